"""Tests for mtad.events.schema: one encoding per event class, strict decoding, and the Lua side held to it.

The round trip and the rejections are pure; the producer tests run the real queue scripts on a real Redis
and decode what they wrote with `decode_entry`, so that a field renamed or mistyped in a Lua script (which
writes the ``message.queued`` JSON itself) or in a caller fails here.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtad.accept import Acceptor
from mtad.events.schema import (
    DELIVERY_STATUSES,
    EVENT_CLASSES,
    SCOPES,
    AnyEvent,
    BadEvent,
    MessageDelivery,
    MessageQueued,
    Received,
    decode_entry,
    delivery_event,
    encode,
    from_dict,
    queued_tail,
    to_dict,
)
from mtad.outbound.held_actions import cancel_one
from mtad.outbound.holds import HOLD_CANCELLED, HoldExpiry
from mtad.queue.events import parse_entry
from mtad.queue.model import Event, NewMessage
from mtad.queue.redis_queue import RedisQueue
from mtad.store.servers import Server, ServerMode
from tests.redis_server import RedisTestCase

NOW = 1_700_000_000.0
hypothesis_settings = settings(deadline=None, max_examples=300, database=None)

SUBJECT = "🎉 Grüße aus Köln"
#: A message as a client submits it: encoded-word subject, Message-ID and tag fields.
MESSAGE = (
    b"From: Sender <sender@example.test>\r\n"
    b"Subject: =?UTF-8?B?8J+OiSBHcsO8w59l?= =?utf-8?q?_aus_K=C3=B6ln?=\r\n"
    b"Message-ID: <unique.1@example.test>\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"X-Postal-Tag: welcome\r\n"
    b"\r\n"
    b"Hello \xf0\x9f\x98\x80\r\n"
)

QUEUED = MessageQueued(
    id=41,
    raw_message_id=40,
    token="AbCdEf123456",
    server_id=7,
    scope="outgoing",
    mail_from="app@example.org",
    rcpt_to="ünïcode@example.com",
    size=2048,
    timestamp=NOW + 0.25,
    pool="main",
    held=True,
    subject="Grüße 👋",
    message_id="m1@example.org",
    tag="welcome",
    received_with_ssl=True,
)
DELIVERY = MessageDelivery(
    message_id=41,
    attempt=2,
    status="SoftFail",
    timestamp=NOW + 60.5,
    details="Message for ünïcode@example.com deferred by mx.example.com (192.0.2.1)",
    code=451,
    output="451 4.7.1 Greylisted, réessayez",
    sent_with_ssl=True,
    log_id="L1",
    time=0.25,
    hold_expiry=NOW + 3600,
    server_id=7,
    token="AbCdEf123456",
    scope="outgoing",
    mail_from="app@example.org",
    rcpt_to="ünïcode@example.com",
    enhanced_code="4.7.1",
    mx="mx.example.com",
    source_ip="192.0.2.9",
    subject="Grüße 👋",
    header_message_id="m1@example.org",
    tag="welcome",
    message_timestamp=NOW,
)
SAMPLES: tuple[AnyEvent, ...] = (QUEUED, DELIVERY)

#: Values of the wrong JSON type for a field of each Python type (None is tested on its own).
WRONG_VALUES: dict[type, tuple[Any, ...]] = {
    str: (7, 7.5, True, [], {}),
    int: ("7", 7.5, True, False, [], {}),
    float: ("7.5", True, False, [], {}),
    bool: (1, 0, 1.0, "true", [], {}),
}


def _field_kinds(cls: type[AnyEvent], field: attrs.Attribute[Any]) -> tuple[tuple[type, ...], bool]:
    """The non-None types a field's annotation allows, and whether it allows None."""
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint) or (hint,)
    return tuple(a for a in args if a is not types.NoneType), types.NoneType in args


_SCALARS: dict[type, st.SearchStrategy[Any]] = {
    str: st.text(),
    int: st.integers(),
    float: st.floats(allow_nan=False, allow_infinity=False),
    bool: st.booleans(),
}


def _field_values(cls: type[AnyEvent], field: attrs.Attribute[Any]) -> st.SearchStrategy[Any]:
    kinds, optional = _field_kinds(cls, field)
    choices = field.metadata.get("choices")
    values = st.sampled_from(sorted(choices)) if choices else st.one_of(*(_SCALARS[k] for k in kinds))
    return st.none() | values if optional else values


def events_of(cls: type[AnyEvent]) -> st.SearchStrategy[AnyEvent]:
    """Any value of ``cls``: every field drawn from its type (any text, None where allowed, choices)."""
    return st.builds(cls, **{f.name: _field_values(cls, f) for f in attrs.fields(cls)})


any_event = st.sampled_from(sorted(EVENT_CLASSES.values(), key=lambda c: c.TYPE)).flatmap(events_of)


def entry(event_type: str, data: Mapping[str, Any], entry_id: str = "1-0") -> Event:
    return Event(id=entry_id, type=event_type, data=data)


def stream_entry(event: AnyEvent, entry_id: str = "5-1") -> Event:
    """``event`` as `mtad.queue.events.EventStream` reads it back from the stream (JSON parsed)."""
    event_type, data = encode(event)
    parsed = parse_entry([entry_id, [b"type", event_type.encode(), b"data", data.encode("utf-8")]])
    assert parsed is not None
    return parsed


class RoundTripTests(SynchronousTestCase):
    @hypothesis_settings
    @given(event=any_event)
    def test_decode_inverts_encode(self, event: AnyEvent) -> None:
        """Every value of every event class decodes from its encoding to an equal value."""
        self.assertEqual(decode_entry(stream_entry(event, "9-3")), Received("9-3", event))

    @hypothesis_settings
    @given(event=any_event)
    def test_encoding_is_compact_sorted_utf8(self, event: AnyEvent) -> None:
        """The data is the class's fields as compact JSON, keys sorted, text unescaped UTF-8."""
        event_type, data = encode(event)
        self.assertEqual(event_type, event.TYPE)
        fields = to_dict(event)
        self.assertEqual(sorted(fields), sorted(f.name for f in attrs.fields(type(event))))
        self.assertEqual(data, json.dumps(fields, ensure_ascii=False, separators=(",", ":"), sort_keys=True))

    @hypothesis_settings
    @given(event=events_of(MessageQueued), ids=st.tuples(st.integers(1, 2**53), st.integers(1, 2**53)))
    def test_queued_tail_completes_with_the_ids(self, event: AnyEvent, ids: tuple[int, int]) -> None:
        """The ids ENQUEUE writes in front of queued_tail make the event's JSON object, with those ids."""
        assert isinstance(event, MessageQueued)
        tail = queued_tail(event)
        data = json.loads(f'{{"id":{ids[0]},"raw_message_id":{ids[1]},' + tail)
        expected = attrs.evolve(event, id=ids[0], raw_message_id=ids[1])
        self.assertEqual(from_dict(MessageQueued, data), expected)
        self.assertEqual(data, to_dict(expected))

    def test_samples_round_trip(self) -> None:
        """The fully populated samples the rejection tests start from decode as they are."""
        for sample in SAMPLES:
            self.assertEqual(decode_entry(stream_entry(sample)).event, sample)

    def test_whole_number_for_float_field(self) -> None:
        """A float field written as a JSON integer (``5``, as non-Python producers write 5.0) is a float."""
        data = {**to_dict(DELIVERY), "timestamp": 1_700_000_000, "time": 0, "hold_expiry": None}
        event = from_dict(MessageDelivery, data)
        assert isinstance(event, MessageDelivery)
        self.assertEqual((event.timestamp, event.time, event.hold_expiry), (1_700_000_000.0, 0.0, None))
        self.assertIs(type(event.timestamp), float)
        self.assertIs(type(event.time), float)

    def test_optional_fields_left_out(self) -> None:
        """An older producer's event without the optional fields decodes, each with its default."""
        queued = from_dict(
            MessageQueued,
            {
                "id": 1,
                "token": "t",
                "server_id": 3,
                "scope": "incoming",
                "mail_from": "",
                "rcpt_to": "a@x.test",
                "size": 10,
                "timestamp": NOW,
            },
        )
        self.assertEqual(
            queued,
            MessageQueued(
                id=1,
                raw_message_id=None,
                token="t",
                server_id=3,
                scope="incoming",
                mail_from="",
                rcpt_to="a@x.test",
                size=10,
                timestamp=NOW,
                pool="",
                held=False,
                subject=None,
                message_id=None,
                tag=None,
                received_with_ssl=False,
            ),
        )
        delivery = from_dict(
            MessageDelivery, {"message_id": 1, "attempt": 1, "status": "Sent", "timestamp": NOW}
        )
        self.assertEqual(delivery, MessageDelivery(message_id=1, attempt=1, status="Sent", timestamp=NOW))
        self.assertEqual(
            {k for k, v in to_dict(delivery).items() if v not in (None, False)},
            {"message_id", "attempt", "status", "timestamp"},
        )

    def test_extra_keys_ignored(self) -> None:
        """A key a newer producer added is ignored by this consumer, not an error."""
        for sample in SAMPLES:
            data = {**to_dict(sample), "added_later": {"nested": [1, 2]}, "zz": None}
            self.assertEqual(decode_entry(entry(sample.TYPE, data)).event, sample)

    def test_required_fields_pinned(self) -> None:
        """The fields without a default are the ones every producer has always written: making another
        one required would make older events in the stream undecodable (parked)."""
        required = {
            cls.TYPE: {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}
            for cls in (MessageQueued, MessageDelivery)
        }
        self.assertEqual(
            required,
            {
                "message.queued": {
                    "id",
                    "token",
                    "server_id",
                    "scope",
                    "mail_from",
                    "rcpt_to",
                    "size",
                    "timestamp",
                },
                "message.delivery": {"message_id", "attempt", "status", "timestamp"},
            },
        )

    def test_type_names(self) -> None:
        """Each class is registered under its TYPE, the name written to the stream's ``type`` field."""
        self.assertIs(EVENT_CLASSES["message.queued"], MessageQueued)
        self.assertIs(EVENT_CLASSES["message.delivery"], MessageDelivery)
        for name, cls in EVENT_CLASSES.items():
            self.assertEqual(cls.TYPE, name)


class RejectionTests(SynchronousTestCase):
    def assert_bad(self, event_type: str, data: Mapping[str, Any], *words: str) -> None:
        with self.assertRaises(BadEvent) as caught:
            decode_entry(entry(event_type, data))
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_wrong_type_for_every_field(self) -> None:
        """Each field refuses every JSON value of another type (a boolean is not a number, a number is
        not text, a whole number is not a bool), naming the field."""
        accepted = []
        for sample in SAMPLES:
            cls = type(sample)
            for field in attrs.fields(cls):
                kinds, _optional = _field_kinds(cls, field)
                wrong = [v for v in WRONG_VALUES[kinds[0]] if not (float in kinds and type(v) is int)]
                for value in wrong:
                    data = {**to_dict(sample), field.name: value}
                    try:
                        decode_entry(entry(sample.TYPE, data))
                    except BadEvent as e:
                        self.assertIn(repr(field.name), str(e))
                    else:
                        accepted.append((sample.TYPE, field.name, value))
        self.assertEqual(accepted, [])

    def test_null_only_where_optional(self) -> None:
        """JSON null is refused for a field whose type does not allow None, and accepted where it does."""
        for sample in SAMPLES:
            cls = type(sample)
            for field in attrs.fields(cls):
                _kinds, optional = _field_kinds(cls, field)
                data = {**to_dict(sample), field.name: None}
                if optional:
                    decoded = decode_entry(entry(sample.TYPE, data)).event
                    self.assertIsNone(getattr(decoded, field.name))
                else:
                    self.assert_bad(sample.TYPE, data, repr(field.name), "null")

    def test_missing_required_field(self) -> None:
        """An event without one of its required fields is refused, naming the field."""
        for sample in SAMPLES:
            for field in attrs.fields(type(sample)):
                if field.default is not attrs.NOTHING:
                    continue
                data = {k: v for k, v in to_dict(sample).items() if k != field.name}
                self.assert_bad(sample.TYPE, data, "missing", repr(field.name))

    def test_unknown_type(self) -> None:
        """An entry of a type no class has (or with no type at all) is refused."""
        self.assert_bad("message.exploded", to_dict(DELIVERY), "unknown event type", "message.exploded")
        self.assert_bad("", to_dict(QUEUED), "unknown event type")
        self.assert_bad("Message.Queued", to_dict(QUEUED), "unknown event type")

    def test_bad_choice(self) -> None:
        """A status or scope outside its list is refused, however close to a known one."""
        for value in ("Delivered", "sent", "SENT", ""):
            self.assertNotIn(value, DELIVERY_STATUSES)
            self.assert_bad(MessageDelivery.TYPE, {**to_dict(DELIVERY), "status": value}, "'status'")
        for value in ("Outgoing", "sideways", ""):
            self.assertNotIn(value, SCOPES)
            self.assert_bad(MessageQueued.TYPE, {**to_dict(QUEUED), "scope": value}, "'scope'")
            self.assert_bad(MessageDelivery.TYPE, {**to_dict(DELIVERY), "scope": value}, "'scope'")

    def test_every_choice_accepted(self) -> None:
        """Every listed status and scope decodes."""
        for status in DELIVERY_STATUSES:
            event = decode_entry(entry(MessageDelivery.TYPE, {**to_dict(DELIVERY), "status": status})).event
            self.assertEqual(event, attrs.evolve(DELIVERY, status=status))
        for scope in SCOPES:
            event = decode_entry(entry(MessageQueued.TYPE, {**to_dict(QUEUED), "scope": scope})).event
            self.assertEqual(event, attrs.evolve(QUEUED, scope=scope))

    def test_data_not_json(self) -> None:
        """A stream entry whose data is not a JSON object (garbage, an array, a number, or no data at all)
        is refused by decode_entry as EventStream reads it."""
        for raw in (b"{not json", b'{"id":1', b"[1,2,3]", b"42", b"null", b"\xff\xfe", b""):
            for event_type in (b"message.queued", b"message.delivery"):
                parsed = parse_entry([b"7-0", [b"type", event_type, b"data", raw]])
                assert parsed is not None
                with self.assertRaises(BadEvent):
                    decode_entry(parsed)
        parsed = parse_entry([b"7-0", [b"type", b"message.queued"]])
        assert parsed is not None
        with self.assertRaises(BadEvent):
            decode_entry(parsed)

    @hypothesis_settings
    @given(event=any_event, data=st.data())
    def test_any_field_retyped_is_refused(self, event: AnyEvent, data: st.DataObject) -> None:
        """Whatever the other values, one field of the wrong type makes the event BadEvent."""
        cls = type(event)
        field = data.draw(st.sampled_from(attrs.fields(cls)))
        kinds, _optional = _field_kinds(cls, field)
        wrong = [v for v in WRONG_VALUES[kinds[0]] if not (float in kinds and type(v) is int)]
        value = data.draw(st.sampled_from(wrong))
        with self.assertRaises(BadEvent):
            decode_entry(entry(cls.TYPE, {**to_dict(event), field.name: value}))


def make_server(**changes: Any) -> Server:
    values: dict[str, Any] = {
        "id": 7,
        "organization_id": 1,
        "organization_permalink": "acme",
        "name": "Main",
        "permalink": "main",
        "mode": ServerMode.LIVE,
        "token": "abc123",
        "suspended": False,
        "suspension_reason": None,
        "send_limit": None,
        "send_limit_period": None,
        "created_at": NOW,
    }
    values.update(changes)
    return Server(**values)


class ProducerTests(RedisTestCase):
    """The Lua scripts that append events write exactly what `decode_entry` reads back."""

    queue: RedisQueue
    clock: Clock

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.clock = Clock()
        self.clock.advance(NOW)

    async def raw_entries(self) -> list[tuple[str, str, bytes]]:
        """Every stream entry as written: id, type, data (the JSON text, undecoded)."""
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        raw = []
        for entry_id, fields in entries:
            values = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
            self.assertEqual(set(values), {b"type", b"data"})
            raw.append((entry_id.decode(), values[b"type"].decode(), values[b"data"]))
        return raw

    async def decoded(self) -> list[AnyEvent]:
        """Every stream entry decoded, after checking its JSON has exactly its class's fields: a key the
        schema does not know would be silently ignored by every consumer."""
        events = []
        for entry_id, event_type, data in await self.raw_entries():
            parsed = parse_entry([entry_id, [b"type", event_type.encode(), b"data", data]])
            assert parsed is not None
            received = decode_entry(parsed)
            self.assertEqual(received.id, entry_id)
            self.assertEqual(json.loads(data), to_dict(received.event))
            events.append(received.event)
        return events

    async def test_enqueue_writes_message_queued(self) -> None:
        """ENQUEUE's message.queued events decode to exactly the MessageQueued of each message: the ids
        it allocates, the shared body's id, non-ASCII text, held, pool, and None where nothing was given."""
        body = "Subject: Grüße\r\n\r\nHallo 👋\r\n".encode()
        messages = [
            NewMessage(
                token="tokA",
                server_id=3,
                scope="outgoing",
                mail_from="app@exämple.org",
                rcpt_to="ä@x.test",
                pool="main",
                fields={"tag": "welcome"},
                event={
                    "subject": 'Grüße 👋 "quoted" \\ back\nslash',
                    "message_id": "m1@exämple.org",
                    "tag": "wélcome",
                    "received_with_ssl": True,
                },
                held=True,
            ),
            NewMessage(
                token="tokB",
                server_id=3,
                scope="outgoing",
                mail_from="app@exämple.org",
                rcpt_to="b@x.test",
                due_at=NOW + 300,
            ),
        ]
        ids = await self.queue.enqueue(body, messages, NOW + 0.125)
        common: dict[str, Any] = {"server_id": 3, "scope": "outgoing", "mail_from": "app@exämple.org"}
        expected = [
            MessageQueued(
                id=ids[0],
                raw_message_id=ids[0],
                token="tokA",
                rcpt_to="ä@x.test",
                size=len(body),
                timestamp=NOW + 0.125,
                pool="main",
                held=True,
                subject='Grüße 👋 "quoted" \\ back\nslash',
                message_id="m1@exämple.org",
                tag="wélcome",
                received_with_ssl=True,
                **common,
            ),
            MessageQueued(
                id=ids[1],
                raw_message_id=ids[0],
                token="tokB",
                rcpt_to="b@x.test",
                size=len(body),
                timestamp=NOW + 0.125,
                pool="",
                held=False,
                subject=None,
                message_id=None,
                tag=None,
                received_with_ssl=False,
                **common,
            ),
        ]
        self.assertEqual(await self.decoded(), expected)
        # The ids come from the script, not from the placeholders the caller encoded.
        self.assertNotIn(0, ids)
        self.assertEqual(ids[1], ids[0] + 1)

    async def test_second_enqueue_has_its_own_raw_message(self) -> None:
        """Each call's events name that call's body (its first message id), not an earlier one."""
        first = await self.queue.enqueue(b"one", [NewMessage("t1", 1, "incoming", "", "a@x.test")], NOW)
        second = await self.queue.enqueue(
            b"second", [NewMessage("t2", 1, "incoming", "", f"{c}@x.test") for c in "bc"], NOW + 1
        )
        events = await self.decoded()
        self.assertEqual(
            [(e.id, e.raw_message_id, e.size) for e in events if isinstance(e, MessageQueued)],
            [(first[0], first[0], 3), (second[0], second[0], 6), (second[1], second[0], 6)],
        )

    async def test_accept_writes_message_queued(self) -> None:
        """Acceptor.accept (the way in of SMTP and the send API) queues events decoding to the message's
        decoded subject, Message-ID, tag and TLS flag."""
        acceptor = Acceptor(self.queue, self.clock, default_pool="main", hostname="mx.mtad.test")
        accepted = await acceptor.accept(
            make_server(),
            "outgoing",
            "sender@example.test",
            ["a@x.test", "b@y.test"],
            MESSAGE,
            received_with_ssl=True,
        )
        expected = [
            MessageQueued(
                id=m.id,
                raw_message_id=accepted[0].id,
                token=m.token,
                server_id=7,
                scope="outgoing",
                mail_from="sender@example.test",
                rcpt_to=m.rcpt_to,
                size=len(MESSAGE),
                timestamp=NOW,
                pool="main",
                held=False,
                subject=SUBJECT,
                message_id="unique.1@example.test",
                tag="welcome",
                received_with_ssl=True,
            )
            for m in accepted
        ]
        self.assertEqual(await self.decoded(), expected)

    async def claim_one(self) -> Any:
        (claimed,) = await self.queue.claim(NOW + 10, 1, 60.0, "deliverer")
        return claimed

    async def test_settle_scripts_write_the_delivery_event(self) -> None:
        """ACK, RETRY and HOLD append the MessageDelivery they are given, every field intact."""
        written = []
        for rcpt, status in (("a@x.test", "SoftFail"), ("b@x.test", "Held"), ("c@x.test", "Sent")):
            (message_id,) = await self.queue.enqueue(
                b"x", [NewMessage("tok", 7, "outgoing", "app@example.org", rcpt)], NOW
            )
            claimed = await self.claim_one()
            event = attrs.evolve(DELIVERY, message_id=message_id, rcpt_to=rcpt, status=status)
            token = claimed.lease_token
            if status == "SoftFail":
                self.assertTrue(await self.queue.retry(message_id, token, NOW + 3600, event))
            elif status == "Held":
                self.assertTrue(await self.queue.hold(message_id, token, NOW + 10, event))
            else:
                self.assertTrue(await self.queue.ack(message_id, token, event))
            written.append(event)
        decoded = await self.decoded()
        self.assertEqual([e for e in decoded if isinstance(e, MessageDelivery)], written)

    async def test_delivery_event_of_claimed_message(self) -> None:
        """delivery_event names the claimed message's envelope, Message-ID field, tag and accept time as
        the queue holds them, and the ACK script writes it as built."""
        (message_id,) = await self.queue.enqueue(
            b"x",
            [
                NewMessage(
                    "tok",
                    7,
                    "incoming",
                    "s@x.test",
                    "ü@x.test",
                    fields={"subject": SUBJECT, "message_id": "m@x.test", "tag": "t"},
                )
            ],
            NOW,
        )
        claimed = await self.claim_one()
        event = delivery_event(claimed, status="Sent", timestamp=NOW + 11, code=250, details="ok")
        self.assertTrue(await self.queue.ack(message_id, claimed.lease_token, event))
        self.assertEqual(
            (await self.decoded())[-1],
            MessageDelivery(
                message_id=message_id,
                attempt=1,
                status="Sent",
                timestamp=NOW + 11,
                code=250,
                details="ok",
                server_id=7,
                token="tok",
                scope="incoming",
                mail_from="s@x.test",
                rcpt_to="ü@x.test",
                subject=SUBJECT,
                header_message_id="m@x.test",
                tag="t",
                message_timestamp=NOW,
            ),
        )

    async def accept_and_hold(self) -> tuple[int, str]:
        """A message accepted through the Acceptor and held as the delivery service holds it."""
        acceptor = Acceptor(self.queue, self.clock, default_pool="main", hostname="mx.mtad.test")
        server = make_server(mode=ServerMode.DEVELOPMENT)
        (accepted,) = await acceptor.accept(server, "outgoing", "s@example.test", ["ü@x.test"], MESSAGE)
        claimed = await self.claim_one()
        held = delivery_event(claimed, status="Held", timestamp=NOW + 10, details="development")
        self.assertTrue(await self.queue.hold(accepted.id, claimed.lease_token, NOW + 10, held))
        return accepted.id, accepted.token

    def hold_cancelled(self, message_id: int, token: str, now: float) -> MessageDelivery:
        return MessageDelivery(
            message_id=message_id,
            attempt=1,
            status="HoldCancelled",
            timestamp=now,
            details=HOLD_CANCELLED,
            server_id=7,
            token=token,
            scope="outgoing",
            mail_from="s@example.test",
            rcpt_to="ü@x.test",
            subject=SUBJECT,
            header_message_id="unique.1@example.test",
            tag="welcome",
            message_timestamp=NOW,
        )

    def subject_only(self, events: list[AnyEvent]) -> list[AnyEvent]:
        """``events`` with the subject the queue cannot give yet set (see `test_delivery_names_subject`)."""
        return [
            attrs.evolve(e, subject=SUBJECT) if isinstance(e, MessageDelivery) and e.subject is None else e
            for e in events
        ]

    async def test_hold_expiry_writes_hold_cancelled(self) -> None:
        """EXPIRE_HELD (the hold expiry sweep) writes each expired message's HoldCancelled event."""
        message_id, token = await self.accept_and_hold()
        now = NOW + 8 * 86400
        self.clock.advance(now - NOW)
        self.assertEqual(await HoldExpiry(self.clock, self.queue, hold_seconds=7 * 86400).sweep(), 1)
        decoded = self.subject_only(await self.decoded())
        self.assertEqual(
            [type(e).__name__ for e in decoded], ["MessageQueued", "MessageDelivery", "MessageDelivery"]
        )
        self.assertEqual(decoded[-1], self.hold_cancelled(message_id, token, now))

    async def test_cancel_held_writes_hold_cancelled(self) -> None:
        """CANCEL_HELD (the operator's cancel) writes the HoldCancelled event of the message."""
        message_id, token = await self.accept_and_hold()
        self.assertTrue(await cancel_one(self.queue, message_id, NOW + 20))
        decoded = self.subject_only(await self.decoded())
        self.assertEqual(decoded[-1], self.hold_cancelled(message_id, token, NOW + 20))

    async def test_delivery_names_subject(self) -> None:
        """A delivery event of a message accepted with a Subject names that subject (webhooks build
        Postal's message object from it, without SQL)."""
        message_id, token = await self.accept_and_hold()
        self.assertTrue(await cancel_one(self.queue, message_id, NOW + 20))
        decoded = await self.decoded()
        self.assertEqual(decoded[-1], self.hold_cancelled(message_id, token, NOW + 20))

"""The accept path against a real Redis: per-recipient messages, one body, parsed headers, holds."""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtad.accept import (
    DEVELOPMENT_MODE_HOLD,
    TOKEN_ALPHABET,
    TOKEN_LENGTH,
    Acceptor,
    ServerSuspended,
    complete_submission,
    header_section,
    headers_authenticated,
    new_token,
    parse_headers,
)
from mtad.events.recorder import parse_queued
from mtad.mail.compose import format_date
from mtad.queue.client import RedisClient
from mtad.queue.events import parse_entry
from mtad.queue.model import Event, RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from mtad.store.messages import Scope
from mtad.store.servers import Server, ServerMode
from tests.redis_server import RedisTestCase, connect, real_reactor

NOW = 1_700_000_000.0
MESSAGE = (
    b"Received: from client.test ([192.0.2.1])\r\n\tby mx.test with ESMTPSA id abc; date\r\n"
    b"From: Sender <sender@example.test>\r\n"
    b"Subject: =?UTF-8?B?8J+OiSBHcsO8w59l?= =?utf-8?q?_aus_K=C3=B6ln?=\r\n"
    b"Message-ID:  <unique.1@example.test> \r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"\r\n"
    b"Hello \xf0\x9f\x98\x80\r\n"
)
#: What Python's smtplib ``send_message`` sends for a bare ``EmailMessage``: no Date, no Message-ID.
BARE = (
    b"Received: from client.test ([192.0.2.1])\r\n\tby mx.test with ESMTPSA id abc; date\r\n"
    b"From: sender@example.test\r\nTo: a@x.test\r\nSubject: bare\r\n\r\nHello\r\n"
)
DATE_FIELD = b"Date: " + format_date(NOW).encode()
MESSAGE_ID_FIELD = rb"Message-ID: <[0-9a-f-]{36}@mx\.mtad\.test>"


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


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class HeaderTests(SynchronousTestCase):
    def test_subject_encoded_words_decoded(self) -> None:
        """RFC 2047 encoded words in Subject come out as Unicode, emoji and umlauts intact."""
        self.assertEqual(parse_headers(MESSAGE).subject, "🎉 Grüße aus Köln")

    def test_subject_raw_utf8(self) -> None:
        """A UTF-8 Subject sent raw (RFC 6532, SMTPUTF8) is decoded as UTF-8."""
        headers = parse_headers("Subject: Grüße 😀\r\n\r\nbody\r\n".encode())
        self.assertEqual(headers.subject, "Grüße 😀")

    def test_folded_subject_unfolded(self) -> None:
        """A Subject folded over several lines, plain or as encoded words, reads as one line."""
        folded = parse_headers(b"Subject: a long\r\n\tsubject line\r\nTo: x@y.test\r\n\r\nbody\r\n")
        self.assertEqual(folded.subject, "a long subject line")
        words = parse_headers(b"Subject: =?utf-8?Q?Gr=C3=BC=C3=9Fe?=\r\n =?utf-8?Q?_aus_K=C3=B6ln?=\r\n\r\n")
        self.assertEqual(words.subject, "Grüße aus Köln")

    def test_message_id_without_angle_brackets(self) -> None:
        """Message-ID is stored without its angle brackets and surrounding space, as Postal stores it."""
        self.assertEqual(parse_headers(MESSAGE).message_id, "unique.1@example.test")

    def test_missing_headers_are_none(self) -> None:
        """A message without Subject, Message-ID or X-Postal-Tag gives None for each, not an error."""
        headers = parse_headers(b"From: a@b.test\r\n\r\nSubject: not a header\r\n")
        self.assertEqual((headers.subject, headers.message_id, headers.tag), (None, None, None))

    def test_tag_is_last_x_postal_tag(self) -> None:
        """The tag is the last X-Postal-Tag field, as Postal takes it."""
        headers = parse_headers(b"X-Postal-Tag: first\r\nX-Postal-Tag:  second \r\n\r\n")
        self.assertEqual(headers.tag, "second")

    def test_only_header_section_parsed(self) -> None:
        """The body is not part of the parsed section, whether lines end in CRLF or bare LF."""
        self.assertEqual(header_section(b"A: 1\r\nB: 2\r\n\r\nC: 3\r\n"), b"A: 1\r\nB: 2\r\n")
        self.assertEqual(header_section(b"A: 1\nB: 2\n\nC: 3\n"), b"A: 1\nB: 2\n")
        self.assertEqual(header_section(b"\r\nA: 1\r\n"), b"")
        self.assertEqual(header_section(b"A: 1\r\n"), b"A: 1\r\n")

    def test_malformed_headers_do_not_raise(self) -> None:
        """Broken encoded words, unbalanced brackets and 8-bit junk give values or None, never an error."""
        headers = parse_headers(
            b"Subject: =?bogus-charset?Q?x?= =?utf-8?B?!!!?= \xff\xfe\r\n"
            b'Message-ID: <<<\r\nTo: "unterminated <x@\r\n\r\n'
        )
        self.assertIsInstance(headers.subject, str)
        self.assertIsNone(headers.message_id)


class CompleteSubmissionTests(SynchronousTestCase):
    def complete(self, message: bytes) -> tuple[bytes, str | None]:
        completed, headers = complete_submission(message, hostname="mx.mtad.test", timestamp=NOW)
        return completed, headers.message_id

    def test_both_added_after_the_header_fields(self) -> None:
        """Missing Date and Message-ID are added at the end of the header section (the trace block stays
        on top), Date the accept time, Message-ID new on the hostname and returned without brackets."""
        completed, message_id = self.complete(BARE)
        head, body = completed.split(b"\r\n\r\n", 1)
        self.assertEqual(body, b"Hello\r\n")
        self.assertTrue(completed.startswith(BARE.split(b"\r\n\r\n")[0] + b"\r\n" + DATE_FIELD + b"\r\n"))
        self.assertRegex(head.split(b"\r\n")[-1], b"^" + MESSAGE_ID_FIELD + b"$")
        assert message_id is not None
        self.assertIn(f"<{message_id}>".encode(), head)
        self.assertEqual(parse_headers(completed).message_id, message_id)
        self.assertNotEqual(self.complete(BARE)[1], message_id)

    def test_only_the_missing_one_added(self) -> None:
        """A message with Message-ID but no Date gets only Date, and the other way round."""
        with_id = BARE.replace(b"Subject: bare\r\n", b"Subject: bare\r\nMessage-ID: <own@x.test>\r\n")
        completed, message_id = self.complete(with_id)
        self.assertEqual(message_id, "own@x.test")
        self.assertEqual(completed, with_id.replace(b"\r\n\r\n", b"\r\n" + DATE_FIELD + b"\r\n\r\n", 1))
        with_date = BARE.replace(
            b"Subject: bare\r\n", b"Subject: bare\r\ndate: Mon, 1 Jan 2024 0:0 +0000\r\n"
        )
        completed, message_id = self.complete(with_date)
        self.assertNotIn(DATE_FIELD, completed)
        self.assertEqual(completed.count(b"ate: "), 1)
        self.assertRegex(completed, MESSAGE_ID_FIELD + b"\r\n\r\nHello\r\n$")

    def test_present_fields_kept_byte_identical(self) -> None:
        """A message with both fields comes back as the very same bytes."""
        completed, message_id = self.complete(MESSAGE)
        self.assertIs(completed, MESSAGE)
        self.assertEqual(message_id, "unique.1@example.test")

    def test_present_but_empty_or_garbled_left_alone(self) -> None:
        """An empty or unparsable Date or Message-ID counts as present: nothing is added or replaced (no
        second field), and the garbled Message-ID records as None."""
        for fields in (b"Date:\r\nMessage-ID:\r\n", b"Date: someday\r\nMessage-ID: <<<\r\n"):
            message = b"From: a@b.test\r\n" + fields + b"\r\nbody\r\n"
            self.assertEqual(self.complete(message), (message, None))

    def test_bare_lf_message(self) -> None:
        """A message with bare LF line ends gets its fields with bare LF too."""
        completed, _ = self.complete(b"From: a@b.test\nSubject: s\n\nline 1\nline 2\n")
        self.assertNotIn(b"\r", completed)
        head, body = completed.split(b"\n\n", 1)
        self.assertEqual(body, b"line 1\nline 2\n")
        lines = head.split(b"\n")
        self.assertEqual(lines[:3], [b"From: a@b.test", b"Subject: s", DATE_FIELD])
        self.assertRegex(lines[3], b"^" + MESSAGE_ID_FIELD + b"$")

    def test_header_only_messages(self) -> None:
        """A message of header fields alone (no blank line, with or without a last line end) gets the
        fields after its own, each on a line of its own."""
        for message in (b"From: a@b.test\r\nSubject: s\r\n", b"From: a@b.test\r\nSubject: s"):
            completed, _ = self.complete(message)
            lines = completed.split(b"\r\n")
            self.assertEqual(lines[:3], [b"From: a@b.test", b"Subject: s", DATE_FIELD])
            self.assertRegex(lines[3], b"^" + MESSAGE_ID_FIELD + b"$")
            self.assertEqual(lines[4:], [b""])

    def test_no_header_section(self) -> None:
        """A message that starts with its blank line, or is empty, gets a header section of the two."""
        completed, _ = self.complete(b"\r\nbody\r\n")
        self.assertRegex(
            completed, b"^" + re.escape(DATE_FIELD) + b"\r\n" + MESSAGE_ID_FIELD + b"\r\n\r\nbody\r\n$"
        )
        completed, _ = self.complete(b"")
        self.assertRegex(completed, b"^" + re.escape(DATE_FIELD) + b"\r\n" + MESSAGE_ID_FIELD + b"\r\n$")


class TokenTests(SynchronousTestCase):
    def test_tokens_use_the_whole_alphabet_everywhere(self) -> None:
        """Every position of a token draws from all 62 characters (a mistake in the base conversion would
        leave a position short of some), and tokens do not repeat."""
        tokens = [new_token() for _ in range(5000)]
        self.assertEqual(len(set(tokens)), len(tokens))
        for position in range(TOKEN_LENGTH):
            self.assertEqual({t[position] for t in tokens}, set(TOKEN_ALPHABET), position)
        self.assertTrue(all(len(t) == TOKEN_LENGTH for t in tokens))


class HeadersAuthenticatedTests(SynchronousTestCase):
    def authenticated(self, message: bytes, allow_sender: bool) -> bool:
        async def allowed(address: str) -> bool:
            return address.endswith("@example.test")

        d = Deferred.fromCoroutine(headers_authenticated(message, allowed, allow_sender=allow_sender))
        result: bool = self.successResultOf(d)
        return result

    def test_every_from_address(self) -> None:
        """Every From address must be allowed; a missing From never is."""
        self.assertTrue(self.authenticated(b"From: A <a@example.test>, b@example.test\r\n\r\n", False))
        self.assertFalse(self.authenticated(b"From: a@example.test, b@foreign.test\r\n\r\n", False))
        self.assertFalse(self.authenticated(b"Subject: no From\r\n\r\n", True))

    def test_sender_only_when_allowed(self) -> None:
        """Sender stands in for a From that is not allowed only with allow_sender, and then every Sender
        address must be allowed."""
        message = b"From: a@foreign.test\r\nSender: s@example.test\r\n\r\nbody\r\n"
        self.assertFalse(self.authenticated(message, False))
        self.assertTrue(self.authenticated(message, True))
        message = b"From: a@foreign.test\r\nSender: s@example.test, t@foreign.test\r\n\r\n"
        self.assertFalse(self.authenticated(message, True))


class AcceptTests(RedisTestCase):
    clock: Clock
    queue: RedisQueue
    acceptor: Acceptor

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = RedisQueue(self.redis, self.keys)
        self.acceptor = Acceptor(
            self.queue, self.clock, default_pool="main", timeout=5.0, hostname="mx.mtad.test"
        )

    async def events(self) -> list[Event]:
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        return [e for e in map(parse_entry, entries) if e is not None]

    async def test_one_body_one_message_per_recipient(self) -> None:
        """Three recipients become three messages (own id and token) sharing one stored body."""
        rcpts = ["a@x.test", "b@x.test", "c@y.test"]
        accepted = await self.acceptor.accept(
            make_server(), "outgoing", "sender@example.test", rcpts, MESSAGE
        )
        self.assertEqual([m.rcpt_to for m in accepted], rcpts)
        self.assertEqual(len({m.id for m in accepted}), 3)
        self.assertEqual(len({m.token for m in accepted}), 3)
        for m in accepted:
            self.assertRegex(m.token, r"^[A-Za-z0-9]{12}$")
        fields = [await self.queue.message_fields(m.id) for m in accepted]
        self.assertEqual(len({f["body"] for f in fields}), 1)
        self.assertEqual(await self.redis.execute("HGET", fields[0]["body"], "data"), MESSAGE)
        self.assertEqual(await self.redis.execute("HGET", fields[0]["body"], "refs"), b"3")
        for m, f in zip(accepted, fields, strict=True):
            self.assertEqual(f["token"], m.token)
            self.assertEqual(f["rcpt_to"], m.rcpt_to)
            self.assertEqual(f["server_id"], "7")
            self.assertEqual(f["scope"], "outgoing")
            self.assertEqual(f["mail_from"], "sender@example.test")
            self.assertEqual(f["pool"], "main")
            self.assertEqual(f["message_id"], "unique.1@example.test")
            self.assertNotIn("hold_reason", f)
            self.assertNotIn("tag", f)
        stats = await self.queue.stats(NOW)
        self.assertEqual((stats.due_now, stats.held), (3, 0))

    async def test_queued_events_feed_the_recorder(self) -> None:
        """Each message has a message.queued event the recorder parses, with decoded subject and size."""
        accepted = await self.acceptor.accept(
            make_server(),
            "outgoing",
            "",
            ["a@x.test", "b@x.test"],
            MESSAGE,
            tag="welcome",
            received_with_ssl=True,
        )
        events = await self.events()
        self.assertEqual([e.type for e in events], ["message.queued"] * 2)
        rows = [parse_queued(e) for e in events]
        self.assertEqual([r.id for r in rows], [m.id for m in accepted])
        self.assertEqual([r.token for r in rows], [m.token for m in accepted])
        for row in rows:
            self.assertEqual(row.subject, "🎉 Grüße aus Köln")
            self.assertEqual(row.message_id, "unique.1@example.test")
            self.assertEqual(row.tag, "welcome")
            self.assertEqual(row.size, len(MESSAGE))
            self.assertTrue(row.received_with_ssl)
            self.assertEqual(row.timestamp, NOW)
            self.assertEqual(row.scope, Scope.OUTGOING)
            self.assertEqual(row.mail_from, "")
        self.assertEqual((await self.queue.message_fields(accepted[0].id))["tag"], "welcome")

    async def test_tag_from_header(self) -> None:
        """Without a tag from the caller, the X-Postal-Tag field tags the message."""
        (m,) = await self.acceptor.accept(
            make_server(), "incoming", "s@x.test", ["a@x.test"], b"X-Postal-Tag: news\r\n\r\nhi\r\n"
        )
        self.assertEqual((await self.queue.message_fields(m.id))["tag"], "news")
        (event,) = await self.events()
        self.assertEqual(event.data["tag"], "news")
        self.assertIsNone(event.data["subject"])
        self.assertIsNone(event.data["message_id"])

    async def test_submission_gets_date_and_message_id(self) -> None:
        """An outgoing message without Date and Message-ID is stored with both, and the added Message-ID
        is the one in the queue entry, the message.queued event and the result."""
        accepted = await self.acceptor.accept(
            make_server(), "outgoing", "s@x.test", ["a@x.test", "b@x.test"], BARE
        )
        fields = await self.queue.message_fields(accepted[0].id)
        stored: bytes = await self.redis.execute("HGET", fields["body"], "data")
        self.assertIn(b"\r\n" + DATE_FIELD + b"\r\n", stored)
        message_id = parse_headers(stored).message_id
        assert message_id is not None
        self.assertRegex(f"<{message_id}>".encode(), MESSAGE_ID_FIELD[len(b"Message-ID: ") :])
        self.assertEqual([m.message_id for m in accepted], [message_id, message_id])
        self.assertEqual(fields["message_id"], message_id)
        events = await self.events()
        self.assertEqual([e.data["message_id"] for e in events], [message_id, message_id])
        self.assertEqual([parse_queued(e).size for e in events], [len(stored)] * 2)

    async def test_incoming_mail_not_completed(self) -> None:
        """Incoming mail is stored as it came, without fields added (RFC 5321 §6.4)."""
        (m,) = await self.acceptor.accept(make_server(), "incoming", "s@x.test", ["a@x.test"], BARE)
        fields = await self.queue.message_fields(m.id)
        self.assertEqual(await self.redis.execute("HGET", fields["body"], "data"), BARE)
        self.assertNotIn("message_id", fields)
        self.assertIsNone(m.message_id)

    async def test_development_mode_sets_hold_reason(self) -> None:
        """A server in development mode queues its messages with Postal's hold reason."""
        server = make_server(mode=ServerMode.DEVELOPMENT)
        (m,) = await self.acceptor.accept(server, "outgoing", "s@x.test", ["a@x.test"], MESSAGE)
        self.assertEqual((await self.queue.message_fields(m.id))["hold_reason"], DEVELOPMENT_MODE_HOLD)
        self.assertEqual(DEVELOPMENT_MODE_HOLD, "Server is in development mode.")

    async def test_caller_hold_reason_wins(self) -> None:
        """A hold reason from the caller (credential hold) is stored, before the development-mode one."""
        server = make_server(mode=ServerMode.DEVELOPMENT)
        (m,) = await self.acceptor.accept(
            server, "outgoing", "s@x.test", ["a@x.test"], MESSAGE, hold_reason="Credential holds"
        )
        self.assertEqual((await self.queue.message_fields(m.id))["hold_reason"], "Credential holds")

    async def test_suspended_server_refused(self) -> None:
        """A suspended server's message raises ServerSuspended and nothing is queued."""
        server = make_server(suspended=True, suspension_reason="abuse")
        with self.assertRaises(ServerSuspended) as raised:
            await self.acceptor.accept(server, "outgoing", "s@x.test", ["a@x.test"], MESSAGE)
        self.assertIn("acme/main", str(raised.exception))
        self.assertEqual(await self.events(), [])

    async def test_no_recipients_refused(self) -> None:
        """An empty recipient list is a programming error, refused before Redis is asked."""
        with self.assertRaises(ValueError):
            await self.acceptor.accept(make_server(), "outgoing", "s@x.test", [], MESSAGE)

    async def test_redis_disconnected_is_unavailable(self) -> None:
        """With the Redis connection gone, accept raises RedisUnavailable at once."""
        client = await connect()
        await client.disconnect()
        acceptor = Acceptor(RedisQueue(client, self.keys), self.clock, timeout=5.0)
        with self.assertRaises(RedisUnavailable):
            await acceptor.accept(make_server(), "outgoing", "s@x.test", ["a@x.test"], MESSAGE)

    async def test_redis_unreachable_times_out(self) -> None:
        """A Redis that never answers makes accept raise RedisUnavailable once ``timeout`` passes."""
        client = RedisClient.from_url(
            real_reactor(), f"redis://127.0.0.1:{closed_port()}", timeout=60.0, clock=self.clock
        )
        self.addCleanup(client.disconnect)
        acceptor = Acceptor(RedisQueue(client, self.keys), self.clock, timeout=5.0)
        result = Deferred.fromCoroutine(
            acceptor.accept(make_server(), "outgoing", "s@x.test", ["a@x.test"], MESSAGE)
        )
        self.assertNoResult(result)
        self.clock.advance(4.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        failure = self.failureResultOf(result, RedisUnavailable)
        self.assertIn("5.0 s", str(failure.value))

"""End to end: `BounceInbox.put` → `BounceProcessor` → event stream → recorder → SQL rows.

Real Redis, real SQLite, the real recorder; the processor's time is a `task.Clock`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater

from mtad.bounces.inbox import BounceInbox, InboxFull
from mtad.bounces.matching import BOUNCED_DETAILS, UNLINKED_DETAILS
from mtad.bounces.processor import ProcessingOutage
from mtad.events.recorder import record_events
from mtad.events.schema import MessageBounced, SpamComplaint, decode_entry, delivery_event
from mtad.queue.events import parse_entry
from mtad.queue.model import NewMessage, QueueError
from mtad.store.messages import MessageStatus, Scope
from tests.bounces import samples
from tests.bounces.support import NOW, SERVER, BounceTestCase
from tests.redis_server import connect


class FailingDatabase:
    """A database whose units of work fail with ``error`` while ``failing`` is set (the SQL is real)."""

    def __init__(self, database: Any, error: Exception) -> None:
        self.database = database
        self.error = error
        self.failing = True
        self.calls = 0

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        if self.failing:
            return fail(self.error)
        result: Deferred[Any] = self.database.run(fn, *args, **kwargs)
        return result


class MatchedBounceTests(BounceTestCase):
    """A DSN to a message's VERP address marks it Bounced, as Postal does, with the DSN's details."""

    async def test_hard_bounce_end_to_end(self) -> None:
        """Original Bounced with a delivery row (type, code), the bounce recorded as an incoming message
        with its raw message, and one message.bounced event naming both messages."""
        original = await self.send()
        raw = samples.dsn(self.verp(original))
        await self.inbox.put(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=raw,
            received_with_ssl=True,
            client_ip="192.0.2.7",
        )
        self.clock.advance(10)
        self.assertEqual(await self.processor().run_once(), 1)
        self.assertEqual(self.parsed_in_thread, 1)
        await self.record()

        message = self.message(original)
        self.assertEqual(message.status, MessageStatus.BOUNCED)
        self.assertFalse(message.bounce)
        [sent, bounced] = self.deliveries(original)
        self.assertEqual((sent.status, bounced.status), (MessageStatus.SENT, MessageStatus.BOUNCED))
        self.assertEqual(bounced.attempt, 2)
        self.assertEqual(bounced.code, 550)
        self.assertIn("User unknown", bounced.output or "")
        bounce_id = original + 1
        self.assertEqual(
            bounced.details,
            BOUNCED_DETAILS.format(id=bounce_id)
            + " Hard bounce (bad_mailbox), status 5.1.1, reported by mailstore.example.com.",
        )

        bounce = self.message(bounce_id)
        self.assertEqual(bounce.scope, Scope.INCOMING)
        self.assertTrue(bounce.bounce)
        self.assertEqual(bounce.bounce_for_id, original)
        self.assertEqual(bounce.status, MessageStatus.PROCESSED)
        self.assertEqual(
            (bounce.server_id, bounce.rcpt_to, bounce.mail_from), (SERVER, self.verp(original), "")
        )
        self.assertEqual(bounce.subject, "Undelivered Mail Returned to Sender")
        self.assertEqual(bounce.message_id, "dsn-1@mx.example.com")
        self.assertTrue(bounce.received_with_ssl)
        self.assertEqual(bounce.raw_message_id, bounce_id)
        self.assertEqual(self.raw(bounce_id), raw)
        [processed] = self.deliveries(bounce_id)
        self.assertEqual(
            processed.details, f"This has been detected as a bounce message for <msg:{original}>."
        )

        [event] = await self.events(MessageBounced.TYPE)
        self.assertEqual(
            {k: event[k] for k in ("message_id", "server_id", "rcpt_to", "bounce_id", "hard", "category")},
            {
                "message_id": original,
                "server_id": SERVER,
                "rcpt_to": "user@example.com",
                "bounce_id": bounce_id,
                "hard": True,
                "category": "bad_mailbox",
            },
        )
        self.assertEqual(event["status"], "5.1.1")
        self.assertEqual(event["remote_mta"], "mailstore.example.com")
        self.assertEqual(event["token"], "tokuser")
        self.assertEqual(event["bounce_token"], bounce.token)
        # Nothing is left in the inbox, and the body went with the recorder's archive.
        self.assertEqual(await self.inbox_keys(), [])
        self.assertEqual(await self.redis.execute("EXISTS", self.keys.body(bounce_id)), 0)

    async def test_reputation_block_is_not_about_the_recipient(self) -> None:
        """A block-list refusal is hard, but in category policy_block: it says nothing of the address."""
        original = await self.send()
        raw = samples.dsn(
            self.verp(original),
            status="5.7.1",
            diagnostic="smtp; 550 5.7.1 Service unavailable; client [192.0.2.1] blocked using "
            "zen.spamhaus.org",
        )
        await self.inbox.put(
            mail_from="", rcpt_to=[self.verp(original)], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        [event] = await self.events(MessageBounced.TYPE)
        self.assertEqual(
            (event["hard"], event["category"], event["rule"]), (True, "policy_block", "block-list")
        )

    async def test_soft_bounce(self) -> None:
        """A DSN that failed with a 4.x.x status (retries ran out) is a soft bounce."""
        original = await self.send()
        raw = samples.dsn(self.verp(original), status="4.4.7", diagnostic="smtp; 451 4.4.7 Message expired")
        await self.inbox.put(
            mail_from="", rcpt_to=[self.verp(original)], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        [event] = await self.events(MessageBounced.TYPE)
        self.assertFalse(event["hard"])
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)

    async def test_delay_notice_marks_nothing(self) -> None:
        """A "delayed" DSN is linked to the message but neither bounces it nor raises an event."""
        original = await self.send()
        raw = samples.dsn(
            self.verp(original), action="delayed", status="4.4.1", diagnostic="smtp; 451 4.4.1 later"
        )
        await self.inbox.put(
            mail_from="", rcpt_to=[self.verp(original)], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.SENT)
        self.assertEqual(await self.events(MessageBounced.TYPE), [])
        self.assertEqual(self.message(original + 1).bounce_for_id, original)

    async def test_postal_msgid_fallback(self) -> None:
        """Without a VERP address, the X-Postal-MsgID token the bounce quotes finds the message."""
        original = await self.send(token="AbC123xyZ789")
        raw = samples.dsn("srvtok@rp.mtad.test", quoted_extra="X-Postal-MsgID: AbC123xyZ789\r\n")
        await self.inbox.put(
            mail_from="", rcpt_to=["srvtok@rp.mtad.test"], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)
        self.assertEqual(self.message(original + 1).bounce_for_id, original)
        [event] = await self.events(MessageBounced.TYPE)
        self.assertEqual(event["message_id"], original)

    async def test_verp_wins_over_quoted_tokens(self) -> None:
        """With a VERP address, a token quoted in the body (another message) is not looked at."""
        original = await self.send("a@example.com")
        other = await self.send("b@example.com", token="OtherToken99")
        raw = samples.dsn(
            self.verp(original), rcpt="a@example.com", quoted_extra="X-Postal-MsgID: OtherToken99\r\n"
        )
        await self.inbox.put(
            mail_from="", rcpt_to=[self.verp(original)], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)
        self.assertEqual(self.message(other).status, MessageStatus.SENT)

    async def test_verp_survives_case_folding(self) -> None:
        """A return path an MTA upper-cased still finds its message."""
        original = await self.send()
        address = self.verp(original).upper()
        await self.inbox.put(
            mail_from="", rcpt_to=[address], data=samples.dsn(address), received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)


class ComplaintAndReplyTests(BounceTestCase):
    """Feedback reports and auto-replies are recognised for what they are."""

    async def test_arf_complaint(self) -> None:
        """An ARF report quoting our envelope sender is a complaint about that message: a
        message.complaint event, the report linked to it; the message's status stays."""
        original = await self.send()
        raw = samples.arf("fbl@rp.mtad.test", self.verp(original))
        await self.inbox.put(
            mail_from="", rcpt_to=["fbl@rp.mtad.test"], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        [event] = await self.events(SpamComplaint.TYPE)
        self.assertEqual(
            {k: event[k] for k in ("message_id", "server_id", "rcpt_to", "feedback_type", "bounce_id")},
            {
                "message_id": original,
                "server_id": SERVER,
                "rcpt_to": "user@example.com",
                "feedback_type": "abuse",
                "bounce_id": original + 1,
            },
        )
        self.assertEqual(event["source_ip"], "192.0.2.10")
        self.assertEqual(self.message(original).status, MessageStatus.SENT)
        report = self.message(original + 1)
        self.assertTrue(report.bounce)
        self.assertEqual(report.bounce_for_id, original)
        self.assertEqual(await self.events(MessageBounced.TYPE), [])

    async def test_auto_reply_is_not_a_bounce(self) -> None:
        """An out-of-office reply to a VERP address is recorded for its server; nothing marked, no event."""
        original = await self.send()
        address = self.verp(original)
        await self.inbox.put(
            mail_from="user@example.com",
            rcpt_to=[address],
            data=samples.auto_reply(address),
            received_with_ssl=False,
            client_ip="x",
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.SENT)
        reply = self.message(original + 1)
        self.assertEqual((reply.server_id, reply.bounce, reply.bounce_for_id), (SERVER, False, None))
        self.assertEqual(reply.status, MessageStatus.PROCESSED)
        self.assertEqual(reply.subject, "Out of Office: Welcome")
        self.assertEqual(await self.events(MessageBounced.TYPE), [])
        self.assertEqual(await self.events(SpamComplaint.TYPE), [])


class BadInputTests(BounceTestCase):
    """Whatever arrives is recorded; only a genuine report about one of our messages marks anything."""

    async def test_garbage_mime(self) -> None:
        """A broken multipart from MAILER-DAEMON is still a (soft, unknown) bounce of its VERP message."""
        original = await self.send()
        address = self.verp(original)
        raw = (
            b"From: MAILER-DAEMON@mx.example.com\r\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="\xff\x00"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            b"--\xff\x00\r\nContent-Type: message/delivery-status\r\n\r\n\x00\x01\x02=?utf-8?q?=ZZ?=\r\n"
            + bytes(range(256))
            * 20
        )
        await self.inbox.put(
            mail_from="", rcpt_to=[address], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)
        [event] = await self.events(MessageBounced.TYPE)
        self.assertEqual((event["hard"], event["category"]), (False, "unknown"))
        self.assertEqual(self.raw(original + 1), raw)

    async def test_binary_noise(self) -> None:
        """Random octets to the return path are recorded as an incoming message and mark nothing."""
        original = await self.send()
        address = self.verp(original)
        raw = bytes((i * 37 + 11) % 256 for i in range(5000))
        await self.inbox.put(
            mail_from="x@y", rcpt_to=[address], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.SENT)
        noise = self.message(original + 1)
        self.assertEqual(
            (noise.bounce, noise.bounce_for_id, noise.status), (False, None, MessageStatus.PROCESSED)
        )
        self.assertEqual(self.raw(original + 1), raw)

    async def test_eight_bit_headers(self) -> None:
        """Raw UTF-8 and Latin-1 octets in the header section neither stop the DSN nor its recording."""
        original = await self.send()
        address = self.verp(original)
        raw = samples.dsn(address, subject="Unzustellbar: Grüße").replace(
            b"From: MAILER-DAEMON@mx.example.com (Mail Delivery System)",
            b"From: MAILER-DAEMON@mx.example.com (Syst\xe8me de livraison \xf0\x9f\x93\xa8)",
        )
        await self.inbox.put(
            mail_from="", rcpt_to=[address], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)
        self.assertEqual(self.message(original + 1).subject, "Unzustellbar: Grüße")

    async def test_forged_verp_address(self) -> None:
        """A return path with a wrong signature, or for another server, matches nothing: recorded for no
        server with Postal's "couldn't link" HardFail, nothing marked, no event."""
        original = await self.send()
        good = self.verp(original)
        local, _, domain = good.partition("@")
        forged = f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{domain}"
        other_server = self.verp(original, server_id=SERVER + 1)
        for address in (forged, other_server):
            await self.inbox.put(
                mail_from="",
                rcpt_to=[address],
                data=samples.dsn(address),
                received_with_ssl=False,
                client_ip="x",
            )
        processor = self.processor(original_wait=0)
        self.assertEqual(await processor.run_once(), 2)
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.SENT)
        self.assertEqual(await self.events(MessageBounced.TYPE), [])
        forged_row = self.message(original + 1)
        self.assertEqual((forged_row.server_id, forged_row.bounce, forged_row.bounce_for_id), (0, True, None))
        self.assertEqual(forged_row.status, MessageStatus.HARD_FAIL)
        self.assertEqual(self.deliveries(original + 1)[0].details, UNLINKED_DETAILS)
        # Signed for server 4, which has no such message: recorded for that server, unlinked.
        self.assertEqual(self.message(original + 2).server_id, SERVER + 1)
        self.assertIsNone(self.message(original + 2).bounce_for_id)

    async def test_unknown_token(self) -> None:
        """A quoted X-Postal-MsgID of no message of ours marks nothing."""
        original = await self.send()
        raw = samples.dsn("srv@rp.mtad.test", quoted_extra="X-Postal-MsgID: NoSuchToken1\r\n")
        await self.inbox.put(
            mail_from="", rcpt_to=["srv@rp.mtad.test"], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.SENT)
        self.assertEqual(self.message(original + 1).server_id, 0)
        self.assertEqual(await self.events(MessageBounced.TYPE), [])

    async def test_bounce_for_a_bounce(self) -> None:
        """A DSN about a message that is itself a bounce marks nothing (RFC 3464 §2: no DSN about a DSN)."""
        self.record_bounce_message(900, "BounceToken1")
        raw = samples.dsn(
            "srv@rp.mtad.test", rcpt="sender@example.net", quoted_extra="X-Postal-MsgID: BounceToken1\r\n"
        )
        entry_id = await self.inbox.add(
            mail_from="", rcpt_to=["srv@rp.mtad.test"], data=raw, received_with_ssl=False, client_ip="x"
        )
        await self.processor().run_once()
        await self.record()
        self.assertEqual(self.message(900).status, MessageStatus.PENDING)
        self.assertEqual(self.deliveries(900), [])
        self.assertEqual(await self.events(MessageBounced.TYPE), [])
        report = self.message(entry_id)
        self.assertEqual((report.bounce, report.bounce_for_id, report.server_id), (True, None, SERVER))
        self.assertIn("itself a bounce", self.deliveries(entry_id)[0].details or "")


class DurabilityTests(BounceTestCase):
    """Nothing accepted is lost and nothing is recorded twice, wherever a processor stops."""

    async def test_put_is_stored_before_it_returns(self) -> None:
        """When put returns, the message is in Redis with its envelope; a full inbox refuses more."""
        await self.inbox.put(
            mail_from="", rcpt_to=["a@rp.mtad.test"], data=b"x", received_with_ssl=False, client_ip="x"
        )
        self.assertEqual(await self.inbox.pending(), 1)
        self.inbox.max_entries = 1
        with self.assertRaises(InboxFull):
            await self.inbox.put(
                mail_from="", rcpt_to=["a@rp.mtad.test"], data=b"x", received_with_ssl=False, client_ip="x"
            )

    async def test_put_raises_when_redis_is_gone(self) -> None:
        """With Redis unreachable, put raises (the SMTP server answers 451), it never pretends."""
        client = await connect()
        await client.disconnect()
        with self.assertRaises(QueueError):
            await BounceInbox(client, self.clock, self.keys).put(
                mail_from="", rcpt_to=["a@rp.mtad.test"], data=b"x", received_with_ssl=False, client_ip="x"
            )

    async def test_processor_dies_after_claim(self) -> None:
        """A processor that dies holding an entry (claimed, nothing written) leaves it to the next one once
        the lease expires: one bounce recorded, once."""
        original = await self.send()
        await self.inbox.put(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=samples.dsn(self.verp(original)),
            received_with_ssl=False,
            client_ip="x",
        )
        [claimed] = await self.inbox.claim(self.clock.seconds(), 10, 600)  # ... and then it died
        self.assertEqual(await self.processor().run_once(), 0)  # still leased
        self.clock.advance(601)
        self.assertEqual(await self.processor().run_once(), 1)
        # The dead processor's lease is stale: finishing now changes nothing.
        self.assertFalse(await self.inbox.finish(claimed, SERVER, [], self.clock.seconds()))
        await self.record()
        await self.record()
        self.assertEqual(len(await self.events(MessageBounced.TYPE)), 1)
        self.assertEqual(len(self.deliveries(original)), 2)
        self.assertEqual(len(self.deliveries(original + 1)), 1)

    async def test_slow_processor_overtaken(self) -> None:
        """A processor whose lease expired mid-parse finds the entry settled by another: no second set of
        events."""
        original = await self.send()
        await self.inbox.put(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=samples.dsn(self.verp(original)),
            received_with_ssl=False,
            client_ip="x",
        )
        gate: Deferred[None] = Deferred()
        slow = self.processor()
        real_in_thread = self.in_thread

        async def stuck(fn: Any) -> Any:
            await gate
            return await real_in_thread(fn)

        slow._in_thread = stuck
        first = Deferred.fromCoroutine(slow.run_once())
        self.clock.advance(601)
        self.assertEqual(await self.processor().run_once(), 1)
        gate.callback(None)
        self.assertEqual(await first, 1)
        self.assertEqual(slow.processed, 0)
        await self.record()
        self.assertEqual(len(await self.events(MessageBounced.TYPE)), 1)
        self.assertEqual(len(self.deliveries(original)), 2)

    async def test_events_replayed_to_the_recorder(self) -> None:
        """The recorder reading the same events again (it died before acknowledging) adds no rows."""
        original = await self.send()
        await self.inbox.put(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=samples.dsn(self.verp(original)),
            received_with_ssl=False,
            client_ip="x",
        )
        await self.processor().run_once()
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        decoded = [decode_entry(e) for e in (parse_entry(raw) for raw in entries) if e is not None]
        for _ in range(2):
            self.transaction(record_events, decoded, NOW)
        await self.record()
        self.assertEqual(len(self.deliveries(original)), 2)
        self.assertEqual(len(self.deliveries(original + 1)), 1)
        with self.engine.connect() as conn:
            self.assertEqual(conn.execute(sa.text("SELECT COUNT(*) FROM messages")).scalar_one(), 2)

    async def test_waits_for_the_original_to_be_recorded(self) -> None:
        """A bounce overtaking the recording of its message waits for it, uncounted, then marks it."""
        queued = NewMessage(
            token="tokwait",
            server_id=SERVER,
            scope="outgoing",
            mail_from="app@example.org",
            rcpt_to="user@example.com",
        )
        [message_id] = await self.queue.enqueue(b"x", [queued], NOW)
        [claimed] = await self.queue.claim(NOW, 10, 300, "worker")
        sent = delivery_event(claimed, status="Sent", timestamp=NOW, details="ok", code=250)
        self.assertTrue(await self.queue.ack(claimed.id, claimed.lease_token, sent))
        address = self.verp(message_id)
        entry_id = await self.inbox.add(
            mail_from="", rcpt_to=[address], data=samples.dsn(address), received_with_ssl=False, client_ip="x"
        )
        processor = self.processor(wait_interval=30, original_wait=900)
        self.assertEqual(await processor.run_once(), 1)
        self.assertEqual(await self.events(MessageBounced.TYPE), [])
        self.assertEqual(await self.redis.execute("HGET", self.inbox.entry_key(entry_id), "claims"), b"0")
        self.assertEqual(await processor.run_once(), 0)  # not due yet
        await self.record()  # the recorder catches up
        self.clock.advance(30)
        self.assertEqual(await processor.run_once(), 1)
        await self.record()
        self.assertEqual(self.message(message_id).status, MessageStatus.BOUNCED)

    async def test_waits_for_the_delivery_to_be_recorded(self) -> None:
        """A bounce that overtakes the recording of its message's Sent attempt (seen in CI: the remote
        server's DSN came before the delivery's result was recorded) waits for it, the wait doubling from
        one second; marked before it, the message would turn Sent again. The Bounced attempt is never older
        than the Sent one, even when the sending machine's clock is ahead."""
        queued = NewMessage(
            token="tokrace",
            server_id=SERVER,
            scope="outgoing",
            mail_from="app@example.org",
            rcpt_to="user@example.com",
        )
        [message_id] = await self.queue.enqueue(b"x", [queued], NOW)
        await self.record()
        self.assertEqual(self.message(message_id).status, MessageStatus.PENDING)
        [claimed] = await self.queue.claim(NOW, 10, 300, "worker")
        address = self.verp(message_id)
        await self.inbox.add(
            mail_from="", rcpt_to=[address], data=samples.dsn(address), received_with_ssl=False, client_ip="x"
        )
        processor = self.processor()
        self.assertEqual(await processor.run_once(), 1)
        waits = []
        for _ in range(3):
            before = self.clock.seconds()
            while not await processor.run_once():
                self.clock.advance(0.5)
            waits.append(self.clock.seconds() - before)
            self.assertEqual(await self.events(MessageBounced.TYPE), [])
        self.assertEqual(waits, [1.0, 1.0, 2.0])
        # The delivery's result comes, stamped by a machine whose clock runs an hour ahead.
        sent = delivery_event(claimed, status="Sent", timestamp=NOW + 3600, details="ok", code=250)
        self.assertTrue(await self.queue.ack(claimed.id, claimed.lease_token, sent))
        await self.record()
        self.clock.advance(60)
        self.assertEqual(await processor.run_once(), 1)
        await self.record()
        self.assertEqual(self.message(message_id).status, MessageStatus.BOUNCED)
        statuses = [(d.attempt, d.status) for d in self.deliveries(message_id)]
        self.assertEqual(statuses, [(1, MessageStatus.SENT), (2, MessageStatus.BOUNCED)])

    async def test_poison_does_not_block_and_is_recorded_in_the_end(self) -> None:
        """An entry that fails every time goes to the back (the next is processed) and after max_claims
        is recorded unread with an Error delivery."""
        original = await self.send()
        await self.inbox.put(
            mail_from="poison@example.net",
            rcpt_to=["p@rp.mtad.test"],
            data=b"poison",
            received_with_ssl=False,
            client_ip="x",
        )
        self.clock.advance(1)
        await self.inbox.put(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=samples.dsn(self.verp(original)),
            received_with_ssl=False,
            client_ip="x",
        )

        class Boom(Exception):
            pass

        def in_thread(fn: Any) -> Deferred[Any]:
            # The poison's reading blows up (as a parser bug would); the good one's does not.
            result = fn()
            if result.report.reason == "no sign of a bounce":
                return fail(Boom("parser bug"))
            return Deferred.fromCoroutine(_value(result))

        processor = self.processor(retry_delay=10, max_retry_delay=10, max_claims=3)
        processor._in_thread = in_thread
        self.assertEqual(await processor.run_once(), 2)
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        for _ in range(3):
            self.clock.advance(10)
            self.assertEqual(await processor.run_once(), 1)
        self.flushLoggedErrors(Boom)
        await self.record()
        poison_id = original + 1
        poison = self.message(poison_id)
        self.assertEqual((poison.status, poison.server_id), (MessageStatus.ERROR, 0))
        self.assertIn("parser bug", self.deliveries(poison_id)[0].details or "")
        self.assertEqual(self.raw(poison_id), b"poison")
        self.assertEqual(processor.given_up, 1)
        self.assertEqual(await self.inbox.pending(), 0)

    async def test_outage_gives_entries_back_uncounted(self) -> None:
        """With the database down, the entry goes back without counting as a try, and run_once raises
        for the loop to back off; once it is back, the bounce is processed."""
        original = await self.send()
        entry_id = await self.inbox.add(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=samples.dsn(self.verp(original)),
            received_with_ssl=False,
            client_ip="x",
        )
        database = FailingDatabase(self.database, sa.exc.OperationalError("SELECT", {}, Exception("gone")))
        processor = self.processor(database=database)
        with self.assertRaises(ProcessingOutage):
            await processor.run_once()
        self.assertEqual(await self.redis.execute("HGET", self.inbox.entry_key(entry_id), "claims"), b"0")
        self.assertEqual(await self.inbox.pending(), 1)
        database.failing = False
        self.assertEqual(await processor.run_once(), 1)
        await self.record()
        self.assertEqual(self.message(original).status, MessageStatus.BOUNCED)

    async def test_service_loop(self) -> None:
        """Started as a service, the processor works through the inbox on its clock and stops cleanly."""
        original = await self.send()
        processor = self.processor(poll_interval=5)
        processor.startService()
        await self.inbox.put(
            mail_from="",
            rcpt_to=[self.verp(original)],
            data=samples.dsn(self.verp(original)),
            received_with_ssl=False,
            client_ip="x",
        )
        for _ in range(200):
            self.clock.advance(5)
            await _pause()
            if processor.processed:
                break
        await processor.stopService()
        self.assertEqual(processor.processed, 1)


class StopTests(BounceTestCase):
    """Stopping the processor."""

    async def test_stop_gives_back_the_rest_of_the_batch(self) -> None:
        """Stopped mid-batch, the processor settles the entry in hand and gives the others back at once,
        uncounted, rather than leaving them leased."""
        original = await self.send()
        address = self.verp(original)
        first = await self.inbox.add(
            mail_from="", rcpt_to=[address], data=samples.dsn(address), received_with_ssl=False, client_ip="x"
        )
        second = await self.inbox.add(
            mail_from="", rcpt_to=[address], data=samples.dsn(address), received_with_ssl=False, client_ip="x"
        )
        gate: Deferred[None] = Deferred()
        processor = self.processor()
        real_in_thread = self.in_thread

        async def gated(fn: Any) -> Any:
            await gate
            return await real_in_thread(fn)

        processor._in_thread = gated
        processor.startService()
        for _ in range(200):
            if await self.redis.execute("ZCARD", self.keys.bounces_leased) == 2:
                break
            await _pause()
        stopped = processor.stopService()
        gate.callback(None)
        await stopped
        self.assertEqual(processor.processed, 1)
        self.assertEqual(await self.redis.execute("EXISTS", self.inbox.entry_key(first)), 0)
        self.assertEqual(await self.redis.execute("ZCARD", self.keys.bounces_leased), 0)
        self.assertEqual(await self.redis.execute("HGET", self.inbox.entry_key(second), "claims"), b"0")
        self.assertEqual(await self.inbox.pending(), 1)


async def _value(value: Any) -> Any:
    return value


async def _pause() -> None:
    await deferLater(reactor, 0.01, lambda: None)

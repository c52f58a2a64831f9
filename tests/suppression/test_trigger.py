"""The ``suppression`` consumer group's handler against a real Redis and SQLite: what adds an address
to the list (hard bounces in the bad-mailbox category, soft failures in a row, bounce messages,
complaints) and what never does (reputation and content refusals, failures without a reply)."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.task import Clock

from mtad.config import SuppressionConfig
from mtad.events.consumer import StreamConsumer
from mtad.events.schema import (
    MessageBounced,
    MessageDelivery,
    Received,
    SpamComplaint,
    decode_entry,
    encode,
)
from mtad.queue.events import EventStream
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store import suppressions as sup
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.suppressions import SuppressionSource
from mtad.suppression.trigger import GROUP, SuppressionTrigger
from tests.redis_server import RedisTestCase
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0
DAY = 86400.0
SETTINGS = SuppressionConfig(expiry_days=30, soft_fail_threshold=5, complaint_expiry_days=0)


class TriggerTestCase(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        with self.engine.begin() as conn:
            os_.create_organization(conn, "Acme", NOW)
            self.server = ss.create_server(conn, "acme", "Main", NOW)
            self.other = ss.create_server(conn, "acme", "Other", NOW)
        self.clock = Clock()
        self.clock.advance(NOW + 3600)
        self.trigger = self.make_trigger()
        self._ids = itertools.count(1)

    def make_trigger(self, **kwargs: Any) -> SuppressionTrigger:
        return SuppressionTrigger(
            SynchronousDatabase(self.engine),
            self.redis,
            self.keys,
            self.clock,
            kwargs.pop("settings", SETTINGS),
            **kwargs,
        )

    def delivery(
        self,
        status: str,
        code: int | None,
        output: str | None,
        rcpt_to: str = "bob@example.test",
        at: float = NOW,
        **fields: Any,
    ) -> Received:
        """A ``message.delivery`` event of the main server, with a new stream id."""
        number = next(self._ids)
        values: dict[str, Any] = {
            "message_id": number,
            "attempt": 1,
            "status": status,
            "timestamp": at,
            "code": code,
            "output": output,
            "details": f"{status} details",
            "server_id": self.server.id,
            "scope": "outgoing",
            "rcpt_to": rcpt_to,
            "mail_from": "app@mtad.test",
        }
        values.update(fields)
        return Received(f"{int(at * 1000)}-{number}", MessageDelivery(**values))

    def soft(self, **fields: Any) -> Received:
        return self.delivery("SoftFail", 452, "452 4.2.2 Mailbox full", **fields)

    def sent(self, **fields: Any) -> Received:
        return self.delivery("Sent", 250, "250 2.0.0 OK", **fields)

    def listed(
        self, address: str = "bob@example.test", server: ss.Server | None = None
    ) -> sup.Suppression | None:
        with self.engine.begin() as conn:
            return sup.find_suppression(conn, (server or self.server).id, address)

    async def count(self, address: str = "bob@example.test") -> int:
        found: int = await self.redis.execute("SCARD", self.keys.soft_failures(self.server.id, address))
        return found


class HardBounceTests(TriggerTestCase):
    async def test_bad_mailbox_suppresses(self) -> None:
        """A HardFail whose reply says the mailbox does not exist suppresses the recipient (lower-cased)
        as HardBounce with the reply, its message and an expiry of expiry_days from the event's time."""
        event = self.delivery(
            "HardFail", 550, "550 5.1.1 <Bob@Example.test>: No such user", rcpt_to="Bob@Example.TEST"
        )
        await self.trigger.handle([event])
        entry = self.listed()
        assert entry is not None
        self.assertEqual(
            (entry.source, entry.reason, entry.message_id, entry.created_at, entry.expires_at),
            (
                SuppressionSource.HARD_BOUNCE,
                "550 5.1.1 <Bob@Example.test>: No such user",
                event.event.message_id,  # type: ignore[union-attr]
                NOW,
                NOW + 30 * DAY,
            ),
        )
        self.assertIsNone(self.listed(server=self.other))

    async def test_reputation_and_content_blocks_never_suppress(self) -> None:
        """A reputation or block-list refusal, a spam-content refusal, a failure mtad made up itself (no
        reply) and our own suppression's HardFail leave a good recipient alone."""
        await self.trigger.handle(
            [
                self.delivery(
                    "HardFail", 550, "550 5.7.1 Service unavailable; blocked using zen.spamhaus.org"
                ),
                self.delivery(
                    "HardFail",
                    554,
                    "554 5.7.1 Our system has detected that this message is likely unsolicited mail",
                ),
                self.delivery("HardFail", 550, "550 5.7.1 low reputation of the sending IP"),
                self.delivery("HardFail", None, None, details="No MX or A record for example.test"),
                self.delivery(
                    "HardFail",
                    None,
                    None,
                    details="Recipient (bob@example.test) is on the suppression list (source: Manual) ...",
                ),
            ]
        )
        self.assertIsNone(self.listed())

    async def test_incoming_mail_never_suppresses(self) -> None:
        """A failure delivering incoming mail (to our own endpoints) suppresses nothing."""
        await self.trigger.handle(
            [self.delivery("HardFail", 550, "550 5.1.1 No such user", scope="incoming")]
        )
        self.assertIsNone(self.listed())

    async def test_bounce_message_suppresses(self) -> None:
        """A hard bounce message in the bad-mailbox category suppresses as HardBounce with its status and
        diagnostic; a soft one, or a hard one about our reputation, does not."""
        await self.trigger.handle(
            [
                Received("1-1", self.bounce("good@example.test", hard=True, category="policy_block")),
                Received("1-2", self.bounce("later@example.test", hard=False, category="bad_mailbox")),
                Received("1-3", self.bounce("bob@example.test", hard=True, category="bad_mailbox")),
            ]
        )
        entry = self.listed()
        assert entry is not None
        self.assertEqual(
            (entry.source, entry.reason, entry.message_id, entry.expires_at),
            (SuppressionSource.HARD_BOUNCE, "bounce: 5.1.1 smtp; 550 5.1.1 user unknown", 9, NOW + 30 * DAY),
        )
        self.assertIsNone(self.listed("good@example.test"))
        self.assertIsNone(self.listed("later@example.test"))

    def bounce(self, rcpt_to: str, *, hard: bool, category: str) -> MessageBounced:
        return MessageBounced(
            message_id=9,
            server_id=self.server.id,
            rcpt_to=rcpt_to,
            bounce_id=10,
            hard=hard,
            category=category,
            status="5.1.1",
            diagnostic="smtp; 550 5.1.1 user unknown",
            remote_mta="mx.example.test",
            timestamp=NOW,
        )


class ComplaintTests(TriggerTestCase):
    async def test_complaint_suppresses_without_expiry(self) -> None:
        """A spam complaint suppresses as Complaint, never expiring by default; with
        complaint_expiry_days set, it expires after that many days."""
        complaint = SpamComplaint(
            message_id=3,
            server_id=self.server.id,
            rcpt_to="Bob@example.test",
            feedback_type="abuse",
            bounce_id=4,
            timestamp=NOW,
        )
        await self.trigger.handle([Received("1-1", complaint)])
        entry = self.listed()
        assert entry is not None
        self.assertEqual(
            (entry.source, entry.reason, entry.message_id, entry.expires_at),
            (SuppressionSource.COMPLAINT, "spam complaint (feedback type abuse)", 3, None),
        )
        expiring = self.make_trigger(settings=SuppressionConfig(complaint_expiry_days=90))
        other = SpamComplaint(
            message_id=5,
            server_id=self.other.id,
            rcpt_to="bob@example.test",
            feedback_type="",
            bounce_id=6,
            timestamp=NOW,
        )
        await expiring.handle([Received("1-2", other)])
        entry = self.listed(server=self.other)
        assert entry is not None
        self.assertEqual((entry.reason, entry.expires_at), ("spam complaint", NOW + 90 * DAY))


class SoftFailureTests(TriggerTestCase):
    async def test_five_in_a_row_suppress(self) -> None:
        """Five soft failures in a row (over several batches) suppress as SoftFailures, dated by the
        fifth, with the count and its reply; four do not; the count is cleared once suppressed."""
        await self.trigger.handle([self.soft(at=NOW + i) for i in range(3)])
        await self.trigger.handle([self.soft(at=NOW + 3)])
        self.assertIsNone(self.listed())
        self.assertEqual(await self.count(), 4)
        fifth = self.soft(at=NOW + 4)
        await self.trigger.handle([fifth])
        entry = self.listed()
        assert entry is not None
        self.assertEqual(
            (entry.source, entry.reason, entry.message_id, entry.created_at, entry.expires_at),
            (
                SuppressionSource.SOFT_FAILURES,
                "5 soft failures in a row; the last: 452 4.2.2 Mailbox full",
                fifth.event.message_id,  # type: ignore[union-attr]
                NOW + 4,
                NOW + 4 + 30 * DAY,
            ),
        )
        self.assertEqual(await self.count(), 0)

    async def test_sent_between_resets(self) -> None:
        """A Sent between soft failures starts the count again, in the same batch or another; another
        recipient's Sent does not."""
        await self.trigger.handle([*(self.soft() for _ in range(3)), self.sent(), self.soft()])
        self.assertEqual(await self.count(), 1)
        await self.trigger.handle([self.soft(), self.soft(), self.sent(rcpt_to="carol@example.test")])
        self.assertEqual(await self.count(), 3)
        await self.trigger.handle([self.sent(rcpt_to="BOB@example.test")])
        self.assertEqual(await self.count(), 0)
        await self.trigger.handle([self.soft() for _ in range(4)])
        self.assertIsNone(self.listed())

    async def test_same_event_twice_counts_once(self) -> None:
        """An event handled again (redelivered after a crash) is counted once: four failures seen
        twice are four, not eight."""
        batch = [self.soft() for _ in range(4)]
        await self.trigger.handle(batch)
        await self.trigger.handle(batch)
        await self.trigger.handle(batch[1:3])
        self.assertEqual(await self.count(), 4)
        self.assertIsNone(self.listed())

    async def test_blocks_and_unanswered_failures_do_not_count(self) -> None:
        """Soft failures about our reputation or rate (policy blocks), and those without a reply from
        the recipient's server (connection refused, DNS), neither count nor end a run."""
        await self.trigger.handle(
            [
                self.soft(),
                self.delivery("SoftFail", 421, "421 4.7.0 Too many connections, slow down"),
                self.delivery("SoftFail", 451, "451 4.7.1 Temporarily deferred due to low reputation"),
                self.delivery("SoftFail", None, None, details="Connection refused by mx1.example.test"),
                self.soft(),
            ]
        )
        self.assertEqual(await self.count(), 2)

    async def test_threshold_and_window(self) -> None:
        """The threshold is configurable, and a run is forgotten soft_fail_window seconds after its
        last failure."""
        trigger = self.make_trigger(settings=SuppressionConfig(soft_fail_threshold=2), soft_fail_window=60)
        await trigger.handle([self.soft()])
        ttl: int = await self.redis.execute(
            "PTTL", self.keys.soft_failures(self.server.id, "bob@example.test")
        )
        self.assertTrue(0 < ttl <= 60_000, ttl)
        await trigger.handle([self.soft(rcpt_to="Bob@example.test")])
        entry = self.listed()
        assert entry is not None
        self.assertEqual(entry.source, SuppressionSource.SOFT_FAILURES)

    async def test_soft_failures_then_sent_in_one_batch(self) -> None:
        """A run that reaches the threshold and is followed by a Sent in the same batch suppresses
        nothing: the address took mail after all."""
        await self.trigger.handle([*(self.soft() for _ in range(5)), self.sent()])
        self.assertIsNone(self.listed())
        self.assertEqual(await self.count(), 0)


class DeliveredTests(TriggerTestCase):
    """A Sent takes its recipient off the list, as Postal's ``remove_recipient_from_suppression_list_on_
    success`` does, when the entry says the mailbox does not work and is not newer than the delivery."""

    def add(self, address: str, source: SuppressionSource, at: float = NOW, **kwargs: Any) -> None:
        with self.engine.begin() as conn:
            sup.add_suppression(conn, self.server.id, address, source, at, **kwargs)

    def bounce(self, rcpt_to: str, at: float) -> Received:
        event = MessageBounced(
            message_id=9,
            server_id=self.server.id,
            rcpt_to=rcpt_to,
            bounce_id=10,
            hard=True,
            category="bad_mailbox",
            status="5.1.1",
            diagnostic="smtp; 550 5.1.1 user unknown",
            remote_mta="mx.example.test",
            timestamp=at,
        )
        return Received(f"{int(at * 1000)}-{next(self._ids)}", event)

    async def test_sent_removes_hard_bounce_and_soft_failure_entries(self) -> None:
        """A message delivered to an address listed for a hard bounce or soft failures (it was sent
        anyway, e.g. listed while in flight) takes the address off the list (any case); another
        server's entry for the address stays."""
        await self.trigger.handle(
            [self.delivery("HardFail", 550, "550 5.1.1 No such user", rcpt_to="bob@example.test")]
        )
        self.add("carol@example.test", SuppressionSource.SOFT_FAILURES, reason="5 soft failures")
        with self.engine.begin() as conn:
            sup.add_suppression(conn, self.other.id, "bob@example.test", SuppressionSource.HARD_BOUNCE, NOW)
        self.assertIsNotNone(self.listed())
        await self.trigger.handle(
            [
                self.sent(rcpt_to="Bob@Example.test", at=NOW + 60),
                self.sent(rcpt_to="carol@example.test", at=NOW + 60),
            ]
        )
        self.assertIsNone(self.listed())
        self.assertIsNone(self.listed("carol@example.test"))
        self.assertIsNotNone(self.listed(server=self.other))

    async def test_sent_keeps_consent_and_operator_entries(self) -> None:
        """Complaints, unsubscribes and an operator's entries say nobody wants the mail, which a
        delivery does not disprove: they stay."""
        for address, source in [
            ("complained@example.test", SuppressionSource.COMPLAINT),
            ("left@example.test", SuppressionSource.UNSUBSCRIBE),
            ("operator@example.test", SuppressionSource.MANUAL),
        ]:
            self.add(address, source)
        await self.trigger.handle(
            [
                self.sent(rcpt_to=address, at=NOW + 60)
                for address in ("complained@example.test", "left@example.test", "operator@example.test")
            ]
        )
        for address in ("complained@example.test", "left@example.test", "operator@example.test"):
            self.assertIsNotNone(self.listed(address), address)

    async def test_sent_older_than_the_entry_keeps_it(self) -> None:
        """A Sent from before the entry's cause (handled late, or again after a crash) removes nothing."""
        self.add("bob@example.test", SuppressionSource.HARD_BOUNCE, at=NOW + 60)
        await self.trigger.handle([self.sent(at=NOW)])
        entry = self.listed()
        assert entry is not None
        self.assertEqual(entry.created_at, NOW + 60)

    async def test_in_one_batch_time_decides(self) -> None:
        """In one batch, a hard failure followed by a later Sent lists nothing, and a bounce that reached
        the stream before the (earlier) Sent of its message is listed all the same."""
        await self.trigger.handle(
            [
                self.delivery("HardFail", 550, "550 5.1.1 No such user", at=NOW),
                self.sent(at=NOW + 1),
                self.bounce("carol@example.test", at=NOW + 300),
                self.sent(rcpt_to="carol@example.test", at=NOW + 1),
            ]
        )
        self.assertIsNone(self.listed())
        entry = self.listed("carol@example.test")
        assert entry is not None
        self.assertEqual((entry.source, entry.created_at), (SuppressionSource.HARD_BOUNCE, NOW + 300))

    async def test_complaint_then_hard_bounce_in_one_batch_never_expires(self) -> None:
        """A complaint and a later hard bounce of one recipient in one batch keep the complaint's
        never-expiring entry (each is added in turn), as they do in two batches."""
        complaint = SpamComplaint(
            message_id=3,
            server_id=self.server.id,
            rcpt_to="bob@example.test",
            feedback_type="abuse",
            bounce_id=4,
            timestamp=NOW,
        )
        await self.trigger.handle(
            [Received("1-1", complaint), self.delivery("HardFail", 550, "550 5.1.1 No such user", at=NOW + 5)]
        )
        entry = self.listed()
        assert entry is not None
        self.assertEqual((entry.source, entry.expires_at), (SuppressionSource.HARD_BOUNCE, None))


class ConsumerTests(TriggerTestCase):
    async def test_through_the_stream(self) -> None:
        """Run by a StreamConsumer on the real stream in group "suppression": a batch read again before
        it was acknowledged (a crash) suppresses once and counts once."""
        self.assertEqual(GROUP, "suppression")
        stream = EventStream(self.redis, GROUP, "suppression-1", keys=self.keys)
        await stream.ensure_group()
        for received in [
            self.soft(),
            self.soft(),
            self.delivery("HardFail", 550, "550 5.1.1 No such user", rcpt_to="x@example.test"),
        ]:
            event_type, data = encode(received.event)
            await self.redis.execute("XADD", self.keys.events, "*", "type", event_type, "data", data)
        entries = await stream.read(10)
        await self.trigger.handle(
            [decode_entry(e) for e in entries]
        )  # handled, then "crashed" before the ack
        consumer = StreamConsumer(
            EventStream(self.redis, GROUP, "suppression-1", keys=self.keys), self.trigger, self.clock
        )
        self.assertEqual(await consumer.run_once(), 3)
        self.assertEqual(await self.count(), 2)
        entry = self.listed("x@example.test")
        assert entry is not None
        self.assertEqual(entry.source, SuppressionSource.HARD_BOUNCE)
        pending = await self.redis.execute("XPENDING", self.keys.events, GROUP)
        self.assertEqual(pending[0], 0)

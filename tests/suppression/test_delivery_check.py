"""The delivery-time check: the delivery service finishes messages to suppressed recipients at once,
against a real Redis and SQLite, and (last) with the real deliverer and sink SMTP servers on 127.0.0.x.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError

from mtad.events.schema import MessageDelivery, MessageQueued, MessageSuppressed, decode_entry
from mtad.outbound.deliverer import Deliverer, DelivererConfig
from mtad.outbound.delivery import DeliveryService, DeliverySettings, suppressed_details
from mtad.outbound.mx import MXResolver, ResolverConfig
from mtad.queue.limits import ConnectionLimiter
from mtad.queue.model import NewMessage
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store import suppressions as sup
from mtad.store.db import Database, make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.suppressions import SuppressionSource
from mtad.suppression.lookup import SuppressionLookup
from tests.outbound.hold_support import stream_events
from tests.outbound.test_delivery import (
    BODY,
    NOW,
    POOLS,
    SENT,
    FakeDeliverer,
    ServiceTestCase,
    eventually,
    every,
    true,
)
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url
from tools.fakedns import start_fake_dns
from tools.sink import Sink, SinkBehaviour

DAY = 86400.0


class FailingDatabase:
    """A database that is down: every unit of work fails."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        return fail(ConnectionError("database is down"))


class CheckTestCase(ServiceTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        with self.engine.begin() as conn:
            os_.create_organization(conn, "Acme", NOW)
            self.server = ss.create_server(conn, "acme", "Main", NOW)
            self.other = ss.create_server(conn, "acme", "Other", NOW)
        self.database = SynchronousDatabase(self.engine)

    def listed(self, address: str, server: ss.Server | None = None, **kwargs: Any) -> sup.Suppression:
        kwargs.setdefault("source", SuppressionSource.HARD_BOUNCE)
        kwargs.setdefault("at", NOW - DAY)
        kwargs.setdefault("reason", "550 5.1.1 No such user")
        kwargs.setdefault("expires_at", NOW + 29 * DAY)
        source, at = kwargs.pop("source"), kwargs.pop("at")
        with self.engine.begin() as conn:
            return sup.add_suppression(conn, (server or self.server).id, address, source, at, **kwargs)

    async def send(
        self, *rcpts: str, server: ss.Server | None = None, after: float | None = None
    ) -> list[int]:
        """Queue a message to ``rcpts``; with ``after``, due that many seconds from now, and the clock
        moved there (the service claims it on its next poll)."""
        server = server or self.server
        now = self.clock.seconds() + (after or 0.0)
        messages = [
            NewMessage(
                token=f"tok-{rcpt}",
                server_id=server.id,
                scope="outgoing",
                mail_from="bounces@mtad.test",
                rcpt_to=rcpt,
                pool="default",
                fields={"subject": "Hello", "message_id": "m1@mtad.test", "tag": "news"},
            )
            for rcpt in rcpts
        ]
        ids = await self.queue.enqueue(BODY, messages, now)
        if after is not None:
            self.clock.advance(after)
        return ids

    def checked(self, deliverer: Any, lookup: Any, clock: Any = None, **settings: Any) -> DeliveryService:
        """A started delivery service with ``lookup`` as its suppression check."""
        service = DeliveryService(
            clock if clock is not None else self.clock,
            self.queue,
            deliverer,
            POOLS,
            DeliverySettings(**settings),
            "test-worker",
            suppressions=lookup,
        )
        service.startService()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.stop(service)))
        return service

    async def typed_events(self) -> list[Any]:
        return [decode_entry(e).event for e in await stream_events(self.redis, self.keys)]

    async def settled_events(self, count: int) -> list[Any]:
        """The delivery and suppression events once ``count`` messages have their delivery event."""

        async def probe() -> bool:
            events = await self.typed_events()
            return sum(isinstance(e, MessageDelivery) for e in events) >= count

        await eventually(probe)
        return [e for e in await self.typed_events() if isinstance(e, MessageDelivery | MessageSuppressed)]


class CheckTests(CheckTestCase):
    async def test_suppressed_finish_at_once(self) -> None:
        """A message to a suppressed address (in any case) is acked as HardFail with details naming the
        entry, and a MessageSuppressed event follows it; the deliverer never sees it, and the rest of
        the batch is delivered; another server's entry does not suppress."""
        entry = self.listed("bob@example.test")
        self.listed("carol@example.test", server=self.other)
        ids = await self.send("Bob@Example.TEST", "carol@example.test", "dave@example.test")
        deliverer = FakeDeliverer(every(SENT))
        lookup = SuppressionLookup(self.database, self.clock)
        self.checked(deliverer, lookup)
        events = await self.settled_events(3)
        self.assertEqual(
            [[m.recipients for m in messages] for _, messages, _ in deliverer.calls],
            [[("carol@example.test",), ("dave@example.test",)]],
        )
        failed = [e for e in events if isinstance(e, MessageDelivery) and e.message_id == ids[0]]
        (delivery,) = failed
        self.assertEqual((delivery.status, delivery.code, delivery.output), ("HardFail", None, None))
        self.assertEqual(
            delivery.details,
            "Recipient (Bob@Example.TEST) is on the suppression list (source: HardBounce, reason: 550 5.1.1 "
            "No such user) since 2023-11-13 22:13:20 UTC until 2023-12-13 22:13:20 UTC; the message was "
            "not sent.",
        )
        self.assertEqual(delivery.details, suppressed_details("Bob@Example.TEST", entry))
        (notice,) = [e for e in events if isinstance(e, MessageSuppressed)]
        self.assertEqual(
            notice,
            MessageSuppressed(
                message_id=ids[0],
                server_id=self.server.id,
                rcpt_to="Bob@Example.TEST",
                source="HardBounce",
                reason="550 5.1.1 No such user",
                timestamp=NOW,
                suppressed_at=NOW - DAY,
                expires_at=NOW + 29 * DAY,
                details=delivery.details,
                token="tok-Bob@Example.TEST",
                scope="outgoing",
                mail_from="bounces@mtad.test",
                subject="Hello",
                header_message_id="m1@mtad.test",
                tag="news",
                message_timestamp=NOW,
            ),
        )
        # The notice is written with its delivery, right after it.
        self.assertIs(events[events.index(delivery) + 1], notice)
        self.assertEqual(await self.queue.message_fields(ids[0]), {})
        statuses = {e.message_id: e.status for e in events if isinstance(e, MessageDelivery)}
        self.assertEqual(statuses, {ids[0]: "HardFail", ids[1]: "Sent", ids[2]: "Sent"})
        self.assertEqual(lookup.queries, 1)

    async def test_never_expiring_and_expired(self) -> None:
        """A never-expiring entry says "until removed"; an expired one suppresses nothing."""
        self.listed("never@example.test", source=SuppressionSource.COMPLAINT, reason=None, expires_at=None)
        self.listed("gone@example.test", expires_at=NOW - 1)
        ids = await self.send("never@example.test", "gone@example.test")
        deliverer = FakeDeliverer(every(SENT))
        self.checked(deliverer, SuppressionLookup(self.database, self.clock))
        events = await self.settled_events(2)
        by_id = {e.message_id: e for e in events if isinstance(e, MessageDelivery)}
        self.assertEqual((by_id[ids[0]].status, by_id[ids[1]].status), ("HardFail", "Sent"))
        self.assertIn(
            "(source: Complaint) since 2023-11-13 22:13:20 UTC until removed;", by_id[ids[0]].details
        )

    async def test_all_suppressed(self) -> None:
        """A batch whose every message is suppressed never reaches the deliverer, and nothing stays in
        flight."""
        self.listed("a@example.test")
        self.listed("b@other.test")
        await self.send("a@example.test", "b@other.test")
        deliverer = FakeDeliverer()
        service = self.checked(deliverer, SuppressionLookup(self.database, self.clock))
        events = await self.settled_events(2)
        self.assertEqual([e.status for e in events if isinstance(e, MessageDelivery)], ["HardFail"] * 2)
        self.assertEqual(sum(isinstance(e, MessageSuppressed) for e in events), 2)
        self.assertEqual(deliverer.calls, [])
        await true(lambda: service.in_flight == 0)

    async def test_cached_briefly(self) -> None:
        """Answers are cached: the next batch within the cache time makes no query and sees an entry
        added meanwhile only once the cache time has passed; a cached entry's expiry is honoured at
        once."""
        self.listed("soon@example.test", expires_at=NOW + 30)
        lookup = SuppressionLookup(self.database, self.clock, cache_seconds=60)
        deliverer = FakeDeliverer(every(SENT), every(SENT), every(SENT))
        first = await self.send("soon@example.test", "later@example.test")
        service = self.checked(deliverer, lookup, poll_interval=1.0)
        events = await self.settled_events(2)
        by_id = {e.message_id: e.status for e in events if isinstance(e, MessageDelivery)}
        self.assertEqual((by_id[first[0]], by_id[first[1]]), ("HardFail", "Sent"))
        self.assertEqual(lookup.queries, 1)
        self.listed("later@example.test", at=NOW)
        await true(lambda: service.in_flight == 0)
        # Past soon@'s expiry, within the cache time.
        second = await self.send("soon@example.test", "later@example.test", after=31)
        events = await self.settled_events(4)
        by_id = {e.message_id: e.status for e in events if isinstance(e, MessageDelivery)}
        self.assertEqual((by_id[second[0]], by_id[second[1]]), ("Sent", "Sent"))
        self.assertEqual(lookup.queries, 1)
        await true(lambda: service.in_flight == 0)
        (third,) = await self.send("later@example.test", after=60)
        events = await self.settled_events(5)
        self.assertEqual(
            [e.status for e in events if isinstance(e, MessageDelivery) and e.message_id == third],
            ["HardFail"],
        )
        self.assertEqual(lookup.queries, 2)

    async def test_database_down_delivers_unchecked(self) -> None:
        """When the lookup fails the batch is delivered unchecked rather than held up; the outage is
        logged once, not per batch."""
        database = FailingDatabase()
        deliverer = FakeDeliverer(every(SENT), every(SENT))
        await self.send("a@example.test")
        service = self.checked(deliverer, SuppressionLookup(database, self.clock))  # type: ignore[arg-type]
        await self.settled_events(1)
        await true(lambda: service.in_flight == 0)
        await self.send("b@example.test", after=1)
        events = await self.settled_events(2)
        self.assertEqual([e.status for e in events], ["Sent", "Sent"])
        self.assertEqual(database.calls, 2)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)

    async def test_database_timeout_delivers_unchecked(self) -> None:
        """A lookup the database does not answer within its timeout lets the batch go unchecked."""

        class Stalled:
            def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
                return Deferred()

        deliverer = FakeDeliverer(every(SENT))
        await self.send("a@example.test")
        self.checked(deliverer, SuppressionLookup(Stalled(), self.clock, timeout=5.0))  # type: ignore[arg-type]
        await true(lambda: any(c.getTime() == NOW + 5.0 for c in self.clock.getDelayedCalls()))
        self.assertEqual(deliverer.calls, [])
        self.clock.advance(5.0)
        events = await self.settled_events(1)
        self.assertEqual([e.status for e in events], ["Sent"])
        self.assertEqual(len(self.flushLoggedErrors(DeferredTimeoutError)), 1)

    async def test_shutdown_during_lookup_releases(self) -> None:
        """Stopping while the lookup hangs releases the batch after the drain timeout, for another
        process to take at once."""

        class Stalled:
            def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
                return Deferred()

        (mid,) = await self.send("a@example.test")
        service = self.checked(FakeDeliverer(), SuppressionLookup(Stalled(), self.clock, timeout=1e6))  # type: ignore[arg-type]
        await true(lambda: service.in_flight == 1)
        await self.stop(service)
        self.assertEqual((await self.queue.message_fields(mid)).get("state"), "due")
        self.assertEqual([e for e in await self.typed_events() if not isinstance(e, MessageQueued)], [])

    async def test_shutdown_during_delivery_releases(self) -> None:
        """Stopping while the checked batch's delivery hangs releases its messages after the drain
        timeout, as without the check, and logs no error."""
        (mid,) = await self.send("a@example.test")
        deliverer = FakeDeliverer()
        service = self.checked(deliverer, SuppressionLookup(self.database, self.clock))
        await true(lambda: deliverer.outstanding == 1)
        await self.stop(service)
        self.assertEqual((await self.queue.message_fields(mid)).get("state"), "due")
        self.assertEqual(service.in_flight, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_lost_lease_writes_neither_event(self) -> None:
        """The HardFail and the MessageSuppressed are written together or not at all: acking with a
        lease that is no longer the message's appends neither."""
        (mid,) = await self.send("a@example.test")
        (claimed,) = await self.queue.claim(NOW, 1, 60.0, "w")
        before = len(await stream_events(self.redis, self.keys))
        delivery = MessageDelivery(message_id=mid, attempt=1, status="HardFail", timestamp=NOW)
        notice = MessageSuppressed(
            message_id=mid, server_id=self.server.id, rcpt_to="a@example.test", source="Manual", timestamp=NOW
        )
        self.assertFalse(await self.queue.ack(mid, "not-the-lease", delivery, also=notice))
        self.assertEqual(len(await stream_events(self.redis, self.keys)), before)
        self.assertTrue(await self.queue.ack(mid, claimed.lease_token, delivery, also=notice))
        self.assertEqual((await self.typed_events())[-2:], [delivery, notice])


class RealDeliveryTests(CheckTestCase):
    async def test_suppressed_never_connected_to(self) -> None:
        """With the real deliverer, sink SMTP servers and the database's thread pool: the suppressed
        recipient's MX is never connected to, a suppressed recipient on a shared MX is never named in
        RCPT TO, and the others in the same batch are delivered."""
        reactor = real_reactor()
        dns = start_fake_dns(
            reactor,
            {
                "example.test": {"MX": [[10, "mx1.example.test"]]},
                "mx1.example.test": {"A": ["127.0.0.2"]},
                "blocked.test": {"MX": [[10, "mx.blocked.test"]]},
                "mx.blocked.test": {"A": ["127.0.0.3"]},
            },
            tcp=False,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        sink = Sink(SinkBehaviour())
        listening = sink.listen(reactor, "127.0.0.2", 0)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port  # type: ignore[attr-defined]
        blocked = Sink(SinkBehaviour())
        blocked_listening = blocked.listen(reactor, "127.0.0.3", port)
        self.addCleanup(blocked_listening.stopListening)
        resolver = MXResolver(
            reactor, reactor, reactor, ResolverConfig((dns.address,), timeout=3, attempts=1), random.Random(1)
        )
        deliverer = Deliverer(
            reactor,
            reactor,
            resolver,
            ConnectionLimiter(self.redis, self.keys),
            DelivererConfig(port=port),
            random.Random(1),
        )
        database = Database(self.engine, reactor)
        database.startService()
        self.addCleanup(database.stopService)
        # The real clock: entries that never expire.
        self.listed("nobody@example.test", expires_at=None)
        self.listed(
            "anyone@blocked.test", source=SuppressionSource.MANUAL, reason="asked us", expires_at=None
        )
        ids = await self.send(
            "a@example.test", "nobody@example.test", "anyone@blocked.test", "b@example.test"
        )
        service = self.checked(deliverer, SuppressionLookup(database, reactor), clock=reactor)
        events = await self.settled_events(4)
        statuses = {e.message_id: e.status for e in events if isinstance(e, MessageDelivery)}
        self.assertEqual(statuses, {ids[0]: "Sent", ids[1]: "HardFail", ids[2]: "HardFail", ids[3]: "Sent"})
        self.assertEqual(
            sorted(e.rcpt_to for e in events if isinstance(e, MessageSuppressed)),
            ["anyone@blocked.test", "nobody@example.test"],
        )
        self.assertEqual(
            sorted(r for m in sink.messages for r in m.recipients), ["a@example.test", "b@example.test"]
        )
        commands = [c.lower() for s in sink.sessions for c in s.commands]
        self.assertFalse([c for c in commands if "nobody@" in c], commands)
        self.assertEqual(blocked.sessions, [])
        await service.stopService()
        for mid in ids:
            self.assertEqual(await self.queue.message_fields(mid), {})


class WithoutCheckTests(CheckTestCase):
    async def test_no_check_delivers_everyone(self) -> None:
        """A service without a suppression check (the default) delivers to a listed address: the check
        is what stops it."""
        self.listed("bob@example.test")
        await self.send("bob@example.test")
        service = DeliveryService(
            self.clock, self.queue, FakeDeliverer(every(SENT)), POOLS, DeliverySettings(), "w"
        )
        service.startService()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.stop(service)))
        events = await self.settled_events(1)
        self.assertEqual([e.status for e in events], ["Sent"])

"""Tests for mtad.events.archive: bodies whose queued events the recorder never read still reach SQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mtad.events.archive import ArchiveCatchUp
from mtad.events.recorder import raw_message_ids, record_events
from mtad.events.schema import decode_entry
from mtad.queue.events import EventStream
from mtad.queue.model import PinnedBody
from mtad.store.messages import find_message
from mtad.store.raw_messages import raw_message_data
from mtad.store.tables import raw_messages
from tests.events.test_recorder import BODY, NOW, ArchiveTestCase
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase, SynchronousDatabase

AFTER = 3600.0


class CountingQueue:
    """The real queue, noting the size of each batch `pinned_before` gives."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.batches: list[int] = []

    async def _pinned_before(self, before: float, limit: int, max_bytes: int) -> list[PinnedBody]:
        pinned: list[PinnedBody] = await self.queue.pinned_before(before, limit, max_bytes)
        self.batches.append(len(pinned))
        return pinned

    def pinned_before(self, before: float, limit: int, max_bytes: int) -> Deferred[list[PinnedBody]]:
        return Deferred.fromCoroutine(self._pinned_before(before, limit, max_bytes))

    def release_archived(self, raw_message_ids: Sequence[int]) -> Deferred[int]:
        result: Deferred[int] = self.queue.release_archived(raw_message_ids)
        return result


class CatchUpTests(ArchiveTestCase):
    """`ArchiveCatchUp` with a real Redis and real SQL (SQLite; PostgreSQL and MariaDB in subclasses)."""

    def catch_up(self, **options: Any) -> ArchiveCatchUp:
        return ArchiveCatchUp(self.clock, self.database, self.queue, AFTER, **options)

    async def lose_events(self) -> None:
        """The stream loses every entry so far (a Redis restored from an old snapshot, an XTRIM by hand)."""
        await self.redis.execute("XTRIM", self.keys.events, "MAXLEN", 0)

    async def pending(self) -> list[int]:
        return [int(id) for id in await self.redis.execute("ZRANGE", self.keys.archive_pending, 0, -1)]

    def raw_row(self, id: int) -> tuple[int, float, int] | None:
        query = sa.select(raw_messages.c.server_id, raw_messages.c.timestamp, raw_messages.c.size).where(
            raw_messages.c.id == id
        )
        row = self.transaction(lambda conn: conn.execute(query).one_or_none())
        return None if row is None else (row.server_id, row.timestamp, row.size)

    async def test_trimmed_event_archived_after_age(self) -> None:
        """A message delivered whose queued event was trimmed unread: once pinned for the catch-up age, its
        body is stored as its raw message (server and accept time included) and leaves Redis."""
        await EventStream(self.redis, "recorder", "recorder-1", keys=self.keys).ensure_group()
        (id,) = await self.accept("a@example.com")
        await self.lose_events()
        await self.deliver_all()
        self.assertEqual(await self.recorder().run_once(), 1)  # the delivery event alone
        self.assertEqual(self.raw_count(), 0)
        self.assertTrue(await self.body_in_redis(id))
        self.clock.advance(AFTER)
        self.assertEqual(await self.catch_up().sweep(), 1)
        self.assertEqual(self.transaction(raw_message_data, id), BODY)
        self.assertEqual(self.raw_row(id), (3, NOW, len(BODY)))
        self.assertFalse(await self.body_in_redis(id))
        self.assertEqual(await self.pending(), [])
        self.assertEqual(await self.catch_up().sweep(), 0)

    async def test_young_pin_left_alone(self) -> None:
        """A body pinned for less than the catch-up age stays pinned in Redis, and nothing is stored."""
        (id,) = await self.accept("a@example.com")
        ((event_id, _),) = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        await self.redis.execute("XDEL", self.keys.events, event_id)
        await self.deliver_all()
        self.clock.advance(AFTER - 1)
        self.assertEqual(await self.catch_up().sweep(), 0)
        self.assertEqual(self.raw_count(), 0)
        self.assertEqual(await self.queue.bodies_to_archive([id]), {id: BODY})
        self.assertEqual(await self.pending(), [id])

    async def test_caught_up_then_recorded_stored_once(self) -> None:
        """A recorder only late (events not lost): the catch-up stores and releases the body first, the
        recorder then records the messages against that one raw message; recipients still queued keep the
        body until they are delivered."""
        ids = await self.accept("a@example.com", "b@example.com")
        self.clock.advance(AFTER)
        self.assertEqual(await self.catch_up().sweep(), 1)
        self.assertTrue(await self.body_in_redis(ids[0]))
        self.assertEqual(await self.recorder().run_once(), 2)
        self.assertEqual(self.raw_count(), 1)
        self.assertEqual(self.transaction(raw_message_data, ids[0]), BODY)
        for id in ids:
            self.assertEqual(self.transaction(find_message, id).raw_message_id, ids[0])
        claimed = await self.queue.claim(NOW + AFTER, 10, 60.0, "deliverer")
        self.assertEqual([(c.id, c.body) for c in claimed], [(ids[0], BODY), (ids[1], BODY)])
        for c in claimed:
            self.assertTrue(await self.queue.ack(c.id, c.lease_token))
        self.assertFalse(await self.body_in_redis(ids[0]))

    async def test_recorder_and_catch_up_interleaved_stored_once(self) -> None:
        """The recorder reads a pinned body, the catch-up stores and releases it, then the recorder stores
        and releases it too: one raw message, the body gone, nothing left pinned."""
        (id,) = await self.accept("a@example.com")
        await self.deliver_all()
        stream = EventStream(self.redis, "recorder", "recorder-1", keys=self.keys)
        events = [decode_entry(e) for e in await stream.read(100)]
        bodies = await self.queue.bodies_to_archive(raw_message_ids(events))
        self.clock.advance(AFTER)
        self.assertEqual(await self.catch_up().sweep(), 1)
        await self.database.run(record_events, events, NOW, bodies)
        self.assertEqual(await self.queue.release_archived(list(bodies)), 0)
        await stream.ack([e.id for e in events])
        self.assertEqual(self.raw_count(), 1)
        self.assertEqual(self.transaction(raw_message_data, id), BODY)
        self.assertFalse(await self.body_in_redis(id))
        self.assertEqual(await self.pending(), [])

    async def test_recorded_body_not_caught_up(self) -> None:
        """A body the recorder archived is off the pending set: the catch-up finds nothing to do later."""
        (id,) = await self.accept("a@example.com")
        self.assertEqual(await self.recorder().run_once(), 1)
        self.assertEqual(await self.pending(), [])
        await self.deliver_all()
        self.clock.advance(AFTER * 10)
        self.assertEqual(await self.catch_up().sweep(), 0)
        self.assertEqual(self.raw_count(), 1)
        self.assertEqual(self.transaction(raw_message_data, id), BODY)

    async def test_backlog_in_bounded_batches(self) -> None:
        """A backlog clears in one sweep, in batches of at most ``batch`` bodies and ``batch_bytes``."""
        ids = [(await self.accept(f"{n}@example.com", body=b"x" * 100))[0] for n in range(5)]
        await self.lose_events()
        await self.deliver_all()
        self.clock.advance(AFTER)
        queue = CountingQueue(self.queue)
        catch_up = ArchiveCatchUp(self.clock, self.database, queue, AFTER, batch=3, batch_bytes=250)
        self.assertEqual(await catch_up.sweep(), 5)
        self.assertEqual(queue.batches, [2, 2, 1, 0])
        for id in ids:
            self.assertEqual(self.transaction(raw_message_data, id), b"x" * 100)
            self.assertFalse(await self.body_in_redis(id))

    async def test_service_sweeps_at_start(self) -> None:
        """The service's first sweep runs at start; stopping waits for it to finish."""
        (id,) = await self.accept("a@example.com")
        await self.lose_events()
        await self.deliver_all()
        self.clock.advance(AFTER + 1)
        service = self.catch_up()
        service.startService()
        await service.stopService()
        self.assertEqual(self.transaction(raw_message_data, id), BODY)
        self.assertFalse(await self.body_in_redis(id))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CatchUpPostgresTests(CatchUpTests):
    backend = POSTGRES


class CatchUpMySQLTests(CatchUpTests):
    backend = MYSQL


class FakePins:
    """Pinned bodies in memory, answering at once, for the service's timing alone."""

    def __init__(self, pinned: Sequence[PinnedBody]) -> None:
        self.pinned = list(pinned)
        self.asked: list[float] = []
        self.fail_reads = 0

    def pinned_before(self, before: float, limit: int, max_bytes: int) -> Deferred[list[PinnedBody]]:
        self.asked.append(before)
        if self.fail_reads:
            self.fail_reads -= 1
            return fail(ConnectionError("redis went away"))
        return succeed([p for p in self.pinned if p.accepted_at <= before][:limit])

    def release_archived(self, raw_message_ids: Sequence[int]) -> Deferred[int]:
        before = len(self.pinned)
        self.pinned = [p for p in self.pinned if p.id not in raw_message_ids]
        return succeed(before - len(self.pinned))


class CatchUpServiceTests(DatabaseTestCase):
    """`ArchiveCatchUp` on a `task.Clock`: when it sweeps, and what a failure does."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = SynchronousDatabase(self.engine)

    def start(self, pins: FakePins, **options: Any) -> ArchiveCatchUp:
        service = ArchiveCatchUp(self.clock, self.database, pins, AFTER, **options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def stored(self) -> list[int]:
        return [id for id in range(1, 5) if self.transaction(raw_message_data, id) is not None]

    def test_sweeps_every_interval(self) -> None:
        """Each interval, the bodies that have been pinned for the catch-up age since are archived."""
        pins = FakePins([PinnedBody(1, 3, NOW - AFTER, b"one"), PinnedBody(2, 3, NOW - 10, b"two")])
        self.start(pins, interval=60.0)
        self.assertEqual((self.stored(), pins.asked), ([1], [NOW - AFTER, NOW - AFTER]))
        self.clock.advance(AFTER - 60)
        self.assertEqual(self.stored(), [1])
        self.clock.advance(60)
        self.assertEqual(self.stored(), [1, 2])
        self.assertEqual(pins.pinned, [])

    def test_failed_sweep_logged_and_retried(self) -> None:
        """A sweep that fails (Redis away) is logged and stores nothing; the next interval tries again."""
        pins = FakePins([PinnedBody(1, 3, NOW - AFTER, b"one")])
        pins.fail_reads = 1
        self.start(pins, interval=60.0)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(self.stored(), [])
        self.clock.advance(60)
        self.assertEqual(self.stored(), [1])

    def test_stop_ends_sweeping(self) -> None:
        """After stopService no further sweep runs and no call is left on the clock."""
        pins = FakePins([])
        service = self.start(pins, interval=60.0)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        pins.pinned.append(PinnedBody(1, 3, NOW - AFTER, b"one"))
        self.clock.advance(120)
        self.assertEqual(self.stored(), [])

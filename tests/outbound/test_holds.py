"""Hold expiry: held messages older than the hold time are cancelled (HoldCancelled), younger ones kept.

The sweep's clock is a `task.Clock`; Redis and SQLite are real, so the tests wait for Redis in real time.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy.engine import Engine
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtad.events.recorder import parse_delivery
from mtad.events.schema import MessageDelivery, to_dict
from mtad.outbound.holds import HOLD_CANCELLED, HoldExpiry, hold_cancelled_event
from mtad.queue.model import RedisUnavailable
from mtad.queue.redis_queue import HeldMessage, RedisQueue
from mtad.store.db import make_engine
from mtad.store.messages import MessageStatus, find_message, list_deliveries
from mtad.store.migrate import upgrade_schema
from tests.outbound.hold_support import WEEK, hold_message, record_stream, stream_events
from tests.outbound.test_delivery import eventually
from tests.redis_server import RedisTestCase
from tests.store.support import SQLITE, fresh_database_url

NOW = 1_700_000_000.0
DAY = 86400.0


class ExpiryTests(RedisTestCase):
    queue: RedisQueue
    clock: Clock
    engine: Engine

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)

    def start(self, **options: Any) -> HoldExpiry:
        service = HoldExpiry(self.clock, self.queue, WEEK, **options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def gone(self, message_id: int) -> None:
        async def probe() -> bool:
            return await self.queue.message_fields(message_id) == {}

        await eventually(probe)

    async def test_old_hold_cancelled_young_kept(self) -> None:
        """At start, a message held over hold_seconds ago is cancelled with a HoldCancelled event the
        recorder writes to SQL; one held a day ago is kept until its week is up."""
        old = await hold_message(self.queue, NOW - 8 * DAY, "old@example.test")
        young = await hold_message(self.queue, NOW - DAY, "young@example.test")
        await record_stream(self.redis, self.keys, self.engine, NOW)
        self.start()
        await self.gone(old)
        self.assertIsNotNone(await self.queue.held_message(young))
        event = (await stream_events(self.redis, self.keys))[-1]
        attempt = parse_delivery(event)
        self.assertEqual(
            (attempt.message_id, attempt.status, attempt.details, attempt.timestamp, attempt.hold_expiry),
            (old, MessageStatus.HOLD_CANCELLED, HOLD_CANCELLED, NOW, None),
        )
        self.assertEqual(
            (event.data["rcpt_to"], event.data["server_id"], event.data["attempt"]),
            ("old@example.test", 7, 1),
        )
        await record_stream(self.redis, self.keys, self.engine, NOW)
        with self.engine.connect() as conn:
            cancelled, kept = find_message(conn, old), find_message(conn, young)
            statuses = [d.status for d in list_deliveries(conn, old)]
        assert cancelled is not None and kept is not None
        self.assertEqual(
            (cancelled.status, cancelled.held, cancelled.hold_expiry), ("HoldCancelled", False, None)
        )
        self.assertEqual((kept.status, kept.held, kept.hold_expiry), ("Held", True, NOW - DAY + WEEK))
        self.assertEqual(statuses, [MessageStatus.HELD, MessageStatus.HOLD_CANCELLED])

        # The first sweep is over once the next one is scheduled.
        await eventually(lambda: succeed(bool(self.clock.getDelayedCalls())))
        self.clock.advance(6 * DAY - 60)
        self.assertIsNotNone(await self.queue.held_message(young))
        self.clock.advance(60)
        await self.gone(young)

    async def test_sweep_works_through_batches(self) -> None:
        """One sweep cancels every expired hold, batch by batch, and leaves the unexpired ones."""
        expired = [await hold_message(self.queue, NOW - WEEK - i, f"r{i}@example.test") for i in range(5)]
        kept = await hold_message(self.queue, NOW - WEEK + 1, "kept@example.test")
        service = HoldExpiry(self.clock, self.queue, WEEK, batch=2)
        self.assertEqual(await service.sweep(), 5)
        for message_id in expired:
            self.assertEqual(await self.queue.message_fields(message_id), {})
        self.assertIsNotNone(await self.queue.held_message(kept))
        self.assertEqual(await service.sweep(), 0)

    async def test_released_message_not_expired(self) -> None:
        """A message released before its hold expired is delivered, not cancelled by the sweep."""
        message_id = await hold_message(self.queue, NOW - 8 * DAY, "a@example.test")
        self.assertTrue(await self.queue.release_held(message_id, NOW - DAY))
        self.assertEqual(await HoldExpiry(self.clock, self.queue, WEEK).sweep(), 0)
        self.assertEqual((await self.queue.message_fields(message_id))["state"], "due")


class FakeQueue:
    """Answers expire_held from a list: an exception fails the call, a Deferred is returned as it is."""

    def __init__(self, *answers: list[int] | Exception | Deferred[list[int]]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[float, int]] = []

    def expire_held(self, before: float, limit: int, event_for: Any) -> Deferred[list[int]]:
        self.calls.append((before, limit))
        answer = self.answers.pop(0) if self.answers else []
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)


class ServiceTests(SynchronousTestCase):
    def make(self, queue: FakeQueue, clock: Clock) -> HoldExpiry:
        return HoldExpiry(clock, cast(RedisQueue, queue), 100.0, interval=60.0, batch=3)

    def test_sweeps_every_interval_and_survives_errors(self) -> None:
        """The sweep runs at start and every interval; a failed sweep is logged and the next one runs."""
        clock = Clock()
        clock.advance(1000)
        queue = FakeQueue(RedisUnavailable("down"), ValueError("bug"), [1, 2, 3], [4])
        service = self.make(queue, clock)
        service.startService()
        clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        clock.advance(60)
        self.assertEqual(queue.calls, [(900, 3), (960, 3), (1020, 3), (1020, 3)])
        self.successResultOf(service.stopService())
        clock.advance(600)
        self.assertEqual(len(queue.calls), 4)

    def test_stop_waits_for_running_sweep(self) -> None:
        """stopService fires only once the sweep in progress has finished, and no further batch starts."""
        clock = Clock()
        pending: Deferred[list[int]] = Deferred()
        queue = FakeQueue(pending)
        service = self.make(queue, clock)
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        pending.callback([1, 2, 3])
        self.successResultOf(stopped)
        self.assertEqual(len(queue.calls), 1)

    def test_bad_settings(self) -> None:
        """A negative hold time, a non-positive interval or an empty batch is refused."""
        queue = cast(RedisQueue, FakeQueue())
        self.assertRaises(ValueError, HoldExpiry, Clock(), queue, -1.0)
        self.assertRaises(ValueError, HoldExpiry, Clock(), queue, 1.0, interval=0.0)
        self.assertRaises(ValueError, HoldExpiry, Clock(), queue, 1.0, batch=0)

    def test_event_shape(self) -> None:
        """The HoldCancelled event carries the recorder's fields and the message's envelope."""
        message = HeldMessage(12, "tok", 3, "outgoing", "a@x.test", "b@y.test", 2, NOW, NOW, {})
        event = hold_cancelled_event(message, NOW + 5)
        self.assertIsInstance(event, MessageDelivery)
        data = to_dict(event)
        self.assertEqual(
            {k: data[k] for k in ("message_id", "attempt", "status", "details", "timestamp", "token")},
            {
                "message_id": 12,
                "attempt": 3,
                "status": "HoldCancelled",
                "details": "The hold on this message has been removed without action.",
                "timestamp": NOW + 5,
                "token": "tok",
            },
        )

"""Tests for mtad.events.consumer.StreamConsumer: ack after handling, parking, back-off, stopping, takeover.

The loop's timing is driven by `task.Clock` over an in-memory source with consumer-group semantics
(`ListEventSource`); what the stream itself does (pending entries, the parked stream, XAUTOCLAIM) runs on a
real Redis through `mtad.queue.events.EventStream`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from mtad.events.consumer import StreamConsumer, is_outage
from mtad.events.schema import MessageQueued, Received, encode
from mtad.queue.events import EventStream
from mtad.queue.model import Event, NewMessage, QueueError, QueueFull, RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from tests.events.test_recorder import ListEventSource, queued_entry
from tests.redis_server import RedisTestCase, real_reactor

NOW = 1_700_000_000.0


class Poisoned(Exception):
    """What the test handler raises for an event it cannot handle (not an outage)."""


class Handler:
    """An `EventHandler` that records each batch it is given and fails where told.

    ``fails(event)`` makes a batch containing ``event`` raise ``error``; ``gate``, when set, is awaited
    before a batch completes (a slow SQL transaction); ``limit`` is what `take` allows per batch.
    """

    group = "tests"

    def __init__(
        self,
        fails: Callable[[Received], bool] = lambda event: False,
        error: Callable[[], Exception] = lambda: Poisoned("cannot handle it"),
        limit: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.fails = fails
        self.error = error
        self.limit = limit
        self.clock = clock
        self.batches: list[list[str]] = []
        self.times: list[float] = []
        self.done: list[str] = []
        self.gate: Deferred[None] | None = None

    def take(self, events: Sequence[Received]) -> int:
        return len(events) if self.limit is None else self.limit

    async def handle(self, events: Sequence[Received]) -> None:
        self.batches.append([e.id for e in events])
        if self.clock is not None:
            self.times.append(self.clock.seconds())
        if self.gate is not None:
            await self.gate
        if any(self.fails(e) for e in events):
            raise self.error()
        self.done.extend(e.id for e in events)


def entries(count: int, start: int = 1) -> list[Event]:
    return [queued_entry(f"{n}-0", n) for n in range(start, start + count)]


def ids(events: Sequence[Event]) -> list[str]:
    return [e.id for e in events]


def gaps(times: Sequence[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def fails_on(*event_ids: str) -> Callable[[Received], bool]:
    return lambda event: event.id in event_ids


class Source(ListEventSource):
    """`ListEventSource` whose failing reads raise ``read_error`` (an outage by default)."""

    group = "tests"

    def __init__(self, events: Sequence[Event]) -> None:
        super().__init__(events)
        self.read_error: Callable[[], Exception] = lambda: ConnectionError("redis went away")

    def read(self, count: int) -> Deferred[list[Event]]:
        if self.fail_reads:
            self.reads += 1
            self.fail_reads -= 1
            d: Deferred[list[Event]] = Deferred()
            d.errback(self.read_error())
            return d
        return super().read(count)


class RunOnceTests(SynchronousTestCase):
    def run_once(self, consumer: StreamConsumer) -> Deferred[int]:
        return Deferred.fromCoroutine(consumer.run_once())

    def test_ack_only_after_handle_returns(self) -> None:
        """The batch is acknowledged once handle has returned, not while it is still working."""
        source = Source(entries(3))
        handler = Handler()
        handler.gate = Deferred()
        d = self.run_once(StreamConsumer(source, handler, Clock()))
        self.assertEqual(handler.batches, [["1-0", "2-0", "3-0"]])
        self.assertNoResult(d)
        self.assertEqual(source.acked, [])
        handler.gate.callback(None)
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual(source.acked, ["1-0", "2-0", "3-0"])

    def test_failed_batch_not_acknowledged(self) -> None:
        """A batch whose handler raises is not acknowledged (nor parked): all of it is read again."""
        source = Source(entries(3))
        consumer = StreamConsumer(source, Handler(fails_on("2-0")), Clock())
        self.failureResultOf(self.run_once(consumer), Poisoned)
        self.assertEqual((source.acked, source.parked), ([], []))
        self.assertEqual(ids(source.pending), ["1-0", "2-0", "3-0"])

    def test_nothing_to_read(self) -> None:
        """An empty read handles nothing and answers 0."""
        handler = Handler()
        self.assertEqual(self.successResultOf(self.run_once(StreamConsumer(Source([]), handler, Clock()))), 0)
        self.assertEqual(handler.batches, [])

    def test_unreadable_entries_parked_and_acknowledged(self) -> None:
        """Entries no schema can read are parked with the reason, and only the rest reach the handler."""
        bad_type = Event(id="2-0", type="message.exploded", data={})
        missing = Event(id="3-0", type="message.queued", data={"id": 3})
        source = Source([queued_entry("1-0", 1), bad_type, missing, queued_entry("4-0", 4)])
        handler = Handler()
        consumer = StreamConsumer(source, handler, Clock())
        self.assertEqual(self.successResultOf(self.run_once(consumer)), 4)
        self.assertEqual(handler.batches, [["1-0", "4-0"]])
        self.assertEqual([event_id for event_id, _ in source.parked], ["2-0", "3-0"])
        self.assertIn("unknown event type 'message.exploded'", source.parked[0][1])
        self.assertIn("missing field 'token'", source.parked[1][1])
        self.assertEqual(source.acked, ["1-0", "4-0"])
        self.assertEqual((consumer.parked, consumer.handled), (2, 2))
        self.assertEqual(source.pending, [])

    def test_batch_of_unreadable_entries_only(self) -> None:
        """A batch of unreadable entries is parked without calling the handler."""
        source = Source([Event(id="1-0", type="", data={}), Event(id="2-0", type="x", data={})])
        handler = Handler()
        self.assertEqual(self.successResultOf(self.run_once(StreamConsumer(source, handler, Clock()))), 2)
        self.assertEqual((handler.batches, len(source.parked)), ([], 2))

    def test_take_limits_the_batch(self) -> None:
        """handle gets only the prefix take allows; the rest stays unacknowledged for the next batch."""
        source = Source(entries(5))
        handler = Handler(limit=2)
        consumer = StreamConsumer(source, handler, Clock(), batch_size=10)
        self.assertEqual(self.successResultOf(self.run_once(consumer)), 2)
        self.assertEqual(source.acked, ["1-0", "2-0"])
        self.assertEqual(ids(source.pending), ["3-0", "4-0", "5-0"])
        self.successResultOf(self.run_once(consumer))
        self.successResultOf(self.run_once(consumer))
        self.assertEqual(handler.batches, [["1-0", "2-0"], ["3-0", "4-0"], ["5-0"]])

    def test_take_at_least_one(self) -> None:
        """A take answering 0 still hands one event over, so a consumer can never stall on a batch."""
        source = Source(entries(2))
        handler = Handler(limit=0)
        self.assertEqual(self.successResultOf(self.run_once(StreamConsumer(source, handler, Clock()))), 1)
        self.assertEqual(handler.batches, [["1-0"]])

    def test_batch_size_bounds_the_read(self) -> None:
        """At most batch_size events are read and handled at once."""
        source = Source(entries(5))
        handler = Handler()
        self.successResultOf(self.run_once(StreamConsumer(source, handler, Clock(), batch_size=3)))
        self.assertEqual(handler.batches, [["1-0", "2-0", "3-0"]])

    def test_bad_options_refused(self) -> None:
        """batch_size and max_failures below 1 are configuration errors."""
        for options in ({"batch_size": 0}, {"max_failures": 0}):
            with self.assertRaises(ValueError):
                StreamConsumer(Source([]), Handler(), Clock(), **options)

    def test_outage_classification(self) -> None:
        """Redis and database unavailability and timeouts are outages; a handler's bug is not."""
        orig = Exception("gone")
        for error in (
            QueueError("ERR"),
            RedisUnavailable("down"),
            QueueFull("OOM"),
            DeferredTimeoutError(),
            TimeoutError(),
            ConnectionRefusedError(),
            sa.exc.OperationalError("SELECT 1", {}, orig),
            sa.exc.InterfaceError("SELECT 1", {}, orig),
            sa.exc.TimeoutError(),
        ):
            self.assertTrue(is_outage(error), error)
        for bug in (Poisoned(), ValueError(), KeyError("x"), sa.exc.IntegrityError("INSERT", {}, orig)):
            self.assertFalse(is_outage(bug), bug)


class LoopTests(SynchronousTestCase):
    """The service's loop, on a `task.Clock`."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def start(self, source: Source, handler: Handler, **options: Any) -> StreamConsumer:
        consumer = StreamConsumer(source, handler, self.clock, **options)
        consumer.startService()
        self.addCleanup(self.stop, consumer)
        return consumer

    def stop(self, consumer: StreamConsumer) -> None:
        if consumer.running:
            self.successResultOf(consumer.stopService())

    def test_handles_batches_until_empty_then_idles(self) -> None:
        """Batches follow each other at once; an empty read waits idle_delay before reading again."""
        source = Source(entries(5))
        handler = Handler()
        self.start(source, handler, batch_size=2, idle_delay=3.0)
        self.assertEqual(handler.batches, [["1-0", "2-0"], ["3-0", "4-0"], ["5-0"]])
        reads = source.reads
        self.clock.advance(2.9)
        self.assertEqual(source.reads, reads)
        source.pending.extend(entries(1, start=6))
        self.clock.advance(0.1)
        self.assertEqual(source.reads, reads + 2)
        self.assertEqual(handler.batches[-1], ["6-0"])

    def test_back_off_doubles_up_to_the_limit_and_resets(self) -> None:
        """After each failure the loop waits retry_delay, doubling up to max_retry_delay; a success
        resets the wait."""
        source = Source(entries(1))
        failing = [True]
        handler = Handler(lambda event: failing[0], error=lambda: TimeoutError("SQL slow"), clock=self.clock)
        self.start(source, handler, retry_delay=1.0, max_retry_delay=8.0, idle_delay=100.0)
        for _ in range(40):
            self.clock.advance(1.0)
        self.assertEqual(gaps(handler.times), [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0])
        failing[0] = False
        for _ in range(8):
            self.clock.advance(1.0)
        self.assertEqual(source.acked, ["1-0"])
        succeeded = len(handler.times)
        # The next failure (after the idle wait) waits retry_delay again, not max_retry_delay.
        failing[0] = True
        source.pending.extend(entries(1, start=2))
        for _ in range(110):
            self.clock.advance(1.0)
        self.assertEqual(gaps(handler.times[succeeded:])[:1], [1.0])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_read_failure_backs_off(self) -> None:
        """A read that fails (Redis down) is retried after retry_delay, and nothing is lost."""
        source = Source(entries(2))
        source.fail_reads = 2
        handler = Handler()
        self.start(source, handler, retry_delay=5.0)
        self.assertEqual((source.reads, handler.batches), (1, []))
        self.clock.advance(5.0)
        self.assertEqual((source.reads, handler.batches), (2, []))
        self.clock.advance(9.9)
        self.assertEqual(handler.batches, [])
        self.clock.advance(0.1)
        self.assertEqual(handler.batches, [["1-0", "2-0"]])
        self.assertEqual(source.acked, ["1-0", "2-0"])

    def test_poison_event_found_and_parked(self) -> None:
        """A batch that fails max_failures times is handled one event at a time; the event failing every
        time is parked after max_failures attempts, the others are handled, then batches resume."""
        source = Source(entries(5))
        handler = Handler(fails_on("3-0"))
        consumer = self.start(source, handler, batch_size=10, max_failures=3, retry_delay=1.0)
        for _ in range(20):
            self.clock.advance(1.0)
        whole = ["1-0", "2-0", "3-0", "4-0", "5-0"]
        self.assertEqual(
            handler.batches,
            [whole] * 3 + [["1-0"], ["2-0"]] + [["3-0"]] * 3 + [["4-0"], ["5-0"]],
        )
        self.assertEqual(source.parked, [("3-0", "Poisoned: cannot handle it")])
        self.assertEqual(source.acked, ["1-0", "2-0", "4-0", "5-0"])
        self.assertEqual((consumer.handled, consumer.parked), (4, 1))
        self.assertEqual(len(self.flushLoggedErrors(Poisoned)), 6)
        # Then batches again (after at most batch_size events one by one, counted from the failure).
        source.pending.extend(entries(10, start=6))
        for _ in range(20):
            self.clock.advance(1.0)
        self.assertEqual(source.pending, [])
        self.assertGreater(len(handler.batches[-1]), 1)

    def test_single_poison_event_parked_after_max_failures(self) -> None:
        """A batch of one event that fails every time is parked on the max_failures-th attempt."""
        source = Source(entries(1))
        handler = Handler(fails_on("1-0"))
        self.start(source, handler, max_failures=4, retry_delay=1.0)
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertEqual(handler.batches, [["1-0"]] * 4)
        self.assertEqual([event_id for event_id, _ in source.parked], ["1-0"])
        self.assertEqual(source.acked, [])
        self.flushLoggedErrors(Poisoned)

    def test_event_failing_a_few_times_is_not_parked(self) -> None:
        """An event that fails fewer than max_failures times in a row is handled, not parked."""
        source = Source(entries(1))
        attempts = [0]

        def fails(event: Received) -> bool:
            attempts[0] += 1
            return attempts[0] < 3

        handler = Handler(fails)
        self.start(source, handler, max_failures=3, retry_delay=1.0)
        for _ in range(5):
            self.clock.advance(2.0)
        self.assertEqual((source.parked, source.acked), ([], ["1-0"]))
        self.flushLoggedErrors(Poisoned)

    def test_outage_never_parks(self) -> None:
        """However often the handler fails because a store is down, nothing is parked; once it is back,
        the events are handled."""
        for error in (
            lambda: sa.exc.OperationalError("INSERT", {}, Exception("server has gone away")),
            lambda: RedisUnavailable("Redis did not answer"),
            lambda: DeferredTimeoutError(),
        ):
            source = Source(entries(2))
            down = [True]

            def is_down(event: Received, down: list[bool] = down) -> bool:
                return down[0]

            handler = Handler(is_down, error=error)
            consumer = StreamConsumer(
                source, handler, self.clock, max_failures=1, retry_delay=1.0, max_retry_delay=2.0
            )
            consumer.startService()
            for _ in range(50):
                self.clock.advance(2.0)
            self.assertEqual(len(handler.batches), 51)
            self.assertEqual((source.parked, source.acked, consumer.parked), ([], [], 0), handler.batches[-1])
            down[0] = False
            self.clock.advance(2.0)
            self.assertEqual(source.acked, ["1-0", "2-0"])
            self.successResultOf(consumer.stopService())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_waits_for_the_running_batch(self) -> None:
        """stopService fires only after the batch in hand is handled and acknowledged, and then no
        further batch is read."""
        source = Source(entries(3))
        handler = Handler()
        handler.gate = Deferred()
        consumer = self.start(source, handler, batch_size=2)
        stopped = consumer.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(source.acked, [])
        gate, handler.gate = handler.gate, None
        gate.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(source.acked, ["1-0", "2-0"])
        self.assertEqual(handler.batches, [["1-0", "2-0"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_idle_or_backing_off(self) -> None:
        """A loop waiting on the clock (idle, or backing off after a failure) stops at once."""
        idle = self.start(Source([]), Handler(), idle_delay=60.0)
        self.successResultOf(idle.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        source = Source(entries(1))
        source.fail_reads = 1
        backing_off = self.start(source, Handler(), retry_delay=60.0)
        self.successResultOf(backing_off.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(source.reads, 1)

    def test_stop_before_start(self) -> None:
        """Stopping a consumer that never started fires at once."""
        self.successResultOf(StreamConsumer(Source([]), Handler(), self.clock).stopService())


class StreamTests(RedisTestCase):
    """The consumer over a real Redis stream (`EventStream`)."""

    queue: RedisQueue
    clock: Clock

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.clock = Clock()
        self.clock.advance(NOW)

    def stream(self, consumer: str = "c1", **options: Any) -> EventStream:
        return EventStream(self.redis, Handler.group, consumer, self.keys, **options)

    async def accept(self, *recipients: str) -> list[int]:
        return await self.queue.enqueue(
            b"x", [NewMessage(f"tok-{r}", 3, "incoming", "s@x.test", r) for r in recipients], NOW
        )

    async def stream_ids(self) -> list[str]:
        return [e[0].decode() for e in await self.redis.execute("XRANGE", self.keys.events, "-", "+")]

    async def pending(self) -> list[tuple[str, str]]:
        """(entry id, consumer) of every entry pending in the group."""
        reply = await self.redis.execute("XPENDING", self.keys.events, Handler.group, "-", "+", 1000)
        return [(r[0].decode(), r[1].decode()) for r in reply]

    async def parked(self) -> list[dict[str, str]]:
        reply = await self.redis.execute("XRANGE", self.keys.parked_events, "-", "+")
        return [
            {fields[i].decode(): fields[i + 1].decode("utf-8", "replace") for i in range(0, len(fields), 2)}
            for _, fields in reply
        ]

    def rcpt(self, event: Received) -> str:
        assert isinstance(event.event, MessageQueued)
        return event.event.rcpt_to

    async def test_unacknowledged_batch_read_again_after_restart(self) -> None:
        """A batch whose handling failed (a crash mid-batch) stays pending and is handled in full by the
        consumer that comes back under the same name."""
        await self.accept("a@x.test", "b@x.test")
        crashing = StreamConsumer(self.stream(), Handler(lambda e: True), self.clock)
        with self.assertRaises(Poisoned):
            await crashing.run_once()
        self.assertEqual(len(await self.pending()), 2)
        handler = Handler()
        restarted = StreamConsumer(self.stream(), handler, self.clock)
        self.assertEqual(await restarted.run_once(), 2)
        self.assertEqual(handler.done, await self.stream_ids())
        self.assertEqual(await self.pending(), [])
        self.assertEqual(await restarted.run_once(), 0)

    async def test_unreadable_entries_parked_in_the_parked_stream(self) -> None:
        """Entries no schema reads are moved to events:parked with group, type, data as written and the
        reason, and acknowledged; the readable ones are handled."""
        await self.accept("a@x.test")
        add = self.redis.execute
        await add("XADD", self.keys.events, "*", "type", "message.queued", "data", "{not json")
        await add("XADD", self.keys.events, "*", "type", "message.hologram", "data", '{"id":1}')
        type_, data = encode(
            MessageQueued(
                id=5,
                token="t",
                server_id=3,
                scope="incoming",
                mail_from="",
                rcpt_to="é@x.test",
                size=1,
                timestamp=NOW,
            )
        )
        await add(
            "XADD", self.keys.events, "*", "type", type_, "data", data.replace('"size":1', '"size":"1"')
        )
        await self.accept("b@x.test")
        written = await self.stream_ids()
        handler = Handler()
        consumer = StreamConsumer(self.stream(), handler, self.clock)
        self.assertEqual(await consumer.run_once(), 5)
        self.assertEqual(handler.done, [written[0], written[4]])
        parked = await self.parked()
        self.assertEqual([p["id"] for p in parked], written[1:4])
        self.assertEqual({p["group"] for p in parked}, {Handler.group})
        self.assertEqual(
            [p["type"] for p in parked], ["message.queued", "message.hologram", "message.queued"]
        )
        self.assertEqual(parked[0]["data"], "{not json")
        self.assertEqual(json.loads(parked[1]["data"]), {"id": 1})
        self.assertEqual(json.loads(parked[2]["data"])["rcpt_to"], "é@x.test")
        self.assertIn("unknown event type 'message.hologram'", parked[1]["reason"])
        self.assertIn("'size' has wrong type str", parked[2]["reason"])
        self.assertEqual(await self.pending(), [])
        self.assertEqual(await consumer.run_once(), 0)

    async def run_loop(self, consumer: StreamConsumer, done: Callable[[], bool], steps: int = 40) -> None:
        """Run ``consumer``'s loop until ``done()``: let Redis answer until the loop waits on the clock,
        then move the clock on to the end of that wait; give up after ``steps`` waits."""
        consumer.startService()
        try:
            for _ in range(steps):
                waited = 0.0
                while not self.clock.getDelayedCalls():
                    await deferLater(real_reactor(), 0.002, lambda: None)
                    waited += 0.002
                    self.assertLess(waited, 5.0, "the loop never waited")
                if done():
                    return
                self.clock.advance(
                    max(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds()
                )
        finally:
            await consumer.stopService()

    async def test_poison_event_parked_from_the_stream(self) -> None:
        """On the real stream too, a failing batch is retried one event at a time, the poison event is
        parked after max_failures attempts and the rest of the batch is handled and acknowledged."""
        await self.accept(*(f"{c}@x.test" for c in "abcde"))
        written = await self.stream_ids()
        handler = Handler(lambda e: self.rcpt(e) == "c@x.test")
        consumer = StreamConsumer(
            self.stream(clock=self.clock), handler, self.clock, batch_size=10, max_failures=2, idle_delay=1.0
        )
        await self.run_loop(consumer, lambda: len(handler.done) == 4 and consumer.parked == 1)
        self.flushLoggedErrors(Poisoned)
        self.assertEqual(handler.done, [written[i] for i in (0, 1, 3, 4)])
        self.assertEqual([p["id"] for p in await self.parked()], [written[2]])
        self.assertEqual(await self.pending(), [])

    async def test_own_pending_entries_all_read_again(self) -> None:
        """A consumer reading fewer entries than it has pending (one at a time after a failed batch, or
        restarted with a smaller batch) gets every pending one back, in order, before new ones."""
        await self.accept("a@x.test", "b@x.test", "c@x.test")
        written = await self.stream_ids()
        stream = self.stream(clock=self.clock)
        self.assertEqual(ids(await stream.read(3)), written)  # handling them fails: nothing acknowledged
        got = []
        for _ in range(3):
            batch = await stream.read(1)
            got += ids(batch)
            await stream.ack(ids(batch))
        self.assertEqual(got, written)
        self.assertEqual(await self.pending(), [])

    async def test_restarted_consumer_reads_all_its_pending_entries(self) -> None:
        """A consumer restarted with a batch smaller than what it left pending handles all of it."""
        await self.accept("a@x.test", "b@x.test", "c@x.test")
        written = await self.stream_ids()
        await self.stream().read(10)  # then it died
        handler = Handler()
        consumer = StreamConsumer(self.stream(clock=self.clock), handler, self.clock, batch_size=1)
        for _ in range(3):
            await consumer.run_once()
        self.assertEqual(handler.done, written)

    async def age(self, entry_ids: Sequence[str], consumer: str, idle_ms: int) -> None:
        """Make pending entries look ``idle_ms`` idle (a consumer that read them and died long ago),
        keeping them with ``consumer``: XCLAIM's IDLE sets the idle time Redis keeps by wall clock."""
        await self.redis.execute(
            "XCLAIM", self.keys.events, Handler.group, consumer, 0, *entry_ids, "IDLE", idle_ms, "JUSTID"
        )

    async def test_dead_consumers_entries_taken_over(self) -> None:
        """Entries read and never acknowledged by a consumer that died are taken over by a live one
        (XAUTOCLAIM) once idle over claim_idle, handled and acknowledged; fresh ones are left alone."""
        await self.accept("a@x.test", "b@x.test")
        written = await self.stream_ids()
        self.assertEqual(ids(await self.stream("dead").read(10)), written)
        handler = Handler()
        live = StreamConsumer(self.stream("live", claim_idle=60.0, clock=self.clock), handler, self.clock)
        self.assertEqual(await live.run_once(), 0)  # just read: not abandoned yet
        self.assertEqual(await self.pending(), [(i, "dead") for i in written])
        await self.age(written, "dead", 61_000)
        self.clock.advance(15.0)  # a quarter of claim_idle: the next read looks for abandoned entries
        self.assertEqual(await live.run_once(), 2)
        self.assertEqual(handler.done, written)
        self.assertEqual(await self.pending(), [])

    async def test_takeover_checked_every_quarter_of_claim_idle(self) -> None:
        """A live consumer looks for abandoned entries at most every claim_idle/4 on its clock (one
        command per poll when idle), and then takes over those idle long enough."""
        await self.accept("a@x.test")
        handler = Handler()
        live = StreamConsumer(self.stream("live", claim_idle=60.0, clock=self.clock), handler, self.clock)
        self.assertEqual(await live.run_once(), 1)  # looked for abandoned entries, then read the new one
        await self.accept("b@x.test")
        (dead_entry,) = ids(await self.stream("dead").read(10))
        await self.age([dead_entry], "dead", 3_600_000)
        self.clock.advance(14.9)
        self.assertEqual(await live.run_once(), 0)
        self.assertEqual(await self.pending(), [(dead_entry, "dead")])
        self.clock.advance(0.1)
        self.assertEqual(await live.run_once(), 1)
        self.assertEqual(handler.done[-1], dead_entry)
        self.assertEqual(await self.pending(), [])

    async def test_takeover_with_zero_claim_idle(self) -> None:
        """With claim_idle 0, any entry another consumer has not acknowledged is taken over at once."""
        await self.accept("a@x.test")
        written = await self.stream_ids()
        await self.stream("dead").read(10)
        handler = Handler()
        live = StreamConsumer(self.stream("live", claim_idle=0.0), handler, self.clock)
        self.assertEqual(await live.run_once(), 1)
        self.assertEqual(handler.done, written)
        self.assertEqual(await self.pending(), [])

    async def test_parked_event_of_taken_over_entry(self) -> None:
        """An unreadable entry abandoned by a dead consumer is parked by the one taking it over."""
        await self.redis.execute("XADD", self.keys.events, "*", "type", "nonsense", "data", "{}")
        (entry_id,) = await self.stream_ids()
        await self.stream("dead").read(10)
        live = StreamConsumer(self.stream("live", claim_idle=0.0), Handler(), self.clock)
        self.assertEqual(await live.run_once(), 1)
        self.assertEqual([p["id"] for p in await self.parked()], [entry_id])
        self.assertEqual(await self.pending(), [])

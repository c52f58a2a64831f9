"""Tests for mtad.events.recorder: event batches into SQL history, idempotently."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pymysql
import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mtad.events.consumer import StreamConsumer
from mtad.events.recorder import DEADLOCK_ATTEMPTS, Recorder, raw_message_ids, record_events
from mtad.events.schema import MessageDelivery, Received, decode_entry
from mtad.queue.events import EventStream
from mtad.queue.model import Event, NewMessage
from mtad.queue.redis_queue import RedisQueue
from mtad.store.db import make_engine
from mtad.store.messages import MessageStatus, find_message, list_deliveries
from mtad.store.migrate import upgrade_schema
from mtad.store.raw_messages import raw_message_data
from mtad.store.tables import raw_messages
from tests.redis_server import RedisTestCase
from tests.store.support import (
    MYSQL,
    POSTGRES,
    SQLITE,
    DatabaseTestCase,
    SynchronousDatabase,
    fresh_database_url,
)

NOW = 1_700_000_000.0


def queued(event_id: str, id: int, **changes: Any) -> Received:
    return decode_entry(queued_entry(event_id, id, **changes))


def queued_entry(event_id: str, id: int, **changes: Any) -> Event:
    data: dict[str, Any] = {
        "id": id,
        "raw_message_id": id,
        "token": f"t{id}",
        "server_id": 3,
        "scope": "outgoing",
        "mail_from": "app@example.org",
        "rcpt_to": f"user{id}@example.com",
        "subject": "Grüße 👋",
        "message_id": "<m1@example.org>",
        "size": 2048,
        "timestamp": NOW,
        "tag": "welcome",
    }
    data.update(changes)
    return Event(id=event_id, type="message.queued", data=data)


def delivery(
    event_id: str, message_id: int, attempt: int, status: str, timestamp: float, **changes: Any
) -> Received:
    return decode_entry(delivery_entry(event_id, message_id, attempt, status, timestamp, **changes))


def delivery_entry(
    event_id: str, message_id: int, attempt: int, status: str, timestamp: float, **changes: Any
) -> Event:
    data: dict[str, Any] = {
        "message_id": message_id,
        "attempt": attempt,
        "status": status,
        "code": 250 if status == "Sent" else 451,
        "output": "250 2.0.0 queued as ABC" if status == "Sent" else "451 4.7.1 try later",
        "details": "Message accepted by mx.example.com (192.0.2.1)",
        "sent_with_ssl": True,
        "log_id": "L1",
        "time": 0.25,
        "timestamp": timestamp,
    }
    data.update(changes)
    return Event(id=event_id, type="message.delivery", data=data)


ENTRIES = [
    queued_entry("1-0", 1),
    queued_entry("1-1", 2),
    delivery_entry("2-0", 1, 1, "SoftFail", NOW + 5),
    delivery_entry("3-0", 1, 2, "Sent", NOW + 65),
    delivery_entry("3-1", 2, 1, "Held", NOW + 6, hold_expiry=NOW + 3600),
]
BATCH = [decode_entry(entry) for entry in ENTRIES]


class RecordEventsTests(DatabaseTestCase):
    def snapshot(self) -> tuple[object, ...]:
        return tuple(
            (self.transaction(find_message, id), self.transaction(list_deliveries, id)) for id in (1, 2)
        )

    def test_batch_recorded(self) -> None:
        """Queued events become Pending-then-updated message rows; delivery events become delivery rows."""
        result = self.transaction(record_events, BATCH, NOW + 100)
        self.assertEqual(result.recorded, 5)
        first = self.transaction(find_message, 1)
        second = self.transaction(find_message, 2)
        assert first is not None and second is not None
        self.assertEqual(
            (first.status, first.subject, first.tag), (MessageStatus.SENT, "Grüße 👋", "welcome")
        )
        self.assertEqual(
            (second.status, second.held, second.hold_expiry), (MessageStatus.HELD, True, NOW + 3600)
        )
        deliveries = self.transaction(list_deliveries, 1)
        self.assertEqual(
            [(d.event_id, d.attempt, d.status) for d in deliveries],
            [("2-0", 1, "SoftFail"), ("3-0", 2, "Sent")],
        )
        self.assertEqual((deliveries[1].code, deliveries[1].time, deliveries[1].log_id), (250, 0.25, "L1"))

    def test_reapplying_batch_changes_nothing(self) -> None:
        """Applying the same batch twice (an unacknowledged batch read again) leaves the same rows."""
        self.transaction(record_events, BATCH, NOW + 100)
        before = self.snapshot()
        self.transaction(record_events, BATCH, NOW + 200)
        self.assertEqual(self.snapshot(), before)
        # Replaying only a prefix (older events) does not regress a status either.
        self.transaction(record_events, BATCH[:3], NOW + 300)
        self.assertEqual(self.snapshot(), before)

    def test_pending_message_without_deliveries(self) -> None:
        """A queued event alone gives a Pending message with no delivery attempt."""
        self.transaction(record_events, [queued("1-0", 9, tag=None, subject=None)], NOW)
        found = self.transaction(find_message, 9)
        assert found is not None
        self.assertEqual(
            (found.status, found.last_delivery_attempt, found.subject), (MessageStatus.PENDING, None, None)
        )

    def test_delivery_before_queued_event(self) -> None:
        """A delivery event recorded before its message's queued event, in an earlier batch or earlier in
        the same one, leaves the message with the delivery's status and the queued event's details."""
        envelope = {"server_id": 3, "token": "t1", "scope": "outgoing", "mail_from": "app@example.org"}
        sent = delivery("2-0", 1, 1, "Sent", NOW + 5, rcpt_to="user1@example.com", **envelope)
        self.transaction(record_events, [sent], NOW)
        stand_in = self.transaction(find_message, 1)
        assert stand_in is not None
        self.assertEqual(
            (stand_in.server_id, stand_in.token, stand_in.rcpt_to, stand_in.status, stand_in.subject),
            (3, "t1", "user1@example.com", MessageStatus.SENT, None),
        )
        self.transaction(record_events, [queued("1-0", 1)], NOW + 1)
        self.transaction(record_events, [delivery("2-1", 2, 1, "Sent", NOW + 5), queued("1-1", 2)], NOW + 1)
        for id in (1, 2):
            found = self.transaction(find_message, id)
            assert found is not None
            self.assertEqual(
                (found.status, found.last_delivery_attempt, found.subject, found.size, found.timestamp),
                (MessageStatus.SENT, NOW + 5, "Grüße 👋", 2048, NOW),
            )

    def test_other_event_types_skipped(self) -> None:
        """Events of types the recorder does not record are skipped; the rest is recorded."""
        clicked = Received("1-1", MessageDelivery(message_id=1, attempt=1, status="Sent", timestamp=NOW))
        result = self.transaction(record_events, [queued("1-0", 1), clicked], NOW)
        self.assertEqual(result.recorded, 2)


class RecordEventsPostgresTests(RecordEventsTests):
    backend = POSTGRES


class RecordEventsMySQLTests(RecordEventsTests):
    backend = MYSQL


class ListEventSource:
    """An event stream in memory with consumer-group semantics: unacknowledged events are read again."""

    group = "recorder"

    def __init__(self, events: Sequence[Event]) -> None:
        self.pending = list(events)
        self.acked: list[str] = []
        self.parked: list[tuple[str, str]] = []
        self.reads = 0
        self.fail_reads = 0

    def read(self, count: int) -> Deferred[list[Event]]:
        self.reads += 1
        if self.fail_reads:
            self.fail_reads -= 1
            return fail(ConnectionError("redis went away"))
        return succeed(self.pending[:count])

    def ack(self, ids: Sequence[str]) -> Deferred[None]:
        self.acked.extend(ids)
        self.pending = [e for e in self.pending if e.id not in ids]
        return succeed(None)

    def park(self, event: Event, reason: str) -> Deferred[bool]:
        self.parked.append((event.id, reason))
        self.pending = [e for e in self.pending if e.id != event.id]
        return succeed(True)


class NoBodies:
    """A `BodyArchive` with no body pinned, for tests of the event flow alone (`ArchiveTests` keeps
    bodies with a real Redis)."""

    def bodies_to_archive(self, raw_message_ids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        return succeed({})

    def release_archived(self, raw_message_ids: Sequence[int]) -> Deferred[int]:
        return succeed(0)


class RecorderTests(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.database = SynchronousDatabase(self.engine)
        self.archive = NoBodies()

    def consumer(self, source: ListEventSource, database: Any = None, **options: Any) -> StreamConsumer:
        recorder = Recorder(database or self.database, self.clock, self.archive)
        return StreamConsumer(source, recorder, self.clock, **options)

    def test_batches_recorded_then_acknowledged(self) -> None:
        """The recorder reads in batches, records each, acknowledges it, then idles on the clock."""
        source = ListEventSource(ENTRIES)
        recorder = self.consumer(source, batch_size=2, idle_delay=1.0)
        recorder.startService()
        self.assertEqual(source.acked, [e.id for e in BATCH])
        self.assertEqual(self.database.calls, 3)
        reads = source.reads
        self.clock.advance(1.0)
        self.assertEqual(source.reads, reads + 1)
        self.successResultOf(recorder.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        message = self.transaction(find_message, 1)
        assert message is not None
        self.assertEqual(message.status, MessageStatus.SENT)

    def test_failure_retried_after_delay_without_ack(self) -> None:
        """When recording fails, nothing is acknowledged and the batch is read again after retry_delay."""
        source = ListEventSource(ENTRIES)
        source.fail_reads = 1
        recorder = self.consumer(source, retry_delay=5.0)
        recorder.startService()
        self.assertEqual(source.acked, [])
        self.clock.advance(4.9)
        self.assertEqual(source.acked, [])
        self.clock.advance(0.1)
        self.assertEqual(source.acked, [e.id for e in BATCH])
        self.successResultOf(recorder.stopService())

    def test_database_failure_not_acknowledged(self) -> None:
        """If the SQL transaction fails, the events stay unacknowledged so they are recorded later."""
        source = ListEventSource(ENTRIES)
        self.transaction(lambda conn: conn.exec_driver_sql("DROP TABLE deliveries"))
        result = Deferred.fromCoroutine(self.consumer(source).run_once())
        self.failureResultOf(result)
        self.assertEqual(source.acked, [])
        self.assertIsNone(self.transaction(find_message, 1))

    def test_batch_losing_a_deadlock_runs_again_at_once(self) -> None:
        """A batch chosen as a deadlock's victim (two recorders crossing, see ConcurrentRecordingTests) is
        run again at once: recorded and acknowledged without waiting retry_delay, and no traceback."""
        source = ListEventSource(ENTRIES)
        database = LosingDeadlocks(self.database, losses=DEADLOCK_ATTEMPTS - 1)
        recorder = self.consumer(source, database, batch_size=10)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(recorder.run_once())), len(BATCH))
        self.assertEqual(source.acked, [e.id for e in BATCH])
        self.assertEqual(database.calls, DEADLOCK_ATTEMPTS)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_batch_losing_every_deadlock_fails_unacknowledged(self) -> None:
        source = ListEventSource(ENTRIES)
        database = LosingDeadlocks(self.database, losses=DEADLOCK_ATTEMPTS)
        recorder = self.consumer(source, database, batch_size=10)
        self.failureResultOf(Deferred.fromCoroutine(recorder.run_once()), sa.exc.OperationalError)
        self.assertEqual((source.acked, database.calls), ([], DEADLOCK_ATTEMPTS))


class LosingDeadlocks:
    """A database whose first ``losses`` transactions are rolled back as MySQL rolls back a deadlock's
    victim (the driver's own error, as SQLAlchemy wraps it); the rest run on ``database``."""

    def __init__(self, database: SynchronousDatabase, losses: int) -> None:
        self.database = database
        self.losses = losses
        self.calls = 0

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        if self.calls <= self.losses:
            orig = pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
            return fail(sa.exc.OperationalError("INSERT INTO messages ...", {}, orig))
        return self.database.run(fn, *args, **kwargs)


BODY = b"From: app@example.org\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nHello \xf0\x9f\x91\x8b\r\n"


class ArchiveTestCase(RedisTestCase):
    """Real Redis (queue and stream) and real SQL for tests of raw messages; SQLite here, PostgreSQL and
    MariaDB in subclasses setting ``backend`` when configured."""

    backend = SQLITE

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.engine = make_engine(fresh_database_url(self, self.backend))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)

    def transaction(self, fn: Any, *args: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args)

    def recorder(self, **options: Any) -> StreamConsumer:
        """A recorder as the daemon builds one; every call gives a new one under the same consumer name,
        as after a crash and restart."""
        stream = EventStream(self.redis, "recorder", "recorder-1", keys=self.keys)
        return StreamConsumer(stream, Recorder(self.database, self.clock, self.queue, **options), self.clock)

    async def accept(self, *recipients: str, body: bytes = BODY) -> list[int]:
        messages = [
            NewMessage(
                token=f"tok-{rcpt}",
                server_id=3,
                scope="outgoing",
                mail_from="app@example.org",
                rcpt_to=rcpt,
                event={"subject": "Grüße"},
            )
            for rcpt in recipients
        ]
        return await self.queue.enqueue(body, messages, NOW)

    async def deliver_all(self) -> None:
        """Claim and ack every due message with a Sent event, as the delivery service does."""
        for claimed in await self.queue.claim(NOW + 1, 100, 60.0, "deliverer"):
            event = MessageDelivery(
                message_id=claimed.id,
                attempt=1,
                status="Sent",
                output="250 OK",
                details="accepted",
                timestamp=NOW + 1,
            )
            self.assertTrue(await self.queue.ack(claimed.id, claimed.lease_token, event))

    def raw_count(self) -> int:
        query = sa.select(sa.func.count()).select_from(raw_messages)
        return int(self.transaction(lambda conn: conn.execute(query).scalar_one()))

    async def body_in_redis(self, raw_message_id: int) -> bool:
        return bool(await self.redis.execute("EXISTS", self.keys.body(raw_message_id)))


class ArchiveTests(ArchiveTestCase):
    """Raw messages kept by the recorder."""

    async def test_one_raw_message_per_accept(self) -> None:
        """Three recipients of one accept: three message rows pointing at one raw message, stored once."""
        ids = await self.accept("a@example.com", "b@example.com", "c@example.com")
        self.assertEqual(await self.recorder().run_once(), 3)
        self.assertEqual(self.raw_count(), 1)
        self.assertEqual(self.transaction(raw_message_data, ids[0]), BODY)
        for id in ids:
            self.assertEqual(self.transaction(find_message, id).raw_message_id, ids[0])
        # Released in Redis, but still there for the three queued messages.
        self.assertEqual(await self.queue.bodies_to_archive([ids[0]]), {})
        self.assertEqual(await self.redis.execute("HGET", self.keys.body(ids[0]), "refs"), b"3")

    async def test_delivered_before_recorded_still_archived(self) -> None:
        """A message delivered (acked, its last reference dropped) before the recorder reads its queued
        event still has its raw message stored; the body leaves Redis once it is in SQL."""
        (id,) = await self.accept("a@example.com")
        await self.deliver_all()
        self.assertTrue(await self.body_in_redis(id))
        self.assertEqual(await self.recorder().run_once(), 2)
        self.assertEqual(self.transaction(raw_message_data, id), BODY)
        self.assertEqual(self.transaction(find_message, id).status, MessageStatus.SENT)
        self.assertFalse(await self.body_in_redis(id))

    async def test_crash_after_commit_before_release(self) -> None:
        """A recorder that stored a batch but died before releasing its bodies: the batch read again stores
        nothing twice, and the bodies are released then."""
        (id,) = await self.accept("a@example.com")
        await self.deliver_all()
        stream = EventStream(self.redis, "recorder", "recorder-1", keys=self.keys)
        events = [decode_entry(e) for e in await stream.read(100)]
        bodies = await self.queue.bodies_to_archive(raw_message_ids(events))
        await self.database.run(record_events, events, NOW, bodies)
        # Crash. The restarted recorder reads its unacknowledged batch again.
        self.assertEqual(await self.recorder().run_once(), 2)
        self.assertEqual(self.raw_count(), 1)
        self.assertEqual(self.transaction(raw_message_data, id), BODY)
        self.assertFalse(await self.body_in_redis(id))
        self.assertEqual(await self.recorder().run_once(), 0)

    async def test_crash_after_release_before_ack(self) -> None:
        """A recorder that released a batch's bodies but died before acknowledging it: the batch read again
        releases nothing more, so a recipient still queued keeps its body and is delivered with it."""
        ids = await self.accept("a@example.com", "b@example.com")
        stream = EventStream(self.redis, "recorder", "recorder-1", keys=self.keys)
        events = [decode_entry(e) for e in await stream.read(100)]
        bodies = await self.queue.bodies_to_archive(raw_message_ids(events))
        await self.database.run(record_events, events, NOW, bodies)
        await self.queue.release_archived(list(bodies))
        (first,) = await self.queue.claim(NOW + 1, 1, 60.0, "deliverer")
        self.assertTrue(await self.queue.ack(first.id, first.lease_token))
        # Crash before the acknowledgement: the restarted recorder reads the same two events again.
        self.assertEqual(await self.recorder().run_once(), 2)
        self.assertEqual(await self.recorder().run_once(), 0)
        self.assertEqual(self.raw_count(), 1)
        self.assertEqual(self.transaction(raw_message_data, ids[0]), BODY)
        (second,) = await self.queue.claim(NOW + 1, 1, 60.0, "deliverer")
        self.assertEqual((second.id, second.body), (ids[1], BODY))
        self.assertTrue(await self.queue.ack(second.id, second.lease_token))
        self.assertFalse(await self.body_in_redis(ids[0]))

    async def test_batch_bounded_by_body_bytes(self) -> None:
        """A batch takes bodies up to ``batch_bytes`` (at least one); the rest come in the next batches."""
        big = b"x" * 1000
        first = await self.accept("a@example.com", "b@example.com", body=big)
        second = await self.accept("c@example.com", body=big)
        third = await self.accept("d@example.com", body=big)
        recorder = self.recorder(batch_bytes=1500)
        self.assertEqual([await recorder.run_once() for _ in range(4)], [2, 1, 1, 0])
        for id in (first[0], second[0], third[0]):
            self.assertEqual(self.transaction(raw_message_data, id), big)

    async def test_event_without_raw_message(self) -> None:
        """A queued event from before raw messages were kept records its message without one."""
        data = {
            "id": 77,
            "token": "t77",
            "server_id": 3,
            "scope": "outgoing",
            "mail_from": "app@example.org",
            "rcpt_to": "a@example.com",
            "size": 10,
            "timestamp": NOW,
        }
        await self.redis.execute(
            "XADD", self.keys.events, "*", "type", "message.queued", "data", json.dumps(data)
        )
        self.assertEqual(await self.recorder().run_once(), 1)
        self.assertIsNone(self.transaction(find_message, 77).raw_message_id)
        self.assertEqual(self.raw_count(), 0)


class ArchivePostgresTests(ArchiveTests):
    backend = POSTGRES


class ArchiveMySQLTests(ArchiveTests):
    backend = MYSQL

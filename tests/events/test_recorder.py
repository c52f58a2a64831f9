"""Tests for mtad.events.recorder: event batches into SQL history, idempotently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mtad.events.recorder import Event, Recorder, record_events
from mtad.store.messages import MessageStatus, find_message, list_deliveries
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase, SynchronousDatabase

NOW = 1_700_000_000.0


def queued(event_id: str, id: int, **changes: Any) -> Event:
    data: dict[str, Any] = {
        "id": id,
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


BATCH = [
    queued("1-0", 1),
    queued("1-1", 2),
    delivery("2-0", 1, 1, "SoftFail", NOW + 5),
    delivery("3-0", 1, 2, "Sent", NOW + 65),
    delivery("3-1", 2, 1, "Held", NOW + 6, hold_expiry=NOW + 3600),
]


class RecordEventsTests(DatabaseTestCase):
    def snapshot(self) -> tuple[object, ...]:
        return tuple(
            (self.transaction(find_message, id), self.transaction(list_deliveries, id)) for id in (1, 2)
        )

    def test_batch_recorded(self) -> None:
        """Queued events become Pending-then-updated message rows; delivery events become delivery rows."""
        result = self.transaction(record_events, BATCH, NOW + 100)
        self.assertEqual((result.recorded, result.rejected), (5, ()))
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

    def test_malformed_and_unknown_events(self) -> None:
        """Malformed events are rejected with a reason, other event types skipped; the rest is recorded."""
        events = [
            queued("1-0", 1),
            Event(id="1-1", type="message.queued", data={"id": "not a number"}),
            delivery("1-2", 1, 1, "Exploded", NOW),
            Event(id="1-3", type="message.link_clicked", data={}),
            queued("1-4", 2, size=True),
        ]
        result = self.transaction(record_events, events, NOW)
        self.assertEqual(result.recorded, 1)
        self.assertEqual([event_id for event_id, _ in result.rejected], ["1-1", "1-2", "1-4"])
        self.assertIn("'id'", result.rejected[0][1])
        self.assertIn("'Exploded'", result.rejected[1][1])
        self.assertIsNone(self.transaction(find_message, 2))


class RecordEventsPostgresTests(RecordEventsTests):
    backend = POSTGRES


class RecordEventsMySQLTests(RecordEventsTests):
    backend = MYSQL


class ListEventSource:
    """An event stream in memory with consumer-group semantics: unacknowledged events are read again."""

    def __init__(self, events: Sequence[Event]) -> None:
        self.pending = list(events)
        self.acked: list[str] = []
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


class RecorderTests(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.database = SynchronousDatabase(self.engine)

    def test_batches_recorded_then_acknowledged(self) -> None:
        """The recorder reads in batches, records each, acknowledges it, then idles on the clock."""
        source = ListEventSource(BATCH)
        recorder = Recorder(self.database, source, self.clock, batch_size=2, idle_delay=1.0)
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
        source = ListEventSource(BATCH)
        source.fail_reads = 1
        recorder = Recorder(self.database, source, self.clock, retry_delay=5.0)
        recorder.startService()
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(source.acked, [])
        self.clock.advance(4.9)
        self.assertEqual(source.acked, [])
        self.clock.advance(0.1)
        self.assertEqual(source.acked, [e.id for e in BATCH])
        self.successResultOf(recorder.stopService())

    def test_database_failure_not_acknowledged(self) -> None:
        """If the SQL transaction fails, the events stay unacknowledged so they are recorded later."""
        source = ListEventSource(BATCH)
        self.transaction(lambda conn: conn.exec_driver_sql("DROP TABLE deliveries"))
        recorder = Recorder(self.database, source, self.clock)
        result = Deferred.fromCoroutine(recorder.record_batch())
        self.failureResultOf(result)
        self.assertEqual(source.acked, [])
        self.assertIsNone(self.transaction(find_message, 1))

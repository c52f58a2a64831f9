"""Tests for mtad.store.messages: message and delivery history."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import is_deadlock
from mtad.store.messages import (
    DeliveryAttempt,
    Message,
    MessageStatus,
    Scope,
    find_message,
    list_deliveries,
    list_messages,
    record_deliveries,
    record_delivery,
    record_messages,
)
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase

NOW = 1_700_000_000.0
#: How long a test waits for another transaction, and a session for a row lock, before failing.
WAIT_SECONDS = 10
#: 10,000 four-byte characters: longer than MySQL's TEXT and impossible in MySQL's 3-byte "utf8".
EMOJI_SUBJECT = "📬" * 9_999 + "✓"


def message(id: int = 1, **changes: object) -> Message:
    values: dict[str, object] = {
        "id": id,
        "token": f"tok{id}",
        "server_id": 7,
        "scope": Scope.OUTGOING,
        "rcpt_to": "rcpt@example.com",
        "mail_from": "sender@example.org",
        "subject": "Hello",
        "message_id": "<abc@example.org>",
        "size": 1234,
        "status": MessageStatus.PENDING,
        "held": False,
        "hold_expiry": None,
        "last_delivery_attempt": None,
        "tag": None,
        "timestamp": NOW,
    }
    values.update(changes)
    return Message(**values)  # type: ignore[arg-type]


def attempt(event_id: str, status: MessageStatus, timestamp: float, **changes: object) -> DeliveryAttempt:
    values: dict[str, object] = {
        "event_id": event_id,
        "message_id": 1,
        "attempt": 1,
        "status": status,
        "output": "250 2.0.0 OK",
        "details": "Message for rcpt@example.com accepted by mx.example.com",
        "sent_with_ssl": True,
        "timestamp": timestamp,
    }
    values.update(changes)
    return DeliveryAttempt(**values)  # type: ignore[arg-type]


SENT = attempt("1-0", MessageStatus.SENT, NOW + 5, code=250)


class MessageTests(DatabaseTestCase):
    def test_emoji_subject_round_trips(self) -> None:
        """A 10,000-character subject of 4-byte emoji is stored and read back unchanged."""
        self.transaction(record_messages, [message(subject=EMOJI_SUBJECT)], NOW)
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual(found.subject, EMOJI_SUBJECT)
        self.assertEqual(found, message(subject=EMOJI_SUBJECT))

    def test_large_ids_and_long_output(self) -> None:
        """Ids beyond 32 bits and delivery output beyond 64 KiB are stored whole."""
        big = 2**40 + 5
        output = "x" * 100_000
        self.transaction(record_messages, [message(id=big)], NOW)
        self.transaction(
            record_delivery, attempt("1-0", MessageStatus.SENT, NOW + 1, message_id=big, output=output), NOW
        )
        [delivery] = self.transaction(list_deliveries, big)
        self.assertEqual((delivery.message_id, delivery.output), (big, output))

    def test_record_messages_is_idempotent(self) -> None:
        """Recording a message again (a replayed event) leaves one row, as it was."""
        self.transaction(record_messages, [message()], NOW)
        self.transaction(record_messages, [message(), message(id=2), message()], NOW + 1)
        self.assertEqual(self.transaction(list_messages, 7), [message(id=2), message()])

    def test_delivery_updates_message(self) -> None:
        """A delivery attempt is recorded and sets the message's status and last attempt time."""
        self.transaction(record_messages, [message()], NOW)
        self.transaction(record_delivery, attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 10, code=451), NOW)
        self.transaction(
            record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 70, attempt=2, code=250), NOW
        )
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual((found.status, found.last_delivery_attempt), (MessageStatus.SENT, NOW + 70))
        deliveries = self.transaction(list_deliveries, 1)
        self.assertEqual(
            [(d.attempt, d.status, d.code) for d in deliveries], [(1, "SoftFail", 451), (2, "Sent", 250)]
        )
        self.assertTrue(deliveries[0].sent_with_ssl)

    def test_delivery_recorded_before_its_message(self) -> None:
        """A delivery recorded before its message (another process's recorder committed first) gives the
        message its status when the message is recorded; the latest attempt wins, with its hold expiry, and
        a message with no attempt stays Pending."""
        self.transaction(record_delivery, attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 1), NOW)
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 5, attempt=2), NOW)
        self.transaction(
            record_delivery,
            attempt("3-0", MessageStatus.HELD, NOW + 2, message_id=3, hold_expiry=NOW + 3600),
            NOW,
        )
        self.transaction(record_messages, [message(1), message(2), message(3)], NOW + 6)
        self.assertEqual(
            self.transaction(list_messages, 7),
            [
                message(
                    3,
                    status=MessageStatus.HELD,
                    held=True,
                    hold_expiry=NOW + 3600,
                    last_delivery_attempt=NOW + 2,
                ),
                message(2),
                message(1, status=MessageStatus.SENT, last_delivery_attempt=NOW + 5),
            ],
        )
        self.assertEqual(len(self.transaction(list_deliveries, 1)), 2)
        # Recording the messages again (a replayed batch) changes nothing.
        before = self.transaction(list_messages, 7)
        self.transaction(record_messages, [message(1), message(3)], NOW + 7)
        self.assertEqual(self.transaction(list_messages, 7), before)

    def test_delivery_before_message_stands_in_for_it(self) -> None:
        """Until its message is recorded, a delivery gives it a row with the envelope its event names, the
        attempt's time as its timestamp and its status; a later attempt updates that row."""
        envelope = {
            "server_id": 7,
            "token": "tok1",
            "scope": Scope.OUTGOING,
            "mail_from": "sender@example.org",
            "rcpt_to": "rcpt@example.com",
        }
        self.transaction(record_delivery, attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 5, **envelope), NOW)
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 9, **envelope), NOW)
        stand_in = message(
            subject=None,
            message_id=None,
            size=0,
            timestamp=NOW + 5,
            status=MessageStatus.SENT,
            last_delivery_attempt=NOW + 9,
        )
        self.assertEqual(self.transaction(find_message, 1), stand_in)
        self.assertEqual(self.transaction(list_messages, 7), [stand_in])
        self.transaction(record_messages, [message()], NOW + 10)
        self.assertEqual(
            self.transaction(find_message, 1),
            message(status=MessageStatus.SENT, last_delivery_attempt=NOW + 9),
        )

    def test_delivery_without_envelope_belongs_to_no_server(self) -> None:
        """A delivery whose event names no envelope, recorded before its message, gives a row of server 0
        (no server's) until the message is recorded."""
        self.transaction(record_delivery, SENT, NOW)
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual((found.server_id, found.token, found.status), (0, "", MessageStatus.SENT))
        self.assertEqual(self.transaction(list_messages, 7), [])

    def test_older_delivery_after_newer(self) -> None:
        """An older attempt recorded after a newer one (a later event, or later in the same batch) leaves
        the newer one's status, whether the message is recorded before, between or after them."""
        # M: the message; S: Sent (newer); O: SoftFail (older); letters together: one batch.
        for id, scenario in enumerate(["M S O", "S M O", "S O M", "M SO", "SO M", "SO"], start=1):
            sent = attempt(f"{id}-2", MessageStatus.SENT, NOW + 70, attempt=2, message_id=id)
            older = attempt(f"{id}-1", MessageStatus.SOFT_FAIL, NOW + 10, message_id=id)
            for step in scenario.split():
                if step == "M":
                    self.transaction(record_messages, [message(id)], NOW)
                else:
                    self.transaction(record_deliveries, [{"S": sent, "O": older}[c] for c in step], NOW)
            found = self.transaction(find_message, id)
            assert found is not None, scenario
            self.assertEqual(
                (found.status, found.last_delivery_attempt), (MessageStatus.SENT, NOW + 70), scenario
            )
            self.assertEqual(len(self.transaction(list_deliveries, id)), 2, scenario)

    def test_replayed_old_delivery_changes_nothing(self) -> None:
        """Replaying an older attempt's event neither duplicates its row nor regresses the message status."""
        self.transaction(record_messages, [message()], NOW)
        old = attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 10)
        self.transaction(record_delivery, old, NOW)
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 70, attempt=2), NOW)
        self.transaction(record_delivery, old, NOW)
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual(found.status, MessageStatus.SENT)
        self.assertEqual(len(self.transaction(list_deliveries, 1)), 2)

    def test_held_sets_hold_expiry(self) -> None:
        """A Held attempt marks the message held until the expiry; a later Sent clears the hold."""
        self.transaction(record_messages, [message()], NOW)
        self.transaction(
            record_delivery, attempt("1-0", MessageStatus.HELD, NOW + 1, hold_expiry=NOW + 86400), NOW
        )
        held = self.transaction(find_message, 1)
        assert held is not None
        self.assertEqual((held.held, held.hold_expiry), (True, NOW + 86400))
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 2), NOW)
        sent = self.transaction(find_message, 1)
        assert sent is not None
        self.assertEqual((sent.held, sent.hold_expiry, sent.status), (False, None, MessageStatus.SENT))


class MessagePostgresTests(MessageTests):
    backend = POSTGRES


class MessageMySQLTests(MessageTests):
    backend = MYSQL


class ConcurrentRecordingTests(DatabaseTestCase):
    """Two recorders' transactions on one message, interleaved as PostgreSQL (READ COMMITTED) and MariaDB
    (REPEATABLE READ) let them run: whichever commits first, the message ends with its delivery's status.

    SQLite runs one writer at a time, so there the other writer just waits and the sequential tests above
    cover it. A transaction that must wait for the other's row lock runs in a thread; the test commits the
    other once that thread has finished or is seen waiting for a lock, and lock timeouts bound every wait.
    """

    backend = POSTGRES

    def setUp(self) -> None:
        super().setUp()
        #: Each session's id on the server, by connection.
        self.session_ids: dict[Connection, int] = {}

    def session(self) -> Connection:
        """A connection of its own whose lock waits time out, closed (rolling back) when the test ends."""
        conn = self.engine.connect()
        self.addCleanup(conn.close)
        if self.backend == MYSQL:
            conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {WAIT_SECONDS}")
            session_id = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        else:
            conn.exec_driver_sql(f"SET lock_timeout = '{WAIT_SECONDS}s'")
            session_id = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.commit()
        self.session_ids[conn] = int(session_id)
        return conn

    def waiting_for_lock(self, observer: Connection, session_id: int) -> bool:
        if self.backend == MYSQL:
            # Not information_schema.innodb_trx: MariaDB refreshes that only after 0.1 s without readers,
            # so tests polling it in parallel keep it stale. The InnoDB monitor is written afresh.
            status = observer.exec_driver_sql("SHOW ENGINE INNODB STATUS").one()[2]
            return any(
                f"thread id {session_id}," in transaction and "LOCK WAIT" in transaction
                for transaction in status.split("---TRANSACTION ")
            )
        query = "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'"
        return bool(observer.exec_driver_sql(query, (session_id,)).scalar_one())

    def commit_in_thread(self, conn: Connection, work: Callable[[Connection], None]) -> Callable[[], None]:
        """Run ``work`` on ``conn`` then commit, in a thread; return once it is done or waits for a lock.

        The function returned waits for the thread to end and re-raises what it raised. Should the test
        fail meanwhile, the thread ends by itself at the latest when its lock wait times out.
        """
        errors: list[BaseException] = []
        session_id = self.session_ids[conn]

        def run() -> None:
            try:
                work(conn)
                conn.commit()
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, WAIT_SECONDS)
        deadline = time.monotonic() + WAIT_SECONDS
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as observer:
            while thread.is_alive() and not self.waiting_for_lock(observer, session_id):
                if time.monotonic() > deadline:
                    self.fail("the other transaction neither finished nor waited for a lock")
                # The state waited for is in the database server, not on a clock this test could drive.
                thread.join(0.01)

        def finish() -> None:
            thread.join(WAIT_SECONDS)
            self.assertFalse(thread.is_alive(), "the other transaction did not finish")
            if errors:
                raise errors[0]

        return finish

    def assert_sent(self) -> None:
        found = self.transaction(find_message, 1)
        self.assertEqual(found, message(status=MessageStatus.SENT, last_delivery_attempt=NOW + 5))
        [delivery] = self.transaction(list_deliveries, 1)
        self.assertEqual(
            (delivery.event_id, delivery.status, delivery.details, delivery.output),
            ("1-0", MessageStatus.SENT, SENT.details, SENT.output),
        )

    def test_delivery_committed_before_uncommitted_message(self) -> None:
        """A delivery committed while its message's insert is still uncommitted in another transaction
        leaves the message Sent once that one commits."""
        a = self.session()
        b = self.session()
        record_messages(a, [message()], NOW)
        finish = self.commit_in_thread(b, lambda conn: record_deliveries(conn, [SENT], NOW))
        a.commit()
        finish()
        self.assert_sent()

    def test_message_committed_before_uncommitted_delivery(self) -> None:
        """A message committed while its delivery is still uncommitted in another transaction (which the
        message's transaction did not see when it began) ends Sent once the delivery commits."""
        a = self.session()
        b = self.session()
        # The message's transaction has read before (on MariaDB this fixes its snapshot).
        self.assertIsNone(find_message(a, 1))
        record_deliveries(b, [SENT], NOW)
        finish = self.commit_in_thread(a, lambda conn: record_messages(conn, [message()], NOW))
        b.commit()
        finish()
        self.assert_sent()

    def test_crossing_batches_deadlock_is_recognised(self) -> None:
        """Two batches that take two messages' rows in opposite orders (message 2 and the delivery of 1;
        message 1 and the delivery of 2): the database rolls one back as a deadlock, `is_deadlock` says
        so, and running that batch again (what the recorder does) leaves both messages Sent."""
        a = self.session()
        b = self.session()
        second = attempt("2-0", MessageStatus.SENT, NOW + 5, message_id=2, code=250)
        record_messages(a, [message(2)], NOW)
        record_messages(b, [message(1)], NOW)
        finish = self.commit_in_thread(b, lambda conn: record_deliveries(conn, [second], NOW))
        errors: list[BaseException] = []
        try:
            record_deliveries(a, [SENT], NOW)
            a.commit()
        except sa.exc.DBAPIError as e:
            errors.append(e)
            a.rollback()
        try:
            finish()
        except sa.exc.DBAPIError as e:
            errors.append(e)
        self.assertEqual([is_deadlock(e) for e in errors], [True])
        self.assertFalse(is_deadlock(sa.exc.DBAPIError("SELECT 1", {}, ValueError("not a database error"))))

        def again(conn: Connection) -> None:  # both batches, as a recorder runs a batch again
            record_messages(conn, [message(1), message(2)], NOW)
            record_deliveries(conn, [SENT, second], NOW)

        self.transaction(again)
        self.assertEqual(
            [self.transaction(find_message, id).status for id in (1, 2)],  # type: ignore[union-attr]
            [MessageStatus.SENT, MessageStatus.SENT],
        )


class ConcurrentRecordingMySQLTests(ConcurrentRecordingTests):
    backend = MYSQL

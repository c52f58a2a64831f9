"""Tests for mtad.store.raw_messages: raw messages stored once, read back whole, deleted under retention."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from mtad.store.raw_messages import (
    PART_SIZE,
    RawMessage,
    RawMessageRetention,
    delete_raw_messages_before,
    raw_message_data,
    raw_messages_size,
    store_raw_messages,
)
from mtad.store.tables import raw_message_parts, raw_messages
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase, SynchronousDatabase

NOW = 1_700_000_000.0
DAY = 86400.0

#: Every byte value, CR, LF and NUL included, in a message larger than several parts.
LARGE = bytes(range(256)) * (3 * PART_SIZE // 256) + b"\r\n.\r\n\x00"


def count(conn: Any, table: Any) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


class RawMessageStoreTests(DatabaseTestCase):
    def test_round_trip(self) -> None:
        """Messages of any size (empty, over MySQL's 64 KiB BLOB, 1 MB, several parts) come back byte for
        byte."""
        bodies = {
            1: b"",
            2: b"Subject: \xf0\x9f\x98\x80\r\n\r\nHi\r\n",
            3: b"x" * 70_000,
            4: b"\xff\x00" * 500_000,
            5: LARGE,
        }
        raw = [RawMessage(id, 7, NOW, data) for id, data in bodies.items()]
        self.transaction(store_raw_messages, raw, NOW)
        for id, data in bodies.items():
            self.assertEqual(self.transaction(raw_message_data, id), data, f"raw message {id}")
        self.assertEqual(self.transaction(raw_messages_size), sum(len(d) for d in bodies.values()))
        self.assertIsNone(self.transaction(raw_message_data, 99))

    def test_stored_once(self) -> None:
        """Storing the same raw message again (events read twice) leaves one copy, unchanged."""
        self.transaction(store_raw_messages, [RawMessage(1, 7, NOW, LARGE)], NOW)
        self.transaction(store_raw_messages, [RawMessage(1, 7, NOW + 5, LARGE)], NOW + 5)
        self.assertEqual(self.transaction(raw_message_data, 1), LARGE)
        self.assertEqual(self.transaction(count, raw_messages), 1)
        self.assertEqual(self.transaction(count, raw_message_parts), -(-len(LARGE) // PART_SIZE))

    def test_delete_before_oldest_first_bounded(self) -> None:
        """Deletion takes raw messages accepted before a time, oldest first, at most ``limit``, parts too."""
        self.transaction(
            store_raw_messages,
            [RawMessage(id, 7, NOW + id, LARGE if id == 1 else b"x") for id in range(1, 6)],
            NOW,
        )
        self.assertEqual(self.transaction(delete_raw_messages_before, NOW + 4, 2), 2)
        self.assertEqual(
            [self.transaction(raw_message_data, id) is None for id in range(1, 6)], [True] * 2 + [False] * 3
        )
        self.assertEqual(self.transaction(delete_raw_messages_before, NOW + 4, 2), 1)
        self.assertEqual(self.transaction(delete_raw_messages_before, NOW + 4, 2), 0)
        self.assertEqual(self.transaction(count, raw_message_parts), 2)


class RawMessageStorePostgresTests(RawMessageStoreTests):
    backend = POSTGRES


class RawMessageStoreMySQLTests(RawMessageStoreTests):
    backend = MYSQL


class RetentionTests(DatabaseTestCase):
    """`RawMessageRetention` on a `task.Clock`, with real SQL (SQLite) run in the test's thread."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = SynchronousDatabase(self.engine)

    def store(self, id: int, age_days: float, size: int = 10) -> None:
        self.transaction(store_raw_messages, [RawMessage(id, 7, NOW - age_days * DAY, b"r" * size)], NOW)

    def kept(self) -> list[int]:
        return [id for id in range(1, 20) if self.transaction(raw_message_data, id) is not None]

    def start(self, **options: Any) -> RawMessageRetention:
        service = RawMessageRetention(self.clock, self.database, 30 * DAY, **options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_expired_deleted_at_start_in_batches(self) -> None:
        """The first sweep, at start, deletes every raw message older than the retention time, in
        transactions of at most ``batch``; younger ones stay."""
        for id in range(1, 6):
            self.store(id, 31 + id)
        self.store(6, 29)
        self.start(batch=2)
        self.assertEqual(self.kept(), [6])
        self.assertEqual(self.database.calls, 3)

    def test_sweeps_every_interval(self) -> None:
        """Each interval, the raw messages that have reached the retention time since are deleted."""
        self.store(1, 29.5)
        self.store(2, 10)
        self.start(interval=3600.0)
        self.assertEqual(self.kept(), [1, 2])
        self.clock.advance(DAY / 2)  # the sweep at this moment finds raw message 1 just 30 days old
        self.assertEqual(self.kept(), [1, 2])
        self.clock.advance(3600)
        self.assertEqual(self.kept(), [2])

    def test_size_limit_deletes_oldest_first(self) -> None:
        """With a size limit, the oldest raw messages go until the rest fit; without one, none do."""
        for id in range(1, 6):
            self.store(id, 10 - id, size=100)
        self.start(max_bytes=250, batch=1)
        self.assertEqual(self.kept(), [4, 5])
        self.assertEqual(self.transaction(raw_messages_size), 200)

    def test_no_size_limit(self) -> None:
        """Without a size limit, young raw messages are kept whatever their total size."""
        for id in range(1, 4):
            self.store(id, 1, size=PART_SIZE)
        self.start()
        self.assertEqual(self.kept(), [1, 2, 3])

    def test_failed_sweep_logged_and_retried(self) -> None:
        """A sweep that fails (database away) is logged; the next interval tries again."""
        self.store(1, 40)
        failing = {"left": 1}
        database = self.database

        class Flaky:
            def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
                if failing["left"]:
                    failing["left"] -= 1
                    return fail(ConnectionError("database went away"))
                return database.run(fn, *args, **kwargs)

        service = RawMessageRetention(self.clock, Flaky(), 30 * DAY, interval=60.0)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(self.kept(), [1])
        self.clock.advance(60)
        self.assertEqual(self.kept(), [])

    def test_stop_ends_sweeping(self) -> None:
        """After stopService no further sweep runs and no call is left on the clock."""
        service = self.start(interval=60.0)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.store(1, 40)
        self.clock.advance(120)
        self.assertEqual(self.kept(), [1])

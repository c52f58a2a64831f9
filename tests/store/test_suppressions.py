"""Tests for mtad.store.suppressions: adding (merging causes and expiries), finding, removing, paging,
filtering, exporting, the batch lookup and the expiry sweep, on SQLite (and PostgreSQL and MySQL/MariaDB
when configured)."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
from twisted.internet.task import Clock

from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store import suppressions as sup
from mtad.store.db import NotFound
from mtad.store.suppressions import SuppressionError, SuppressionSource
from mtad.store.tables import suppressions
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase, SynchronousDatabase

NOW = 1_700_000_000.0
DAY = 86400.0


class SuppressionTestCase(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.transaction(os_.create_organization, "Acme", NOW)
        self.server = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.other = self.transaction(ss.create_server, "acme", "Other", NOW)

    def add(
        self,
        address: str,
        source: SuppressionSource = SuppressionSource.MANUAL,
        at: float = NOW,
        server: ss.Server | None = None,
        **kwargs: Any,
    ) -> sup.Suppression:
        found: sup.Suppression = self.transaction(
            sup.add_suppression, (server or self.server).id, address, source, at, **kwargs
        )
        return found

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(suppressions)).scalar_one())


class AddTests(SuppressionTestCase):
    def test_add_and_find(self) -> None:
        """An address is listed lower-cased with its source, reason, message and expiry, and found in any
        case, for its server only; an expired one is found only when no time is given."""
        added = self.add(
            "  Bob@Example.COM ",
            SuppressionSource.HARD_BOUNCE,
            reason="550 5.1.1 No such user 😀",
            message_id=42,
            expires_at=NOW + 30 * DAY,
        )
        self.assertEqual(
            (added.address, added.source, added.reason, added.message_id, added.created_at, added.expires_at),
            (
                "bob@example.com",
                SuppressionSource.HARD_BOUNCE,
                "550 5.1.1 No such user 😀",
                42,
                NOW,
                NOW + 30 * DAY,
            ),
        )
        self.assertEqual(self.transaction(sup.find_suppression, self.server.id, "BOB@example.com"), added)
        self.assertIsNone(self.transaction(sup.find_suppression, self.other.id, "bob@example.com"))
        self.assertEqual(
            self.transaction(sup.find_suppression, self.server.id, "bob@example.com", NOW + DAY), added
        )
        self.assertIsNone(
            self.transaction(sup.find_suppression, self.server.id, "bob@example.com", NOW + 30 * DAY)
        )
        never = self.add("carol@example.com", SuppressionSource.COMPLAINT)
        self.assertIsNone(never.expires_at)
        self.assertTrue(never.active_at(NOW + 10_000 * DAY))

    def test_same_address_other_server(self) -> None:
        """Each server has its own list: the same address is listed once per server."""
        mine = self.add("a@example.com")
        theirs = self.add("a@example.com", server=self.other)
        self.assertNotEqual(mine.id, theirs.id)
        self.assertEqual(self.rows(), 2)

    def test_newer_cause_replaces_and_extends(self) -> None:
        """Adding a listed address again keeps one row: the newer cause replaces the older's source,
        reason, message and time, and the expiry only moves later (never expiring wins)."""
        first = self.add(
            "a@example.com", SuppressionSource.SOFT_FAILURES, reason="5 soft", expires_at=NOW + 30 * DAY
        )
        later = self.add(
            "A@example.com",
            SuppressionSource.HARD_BOUNCE,
            at=NOW + DAY,
            reason="550 5.1.1",
            message_id=7,
            expires_at=NOW + 10 * DAY,
        )
        self.assertEqual(later.id, first.id)
        self.assertEqual(
            (later.source, later.reason, later.message_id, later.created_at, later.expires_at),
            (SuppressionSource.HARD_BOUNCE, "550 5.1.1", 7, NOW + DAY, NOW + 30 * DAY),
        )
        complaint = self.add("a@example.com", SuppressionSource.COMPLAINT, at=NOW + 2 * DAY)
        self.assertIsNone(complaint.expires_at)
        bounce = self.add(
            "a@example.com", SuppressionSource.HARD_BOUNCE, at=NOW + 3 * DAY, expires_at=NOW + 33 * DAY
        )
        self.assertEqual((bounce.source, bounce.expires_at), (SuppressionSource.HARD_BOUNCE, None))
        self.assertEqual(self.rows(), 1)
        self.assertEqual(self.transaction(sup.find_suppression, self.server.id, "a@example.com"), bounce)

    def test_older_cause_only_extends(self) -> None:
        """A cause older than the row's (an event handled late) leaves the cause as it is and can only
        move the expiry later; the same cause again changes nothing."""
        current = self.add(
            "a@example.com",
            SuppressionSource.HARD_BOUNCE,
            at=NOW + DAY,
            reason="new",
            expires_at=NOW + 31 * DAY,
        )
        self.assertEqual(
            self.add(
                "a@example.com",
                SuppressionSource.HARD_BOUNCE,
                at=NOW + DAY,
                reason="new",
                expires_at=NOW + 31 * DAY,
            ),
            current,
        )
        older = self.add(
            "a@example.com", SuppressionSource.SOFT_FAILURES, at=NOW, reason="old", expires_at=NOW + 40 * DAY
        )
        self.assertEqual(
            (older.source, older.reason, older.created_at), (SuppressionSource.HARD_BOUNCE, "new", NOW + DAY)
        )
        self.assertEqual(older.expires_at, NOW + 40 * DAY)

    def test_expired_row_starts_afresh(self) -> None:
        """An expired row not yet swept is replaced whole, its expiry included."""
        self.add("a@example.com", SuppressionSource.COMPLAINT, expires_at=NOW + DAY)
        again = self.add(
            "a@example.com", SuppressionSource.MANUAL, at=NOW + 2 * DAY, expires_at=NOW + 3 * DAY
        )
        self.assertEqual((again.source, again.expires_at), (SuppressionSource.MANUAL, NOW + 3 * DAY))

    def test_bad_input(self) -> None:
        """Addresses that are not local@domain, too long or with spaces, unknown sources and an expiry
        not after now are refused naming the field; an unknown server is NotFound; nothing is added."""
        for address in (
            "",
            "bob",
            "@example.com",
            "bob@",
            "b ob@example.com",
            "bob@exa\x00mple.com",
            "a" * 320 + "@x.com",
            5,
        ):
            with self.assertRaises(SuppressionError, msg=repr(address)) as raised:
                self.add(address)  # type: ignore[arg-type]
            self.assertEqual(raised.exception.field, "address", address)
        for source in ("manual", "Bounce", None):
            with self.assertRaises(SuppressionError, msg=repr(source)) as raised:
                self.add("a@example.com", source)  # type: ignore[arg-type]
            self.assertEqual(raised.exception.field, "source")
            self.assertIn("HardBounce, SoftFailures, Complaint, Manual, Unsubscribe", str(raised.exception))
        with self.assertRaises(SuppressionError) as raised:
            self.add("a@example.com", expires_at=NOW)
        self.assertEqual(raised.exception.field, "expires_at")
        with self.assertRaises(NotFound):
            self.transaction(sup.add_suppression, 999, "a@example.com", "Manual", NOW)
        self.assertEqual(self.rows(), 0)

    def test_concurrent_adds_leave_one_row(self) -> None:
        """Transactions adding the same address at once (two processes' triggers) both succeed and
        leave one row, holding the newer cause."""
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def add(at: float) -> None:
            try:
                barrier.wait()
                with self.engine.begin() as conn:
                    sup.add_suppression(
                        conn, self.server.id, "race@example.com", "HardBounce", at, reason=str(at)
                    )
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=add, args=(NOW + i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(self.rows(), 1)
        found = self.transaction(sup.find_suppression, self.server.id, "race@example.com")
        assert found is not None
        self.assertEqual((found.created_at, found.reason), (NOW + 3, str(NOW + 3)))

    def test_add_many_skips_deleted_servers(self) -> None:
        """`add_suppressions` adds a batch in one transaction, skipping a server that no longer exists."""
        rows = [
            sup.Suppression(
                0, self.server.id, "a@example.com", SuppressionSource.COMPLAINT, "x", 1, NOW, None
            ),
            sup.Suppression(0, 999, "b@example.com", SuppressionSource.COMPLAINT, "x", 2, NOW, None),
            sup.Suppression(
                0, self.other.id, "c@example.com", SuppressionSource.HARD_BOUNCE, "y", 3, NOW, NOW + DAY
            ),
        ]
        added = self.transaction(sup.add_suppressions, rows)
        self.assertEqual(
            [(s.server_id, s.address) for s in added],
            [(self.server.id, "a@example.com"), (self.other.id, "c@example.com")],
        )
        self.assertEqual(self.rows(), 2)


class RemoveListExportTests(SuppressionTestCase):
    def test_remove(self) -> None:
        """Removing takes the address off that server's list only (in any case); removing it again
        finds nothing."""
        added = self.add("a@example.com")
        self.add("a@example.com", server=self.other)
        self.assertEqual(self.transaction(sup.remove_suppression, self.server.id, "A@Example.com"), added)
        self.assertIsNone(self.transaction(sup.remove_suppression, self.server.id, "a@example.com"))
        self.assertIsNotNone(self.transaction(sup.find_suppression, self.other.id, "a@example.com"))

    def test_list_paged_and_filtered(self) -> None:
        """Listing gives the server's active entries newest first, a page at a time with the total;
        ``source`` and ``search`` (an address substring, ignoring case, LIKE wildcards taken literally)
        filter; expired entries and other servers' are left out."""
        for i in range(7):
            self.add(
                f"user{i}@example.com",
                SuppressionSource.HARD_BOUNCE if i % 2 else SuppressionSource.MANUAL,
                at=NOW + i,
            )
        self.add("old@example.com", at=NOW - 2 * DAY, expires_at=NOW - DAY)
        self.add("x_%@other.test", SuppressionSource.COMPLAINT, at=NOW + 10)
        self.add("theirs@example.com", server=self.other)
        page = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, per_page=3)
        self.assertEqual((page.total, page.page, page.per_page, page.pages), (8, 1, 3, 3))
        self.assertEqual(
            [s.address for s in page.suppressions],
            ["x_%@other.test", "user6@example.com", "user5@example.com"],
        )
        last = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, page=3, per_page=3)
        self.assertEqual([s.address for s in last.suppressions], ["user1@example.com", "user0@example.com"])
        beyond = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, page=9, per_page=3)
        self.assertEqual((beyond.suppressions, beyond.total), ((), 8))
        bounces = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, source="HardBounce")
        self.assertEqual(
            [s.address for s in bounces.suppressions],
            ["user5@example.com", "user3@example.com", "user1@example.com"],
        )
        search = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, search="USER3")
        self.assertEqual([s.address for s in search.suppressions], ["user3@example.com"])
        literal = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, search="_%")
        self.assertEqual([s.address for s in literal.suppressions], ["x_%@other.test"])
        both = self.transaction(
            sup.list_suppressions, self.server.id, NOW + 20, source="Manual", search="user"
        )
        self.assertEqual(both.total, 4)
        empty = self.transaction(sup.list_suppressions, self.server.id, NOW + 20, search="nobody")
        self.assertEqual((empty.total, empty.pages), (0, 1))
        for kwargs, field in (
            ({"page": 0}, "page"),
            ({"per_page": 0}, "per_page"),
            ({"per_page": 1001}, "per_page"),
            ({"source": "x"}, "source"),
        ):
            with self.assertRaises(SuppressionError) as raised:
                self.transaction(sup.list_suppressions, self.server.id, NOW, **kwargs)
            self.assertEqual(raised.exception.field, field)

    def test_export_in_chunks(self) -> None:
        """Exporting reads the active list by id in chunks after the last id, filtered like listing."""
        ids = [self.add(f"u{i}@example.com", at=NOW - i).id for i in range(5)]
        self.add("gone@example.com", expires_at=NOW + 1)
        first = self.transaction(sup.export_suppressions, self.server.id, NOW + 2, limit=2)
        self.assertEqual([s.id for s in first], ids[:2])
        rest = self.transaction(
            sup.export_suppressions, self.server.id, NOW + 2, after_id=first[-1].id, limit=10
        )
        self.assertEqual([s.id for s in rest], ids[2:])
        searched = self.transaction(sup.export_suppressions, self.server.id, NOW + 2, search="u3")
        self.assertEqual([s.address for s in searched], ["u3@example.com"])


class LookupTests(SuppressionTestCase):
    def test_active_for_a_batch(self) -> None:
        """The batch lookup answers which (server, address) pairs are suppressed now, keyed by the
        normalized address: not another server's entry, not an expired one."""
        self.add("a@example.com", expires_at=NOW + DAY)
        self.add("b@example.com", server=self.other)
        self.add("c@example.com", expires_at=NOW + 1)
        found = self.transaction(
            sup.active_suppressions,
            [
                (self.server.id, "A@Example.com"),
                (self.server.id, "b@example.com"),
                (self.other.id, "b@example.com"),
                (self.server.id, "c@example.com"),
                (self.server.id, "d@example.com"),
            ],
            NOW + 1,
        )
        self.assertEqual(set(found), {(self.server.id, "a@example.com"), (self.other.id, "b@example.com")})
        self.assertEqual(found[(self.other.id, "b@example.com")].server_id, self.other.id)
        self.assertEqual(self.transaction(sup.active_suppressions, [], NOW), {})

    def test_many_addresses(self) -> None:
        """A batch of more addresses than one IN list holds is answered whole."""
        for i in range(0, 1200, 7):
            self.add(f"u{i}@example.com")
        found = self.transaction(
            sup.active_suppressions, [(self.server.id, f"u{i}@example.com") for i in range(1200)], NOW
        )
        self.assertEqual(len(found), len(range(0, 1200, 7)))


class ExpiryTests(SuppressionTestCase):
    def test_sweep_deletes_expired(self) -> None:
        """The sweep deletes expired entries in batches at start and every interval; never-expiring and
        live ones stay."""
        for i in range(5):
            self.add(f"u{i}@example.com", expires_at=NOW + DAY)
        self.add("live@example.com", expires_at=NOW + 3 * DAY)
        self.add("never@example.com", SuppressionSource.COMPLAINT)
        clock = Clock()
        clock.advance(NOW + 2 * DAY)
        sweep = sup.SuppressionExpiry(clock, SynchronousDatabase(self.engine), interval=DAY, batch=2)  # type: ignore[arg-type]
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertEqual(self.rows(), 2)
        clock.advance(DAY)
        self.assertEqual(self.rows(), 1)
        self.assertIsNotNone(self.transaction(sup.find_suppression, self.server.id, "never@example.com"))


class AddPostgresTests(AddTests):
    backend = POSTGRES


class AddMySQLTests(AddTests):
    backend = MYSQL


class RemoveListExportPostgresTests(RemoveListExportTests):
    backend = POSTGRES


class RemoveListExportMySQLTests(RemoveListExportTests):
    backend = MYSQL


class LookupPostgresTests(LookupTests):
    backend = POSTGRES


class LookupMySQLTests(LookupTests):
    backend = MYSQL

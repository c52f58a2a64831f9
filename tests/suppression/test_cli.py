"""The suppression commands of mtad.cli, run in-process on a temporary SQLite database."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mtad.cli import main
from mtad.store import servers as ss
from mtad.store import suppressions as sup
from mtad.store.db import make_engine

DAY = 86400.0


class SuppressionCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config = self.dir / "mtad.toml"
        self.config.write_text(
            f'[general]\ndata_dir = "{self.dir / "data"}"\n[suppression]\nexpiry_days = 10\n'
            "unsubscribe_expiry_days = 0\n"
        )
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        self.mtad("make-server", "acme", "Main")
        self.mtad("make-server", "acme", "Other")

    def mtad(self, *argv: str, status: int = 0) -> str:
        """Run a command; its stdout, or its stderr when it is expected to fail."""
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(
            main(["--config", str(self.config), *argv], stdout=out, stderr=err), status, err.getvalue()
        )
        return out.getvalue() if status == 0 else err.getvalue()

    def stored(self, server: str, address: str) -> sup.Suppression | None:
        engine = make_engine(f"sqlite:///{self.dir / 'data' / 'mtad.sqlite3'}")
        try:
            with engine.begin() as conn:
                server_id = ss.get_server_by_name(conn, server).id
                return sup.find_suppression(conn, server_id, address)
        finally:
            engine.dispose()

    def test_add_and_remove(self) -> None:
        """add-suppression lists an address for one server, expiring after suppression.expiry_days
        unless --days or --never say otherwise (unsubscribes by their own setting); remove-suppression
        takes it off, and says so when it was not listed."""
        before = time.time()
        out = self.mtad("add-suppression", "acme/main", "Bob@Example.com", "--reason", "asked by phone 😀")
        self.assertRegex(out, r"^bob@example\.com is suppressed for acme/main \(Manual\) until \d{4}-")
        entry = self.stored("acme/main", "bob@example.com")
        assert entry is not None and entry.expires_at is not None
        self.assertAlmostEqual(entry.expires_at - entry.created_at, 10 * DAY)
        self.assertGreaterEqual(entry.created_at, before)
        self.assertEqual((entry.source, entry.reason), (sup.SuppressionSource.MANUAL, "asked by phone 😀"))
        self.assertIsNone(self.stored("acme/other", "bob@example.com"))
        self.mtad("add-suppression", "acme/main", "x@example.com", "--days", "2.5")
        two = self.stored("acme/main", "x@example.com")
        assert two is not None and two.expires_at is not None
        self.assertAlmostEqual(two.expires_at - two.created_at, 2.5 * DAY)
        out = self.mtad("add-suppression", "acme/main", "y@example.com", "--source", "Unsubscribe")
        self.assertIn("(Unsubscribe) until removed (it never expires)", out)
        self.mtad("add-suppression", "acme/main", "z@example.com", "--never")
        never = self.stored("acme/main", "z@example.com")
        assert never is not None
        self.assertIsNone(never.expires_at)
        out = self.mtad("remove-suppression", "acme/main", "BOB@example.com")
        self.assertEqual(out, "bob@example.com removed from the suppression list of acme/main\n")
        self.assertIsNone(self.stored("acme/main", "bob@example.com"))
        err = self.mtad("remove-suppression", "acme/main", "bob@example.com", status=1)
        self.assertEqual(err, "mtad: error: bob@example.com is not on the suppression list of acme/main\n")

    def test_bad_input(self) -> None:
        """A bad address, an unknown server or source, and a non-positive --days are refused with one
        line; --days and --never exclude each other."""
        self.assertIn(
            "`address` must be an e-mail address", self.mtad("add-suppression", "acme/main", "bob", status=1)
        )
        self.assertEqual(
            self.mtad("add-suppression", "acme/nope", "a@b.c", status=1),
            "mtad: error: no server 'acme/nope'\n",
        )
        for argv in (
            ("--source", "manual"),
            ("--days", "0"),
            ("--days", "x"),
            ("--days", "1", "--never"),
        ):
            self.mtad("add-suppression", "acme/main", "a@b.c", *argv, status=2)
        self.mtad("list-suppressions", "acme/main", "--page", "0", status=2)

    def test_list_paged_and_filtered(self) -> None:
        """list-suppressions shows a page of the server's list, newest first, with the page count;
        --source and --search filter."""
        for i in range(5):
            self.mtad("add-suppression", "acme/main", f"user{i}@example.com", "--reason", f"note {i}")
        self.mtad("add-suppression", "acme/main", "gone@other.test", "--source", "Unsubscribe")
        self.mtad("add-suppression", "acme/other", "theirs@example.com")
        out = self.mtad("list-suppressions", "acme/main", "--per-page", "4")
        header, *rows, footer = out.splitlines()
        self.assertEqual(header.split(), ["ADDRESS", "SOURCE", "SINCE", "UNTIL", "MESSAGE", "REASON"])
        self.assertEqual(footer, "page 1 of 2 (6 suppressed addresses)")
        self.assertEqual(len(rows), 4)
        listed = {row.split()[0] for row in rows}
        out = self.mtad("list-suppressions", "acme/main", "--per-page", "4", "--page", "2")
        listed |= {row.split()[0] for row in out.splitlines()[1:-1]}
        self.assertEqual(listed, {f"user{i}@example.com" for i in range(5)} | {"gone@other.test"})
        out = self.mtad("list-suppressions", "acme/main", "--source", "Unsubscribe")
        (row,) = out.splitlines()[1:-1]
        self.assertRegex(
            row, r"^gone@other\.test\s+Unsubscribe\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\s+never expires\s+-$"
        )
        out = self.mtad("list-suppressions", "acme/main", "--search", "USER3")
        (row,) = out.splitlines()[1:-1]
        self.assertTrue(row.startswith("user3@example.com "), row)
        self.assertTrue(row.endswith("note 3"), row)
        self.assertEqual(
            self.mtad("list-suppressions", "acme/main", "--search", "nobody"),
            "no suppressed addresses\npage 1 of 1 (0 suppressed addresses)\n",
        )
        self.assertEqual(
            self.mtad("list-suppressions", "acme/main", "--page", "5"),
            "no suppressed addresses on page 5\npage 5 of 1 (6 suppressed addresses)\n",
        )

    def add_many(self, server: str, count: int) -> None:
        """``count`` entries u0@ ... straight into the database, in one transaction."""
        engine = make_engine(f"sqlite:///{self.dir / 'data' / 'mtad.sqlite3'}")
        try:
            with engine.begin() as conn:
                server_id = ss.get_server_by_name(conn, server).id
                now = time.time()
                for i in range(count):
                    sup.add_suppression(
                        conn, server_id, f"u{i}@example.com", "Manual", now, reason='said "no", twice'
                    )
        finally:
            engine.dispose()

    def test_export(self) -> None:
        """export-suppressions writes the whole list (more than one chunk) as JSON lines, or as CSV with
        a header, filtered like list-suppressions."""
        self.add_many("acme/main", 1205)
        self.mtad("add-suppression", "acme/other", "theirs@example.com")
        lines = self.mtad("export-suppressions", "acme/main").splitlines()
        entries = [json.loads(line) for line in lines]
        self.assertEqual([e["address"] for e in entries], [f"u{i}@example.com" for i in range(1205)])
        self.assertEqual(
            set(entries[0]), {"address", "source", "reason", "message_id", "created_at", "expires_at"}
        )
        self.assertEqual(
            (entries[0]["source"], entries[0]["reason"], entries[0]["message_id"], entries[0]["expires_at"]),
            ("Manual", 'said "no", twice', None, None),
        )
        out = self.mtad("export-suppressions", "acme/main", "--format", "csv", "--search", "u120")
        self.assertTrue(out.endswith("\r\n"))
        rows = list(csv.reader(io.StringIO(out)))
        self.assertEqual(rows[0], ["address", "source", "reason", "message_id", "created_at", "expires_at"])
        self.assertEqual([r[0] for r in rows[1:]], [f"u{i}@example.com" for i in (120, *range(1200, 1205))])
        self.assertEqual(rows[1][2:4], ['said "no", twice', ""])
        self.assertRegex(rows[1][4], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(rows[1][5], "")
        self.assertEqual(self.mtad("export-suppressions", "acme/main", "--source", "Complaint"), "")
        self.assertEqual(
            self.mtad("export-suppressions", "acme/other", "--format", "csv", "--search", "nobody"),
            "address,source,reason,message_id,created_at,expires_at\r\n",
        )

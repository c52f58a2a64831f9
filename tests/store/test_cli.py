"""Tests for mtad.cli: the operator command, run in-process on a temporary SQLite database."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mtad.cli import CommandError, database_url_from_toml, main
from mtad.store.migrate import head_revision


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config = self.dir / "mtad.toml"
        self.config.write_text(f'[general]\ndata_dir = "{self.dir / "data"}"\n')

    def mtad(self, *argv: str, status: int = 0) -> tuple[str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(
            main(["--config", str(self.config), *argv], stdout=out, stderr=err), status, err.getvalue()
        )
        return out.getvalue(), err.getvalue()

    def test_initialize_creates_database_and_is_repeatable(self) -> None:
        """`initialize` creates data_dir and schema and can be repeated; then `upgrade` has nothing to do."""
        out, _ = self.mtad("initialize")
        self.assertIn(head_revision(), out)
        self.assertTrue((self.dir / "data" / "mtad.sqlite3").exists())
        self.mtad("initialize")
        out, _ = self.mtad("upgrade")
        self.assertIn("already", out)

    def test_commands_need_initialized_database(self) -> None:
        """Before `initialize`, other commands fail with one line saying to run it, and create no file."""
        _, err = self.mtad("list-servers", status=1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("mtad initialize", err)
        _, err = self.mtad("upgrade", status=1)
        self.assertIn("mtad initialize", err)
        self.assertFalse((self.dir / "data" / "mtad.sqlite3").exists())

    def test_organization_and_server(self) -> None:
        """Organizations and servers are made and listed; the server's token is shown."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme Ltd")
        out, _ = self.mtad("make-server", "acme-ltd", "Main", "--mode", "Development")
        token = re.search(r"token ([a-z0-9]{6})", out)
        assert token is not None
        out, _ = self.mtad("list-organizations")
        self.assertIn("acme-ltd", out)
        self.assertIn("Acme Ltd", out)
        out, _ = self.mtad("list-servers")
        self.assertIn("acme-ltd/main", out)
        self.assertIn("Development", out)
        self.assertIn(token.group(1), out)

    def test_duplicate_and_unknown_are_errors(self) -> None:
        """Duplicate organizations and unknown organizations exit 1 with a one-line message naming them."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        _, err = self.mtad("make-organization", "Acme", status=1)
        self.assertRegex(err, r"^mtad: error: .*'acme' already exists\n$")
        _, err = self.mtad("make-server", "nope", "Main", status=1)
        self.assertRegex(err, r"^mtad: error: no organization .*'nope'\n$")
        _, err = self.mtad("make-credential", "acme/none", "--type", "API", status=1)
        self.assertIn("no server", err)

    def test_secrets_printed_once(self) -> None:
        """API key and SMTP password are printed by make-credential and never by list-credentials."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        self.mtad("make-server", "acme", "Main")
        out, _ = self.mtad("make-credential", "acme/main", "--type", "API", "--name", "web")
        api_key = re.search(r"API key: (\S+)", out)
        out, _ = self.mtad("make-credential", "main", "--type", "SMTP", "--hold")
        password = re.search(r"SMTP password: (\S+)", out)
        self.assertIn("SMTP username: acme/main", out)
        out, _ = self.mtad("make-credential", "acme/main", "--type", "SMTP-IP", "--key", "192.0.2.0/24")
        assert api_key is not None and password is not None
        self.assertEqual(len(api_key.group(1)), 24)
        out, _ = self.mtad("list-credentials")
        self.assertNotIn(api_key.group(1), out)
        self.assertNotIn(password.group(1), out)
        self.assertIn("web", out)
        self.assertIn("192.0.2.0/24", out)
        self.assertEqual(len(out.strip().splitlines()), 4)
        out, _ = self.mtad("list-credentials", "acme/main")
        self.assertEqual(len(out.strip().splitlines()), 4)

    def test_bad_ip_key(self) -> None:
        """An SMTP-IP credential with an invalid network exits 1 and says why."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        self.mtad("make-server", "acme", "Main")
        _, err = self.mtad(
            "make-credential", "acme/main", "--type", "SMTP-IP", "--key", "not-an-ip", status=1
        )
        self.assertIn("invalid SMTP-IP key", err)

    def test_usage_error_exits_2(self) -> None:
        """An unknown command is a usage error with exit status 2."""
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main(["no-such-command"]), 2)


class DatabaseURLTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without a config file the database is SQLite in ./data, as an absolute path."""
        self.assertEqual(database_url_from_toml(None), f"sqlite:///{os.path.abspath('data')}/mtad.sqlite3")

    def test_url_from_file(self) -> None:
        """[database] url wins over data_dir."""
        path = Path(self.mktemp())
        path.write_text('[general]\ndata_dir = "/x"\n[database]\nurl = "postgresql+psycopg2://u@h/db"\n')
        self.assertEqual(database_url_from_toml(path), "postgresql+psycopg2://u@h/db")

    def test_bad_files(self) -> None:
        """A missing file, invalid TOML or a non-string url is a CommandError naming the file."""
        path = Path(self.mktemp())
        self.assertRaises(CommandError, database_url_from_toml, path)
        path.write_text("[database\n")
        self.assertRaises(CommandError, database_url_from_toml, path)
        path.write_text("[database]\nurl = 5\n")
        error = self.assertRaises(CommandError, database_url_from_toml, path)
        self.assertIn("database.url", str(error))

"""Tests for mtad.cli: the operator command, run in-process on a temporary SQLite database."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtad.cli import CommandError, database_url_from_toml, main
from mtad.store import domains as domain_store
from mtad.store import servers as server_store
from mtad.store.db import make_engine
from mtad.store.migrate import head_revision
from tests.domains.support import add_record
from tools.fakedns import FakeDNS, start_fake_dns

reactor: Any = _reactor


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

    def test_allow_sender(self) -> None:
        """make-server --allow-sender and set-server --[no-]allow-sender set the server's allow_sender,
        which list-servers shows; set-server without a change or for an unknown server exits 1."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        out, _ = self.mtad("make-server", "acme", "Main", "--allow-sender")
        self.assertIn("the Sender domain may authenticate", out)
        out, _ = self.mtad("make-server", "acme", "Other")
        self.assertNotIn("Sender", out)

        def allow_sender() -> dict[str, str]:
            out, _ = self.mtad("list-servers")
            header, *rows = out.splitlines()
            self.assertTrue(header.endswith("ALLOW SENDER"), header)
            return {row.split()[0]: row.split()[-1] for row in rows}

        self.assertEqual(allow_sender(), {"acme/main": "yes", "acme/other": "no"})
        out, _ = self.mtad("set-server", "acme/other", "--allow-sender")
        self.assertIn("acme/other: the Sender domain may authenticate", out)
        out, _ = self.mtad("set-server", "main", "--no-allow-sender")
        self.assertIn("acme/main: only the From domain authenticates", out)
        self.assertEqual(allow_sender(), {"acme/main": "no", "acme/other": "yes"})
        _, err = self.mtad("set-server", "acme/main", status=1)
        self.assertIn("nothing to change", err)
        _, err = self.mtad("set-server", "acme/none", "--allow-sender", status=1)
        self.assertIn("no server 'acme/none'", err)

    def test_send_limit_and_suspension(self) -> None:
        """set-server sets a send limit (its window and action), removes it, suspends and unsuspends;
        list-servers shows each; bad values exit 2 (argparse) or 1 naming the problem."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        self.mtad("make-server", "acme", "Main")

        def row() -> str:
            out, _ = self.mtad("list-servers")
            header, line = out.splitlines()
            self.assertIn("SEND LIMIT", header)
            return line

        self.assertIn(" - ", row())
        out, _ = self.mtad("set-server", "acme/main", "--send-limit", "500")
        self.assertIn("send limit 500 messages per 3600 s; messages over it are held", out)
        out, _ = self.mtad(
            "set-server", "acme/main", "--send-limit-period", "600", "--send-limit-action", "refuse"
        )
        self.assertIn("send limit 500 messages per 600 s; messages over it are refused (451 4.7.1)", out)
        self.assertIn("500/600s refuse", row())
        out, _ = self.mtad("set-server", "acme/main", "--send-limit", "none")
        self.assertIn("no send limit", out)
        self.assertIn(" - ", row())
        _, err = self.mtad("set-server", "acme/main", "--send-limit-period", "30", status=1)
        self.assertIn("at least 60 seconds", err)
        self.mtad("set-server", "acme/main", "--send-limit", "-3", status=2)
        out, _ = self.mtad("set-server", "acme/main", "--suspend", "abuse report 123")
        self.assertIn("suspended", out)
        self.assertIn("yes: abuse report 123", row())
        out, _ = self.mtad("set-server", "acme/main", "--unsuspend")
        self.assertIn("no longer suspended", out)
        self.assertNotIn("yes:", row())
        _, err = self.mtad("set-server", "acme/main", "--suspend", "x", "--unsuspend", status=1)
        self.assertIn("not both", err)

    def test_routes_and_endpoints(self) -> None:
        """add-endpoint (HTTP, SMTP, address), add-route, list-* and remove-*; bad input exits 1 with a
        message naming what is wrong."""
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        self.mtad("make-server", "acme", "Main")
        engine = make_engine(database_url_from_toml(self.config))
        try:
            with engine.begin() as conn:
                server = server_store.get_server_by_name(conn, "acme/main")
                domain = domain_store.create_domain(
                    conn, "example.org", 0.0, server_id=server.id, rsa_bits=1024
                )
                domain_store.verify_domain(conn, domain.id, 0.0)
        finally:
            engine.dispose()
        out, _ = self.mtad(
            "add-endpoint", "acme/main", "app", "--http", "https://app.example/in", "--timeout", "30"
        )
        self.assertIn(
            "HTTP endpoint 'app' added to acme/main: https://app.example/in (BodyAsJSON, Hash)", out
        )
        out, _ = self.mtad(
            "add-endpoint", "acme/main", "relay", "--smtp", "mx.example.net:2525", "--tls", "STARTTLS"
        )
        self.assertIn("smtp://mx.example.net:2525 (TLS STARTTLS)", out)
        self.mtad("add-endpoint", "acme/main", "boss", "--address", "boss@example.net")
        out, _ = self.mtad("list-endpoints", "acme/main")
        self.assertEqual([line.split()[0] for line in out.splitlines()[1:]], ["app", "boss", "relay"])
        out, _ = self.mtad("add-route", "acme/main", "support@example.org", "--endpoint", "app", "relay")
        self.assertIn("route support@example.org added to acme/main: Endpoint (endpoints: app, relay)", out)
        self.mtad("add-route", "acme/main", "*@example.org", "--mode", "Reject")
        out, _ = self.mtad("list-routes", "acme/main")
        self.assertRegex(out, r"\n\*@example\.org +Reject +Mark +- +[a-z0-9]{8}\n")
        self.assertRegex(out, r"\nsupport@example\.org +Endpoint +Mark +app, relay +[a-z0-9]{8}\n")
        _, err = self.mtad("add-route", "acme/main", "sales@example.org", status=1)
        self.assertIn("needs at least one endpoint", err)
        _, err = self.mtad("add-route", "acme/main", "x@unknown.example", "--endpoint", "app", status=1)
        self.assertIn("not a verified domain", err)
        _, err = self.mtad("add-endpoint", "acme/main", "bad", "--http", "ftp://x.example/", status=1)
        self.assertIn("`url`", err)
        self.mtad("remove-endpoint", "acme/main", "app")
        self.mtad("remove-endpoint", "acme/main", "relay")
        out, _ = self.mtad("list-routes", "acme/main")
        self.assertRegex(out, r"\nsupport@example\.org +Reject +Mark +- ")
        out, _ = self.mtad("remove-route", "acme/main", "support@example.org")
        self.assertIn("route support@example.org removed", out)
        _, err = self.mtad("remove-route", "acme/main", "support@example.org", status=1)
        self.assertIn("no route", err)

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


class DomainCLITests(TestCase):
    """Domain commands, run in a thread (they block on DNS) against the fake DNS server on 127.0.0.1."""

    def setUp(self) -> None:
        self.zone: dict[str, Any] = {}
        self.dns: FakeDNS = start_fake_dns(reactor, self.zone)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.dns.stop()))
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config = self.dir / "mtad.toml"
        self.config.write_text(
            f'[general]\ndata_dir = "{self.dir / "data"}"\n'
            f'[dns]\nnameservers = ["127.0.0.1:{self.dns.port}"]\ntimeout = 2.0\n'
        )

    async def mtad(self, *argv: str, status: int = 0) -> str:
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(main, ["--config", str(self.config), *argv], out, err)
        self.assertEqual(code, status, err.getvalue())
        return out.getvalue() if status == 0 else err.getvalue()

    async def setup_server(self) -> None:
        await self.mtad("initialize")
        await self.mtad("make-organization", "Acme")
        await self.mtad("make-server", "acme", "Main")

    def publish(self, output: str, purpose: str | None = None) -> None:
        """Put the zone-file lines of ``output`` (after a ``; <purpose>`` comment, if given) into the zone."""
        wanted = purpose is None
        for line in output.splitlines():
            if line.startswith(";"):
                wanted = purpose is None or line.startswith(f"; {purpose}")
                continue
            match = re.fullmatch(r"(\S+)\. IN (TXT|CNAME|MX) (.*)", line)
            if match is None or not wanted:
                continue
            name, kind, rdata = match.groups()
            value: Any
            if kind == "TXT":
                value = re.findall(r'"((?:[^"\\]|\\.)*)"', rdata)
            elif kind == "MX":
                preference, host = rdata.split()
                value = [int(preference), host]
            else:
                value = rdata
            add_record(self.zone, name, kind, value)

    async def test_add_and_list_domains(self) -> None:
        """add-domain prints every record to publish; list-domains shows owner, verification and statuses,
        for all or for the domains a server may use."""
        await self.setup_server()
        out = await self.mtad("add-domain", "acme/main", "Example.COM")
        self.assertIn("domain example.com added to server acme/main", out)
        self.assertRegex(out, r'\nexample\.com\. IN TXT "postal-verification [A-Za-z0-9]{32}"\n')
        self.assertIn('example.com. IN TXT "v=spf1 a mx include:spf.postal.example.com ~all"', out)
        self.assertRegex(
            out, r'\npostal-[a-z0-9]{6}\._domainkey\.example\.com\. IN TXT "v=DKIM1; t=s; h=sha256; p='
        )
        self.assertIn("psrp.example.com. IN CNAME rp.postal.example.com.", out)
        self.assertIn("example.com. IN MX 10 mx1.postal.example.com.", out)
        out = await self.mtad(
            "add-domain", "acme", "org.example", "--organization", "--ed25519", "--use-for-any"
        )
        self.assertIn("added to organization acme", out)
        self.assertEqual(out.count("._domainkey.org.example. IN TXT"), 2)
        self.assertIn("k=ed25519", out)
        await self.mtad("make-server", "acme", "Second")
        await self.mtad("add-domain", "acme/second", "second.example")
        out = await self.mtad("list-domains")
        self.assertRegex(out, r"\n1 +example\.com +acme/main +no +- +- +- +- +no\n")
        self.assertRegex(out, r"\n2 +org\.example +acme/\* +no( +-){4} +yes\n")
        out = await self.mtad("list-domains", "acme/main")
        self.assertEqual(len(out.splitlines()), 3)
        self.assertNotIn("second.example", out)
        err = await self.mtad("add-domain", "acme/main", "example.com", status=1)
        self.assertIn("already been added", err)
        err = await self.mtad("add-domain", "acme/nope", "x.example", status=1)
        self.assertIn("no server", err)

    async def test_verify_domain(self) -> None:
        """verify-domain fails naming the record to publish until it is in DNS, then marks the domain
        verified (once)."""
        await self.setup_server()
        added = await self.mtad("add-domain", "acme/main", "example.com")
        err = await self.mtad("verify-domain", "example.com", status=1)
        self.assertRegex(err, r'^mtad: error: example\.com is not verified: There is no TXT record "postal-')
        self.publish(added, "Verification")
        out = await self.mtad("verify-domain", "example.com")
        self.assertIn("example.com verified", out)
        out = await self.mtad("verify-domain", "example.com")
        self.assertIn("already verified", out)
        out = await self.mtad("show-domain", "example.com")
        self.assertRegex(out, r"verified: \d{4}-\d\d-\d\d ")
        self.assertNotIn("postal-verification", out)

    async def test_check_domain(self) -> None:
        """check-domain reports OK for records published as printed, and Missing/Invalid with Postal's
        reasons when they are not; show-domain shows the stored results."""
        await self.setup_server()
        added = await self.mtad("add-domain", "acme/main", "example.com")
        out = await self.mtad("check-domain", "example.com")
        self.assertIn("DNS not OK", out)
        self.assertIn("SPF          Missing: No SPF record exists for this domain", out)
        self.assertIn("not verified yet", out)
        self.publish(added)
        out = await self.mtad("check-domain", "example.com")
        self.assertIn("domain example.com: DNS OK", out)
        for label in ("SPF", "DKIM", "MX", "Return path"):
            self.assertRegex(out, rf"\n  {label} +OK\n")
        self.zone["example.com"]["TXT"] = [["v=spf1 a mx ~all"]]
        del self.zone["example.com"]["MX"]
        out = await self.mtad("check-domain", "example.com")
        self.assertIn(
            "SPF          Invalid: An SPF record exists but it doesn't include spf.postal.example.com", out
        )
        self.assertIn("MX           Missing: There are no MX records for example.com", out)
        out = await self.mtad("show-domain", "example.com")
        self.assertIn("SPF          Invalid", out)
        self.assertRegex(out, r"postal-[a-z0-9]{6} +rsa +active +DNS OK")

    async def test_rotate_and_activate(self) -> None:
        """rotate-dkim prints the new record; activate-dkim refuses until it resolves (unless forced), then
        switches signing to it and retires the old key."""
        await self.setup_server()
        added = await self.mtad("add-domain", "acme/main", "example.com")
        self.publish(added)
        old = re.search(r"selector (postal-[a-z0-9]{6})", added)
        assert old is not None
        out = await self.mtad("rotate-dkim", "example.com")
        new = re.search(r"selector (postal-[a-z0-9]{6}) \(not signing yet\)", out)
        assert new is not None
        self.assertIn(f"Keep the record of the current key ({old.group(1)})", out)
        err = await self.mtad("rotate-dkim", "example.com", status=1)
        self.assertIn("waiting to be activated", err)
        err = await self.mtad("activate-dkim", "example.com", new.group(1), status=1)
        self.assertIn(f"not activating {new.group(1)}: No TXT records were returned", err)
        self.publish(out)
        out = await self.mtad("activate-dkim", "example.com", new.group(1))
        self.assertIn(f"example.com now signs rsa with {new.group(1)}", out)
        self.assertIn(f"{old.group(1)} retired", out)
        out = await self.mtad("show-domain", "example.com")
        self.assertRegex(out, rf"{old.group(1)} +rsa +retired \d{{4}}")
        self.assertRegex(out, rf"{new.group(1)} +rsa +active")
        self.assertNotIn(f"{old.group(1)}._domainkey", out)
        out = await self.mtad("rotate-dkim", "example.com", "--algorithm", "ed25519")
        ed = re.search(r"selector (postal-[a-z0-9]{6})", out)
        assert ed is not None
        await self.mtad("activate-dkim", "example.com", ed.group(1), "--force")
        out = await self.mtad("show-domain", "example.com")
        self.assertRegex(out, rf"{ed.group(1)} +ed25519 +active")
        err = await self.mtad("activate-dkim", "example.com", "postal-nope00", status=1)
        self.assertIn("no DKIM key with selector", err)

    async def test_ambiguous_name_and_unreachable_dns(self) -> None:
        """A name two servers added must be given by id; a DNS server that does not answer is an error
        naming the lookup, not a verification failure."""
        await self.setup_server()
        await self.mtad("make-server", "acme", "Second")
        await self.mtad("add-domain", "acme/main", "example.com")
        await self.mtad("add-domain", "acme/second", "example.com")
        err = await self.mtad("show-domain", "example.com", status=1)
        self.assertIn("ambiguous (ids 1, 2); use the id", err)
        out = await self.mtad("show-domain", "2")
        self.assertIn("owner: acme/second", out)
        self.zone["example.com"] = "SERVFAIL"
        err = await self.mtad("verify-domain", "1", status=1)
        self.assertIn("DNS lookup of TXT records for example.com failed", err)

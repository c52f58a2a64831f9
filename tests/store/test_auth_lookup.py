"""Tests for the credential lookups the SMTP relay policy runs: by id, and SMTP AUTH with its server."""

from __future__ import annotations

from mtad.store import credentials as cs
from mtad.store import organizations as os_
from mtad.store import servers as ss
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase

NOW = 1_700_000_000.0


class AuthLookupTests(DatabaseTestCase):
    def make_server(self, name: str = "Main") -> ss.Server:
        if self.transaction(os_.find_organization, "acme") is None:
            self.transaction(os_.create_organization, "Acme", NOW)
        return self.transaction(ss.create_server, "acme", name, NOW)

    def make_smtp(self, server: ss.Server, hold: bool = False) -> cs.NewCredential:
        return self.transaction(cs.create_credential, server.id, cs.CredentialType.SMTP, NOW, hold=hold)

    def test_find_credential_by_id(self) -> None:
        """A credential is found by id whatever its type, and None once deleted."""
        server = self.make_server()
        ip = self.transaction(
            cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW, key="10.0.0.0/8"
        )
        found = self.transaction(cs.find_credential, ip.credential.id)
        self.assertEqual(found, ip.credential)
        self.transaction(cs.delete_credential, ip.credential.id)
        self.assertIsNone(self.transaction(cs.find_credential, ip.credential.id))

    def test_authenticate_returns_credential_and_server(self) -> None:
        """The right key gives the SMTP credential and its server, and records the use at ``now``."""
        server = self.make_server()
        made = self.make_smtp(server, hold=True)
        assert made.secret is not None
        found = self.transaction(cs.authenticate_smtp_key, made.secret, NOW + 5)
        assert found is not None
        credential, found_server = found
        self.assertEqual(
            (credential.id, credential.hold, credential.last_used_at), (made.credential.id, True, NOW + 5)
        )
        self.assertEqual(found_server, server)
        stored = self.transaction(cs.find_credential, made.credential.id)
        assert stored is not None
        self.assertEqual(stored.last_used_at, NOW + 5)

    def test_authenticate_wrong_key_or_type(self) -> None:
        """A wrong key, or an API key used as SMTP password, finds nothing."""
        server = self.make_server()
        self.make_smtp(server)
        api = self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW)
        assert api.secret is not None
        self.assertIsNone(self.transaction(cs.authenticate_smtp_key, "x" * 24, NOW))
        self.assertIsNone(self.transaction(cs.authenticate_smtp_key, api.secret, NOW))

    def test_authenticate_touches_at_most_once_per_interval(self) -> None:
        """Within ``touch_interval`` of the last recorded use, last_used_at is left alone (no write)."""
        made = self.make_smtp(self.make_server())
        assert made.secret is not None
        self.transaction(cs.authenticate_smtp_key, made.secret, NOW, 60.0)
        again = self.transaction(cs.authenticate_smtp_key, made.secret, NOW + 30, 60.0)
        assert again is not None
        self.assertEqual(again[0].last_used_at, NOW)
        later = self.transaction(cs.authenticate_smtp_key, made.secret, NOW + 61, 60.0)
        assert later is not None
        self.assertEqual(later[0].last_used_at, NOW + 61)

    def test_authenticate_reports_suspended_server(self) -> None:
        """A suspended server's credential is still found; the server value says it is suspended."""
        server = self.make_server()
        made = self.make_smtp(server)
        assert made.secret is not None
        self.transaction(ss.suspend_server, server.id, "abuse", NOW)
        found = self.transaction(cs.authenticate_smtp_key, made.secret, NOW)
        assert found is not None
        self.assertTrue(found[1].suspended)


class AuthLookupPostgresTests(AuthLookupTests):
    backend = POSTGRES


class AuthLookupMySQLTests(AuthLookupTests):
    backend = MYSQL

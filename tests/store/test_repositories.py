"""Tests for the configuration repositories: organizations, servers, credentials."""

from __future__ import annotations

import ipaddress
import re

import sqlalchemy as sa

from mtad.store import credentials as cs
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import AlreadyExists, NotFound, StoreError
from mtad.store.tables import credentials
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase

NOW = 1_700_000_000.0


class RepositoryTests(DatabaseTestCase):
    def make_server(self, org: str = "Acme", name: str = "Main") -> ss.Server:
        if self.transaction(os_.find_organization, os_.make_permalink(org)) is None:
            self.transaction(os_.create_organization, org, NOW)
        return self.transaction(ss.create_server, os_.make_permalink(org), name, NOW)

    def test_organization_permalink_from_name(self) -> None:
        """An organization's permalink defaults to its name, lowercased with hyphens, and can be listed."""
        created = self.transaction(os_.create_organization, "  Acme Ltd. ", NOW)
        self.assertEqual((created.name, created.permalink), ("Acme Ltd.", "acme-ltd"))
        self.assertEqual(self.transaction(os_.list_organizations), [created])

    def test_organization_permalink_unique(self) -> None:
        """A second organization with the same permalink is refused with a message naming it."""
        self.transaction(os_.create_organization, "Acme", NOW)
        with self.assertRaises(AlreadyExists) as raised:
            self.transaction(os_.create_organization, "ACME", NOW)
        self.assertIn("'acme'", str(raised.exception))

    def test_organization_bad_permalink(self) -> None:
        """Permalinks outside lowercase letters, digits and hyphens are refused."""
        with self.assertRaises(StoreError):
            self.transaction(os_.create_organization, "Acme", NOW, permalink="Acme Co")

    def test_server_token_is_six_lowercase_characters(self) -> None:
        """Each server gets a unique six-character lowercase token (Postal style) and mode Live by default."""
        first = self.make_server(name="One")
        second = self.make_server(name="Two")
        for server in (first, second):
            self.assertRegex(server.token, r"^[a-z0-9]{6}$")
            self.assertEqual(server.mode, ss.ServerMode.LIVE)
            self.assertFalse(server.suspended)
        self.assertNotEqual(first.token, second.token)

    def test_server_lookups(self) -> None:
        """A server is found by id, by token (any case) and by org/server name; all give the same value."""
        server = self.make_server()
        self.assertEqual(server.full_permalink, "acme/main")
        self.assertEqual(self.transaction(ss.get_server, server.id), server)
        self.assertEqual(self.transaction(ss.find_server_by_token, server.token.upper()), server)
        self.assertEqual(self.transaction(ss.get_server_by_name, "acme/main"), server)
        self.assertEqual(self.transaction(ss.get_server_by_name, "main"), server)
        self.assertEqual(self.transaction(ss.get_server_by_name, str(server.id)), server)
        self.assertIsNone(self.transaction(ss.find_server_by_token, "zzzzzz"))
        with self.assertRaises(NotFound):
            self.transaction(ss.get_server, server.id + 1)

    def test_server_bare_name_ambiguous(self) -> None:
        """A bare server permalink used by two organizations is refused as ambiguous."""
        self.make_server(org="Acme", name="Main")
        self.make_server(org="Other", name="Main")
        with self.assertRaises(StoreError) as raised:
            self.transaction(ss.get_server_by_name, "main")
        self.assertIn("ambiguous", str(raised.exception))
        self.assertEqual(len(self.transaction(ss.list_servers)), 2)
        self.assertEqual(
            [s.full_permalink for s in self.transaction(ss.list_servers, "other")], ["other/main"]
        )

    def test_server_permalink_unique_per_organization(self) -> None:
        """Two servers of one organization cannot share a permalink; an unknown organization is NotFound."""
        self.make_server()
        with self.assertRaises(AlreadyExists):
            self.make_server()
        with self.assertRaises(NotFound):
            self.transaction(ss.create_server, "nope", "Main", NOW)

    def test_server_development_mode_and_suspension(self) -> None:
        """Mode is stored as given; suspending records the reason and unsuspending clears it."""
        self.transaction(os_.create_organization, "Acme", NOW)
        server = self.transaction(ss.create_server, "acme", "Dev", NOW, mode=ss.ServerMode.DEVELOPMENT)
        self.assertEqual(server.mode, ss.ServerMode.DEVELOPMENT)
        self.transaction(ss.suspend_server, server.id, "spam complaints", NOW)
        suspended = self.transaction(ss.get_server, server.id)
        self.assertEqual((suspended.suspended, suspended.suspension_reason), (True, "spam complaints"))
        self.transaction(ss.suspend_server, server.id, None, NOW)
        self.assertFalse(self.transaction(ss.get_server, server.id).suspended)

    def test_api_key_found_by_secret_and_stored_hashed(self) -> None:
        """An API key is 24 random characters, found by its value, and only its SHA-256 is stored."""
        server = self.make_server()
        new = self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW)
        assert new.secret is not None
        self.assertRegex(new.secret, r"^[A-Za-z0-9]{24}$")
        self.assertEqual(
            self.transaction(cs.find_credential_by_key, cs.CredentialType.API, new.secret), new.credential
        )
        with self.engine.connect() as conn:
            stored = [str(v) for row in conn.execute(sa.select(credentials)) for v in row]
        self.assertNotIn(new.secret, " ".join(stored))
        self.assertIn(cs.hash_secret(new.secret), stored)

    def test_wrong_key_or_type_finds_nothing(self) -> None:
        """A wrong secret, or an API key offered as an SMTP password, matches no credential."""
        server = self.make_server()
        new = self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW)
        assert new.secret is not None
        self.assertIsNone(
            self.transaction(cs.find_credential_by_key, cs.CredentialType.API, new.secret + "x")
        )
        self.assertIsNone(self.transaction(cs.find_credential_by_key, cs.CredentialType.SMTP, new.secret))
        with self.assertRaises(ValueError):
            self.transaction(cs.find_credential_by_key, cs.CredentialType.SMTP_IP, "10.0.0.1")

    def test_smtp_password_and_hold(self) -> None:
        """An SMTP credential's password finds it, with its hold flag; touching records the last use."""
        server = self.make_server()
        new = self.transaction(
            cs.create_credential, server.id, cs.CredentialType.SMTP, NOW, name="app", hold=True
        )
        assert new.secret is not None
        found = self.transaction(cs.find_credential_by_key, cs.CredentialType.SMTP, new.secret)
        assert found is not None
        self.assertEqual((found.name, found.hold, found.last_used_at), ("app", True, None))
        self.transaction(cs.touch_credential, found.id, NOW + 60)
        [listed] = self.transaction(cs.list_credentials, server.id)
        self.assertEqual(listed.last_used_at, NOW + 60)

    def test_imported_key(self) -> None:
        """A long enough existing secret can be imported and authenticates; duplicates are refused."""
        server = self.make_server()
        key = "postal-key-0123456789"
        self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW, key=key)
        self.assertIsNotNone(self.transaction(cs.find_credential_by_key, cs.CredentialType.API, key))
        with self.assertRaises(AlreadyExists):
            self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW, key=key)
        with self.assertRaises(StoreError):
            self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW, key="short")

    def test_ip_credentials_most_specific_first(self) -> None:
        """SMTP-IP credentials come back parsed, a host (/32) before the network that contains it."""
        server = self.make_server()
        wide = self.transaction(
            cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW, key="10.0.0.0/8"
        )
        host = self.transaction(
            cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW, key="10.1.2.3"
        )
        v6 = self.transaction(
            cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW, key="2001:db8::/32"
        )
        self.assertIsNone(wide.secret)
        self.assertEqual(host.credential.network, "10.1.2.3/32")
        found = self.transaction(cs.find_ip_credentials)
        self.assertEqual(
            [(str(network), credential.id) for network, credential in found],
            [
                ("10.1.2.3/32", host.credential.id),
                ("10.0.0.0/8", wide.credential.id),
                ("2001:db8::/32", v6.credential.id),
            ],
        )
        client = ipaddress.ip_address("10.1.2.3")
        first = next(c for n, c in found if client in n)
        self.assertEqual(first.id, host.credential.id)

    def test_ip_credential_needs_valid_network(self) -> None:
        """An SMTP-IP credential without a key, or with host bits set, is refused with the reason."""
        server = self.make_server()
        with self.assertRaises(StoreError):
            self.transaction(cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW)
        with self.assertRaises(StoreError) as raised:
            self.transaction(
                cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW, key="10.0.0.1/8"
            )
        self.assertTrue(re.search("host bits", str(raised.exception)))

    def test_credential_for_unknown_server(self) -> None:
        """Creating a credential for a server that does not exist is NotFound; deleting removes it."""
        with self.assertRaises(NotFound):
            self.transaction(cs.create_credential, 99, cs.CredentialType.API, NOW)
        server = self.make_server()
        new = self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW)
        self.transaction(cs.delete_credential, new.credential.id)
        self.assertEqual(self.transaction(cs.list_credentials), [])
        with self.assertRaises(NotFound):
            self.transaction(cs.delete_credential, new.credential.id)


class RepositoryPostgresTests(RepositoryTests):
    backend = POSTGRES


class RepositoryMySQLTests(RepositoryTests):
    backend = MYSQL

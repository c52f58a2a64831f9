"""Tests for mtad.store.domains: sending domains, their DKIM keys and stored DNS check results."""

from __future__ import annotations

from typing import Any

from mtad.mail.dkim_keys import ED25519, RSA, public_key_from_private
from mtad.store import domains as ds
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import AlreadyExists, NotFound, StoreError
from mtad.store.domains import ACTIVE, INVALID, MISSING, OK, PUBLISHED, RETIRED, DNSCheck, RecordCheck
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase

NOW = 1_700_000_000.0
#: Small keys keep the tests fast; key size itself is tested once.
BITS = 1024


class DomainStoreTests(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.transaction(os_.create_organization, "Acme", NOW)
        self.transaction(os_.create_organization, "Other", NOW)
        self.server = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.sibling = self.transaction(ss.create_server, "acme", "Second", NOW)
        self.stranger = self.transaction(ss.create_server, "other", "Main", NOW)

    def add(self, name: str, server: ss.Server | None = None, **kw: Any) -> ds.Domain:
        if "organization_id" not in kw:
            kw["server_id"] = (server or self.server).id
        kw.setdefault("rsa_bits", BITS)
        return self.transaction(ds.create_domain, name, NOW, **kw)

    def add_verified(self, name: str, server: ss.Server | None = None, **kw: Any) -> ds.Domain:
        domain = self.add(name, server, **kw)
        return self.transaction(ds.verify_domain, domain.id, NOW + 1)

    def find(self, name: str, server: ss.Server | None = None) -> ds.Domain | None:
        server = server or self.server
        return self.transaction(ds.find_sending_domain, server.id, server.organization_id, name)

    def test_create_makes_token_and_rsa_key(self) -> None:
        """A new domain is lower-cased, unverified, has a 32-character token and one active 2048-bit RSA key
        under a ``postal-xxxxxx`` selector whose stored public key belongs to the private key."""
        domain = self.add("Example.COM.", rsa_bits=2048)
        self.assertEqual(domain.name, "example.com")
        self.assertEqual((domain.server_id, domain.organization_id), (self.server.id, None))
        self.assertRegex(domain.verification_token, r"^[A-Za-z0-9]{32}$")
        self.assertIsNone(domain.verified_at)
        self.assertFalse(domain.verified)
        self.assertIsNone(domain.spf_status)
        self.assertFalse(domain.use_for_any)
        [key] = self.transaction(ds.signing_keys, domain.id)
        self.assertRegex(key.selector, r"^postal-[a-z0-9]{6}$")
        self.assertEqual((key.algorithm, key.state, key.activated_at), (RSA, ACTIVE, NOW))
        self.assertTrue(key.private_key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertEqual(public_key_from_private(RSA, key.private_key_pem), key.public_key)
        self.assertEqual(self.transaction(ds.list_keys, domain.id), [key])
        self.assertEqual(self.transaction(ds.get_domain, domain.id), domain)

    def test_create_with_ed25519_for_dual_signing(self) -> None:
        """With both algorithms a domain gets two active keys under different selectors, RSA listed first."""
        domain = self.add("example.com", algorithms=(ED25519, RSA), selector_prefix="mtad")
        keys = self.transaction(ds.signing_keys, domain.id)
        self.assertEqual([k.algorithm for k in keys], [RSA, ED25519])
        self.assertNotEqual(keys[0].selector, keys[1].selector)
        for key in keys:
            self.assertRegex(key.selector, r"^mtad-[a-z0-9]{6}$")
            self.assertEqual(public_key_from_private(key.algorithm, key.private_key_pem), key.public_key)

    def test_create_refuses_bad_input(self) -> None:
        """No owner, two owners, a bad name, algorithm or selector prefix, or an unknown owner are refused."""
        with self.assertRaises(StoreError):
            self.transaction(ds.create_domain, "example.com", NOW)
        with self.assertRaises(StoreError):
            self.add("example.com", organization_id=self.server.organization_id, server_id=self.server.id)
        for name in ("localhost", "exa mple.com", "-x.example.com", "a..b", "x" * 64 + ".com", ""):
            with self.assertRaises(StoreError, msg=name):
                self.add(name)
        with self.assertRaises(StoreError):
            self.add("example.com", algorithms=("dsa",))
        with self.assertRaises(StoreError):
            self.add("example.com", selector_prefix="Bad_Prefix")
        with self.assertRaises(NotFound):
            self.transaction(ds.create_domain, "example.com", NOW, server_id=self.stranger.id + 100)
        self.assertEqual(self.transaction(ds.list_domains), [])

    def test_name_unique_per_owner(self) -> None:
        """One owner cannot add a domain twice (in any case); another owner may add the same name."""
        self.add("example.com")
        with self.assertRaises(AlreadyExists) as raised:
            self.add("EXAMPLE.com")
        self.assertIn("example.com", str(raised.exception))
        self.add("example.com", self.sibling)
        self.add("example.com", organization_id=self.server.organization_id)
        with self.assertRaises(AlreadyExists):
            self.add("example.com", organization_id=self.server.organization_id)
        self.assertEqual(len(self.transaction(ds.find_domains_by_name, "Example.com")), 3)

    def test_unicode_name_stored_as_a_labels(self) -> None:
        """An internationalized name is stored in its A-label form and found by either form."""
        domain = self.add_verified("Bücher.example")
        self.assertEqual(domain.name, "xn--bcher-kva.example")
        self.assertEqual(self.find("bücher.example"), domain)
        self.assertEqual(self.find("XN--BCHER-KVA.example"), domain)

    def test_verify_keeps_first_time(self) -> None:
        """Verifying sets verified_at; verifying again keeps the first time."""
        domain = self.add("example.com")
        verified = self.transaction(ds.verify_domain, domain.id, NOW + 5)
        self.assertEqual(verified.verified_at, NOW + 5)
        self.assertTrue(verified.verified)
        again = self.transaction(ds.verify_domain, domain.id, NOW + 50)
        self.assertEqual(again.verified_at, NOW + 5)

    def test_list_domains_by_owner(self) -> None:
        """Listing filters by server or organization (either), sorted by name; without filter lists all."""
        a = self.add("b.example")
        b = self.add("a.example", organization_id=self.server.organization_id)
        c = self.add("c.example", self.stranger)
        self.assertEqual(self.transaction(ds.list_domains), [b, a, c])
        self.assertEqual(
            self.transaction(ds.list_domains, self.server.id, self.server.organization_id), [b, a]
        )
        self.assertEqual(self.transaction(ds.list_domains, self.sibling.id), [])
        self.assertEqual(self.transaction(ds.list_domains, None, self.stranger.organization_id), [])

    def test_get_domain_by_name(self) -> None:
        """Operators name a domain by name or id; a name two owners share is ambiguous."""
        domain = self.add("example.com")
        self.assertEqual(self.transaction(ds.get_domain_by_name, "EXAMPLE.com"), domain)
        self.assertEqual(self.transaction(ds.get_domain_by_name, str(domain.id)), domain)
        self.add("example.com", self.sibling)
        with self.assertRaises(StoreError) as raised:
            self.transaction(ds.get_domain_by_name, "example.com")
        self.assertIn("ambiguous", str(raised.exception))
        with self.assertRaises(NotFound):
            self.transaction(ds.get_domain_by_name, "nope.example")

    def test_sending_domain_of_server(self) -> None:
        """A verified domain of the server authorizes it, in any case and with a trailing dot."""
        domain = self.add_verified("example.com")
        self.assertEqual(self.find("example.com"), domain)
        self.assertEqual(self.find("ExAmPlE.CoM."), domain)

    def test_sending_domain_of_organization(self) -> None:
        """A verified domain of the organization authorizes each of its servers, not other organizations'."""
        domain = self.add_verified("example.com", organization_id=self.server.organization_id)
        self.assertEqual(self.find("example.com"), domain)
        self.assertEqual(self.find("example.com", self.sibling), domain)
        self.assertIsNone(self.find("example.com", self.stranger))

    def test_sending_domain_unverified_or_foreign(self) -> None:
        """An unverified domain, another server's domain, a subdomain or garbage authorize nothing."""
        self.add("unverified.example")
        self.add_verified("sibling.example", self.sibling)
        self.add_verified("example.com")
        self.assertIsNone(self.find("unverified.example"))
        self.assertIsNone(self.find("sibling.example"))
        self.assertIsNone(self.find("mail.example.com"))
        self.assertIsNone(self.find("not a domain"))

    def test_sending_domain_prefers_server_then_exact_name(self) -> None:
        """The server's own domain wins over the organization's of the same name, an exact name over a
        use_for_any domain, and use_for_any domains are taken alphabetically, the server's first."""
        org_domain = self.add_verified("example.com", organization_id=self.server.organization_id)
        own = self.add_verified("example.com")
        self.assertEqual(self.find("example.com"), own)
        self.assertEqual(self.find("example.com", self.sibling), org_domain)
        self.add_verified("z-any.example", use_for_any=True)
        self.assertEqual(self.find("example.com"), own)
        self.assertEqual(self.find("elsewhere.example").name, "z-any.example")  # type: ignore[union-attr]
        a_any = self.add_verified("a-any.example", use_for_any=True)
        self.assertEqual(self.find("elsewhere.example"), a_any)
        org_any = self.add_verified(
            "0-any.example", organization_id=self.server.organization_id, use_for_any=True
        )
        self.assertEqual(self.find("elsewhere.example"), a_any)
        self.assertEqual(self.find("elsewhere.example", self.sibling), org_any)
        self.assertIsNone(self.find("elsewhere.example", self.stranger))

    def test_use_for_any_must_be_verified(self) -> None:
        """An unverified use_for_any domain authorizes nothing; setting the flag later takes effect."""
        domain = self.add("any.example", use_for_any=True)
        self.assertIsNone(self.find("elsewhere.example"))
        self.transaction(ds.verify_domain, domain.id, NOW)
        self.transaction(ds.set_use_for_any, domain.id, False, NOW)
        self.assertIsNone(self.find("elsewhere.example"))
        self.transaction(ds.set_use_for_any, domain.id, True, NOW)
        self.assertEqual(self.find("elsewhere.example").id, domain.id)  # type: ignore[union-attr]

    def test_rotation_without_gap(self) -> None:
        """A rotated-in key is published but does not sign until activated; activation makes it the only
        active RSA key and retires the old one in the same step."""
        domain = self.add("example.com")
        [old] = self.transaction(ds.signing_keys, domain.id)
        new = self.transaction(ds.rotate_key, domain.id, NOW + 10, rsa_bits=BITS)
        self.assertEqual(new.state, PUBLISHED)
        self.assertNotEqual(new.selector, old.selector)
        self.assertEqual(self.transaction(ds.signing_keys, domain.id), [old])
        activated = self.transaction(ds.activate_key, domain.id, new.selector.upper(), NOW + 20)
        self.assertEqual((activated.state, activated.activated_at), (ACTIVE, NOW + 20))
        self.assertEqual([k.selector for k in self.transaction(ds.signing_keys, domain.id)], [new.selector])
        states = {k.selector: (k.state, k.retired_at) for k in self.transaction(ds.list_keys, domain.id)}
        self.assertEqual(states, {old.selector: (RETIRED, NOW + 20), new.selector: (ACTIVE, None)})
        # Activating again changes nothing; the retired key can be brought back (a rollback).
        self.transaction(ds.activate_key, domain.id, new.selector, NOW + 30)
        self.transaction(ds.activate_key, domain.id, old.selector, NOW + 40)
        [signing] = self.transaction(ds.signing_keys, domain.id)
        self.assertEqual((signing.selector, signing.retired_at), (old.selector, None))

    def test_one_waiting_key_per_algorithm(self) -> None:
        """A second rotation before the first is activated is refused, naming the waiting selector."""
        domain = self.add("example.com")
        waiting = self.transaction(ds.rotate_key, domain.id, NOW, rsa_bits=BITS)
        with self.assertRaises(AlreadyExists) as raised:
            self.transaction(ds.rotate_key, domain.id, NOW, rsa_bits=BITS)
        self.assertIn(waiting.selector, str(raised.exception))
        with self.assertRaises(NotFound):
            self.transaction(ds.activate_key, domain.id, "postal-nope00", NOW)
        with self.assertRaises(NotFound):
            self.transaction(ds.rotate_key, domain.id + 100, NOW, rsa_bits=BITS)

    def test_adding_ed25519_keeps_rsa(self) -> None:
        """Rotating in an Ed25519 key on an RSA-only domain adds a second signing key on activation."""
        domain = self.add("example.com")
        key = self.transaction(ds.rotate_key, domain.id, NOW, algorithm=ED25519, selector_prefix="ed")
        self.assertRegex(key.selector, r"^ed-[a-z0-9]{6}$")
        self.transaction(ds.activate_key, domain.id, key.selector, NOW)
        self.assertEqual([k.algorithm for k in self.transaction(ds.signing_keys, domain.id)], [RSA, ED25519])

    def test_record_dns_check(self) -> None:
        """Check results are stored per record and per key; a failed lookup keeps the previous status."""
        domain = self.add("example.com")
        [key] = self.transaction(ds.list_keys, domain.id)
        first = DNSCheck(
            spf=RecordCheck(OK),
            dkim=RecordCheck(MISSING, "No TXT records"),
            mx=RecordCheck(INVALID, "MX record for mx2 is missing"),
            return_path=RecordCheck(OK),
            keys=((key.id, RecordCheck(MISSING, "No TXT records")),),
        )
        stored = self.transaction(ds.record_dns_check, domain.id, first, NOW + 60)
        self.assertEqual(
            (stored.spf_status, stored.spf_error, stored.dkim_status, stored.dkim_error, stored.mx_status),
            (OK, None, MISSING, "No TXT records", INVALID),
        )
        self.assertEqual(stored.dns_checked_at, NOW + 60)
        self.assertFalse(stored.dns_ok)
        [checked] = self.transaction(ds.list_keys, domain.id)
        self.assertEqual((checked.dns_status, checked.dns_error), (MISSING, "No TXT records"))
        second = DNSCheck(
            spf=RecordCheck(None, "timed out"),
            dkim=RecordCheck(OK),
            mx=RecordCheck(MISSING, "no MX"),
            return_path=RecordCheck(OK),
            keys=((key.id, RecordCheck(OK)),),
        )
        stored = self.transaction(ds.record_dns_check, domain.id, second, NOW + 120)
        self.assertEqual((stored.spf_status, stored.dkim_status, stored.dkim_error), (OK, OK, None))
        self.assertTrue(stored.dns_ok)
        self.assertEqual(self.transaction(ds.list_keys, domain.id)[0].dns_status, OK)
        with self.assertRaises(NotFound):
            self.transaction(ds.record_dns_check, domain.id + 100, second, NOW)

    def test_domains_due_for_check(self) -> None:
        """Due domains are those never checked, then the least recently checked, up to the limit."""
        checked = DNSCheck(RecordCheck(OK), RecordCheck(OK), RecordCheck(OK), RecordCheck(OK))
        old = self.add("old.example")
        recent = self.add("recent.example")
        never = self.add("never.example")
        self.transaction(ds.record_dns_check, old.id, checked, NOW - 7200)
        self.transaction(ds.record_dns_check, recent.id, checked, NOW - 60)
        due = self.transaction(ds.domains_due_for_check, NOW - 3600)
        self.assertEqual([d.name for d in due], ["never.example", "old.example"])
        self.assertEqual(
            [d.id for d in self.transaction(ds.domains_due_for_check, NOW, 2)], [never.id, old.id]
        )


class DomainStorePostgresTests(DomainStoreTests):
    backend = POSTGRES


class DomainStoreMySQLTests(DomainStoreTests):
    backend = MYSQL

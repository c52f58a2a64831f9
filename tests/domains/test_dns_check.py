"""Domain DNS checks against the fake DNS server on 127.0.0.1 (real UDP and TCP on loopback)."""

from __future__ import annotations

from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtad.config import DomainsConfig
from mtad.domains.dns_check import (
    BlockingResolver,
    DomainDNSChecker,
    check_dkim_key,
    check_domain,
    check_mx,
    check_return_path,
    check_spf,
    check_verification,
    records_to_publish,
    run_blocking,
    txt_records,
)
from mtad.mail.dkim_keys import ED25519, RSA, dkim_txt_value, generate_key
from mtad.outbound.mx import DNSTemporaryError, MXResolver, ResolverConfig
from mtad.store import domains as ds
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.domains import (
    ACTIVE,
    INVALID,
    MISSING,
    OK,
    PUBLISHED,
    RETIRED,
    Domain,
    DomainKey,
    RecordCheck,
)
from mtad.store.migrate import upgrade_schema
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url
from tools.fakedns import FakeDNS, start_fake_dns

reactor: Any = _reactor

NOW = 1_700_000_000.0
SETTINGS = DomainsConfig()
TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


def make_domain(name: str = "example.com", **kw: Any) -> Domain:
    values: dict[str, Any] = {
        "id": 1,
        "name": name,
        "server_id": 1,
        "organization_id": None,
        "verification_token": TOKEN,
        "verified_at": None,
        "use_for_any": False,
        "spf_status": None,
        "spf_error": None,
        "dkim_status": None,
        "dkim_error": None,
        "mx_status": None,
        "mx_error": None,
        "return_path_status": None,
        "return_path_error": None,
        "dns_checked_at": None,
        "created_at": NOW,
    }
    values.update(kw)
    return Domain(**values)


def make_key(
    selector: str = "postal-abc123", algorithm: str = RSA, state: str = ACTIVE, id: int = 1, bits: int = 2048
) -> DomainKey:
    pem, public = generate_key(algorithm, bits)
    return DomainKey(
        id=id,
        domain_id=1,
        selector=selector,
        algorithm=algorithm,
        private_key_pem=pem,
        public_key=public,
        state=state,
        created_at=NOW,
    )


def good_zone(domain: Domain, keys: list[DomainKey]) -> dict[str, Any]:
    """A zone publishing exactly the records `records_to_publish` asks for."""
    zone: dict[str, Any] = {}
    for record in records_to_publish(domain, keys, SETTINGS):
        value: Any = [record.priority, record.value] if record.type == "MX" else record.value
        zone.setdefault(record.name, {}).setdefault(record.type, []).append(value)
    return zone


class DNSCheckTests(TestCase):
    """Postal's checks and error texts, over real loopback DNS."""

    def setUp(self) -> None:
        self.domain = make_domain()
        self.key = make_key()
        self.zone: dict[str, Any] = good_zone(self.domain, [self.key])
        self.dns: FakeDNS = start_fake_dns(reactor, self.zone)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.dns.stop()))
        config = ResolverConfig(nameservers=(self.dns.address,), timeout=2.0, attempts=1)
        self.resolver = MXResolver(reactor, reactor, reactor, config)

    def set_txt(self, name: str, *values: str) -> None:
        self.zone.setdefault(name, {})["TXT"] = list(values)

    async def test_all_records_published(self) -> None:
        """With every record published as printed, each check is OK and the domain is dns_ok."""
        result = await check_domain(self.resolver, self.domain, [self.key], SETTINGS)
        self.assertEqual(
            (result.spf, result.dkim, result.mx, result.return_path),
            (RecordCheck(OK), RecordCheck(OK), RecordCheck(OK), RecordCheck(OK)),
        )
        self.assertEqual(result.keys, ((self.key.id, RecordCheck(OK)),))
        self.assertEqual(await check_verification(self.resolver, self.domain, SETTINGS), RecordCheck(OK))

    async def test_long_dkim_record_read_whole(self) -> None:
        """A 2048-bit key's record comes back as two character-strings and is read as one value."""
        [record] = await txt_records(self.resolver, f"{self.key.selector}._domainkey.example.com")
        self.assertEqual(record, dkim_txt_value(RSA, self.key.public_key))
        self.assertGreater(len(record), 255)

    async def test_spf_missing(self) -> None:
        """No ``v=spf1`` TXT record (or no name at all) is Missing, with Postal's text."""
        self.set_txt("example.com", f"postal-verification {TOKEN}")
        expected = RecordCheck(MISSING, "No SPF record exists for this domain")
        self.assertEqual(await check_spf(self.resolver, self.domain, SETTINGS), expected)
        self.assertEqual(await check_spf(self.resolver, make_domain("nowhere.example"), SETTINGS), expected)

    async def test_spf_without_include_invalid(self) -> None:
        """An SPF record without our include, or including it with a failing qualifier, is Invalid."""
        expected = RecordCheck(INVALID, "An SPF record exists but it doesn't include spf.postal.example.com")
        for record in (
            "v=spf1 a mx ~all",
            "v=spf1 -include:spf.postal.example.com ~all",
            "v=spf1 include:spf.postal.example.com.evil.example ~all",
        ):
            self.set_txt("example.com", record)
            self.assertEqual(await check_spf(self.resolver, self.domain, SETTINGS), expected, record)

    async def test_spf_variants(self) -> None:
        """SPF matching is case-insensitive and accepts ``+include``; two SPF records are Invalid."""
        self.set_txt("example.com", "V=SPF1 +INCLUDE:SPF.Postal.Example.Com. -all", "other text")
        self.assertEqual(await check_spf(self.resolver, self.domain, SETTINGS), RecordCheck(OK))
        self.set_txt("example.com", "v=spf1 include:spf.postal.example.com ~all", "v=spf1 -all")
        result = await check_spf(self.resolver, self.domain, SETTINGS)
        self.assertEqual(result.status, INVALID)
        self.assertIn("There are 2 SPF records", result.error or "")

    async def test_dkim_missing(self) -> None:
        """No TXT record at the selector is Missing, naming the record."""
        del self.zone[f"{self.key.selector}._domainkey.example.com"]
        result = await check_domain(self.resolver, self.domain, [self.key], SETTINGS)
        name = f"{self.key.selector}._domainkey.example.com"
        self.assertEqual(result.dkim, RecordCheck(MISSING, f"No TXT records were returned for {name}"))

    async def test_dkim_wrong_key_invalid(self) -> None:
        """Another key's record, or two records, at the selector are Invalid."""
        name = f"{self.key.selector}._domainkey.example.com"
        other = make_key(bits=1024)
        self.set_txt(name, dkim_txt_value(RSA, other.public_key))
        result = await check_dkim_key(self.resolver, self.domain, self.key)
        self.assertEqual(result.status, INVALID)
        self.assertIn(
            f"The DKIM record at {name} does not match the record we have provided", result.error or ""
        )
        self.assertIn("not the public key", result.error or "")
        self.set_txt(name, dkim_txt_value(RSA, self.key.public_key), "v=DKIM1; p=")
        result = await check_dkim_key(self.resolver, self.domain, self.key)
        self.assertEqual(
            result, RecordCheck(INVALID, f"There are 2 records at {name}. There should only be one.")
        )

    async def test_dkim_equivalent_record_ok(self) -> None:
        """A record in another but equivalent form (``k=rsa``, no ``t=``/``h=``) is OK."""
        name = f"{self.key.selector}._domainkey.example.com"
        self.set_txt(name, f"k=rsa; p={self.key.public_key}")
        self.assertEqual(await check_dkim_key(self.resolver, self.domain, self.key), RecordCheck(OK))

    async def test_dkim_status_follows_active_keys(self) -> None:
        """A waiting key's missing record does not fail the domain's DKIM; an active key's does; retired
        keys are not checked."""
        waiting = make_key("postal-new456", state=PUBLISHED, id=2, bits=1024)
        retired = make_key("postal-old789", state=RETIRED, id=3, bits=1024)
        ed = make_key("postal-ed0001", algorithm=ED25519, id=4)
        result = await check_domain(self.resolver, self.domain, [self.key, waiting, retired], SETTINGS)
        self.assertEqual(result.dkim, RecordCheck(OK))
        self.assertEqual([(i, c.status) for i, c in result.keys], [(1, OK), (2, MISSING)])
        result = await check_domain(self.resolver, self.domain, [self.key, ed], SETTINGS)
        self.assertEqual(result.dkim.status, MISSING)
        self.assertIn("postal-ed0001._domainkey.example.com", result.dkim.error or "")
        self.zone.update(good_zone(self.domain, [ed]))
        result = await check_domain(self.resolver, self.domain, [self.key, ed], SETTINGS)
        self.assertEqual(result.dkim, RecordCheck(OK))

    async def test_mx(self) -> None:
        """MX: all ours OK; none Missing; only others' Missing; some of ours Invalid naming the missing."""
        self.assertEqual(await check_mx(self.resolver, self.domain, SETTINGS), RecordCheck(OK))
        self.zone["example.com"]["MX"] = [[5, "MX1.postal.example.com."]]
        self.assertEqual(
            await check_mx(self.resolver, self.domain, SETTINGS),
            RecordCheck(INVALID, "MX record for mx2.postal.example.com are missing and are required."),
        )
        self.zone["example.com"]["MX"] = [[5, "mx.elsewhere.example"]]
        self.assertEqual(
            await check_mx(self.resolver, self.domain, SETTINGS),
            RecordCheck(MISSING, "You have MX records but none of them point to us."),
        )
        del self.zone["example.com"]["MX"]
        self.assertEqual(
            await check_mx(self.resolver, self.domain, SETTINGS),
            RecordCheck(MISSING, "There are no MX records for example.com"),
        )
        three = DomainsConfig(
            mx_records=("a.mx.example", "b.mx.example", "c.mx.example", "mx.elsewhere.example")
        )
        self.zone["example.com"]["MX"] = [[5, "mx.elsewhere.example"]]
        self.assertEqual(
            (await check_mx(self.resolver, self.domain, three)).error,
            "MX records for a.mx.example, b.mx.example, and c.mx.example are missing and are required.",
        )

    async def test_return_path(self) -> None:
        """Return path: a CNAME to our host OK; none Missing; elsewhere Invalid saying where it should go."""
        self.assertEqual(await check_return_path(self.resolver, self.domain, SETTINGS), RecordCheck(OK))
        self.zone["psrp.example.com"] = {"CNAME": ["rp.elsewhere.example"]}
        self.assertEqual(
            await check_return_path(self.resolver, self.domain, SETTINGS),
            RecordCheck(
                INVALID,
                "There is a CNAME record at psrp.example.com but it points to rp.elsewhere.example which is "
                "incorrect. It should point to rp.postal.example.com.",
            ),
        )
        del self.zone["psrp.example.com"]
        self.assertEqual(
            await check_return_path(self.resolver, self.domain, SETTINGS),
            RecordCheck(MISSING, "There is no return path record at psrp.example.com"),
        )

    async def test_verification_missing(self) -> None:
        """Without the verification TXT record the check is Missing and says what to publish."""
        self.set_txt("example.com", "postal-verification someone-elses-token")
        result = await check_verification(self.resolver, self.domain, SETTINGS)
        self.assertEqual(result.status, MISSING)
        self.assertIn(f'"postal-verification {TOKEN}"', result.error or "")

    async def test_lookup_failure_is_no_status(self) -> None:
        """A SERVFAIL gives no status (the stored one is kept) and an error naming the lookup."""
        self.zone["example.com"] = "SERVFAIL"
        result = await check_domain(self.resolver, self.domain, [self.key], SETTINGS)
        self.assertIsNone(result.spf.status)
        self.assertIn("DNS lookup of TXT records for example.com failed", result.spf.error or "")
        self.assertIsNone(result.mx.status)
        self.assertEqual(result.dkim, RecordCheck(OK))
        self.assertIsNone((await check_verification(self.resolver, self.domain, SETTINGS)).status)

    async def test_checker_checks_due_domains(self) -> None:
        """The periodic checker checks due domains, verifies one whose record appeared, stores the results,
        reports the failing one and leaves recently checked ones alone."""
        store = _Store(self)
        good = store.add("example.com")
        bad = store.add("bad.example")
        self.zone.update(good_zone(good, store.keys(good)))
        failing: list[Domain] = []
        clock = Clock()
        clock.advance(NOW)
        checker = DomainDNSChecker(store.db, self.resolver, clock, SETTINGS, on_dns_error=failing.append)
        self.assertEqual(await checker.run_once(), 2)
        good, bad = store.get(good), store.get(bad)
        self.assertTrue(good.verified)
        self.assertTrue(good.dns_ok)
        self.assertEqual(good.dns_checked_at, NOW)
        self.assertEqual(store.keys(good)[0].dns_status, OK)
        self.assertFalse(bad.verified)
        self.assertEqual((bad.spf_status, bad.dkim_status, bad.mx_status), (MISSING, MISSING, MISSING))
        self.assertEqual([d.name for d in failing], ["bad.example"])
        clock.advance(SETTINGS.check_interval - 1)
        self.assertEqual(await checker.run_once(), 0)
        clock.advance(2)
        self.assertEqual(await checker.run_once(), 2)


class _Store:
    """A real SQLite database for checker tests, used synchronously."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.engine = make_engine(fresh_database_url(test, SQLITE))
        test.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.db = SynchronousDatabase(self.engine)
        with self.engine.begin() as conn:
            os_.create_organization(conn, "Acme", NOW)
            self.server = ss.create_server(conn, "acme", "Main", NOW)

    def add(self, name: str) -> Domain:
        with self.engine.begin() as conn:
            return ds.create_domain(conn, name, NOW, server_id=self.server.id, rsa_bits=1024)

    def get(self, domain: Domain) -> Domain:
        with self.engine.begin() as conn:
            return ds.get_domain(conn, domain.id)

    def keys(self, domain: Domain) -> list[DomainKey]:
        with self.engine.begin() as conn:
            return ds.list_keys(conn, domain.id)


class _NXResolver:
    """Answers NXDOMAIN to everything, at once: every record is Missing."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, int]] = []

    async def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        self.queries.append((name, rdtype))
        response = dns.message.make_response(dns.message.make_query(name, rdtype))
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response


class CheckerServiceTests(SynchronousTestCase):
    """The checker's schedule, driven by task.Clock."""

    def test_polls_on_schedule_and_stops(self) -> None:
        """Nothing runs at start; each poll interval checks what is due; after stop nothing runs."""
        store = _Store(self)
        store.add("example.com")
        resolver = _NXResolver()
        clock = Clock()
        clock.advance(NOW)
        checker = DomainDNSChecker(
            store.db, resolver, clock, DomainsConfig(check_interval=600), poll_interval=60
        )
        checker.startService()
        self.assertEqual(resolver.queries, [])
        clock.advance(60)
        self.assertEqual(len(resolver.queries), 5)  # SPF, DKIM, MX, return path, verification
        clock.advance(60)
        self.assertEqual(len(resolver.queries), 5)  # checked a minute ago: not due
        clock.advance(600)
        self.assertEqual(len(resolver.queries), 10)
        self.successResultOf(checker.stopService())
        clock.advance(3600)
        self.assertEqual(len(resolver.queries), 10)

    def test_failing_pass_is_logged_not_fatal(self) -> None:
        """A pass that fails (database down) is logged and the loop goes on."""
        resolver = _NXResolver()
        clock = Clock()

        class Broken:
            def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
                from twisted.internet.defer import fail

                return fail(RuntimeError("database is down"))

        checker = DomainDNSChecker(Broken(), resolver, clock, SETTINGS, poll_interval=60)
        checker.startService()
        clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(checker.stopService())


class BlockingResolverTests(SynchronousTestCase):
    def test_no_server_answers(self) -> None:
        """With no server answering, the blocking resolver raises DNSTemporaryError naming the servers."""
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        resolver = BlockingResolver([("127.0.0.1", port)], timeout=0.2, attempts=1)
        with self.assertRaises(DNSTemporaryError) as raised:
            run_blocking(resolver.query("example.com", dns.rdatatype.TXT))
        self.assertIn(f"127.0.0.1:{port}", str(raised.exception))
        result = run_blocking(check_spf(resolver, make_domain(), SETTINGS))
        self.assertIsNone(result.status)

    def test_run_blocking_refuses_waiting(self) -> None:
        """run_blocking refuses a coroutine that waits on something asynchronous."""

        async def waits() -> None:
            await Deferred()

        self.assertRaises(RuntimeError, run_blocking, waits())


class RecordsTests(SynchronousTestCase):
    def test_records_to_publish(self) -> None:
        """The records are verification, SPF, DKIM for each key not retired, return path CNAME and MX, in
        zone-file form with long TXT values split."""
        domain = make_domain()
        active = make_key(bits=1024)
        waiting = make_key("postal-new456", algorithm=ED25519, state=PUBLISHED, id=2)
        retired = make_key("postal-old789", state=RETIRED, id=3, bits=1024)
        records = records_to_publish(domain, [active, waiting, retired], SETTINGS)
        self.assertEqual(
            [(r.purpose, r.name, r.type) for r in records],
            [
                ("verification", "example.com", "TXT"),
                ("spf", "example.com", "TXT"),
                ("dkim", "postal-abc123._domainkey.example.com", "TXT"),
                ("dkim", "postal-new456._domainkey.example.com", "TXT"),
                ("return-path", "psrp.example.com", "CNAME"),
                ("mx", "example.com", "MX"),
                ("mx", "example.com", "MX"),
            ],
        )
        lines = [r.zone_line() for r in records]
        self.assertEqual(lines[0], f'example.com. IN TXT "postal-verification {TOKEN}"')
        self.assertEqual(lines[1], 'example.com. IN TXT "v=spf1 a mx include:spf.postal.example.com ~all"')
        self.assertEqual(lines[4], "psrp.example.com. IN CNAME rp.postal.example.com.")
        self.assertEqual(lines[5:], [f"example.com. IN MX 10 mx{i}.postal.example.com." for i in (1, 2)])
        self.assertIn("k=ed25519", lines[3])
        long = make_key(bits=2048)
        [line] = [r.zone_line() for r in records_to_publish(domain, [long], SETTINGS) if r.purpose == "dkim"]
        self.assertRegex(
            line, r'^postal-abc123\._domainkey\.example\.com\. IN TXT "v=DKIM1; [^"]{200,}" "[^"]+"$'
        )

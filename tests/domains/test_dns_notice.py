"""`DNSErrorNotice` as the DNS checker's ``on_dns_error``: real Redis (the event stream), real SQLite through
the database's thread pool, the fake DNS server on loopback answering nothing (every record Missing)."""

from __future__ import annotations

from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock

from mtad.config import DomainsConfig
from mtad.domains.dns_check import DomainDNSChecker
from mtad.domains.dns_notice import DNSErrorNotice
from mtad.events.schema import DomainDNSError, decode_entry
from mtad.outbound.mx import MXResolver, ResolverConfig
from mtad.queue.events import StreamAppender, parse_entry
from mtad.queue.model import RedisUnavailable
from mtad.store import domains as ds
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import Database
from mtad.store.domains import MISSING, Domain
from mtad.store.migrate import upgrade_schema
from mtad.webhooks.payloads import webhook_event_for
from tests.redis_server import RedisTestCase, connect, real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tools.fakedns import start_fake_dns

NOW = 1_700_000_000.0
SETTINGS = DomainsConfig()


class DNSErrorNoticeTests(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        reactor = real_reactor()
        self.database = Database.from_url(
            fresh_database_url(self, SQLITE), cast(IReactorFromThreads, reactor)
        )
        upgrade_schema(self.database.engine)
        self.database.startService()
        self.addCleanup(self.database.stopService)
        with self.database.engine.begin() as conn:
            self.organization = os_.create_organization(conn, "Acme", NOW)
            self.server = ss.create_server(conn, "acme", "Main", NOW)
            self.served = ds.create_domain(
                conn, "served.example", NOW, server_id=self.server.id, rsa_bits=1024
            )
            self.shared = ds.create_domain(
                conn, "shared.example", NOW, organization_id=self.organization.id, rsa_bits=1024
            )
        dns = start_fake_dns(reactor, {})
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        self.resolver = MXResolver(
            reactor, reactor, reactor, ResolverConfig(nameservers=(dns.address,), timeout=2.0, attempts=1)
        )
        self.clock = Clock()
        self.clock.advance(NOW + 3600)
        self.notice = DNSErrorNotice(self.database, StreamAppender(self.redis, self.keys), self.clock)

    def checker(self, notice: Any = None) -> DomainDNSChecker:
        return DomainDNSChecker(
            self.database, self.resolver, self.clock, SETTINGS, on_dns_error=notice or self.notice
        )

    async def stream(self) -> list[Any]:
        """The events in the stream, decoded."""
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        return [decode_entry(e).event for e in (parse_entry(entry) for entry in entries) if e is not None]

    async def test_server_domain_fires_one_event_with_the_uuids(self) -> None:
        """An automatic check that finds a server's domain wrong appends one DomainDNSError naming the
        server and the domain by their uuids, with the stored check; the organization's domain, just as
        wrong, fires none. The pass ends only once the event is in the stream."""
        self.assertEqual(await self.checker().run_once(), 2)
        (event,) = await self.stream()
        assert isinstance(event, DomainDNSError)
        with self.database.engine.begin() as conn:
            stored = ds.get_domain(conn, self.served.id)
        self.assertEqual(len(self.server.uuid), 36)
        self.assertEqual(len(stored.uuid), 36)
        self.assertEqual(
            event,
            DomainDNSError(
                server_id=self.server.id,
                server_uuid=self.server.uuid,
                server_name="Main",
                server_permalink=self.server.permalink,
                organization_permalink="acme",
                domain="served.example",
                domain_uuid=stored.uuid,
                dns_checked_at=NOW + 3600,
                spf_status=MISSING,
                spf_error="No SPF record exists for this domain",
                dkim_status=stored.dkim_status,
                dkim_error=stored.dkim_error,
                mx_status=MISSING,
                mx_error="There are no MX records for served.example",
                return_path_status=MISSING,
                return_path_error="There is no return path record at psrp.served.example",
                timestamp=NOW + 3600,
            ),
        )
        self.assertEqual(stored.dkim_status, MISSING)
        fired = webhook_event_for(event)
        assert fired is not None
        self.assertEqual((fired.server_id, fired.event), (self.server.id, "DomainDNSError"))
        self.assertEqual(fired.payload["uuid"], stored.uuid)
        self.assertEqual(fired.payload["server"]["uuid"], self.server.uuid)

    async def test_organization_domain_fires_none(self) -> None:
        """Called with an organization's domain, the notice appends nothing (as in Postal)."""
        await self.notice(self.shared)
        self.assertEqual(await self.stream(), [])
        await self.notice(self.served)
        self.assertEqual([e.domain for e in await self.stream()], ["served.example"])

    async def test_manual_check_fires_none(self) -> None:
        """Only the automatic check fires it: checking a domain by hand (`check`) appends nothing."""
        checked = await self.checker().check(self.served)
        self.assertFalse(checked.dns_ok)
        self.assertEqual(await self.stream(), [])

    async def test_server_gone_fires_none(self) -> None:
        """A domain whose server no longer exists fires nothing and raises nothing."""
        await self.notice(attrs.evolve(self.served, server_id=self.server.id + 100))
        self.assertEqual(await self.stream(), [])

    async def test_redis_down_is_logged_not_raised(self) -> None:
        """When the event cannot be appended the failure is logged, the notice fires None and the
        checker's pass completes with the check stored."""
        down = await connect()
        await down.disconnect()
        notice = DNSErrorNotice(self.database, StreamAppender(down, self.keys), self.clock)
        self.assertIsNone(await notice(self.served))
        self.assertEqual(await self.checker(notice).run_once(), 2)
        self.assertEqual(len(self.flushLoggedErrors(RedisUnavailable)), 2)
        with self.database.engine.begin() as conn:
            stored: Domain = ds.get_domain(conn, self.served.id)
        self.assertEqual(stored.dns_checked_at, NOW + 3600)
        self.assertEqual(await self.stream(), [])

"""MX resolution against the fake DNS server on 127.0.0.1 (real UDP on loopback)."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mtad.outbound.mx import MXResolver, MXResult, ResolverConfig
from tests.outbound.support import until
from tools.fakedns import FakeDNS, start_fake_dns, start_silent_dns

reactor: Any = _reactor

ZONE: dict[str, Any] = {
    "example.com": {"MX": [[20, "mx2.example.com"], [10, "mx1.example.com"]]},
    "mx1.example.com": {"A": ["127.0.0.2"]},
    "mx2.example.com": {"A": ["127.0.0.3", "127.0.0.4"]},
    "equal.test": {"MX": [[10, "a.equal.test"], [10, "b.equal.test"], [10, "c.equal.test"]]},
    "a.equal.test": {"A": ["127.0.1.1"]},
    "b.equal.test": {"A": ["127.0.1.2"]},
    "c.equal.test": {"A": ["127.0.1.3"]},
    "implicit.test": {"A": ["127.0.0.5"], "AAAA": ["::1"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "broken.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
    "nothing.test": {"TXT": ["hello"]},
    "dangling.test": {"MX": [[10, "gone.dangling.test"]]},
    "many.test": {"MX": [[i, f"mx{i}.with-a-rather-long-name-to-overflow-udp.many.test"] for i in range(40)]},
    **{
        f"mx{i}.with-a-rather-long-name-to-overflow-udp.many.test": {"A": [f"127.0.2.{i}"]} for i in range(40)
    },
}


class MXResolverTests(TestCase):
    """Resolution rules of RFC 5321 §5.1 and RFC 7505 over real loopback UDP."""

    def setUp(self) -> None:
        self.dns: FakeDNS = start_fake_dns(reactor, dict(ZONE))
        self.addCleanup(lambda: Deferred.fromCoroutine(self.dns.stop()))

    def resolver(self, clock: Any = reactor, **kw: Any) -> MXResolver:
        config = ResolverConfig(nameservers=(self.dns.address,), **{"timeout": 2.0, "attempts": 1, **kw})
        return MXResolver(reactor, reactor, clock, config, random.Random(kw.pop("seed", 1)))

    async def _resolve(self, domain: str, **kw: Any) -> MXResult:
        return await self.resolver(**kw).resolve(domain)

    def resolve(self, domain: str, **kw: Any) -> Deferred[MXResult]:
        return Deferred.fromCoroutine(self._resolve(domain, **kw))

    async def test_sorted_by_preference(self) -> None:
        """MX hosts come back lowest preference first, each with all its A addresses."""
        result = await self.resolve("example.com")
        self.assertIsNone(result.failure)
        self.assertEqual(
            [(h.name, h.preference, h.addresses) for h in result.hosts],
            [("mx1.example.com", 10, ("127.0.0.2",)), ("mx2.example.com", 20, ("127.0.0.3", "127.0.0.4"))],
        )
        self.assertFalse(result.implicit)

    async def test_equal_preference_shuffled(self) -> None:
        """Hosts of equal preference are ordered by the injected random generator, not by the answer."""
        orders = set()
        for seed in range(12):
            resolver = MXResolver(
                reactor,
                reactor,
                reactor,
                ResolverConfig(nameservers=(self.dns.address,), timeout=2.0, attempts=1),
                random.Random(seed),
            )
            result = await resolver.resolve("equal.test")
            orders.add(tuple(h.name for h in result.hosts))
        self.assertGreater(len(orders), 1)
        self.assertTrue(all(sorted(o) == ["a.equal.test", "b.equal.test", "c.equal.test"] for o in orders))

    async def test_implicit_mx(self) -> None:
        """With no MX records the domain itself is the mail exchanger (A records only by default)."""
        result = await self.resolve("implicit.test")
        self.assertIsNone(result.failure)
        self.assertTrue(result.implicit)
        self.assertEqual([(h.name, h.addresses) for h in result.hosts], [("implicit.test", ("127.0.0.5",))])

    async def test_implicit_mx_ipv6(self) -> None:
        """With ipv6 enabled AAAA addresses are added after the A addresses."""
        result = await self.resolve("implicit.test", ipv6=True)
        self.assertEqual(result.hosts[0].addresses, ("127.0.0.5", "::1"))

    async def test_null_mx(self) -> None:
        """A null MX (RFC 7505) is a hard failure with enhanced code 5.1.10."""
        result = await self.resolve("nullmx.test")
        assert result.failure is not None
        self.assertEqual((result.failure.kind, result.failure.enhanced), ("hard", "5.1.10"))
        self.assertEqual(result.hosts, ())

    async def test_nxdomain(self) -> None:
        """A domain that does not exist is a hard failure."""
        result = await self.resolve("no-such-domain.test")
        assert result.failure is not None
        self.assertEqual(result.failure.kind, "hard")
        self.assertIn("does not exist", result.failure.text)

    async def test_no_mx_no_address(self) -> None:
        """A domain with neither MX nor A records is a hard failure."""
        result = await self.resolve("nothing.test")
        assert result.failure is not None
        self.assertEqual(result.failure.kind, "hard")

    async def test_mx_host_without_address(self) -> None:
        """An MX pointing at a name with no addresses is a hard failure naming the host."""
        result = await self.resolve("dangling.test")
        assert result.failure is not None
        self.assertEqual((result.failure.kind, result.failure.enhanced), ("hard", "5.4.4"))
        self.assertIn("gone.dangling.test", result.failure.text)

    async def test_servfail(self) -> None:
        """SERVFAIL is a soft failure (retry later)."""
        result = await self.resolve("broken.test")
        assert result.failure is not None
        self.assertEqual((result.failure.kind, result.failure.enhanced), ("soft", "4.4.3"))
        self.assertIn("SERVFAIL", result.failure.text)

    async def test_truncated_answer_retried_over_tcp(self) -> None:
        """An answer too big for UDP comes back truncated and is fetched again over TCP (RFC 7766)."""
        result = await self.resolve("many.test")
        self.assertIsNone(result.failure)
        self.assertEqual(len(result.hosts), 40)
        self.assertEqual(result.hosts[0].addresses, ("127.0.2.0",))

    async def test_timeout_is_soft(self) -> None:
        """A server that never answers gives a soft failure after the configured timeout (injected clock)."""
        clock = Clock()
        d = self.resolve("slow.test", clock=clock, timeout=7.0, attempts=2)
        await until(reactor, lambda: len(clock.getDelayedCalls()) == 1)
        clock.advance(7.0)
        self.assertNoResult(d)  # first attempt timed out, the second is pending
        await until(reactor, lambda: len(clock.getDelayedCalls()) == 1)
        clock.advance(7.0)
        result = await d
        assert result.failure is not None
        self.assertEqual(result.failure.kind, "soft")
        self.assertIn("timed out after 7 s", result.failure.text)

    async def test_silent_server(self) -> None:
        """A port that swallows queries (dead server) also ends in a soft failure, not a hang."""
        silent = start_silent_dns(reactor)
        self.addCleanup(silent.stopListening)
        clock = Clock()
        host: Any = silent.getHost()
        resolver = MXResolver(
            reactor,
            reactor,
            clock,
            ResolverConfig(nameservers=((host.host, host.port),), timeout=5, attempts=1),
        )
        d = Deferred.fromCoroutine(resolver.resolve("example.com"))
        await until(reactor, lambda: bool(clock.getDelayedCalls()))
        clock.advance(5)
        result = await d
        assert result.failure is not None
        self.assertEqual(result.failure.kind, "soft")


class MXCacheTests(TestCase):
    """The answer cache: reuse within cache_seconds, one query for concurrent lookups, no soft failures."""

    def setUp(self) -> None:
        self.zone: dict[str, Any] = {
            "example.com": {"MX": [[10, "mx1.example.com"]]},
            "mx1.example.com": {"A": ["127.0.0.2"]},
            "broken.test": "SERVFAIL",
        }
        self.dns: FakeDNS = start_fake_dns(reactor, self.zone)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.dns.stop()))
        self.clock = Clock()
        config = ResolverConfig(nameservers=(self.dns.address,), timeout=2.0, attempts=1, cache_seconds=60)
        self.resolver = MXResolver(reactor, reactor, self.clock, config, random.Random(1))

    async def test_answer_reused_until_it_expires(self) -> None:
        """A second lookup within cache_seconds is answered from the cache; after it, DNS is asked again."""
        first = await self.resolver.resolve("example.com")
        self.zone["mx1.example.com"] = {"A": ["127.0.0.9"]}
        again = await self.resolver.resolve("Example.COM.")
        self.assertEqual(again.hosts, first.hosts)
        self.clock.advance(60)
        fresh = await self.resolver.resolve("example.com")
        self.assertEqual(fresh.hosts[0].addresses, ("127.0.0.9",))

    async def test_concurrent_lookups_share_one(self) -> None:
        """Lookups of one domain made while one is in flight get its answer."""
        asked: list[bytes] = []
        lookup = self.dns.resolver._lookup

        def counting(name: bytes, *args: Any) -> Any:
            asked.append(name)
            return lookup(name, *args)

        self.dns.resolver._lookup = counting
        results = await gatherResults(
            [Deferred.fromCoroutine(self.resolver.resolve("example.com")) for _ in range(5)]
        )
        self.assertEqual({r.hosts for r in results}, {results[0].hosts})
        self.assertEqual(sorted(asked), [b"example.com", b"mx1.example.com"])

    async def test_temporary_failure_not_cached(self) -> None:
        """A SERVFAIL is asked again on the next lookup, so a fixed zone is seen at once."""
        self.assertIsNotNone((await self.resolver.resolve("broken.test")).failure)
        self.zone["broken.test"] = {"MX": [[10, "mx1.example.com"]]}
        self.assertIsNone((await self.resolver.resolve("broken.test")).failure)

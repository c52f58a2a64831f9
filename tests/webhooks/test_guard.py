"""The SSRF guard: which addresses are refused, and that connections go only to addresses it judged."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from mtad.webhooks.guard import (
    DestinationRefused,
    GuardedEndpointFactory,
    address_refusal,
    parse_networks,
)
from tests.webhooks.support import LOOPBACK, FixedResolver

REFUSED = {
    "0.0.0.0": "unspecified",
    "0.1.2.3": "'this network'",
    "::": "unspecified",
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "fd12:3456::1": "private",
    "fc00::1": "private",
    "169.254.169.254": "cloud metadata",
    "169.254.0.1": "link-local",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "198.18.0.1": "not a globally reachable",
    "192.0.2.10": "not a globally reachable",
    "2001:db8::1": "not a globally reachable",
    "::ffff:127.0.0.1": "IPv4-mapped form of 127.0.0.1, and 127.0.0.1 is a loopback",
    "::ffff:169.254.169.254": "IPv4-mapped form of 169.254.169.254",
    "::ffff:10.0.0.1": "private",
    "64:ff9b::a9fe:a9fe": "NAT64 form of 169.254.169.254",
    "2002:c0a8:101::1": "6to4 form of 192.168.1.1",
}

ALLOWED = ["8.8.8.8", "93.184.216.34", "100.63.255.255", "172.32.0.1", "2a00:1450:4001:80b::200e"]


class AddressRefusalTests(unittest.TestCase):
    def test_refuses_non_public_addresses(self) -> None:
        """Every non-public kind of address is refused, and the reason names its kind."""
        for address, kind in REFUSED.items():
            reason = address_refusal(address, ())
            self.assertIsNotNone(reason, address)
            assert reason is not None
            self.assertIn(kind, reason, address)

    def test_allows_public_addresses(self) -> None:
        """Public IPv4 and IPv6 addresses, and public ones behind NAT64 or in IPv4-mapped form, pass."""
        for address in [*ALLOWED, "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]:
            self.assertIsNone(address_refusal(address, ()), address)

    def test_allow_list(self) -> None:
        """A listed network lets its addresses through (IPv4-mapped forms too) and nothing else."""
        allowed = parse_networks(["127.0.0.0/8", "10.5.0.0/16", "fd00::/8"])
        for address in ["127.0.0.1", "127.9.9.9", "::ffff:127.0.0.1", "10.5.1.1", "fd00::5"]:
            self.assertIsNone(address_refusal(address, allowed), address)
        for address in ["10.6.0.1", "169.254.169.254", "::1", "192.168.0.1"]:
            self.assertIsNotNone(address_refusal(address, allowed), address)

    def test_parse_networks_names_every_bad_entry(self) -> None:
        """Bad entries are all named in one error; a bare address is a /32, host bits are dropped."""
        with self.assertRaises(ValueError) as raised:
            parse_networks(["10.0.0.0/8", "nonsense", "10.0.0.0/33", "fd00::/8"])
        self.assertIn("'nonsense'", str(raised.exception))
        self.assertIn("'10.0.0.0/33'", str(raised.exception))
        self.assertEqual(
            [str(n) for n in parse_networks(["192.0.2.7", "10.1.2.3/8"])], ["192.0.2.7/32", "10.0.0.0/8"]
        )


@implementer(IPolicyForHTTPS)
class RecordingPolicy:
    """Records the names TLS is set up for (the real policy verifies certificates for that name)."""

    def __init__(self) -> None:
        self.netlocs: list[tuple[bytes, int]] = []

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from twisted.internet.ssl import optionsForClientTLS

        self.netlocs.append((hostname, port))
        return optionsForClientTLS(hostname.decode())


class EndpointTests(unittest.TestCase):
    """Connections through `GuardedEndpointFactory`, on a memory reactor that records each connect."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FixedResolver(
            {
                "mixed.test": ["127.0.0.1", "93.184.216.34", "2a00:1450::1"],
                "metadata.test": ["169.254.169.254", "::ffff:169.254.169.254"],
                "nowhere.test": [],
                "loop.test": ["127.0.0.2"],
            }
        )
        self.policy = RecordingPolicy()

    def connect(self, url: str, allowed: Any = ()) -> Deferred[Any]:
        factory = GuardedEndpointFactory(self.reactor, self.resolver, allowed, tls_policy=self.policy)
        endpoint = factory.endpointForURI(URI.fromBytes(url.encode()))
        d: Deferred[Any] = endpoint.connect(Factory.forProtocol(Protocol))
        return d

    def dialled(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def test_connects_only_to_allowed_addresses(self) -> None:
        """Of a name's addresses, the refused ones are never dialled; the first allowed one is."""
        self.connect("http://mixed.test:8080/hook")
        self.assertEqual(self.resolver.asked, ["mixed.test"])
        self.assertEqual(self.dialled(), [("93.184.216.34", 8080)])

    def test_next_allowed_address_after_a_failure(self) -> None:
        """When the first allowed address refuses the connection, the next allowed one is tried."""
        d = self.connect("http://mixed.test/")
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.dialled(), [("93.184.216.34", 80), ("2a00:1450::1", 80)])
        self.assertNoResult(d)

    def test_all_refused(self) -> None:
        """A name with only refused addresses fails with the first address and reason; nothing is dialled."""
        failure = self.failureResultOf(
            self.connect("https://metadata.test/latest/meta-data/"), DestinationRefused
        )
        self.assertEqual(failure.value.host, "metadata.test")
        self.assertEqual(failure.value.address, "169.254.169.254")
        self.assertIn("cloud metadata", str(failure.value))
        self.assertEqual(self.dialled(), [])

    def test_literal_addresses_are_judged_without_resolving(self) -> None:
        """An address literal in the URL (IPv4 or bracketed IPv6) is judged as it is, never resolved."""
        self.failureResultOf(self.connect("http://127.0.0.1:9/"), DestinationRefused)
        self.failureResultOf(self.connect("http://[::1]:9/"), DestinationRefused)
        self.failureResultOf(self.connect("http://[::ffff:a9fe:a9fe]/"), DestinationRefused)
        self.connect("http://[2a00:1450::1]:8443/")
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.dialled(), [("2a00:1450::1", 8443)])

    def test_allow_list_lets_loopback_through(self) -> None:
        """With 127.0.0.0/8 listed, loopback names and literals are dialled."""
        self.connect("http://loop.test:8000/", LOOPBACK)
        self.connect("http://127.0.0.1:8001/", LOOPBACK)
        self.assertEqual(self.dialled(), [("127.0.0.2", 8000), ("127.0.0.1", 8001)])

    def test_no_addresses_is_a_dns_failure(self) -> None:
        """A name without addresses fails as a DNS lookup failure (Postal's -2), not as a refusal."""
        self.failureResultOf(self.connect("http://nowhere.test/"), DNSLookupError)
        self.failureResultOf(self.connect("http://unknown.test/"), DNSLookupError)

    def test_tls_for_the_url_hostname(self) -> None:
        """https connects to the judged address but sets TLS up for the URL's hostname (SNI, verification)."""
        self.connect("https://mixed.test/hook")
        self.assertEqual(self.policy.netlocs, [(b"mixed.test", 443)])
        self.assertEqual(self.dialled(), [("93.184.216.34", 443)])

    def test_other_schemes_refused(self) -> None:
        """Only http and https URLs get an endpoint."""
        factory = GuardedEndpointFactory(self.reactor, self.resolver)
        with self.assertRaises(SchemeNotSupported):
            factory.endpointForURI(URI.fromBytes(b"gopher://mixed.test/"))

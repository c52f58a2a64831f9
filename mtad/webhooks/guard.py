"""SSRF guard for outgoing webhook and HTTP-endpoint requests: never connect into the operator's own networks.

A webhook URL is chosen by whoever can configure a mail server, not by the operator. Without a guard it
reaches the loopback admin API, the embedded Redis, the LAN, or the cloud metadata service at
169.254.169.254 (credentials!) and hands back an excerpt of the answer in the request log. Postal 3.3.7 added
the same guard (``lib/postal/http/address_guard.rb``) with code ``-4`` for a refused destination.

The check is made on the addresses actually connected to: `GuardedEndpointFactory` resolves the host itself,
judges every address, and connects by address literal, so nothing resolves the name a second time and DNS
rebinding (a public answer for the check, a private one for the connection) has nothing to exploit. TLS is
layered on top with the URL's hostname, so certificates are verified for the name, not the address.

Addresses refused (unless inside an operator-listed network): unspecified and "this network" (0/8, ::),
loopback, link-local (169.254/16, fe80::/10), RFC 1918 and unique-local (fc00::/7), CGNAT (100.64/10,
RFC 6598), multicast, reserved (240/4, the IETF-reserved IPv6 blocks), and anything else IANA marks as not
globally reachable (documentation, benchmarking ranges). IPv6 forms that embed an IPv4 address are judged by
that address: IPv4-mapped (``::ffff:127.0.0.1``) and NAT64 (``64:ff9b::/96``, RFC 6052, so an IPv6-only
host behind DNS64 still reaches public receivers) by the embedded address alone, 6to4 (``2002::/16``) by both.

Differences from Postal: Postal refuses a name if *any* of its addresses is refused; we connect only to the
allowed ones and refuse only when none is left, which exposes nothing more (a refused address is never
dialled). The allow-list holds networks only, not hostnames: a hostname says nothing about where it points.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_METADATA = ipaddress.IPv4Address("169.254.169.254")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class DestinationRefused(Exception):
    """The URL's host has no address the guard lets us connect to."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"Destination '{host}' ({address}) is not permitted: {reason}")
        self.host = host
        self.address = address
        self.reason = reason


def parse_networks(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The operator's allow-list (``["127.0.0.0/8", "fd00::/8", "10.1.2.3"]``) as networks; a bare address
    is a one-address network, host bits are dropped (``10.1.2.3/8`` is 10.0.0.0/8, as `mtad.config` checks
    it). Raises `ValueError` naming every bad entry."""
    networks: list[IPNetwork] = []
    problems: list[str] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as e:
            problems.append(f"{text!r}: {e}")
    if problems:
        raise ValueError("not networks in CIDR form: " + "; ".join(problems))
    return tuple(networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str, bool] | None:
    """The IPv4 address an IPv6 form carries: (address, name of the form, whether it alone decides)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped", True
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64", True
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4", False
    return None


def _ipv4_or_ipv6_refusal(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip in _THIS_NETWORK:
        return f"{ip} is a 'this network' address (0.0.0.0/8)"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip == _METADATA:
        return f"{ip} is a link-local address (the cloud metadata service)"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if ip in _CGNAT:
        return f"{ip} is a carrier-grade NAT address (100.64.0.0/10, RFC 6598)"
    if any(ip in network for network in _PRIVATE):
        return f"{ip} is a private address"
    if ip.is_reserved:
        return f"{ip} is a reserved address"
    if not ip.is_global:
        return f"{ip} is not a globally reachable address"
    return None


def address_refusal(ip: str | IPAddress, allowed_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why the guard refuses to connect to ``ip``, or ``None`` if it may.

    ``allowed_networks`` are the operator's exceptions (a receiver on the LAN, 127.0.0.0/8 in tests); an
    IPv6 form of an IPv4 address is allowed when either form is listed.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.partition("%")[0])  # a link-local scope (fe80::1%eth0) is no part of it
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    candidates: list[IPAddress] = [ip] if embedded is None else [ip, embedded[0]]
    if any(address in network for address in candidates for network in allowed_networks):
        return None
    if embedded is not None:
        inner, form, decides = embedded
        inner_refusal = _ipv4_or_ipv6_refusal(inner)
        if inner_refusal is not None:
            return f"{ip} is the {form} form of {inner}, and {inner_refusal}"
        if decides:
            return None
    return _ipv4_or_ipv6_refusal(ip)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects a resolution's addresses into a Deferred (cancelling it just stops waiting: a lookup in
    flight cannot be recalled)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred(lambda d: None)

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, TwistedIPv4Address | TwistedIPv6Address):
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class GuardedTCPEndpoint:
    """A TCP endpoint for ``host:port`` that resolves ``host`` once, drops refused addresses and connects to
    the first allowed address that answers, trying them in the resolver's order (RFC 6724 for getaddrinfo).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        resolver: IHostnameResolver,
        host: str,
        port: int,
        allowed_networks: Sequence[IPNetwork] = (),
        connect_timeout: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._allowed = tuple(allowed_networks)
        self._connect_timeout = connect_timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _addresses(self) -> list[str]:
        literal = _literal(self._host)
        if literal is not None:
            return [str(literal)]
        receiver = _Addresses()
        self._resolver.resolveHostName(
            receiver,
            self._host,
            portNumber=self._port,
            addressTypes=[TwistedIPv4Address, TwistedIPv6Address],
            transportSemantics="TCP",
        )
        return await receiver.done

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        addresses = await self._addresses()
        if not addresses:
            raise DNSLookupError(f"{self._host} has no IPv4 or IPv6 address")
        allowed: list[str] = []
        refused: list[tuple[str, str]] = []
        for address in addresses:
            reason = address_refusal(address, self._allowed)
            if reason is None:
                allowed.append(address)
            else:
                refused.append((address, reason))
        for address, reason in refused:
            self.log.warn(
                "not connecting to {address} for {host}: {reason}",
                address=address,
                host=self._host,
                reason=reason,
            )
        if not allowed:
            address, reason = refused[0]
            raise DestinationRefused(self._host, address, reason)
        failure: ConnectError | None = None
        for address in allowed:
            endpoint: IStreamClientEndpoint
            if isinstance(ipaddress.ip_address(address.partition("%")[0]), ipaddress.IPv6Address):
                endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                    self._reactor, address, self._port, timeout=self._connect_timeout
                )
            else:
                endpoint = TCP4ClientEndpoint(
                    self._reactor, address, self._port, timeout=self._connect_timeout
                )
            try:
                protocol: IProtocol = await endpoint.connect(factory)
            except ConnectError as e:
                failure = e
                continue
            return protocol
        assert failure is not None
        raise failure


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """Endpoints for `twisted.web.client.Agent.usingEndpointFactory`: guarded TCP for ``http``, TLS over
    guarded TCP for ``https`` (certificates verified against the URL's hostname, which is also the SNI
    name; `BrowserLikePolicyForHTTPS` by default, Postal's ``VERIFY_PEER``)."""

    def __init__(
        self,
        reactor: IReactorTCP,
        resolver: IHostnameResolver,
        allowed_networks: Sequence[IPNetwork] = (),
        tls_policy: IPolicyForHTTPS | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._allowed = tuple(allowed_networks)
        self._tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()  # type: ignore[no-untyped-call]
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host {uri.host!r} is not ASCII (IDNA-encode it)") from None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # an IPv6 literal, as URI.fromBytes leaves it
        endpoint = GuardedTCPEndpoint(
            self._reactor, self._resolver, host, uri.port, self._allowed, self._connect_timeout
        )
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(host.encode("ascii"), uri.port)
            return wrapClientTLS(creator, endpoint)
        raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}: webhooks are http or https")

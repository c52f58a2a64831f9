"""MX resolution for outbound delivery, asynchronous on the reactor.

dnspython builds and parses the messages; Twisted carries them (UDP, then TCP when the answer is
truncated, RFC 7766 §5), so the reactor thread never blocks (DESIGN invariant 3) and the injected clock
drives every timeout (invariant 5).

Rules applied (RFC 5321 §5.1): MX records sorted by preference, random order among equal preference
(spreads load as §5.1 asks); no MX records → the domain itself is the implicit MX; a null MX (RFC 7505 §3:
one MX ``0 .``) means the domain accepts no mail → permanent failure ``5.1.10`` (RFC 7505 §4.2).
NXDOMAIN → permanent failure; SERVFAIL, REFUSED and timeouts → temporary failure.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import Literal

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.MX
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

from mtad.caching import ExpiringCache, SharedLookups


@attrs.frozen
class ResolverConfig:
    """Where and how patiently to ask: ``nameservers`` are ``(host, port)`` pairs tried in order.

    ``timeout`` applies to each query to each server; every server is tried ``attempts`` times. Postal's
    resolver uses 5 s then 2 s, 2 s; ``ipv6`` adds AAAA lookups for MX hosts.
    """

    nameservers: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    timeout: float = 5.0
    attempts: int = 2
    ipv6: bool = False
    #: Seconds an answer (hosts, or a permanent failure) is reused; 0 asks every time. Temporary
    #: failures are never cached.
    cache_seconds: float = 0.0


@attrs.frozen
class MXHost:
    """One mail exchanger with the addresses to try, in order."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@attrs.frozen
class MXFailure:
    """Why a domain cannot be delivered to now: ``kind`` decides retry ("soft") or bounce ("hard")."""

    kind: Literal["soft", "hard"]
    enhanced: str
    text: str


@attrs.frozen
class MXResult:
    """Ordered mail exchangers for a domain, or the reason there are none."""

    domain: str
    hosts: tuple[MXHost, ...] = ()
    failure: MXFailure | None = None
    implicit: bool = False


class DNSTemporaryError(Exception):
    """No usable answer: every server timed out or answered SERVFAIL/REFUSED."""


class _UDPQuery(DatagramProtocol):
    """One query over one ephemeral UDP port; fires with the first matching response."""

    noisy = False  # one per query: "starting on port" lines would be most of the log

    def __init__(self, query: dns.message.Message, server: tuple[str, int]) -> None:
        self.query = query
        self.server = server
        self.done: Deferred[dns.message.Message] = Deferred()

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.write(self.query.to_wire(), self.server)

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        if self.done.called or not isinstance(addr, tuple) or tuple(addr[:2]) != self.server:
            return
        try:
            response = dns.message.from_wire(datagram, ignore_trailing=True)
        except dns.exception.DNSException:
            return  # RFC 5452 §9.1: ignore what does not parse or match, keep waiting
        if self.query.is_response(response):
            self.done.callback(response)


class _TCPQuery(Int16StringReceiver):
    """One query over TCP with two-byte length framing (RFC 1035 §4.2.2)."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.done: Deferred[dns.message.Message] = Deferred()

    def connectionMade(self) -> None:
        self.sendString(self.query.to_wire())  # type: ignore[no-untyped-call]

    def stringReceived(self, string: bytes) -> None:
        if self.done.called:
            return
        try:
            response = dns.message.from_wire(string, ignore_trailing=True)
        except dns.exception.DNSException as e:
            self.done.errback(DNSTemporaryError(f"unparsable TCP answer: {e}"))
        else:
            self.done.callback(response)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(DNSTemporaryError("TCP connection closed before an answer"))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MXResolver:
    """Resolve a domain to the ordered list of (MX host, addresses) to deliver to."""

    log = Logger()

    def __init__(
        self,
        udp: IReactorUDP,
        tcp: IReactorTCP,
        clock: IReactorTime,
        config: ResolverConfig,
        rng: random.Random | None = None,
    ) -> None:
        self._udp = udp
        self._tcp = tcp
        self._clock = clock
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self._cache: ExpiringCache[str, MXResult] = ExpiringCache(clock, config.cache_seconds)
        self._lookups: SharedLookups[str, MXResult] = SharedLookups()

    def _with_timeout(self, d: Deferred[dns.message.Message], what: str) -> Deferred[dns.message.Message]:
        call: IDelayedCall = self._clock.callLater(self._config.timeout, d.cancel)

        def finish(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        def translate(f: Failure) -> Failure:
            if isinstance(f.value, CancelledError):
                raise DNSTemporaryError(f"timed out after {self._config.timeout:g} s asking {what}")
            return f

        d.addBoth(finish)
        d.addErrback(translate)
        return d

    async def _udp_query(self, query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        proto = _UDPQuery(query, server)
        ipv6 = ":" in server[0]
        interface = ("::1" if ipv6 else "127.0.0.1") if _is_loopback(server[0]) else ("::" if ipv6 else "")
        port = self._udp.listenUDP(0, proto, interface=interface, maxPacketSize=65535)
        try:
            return await self._with_timeout(proto.done, f"{server[0]}:{server[1]}")
        finally:
            await Deferred.fromCoroutine(_stop(port))

    async def _tcp_query(self, query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        host, port = server
        endpoint = (
            TCP6ClientEndpoint(self._tcp, host, port, timeout=self._config.timeout)  # type: ignore[no-untyped-call]
            if ":" in host
            else TCP4ClientEndpoint(self._tcp, host, port, timeout=self._config.timeout)
        )
        proto = _TCPQuery(query)
        try:
            await connectProtocol(endpoint, proto)  # type: ignore[no-untyped-call]
        except Exception as e:
            raise DNSTemporaryError(f"TCP connection to {host}:{port} failed: {e}") from e
        try:
            return await self._with_timeout(proto.done, f"{host}:{port} over TCP")
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()

    async def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """Ask the configured servers until one gives NOERROR or NXDOMAIN; raise DNSTemporaryError if none."""
        qname = dns.name.from_text(name)
        problems: list[str] = []
        for _attempt in range(max(self._config.attempts, 1)):
            for server in self._config.nameservers:
                query = dns.message.make_query(qname, rdtype, use_edns=0, payload=1232)
                try:
                    response = await self._udp_query(query, server)
                    if response.flags & dns.flags.TC:
                        response = await self._tcp_query(query, server)
                except DNSTemporaryError as e:
                    problems.append(str(e))
                    continue
                rcode = response.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                problems.append(f"{server[0]}:{server[1]} answered {dns.rcode.to_text(rcode)}")
        raise DNSTemporaryError("; ".join(dict.fromkeys(problems)))

    async def addresses(self, host: str) -> tuple[str, ...]:
        """The A (and with ``ipv6``, AAAA) addresses of ``host``; empty when it has none or does not exist."""
        try:
            return (str(ipaddress.ip_address(host)),)  # an address literal needs no lookup
        except ValueError:
            pass
        types = [dns.rdatatype.A] + ([dns.rdatatype.AAAA] if self._config.ipv6 else [])
        found: list[str] = []
        for rdtype in types:
            response = await self.query(host, rdtype)
            for rrset in response.answer:
                if rrset.rdtype == rdtype:
                    found.extend(rdata.address for rdata in rrset)
        return tuple(dict.fromkeys(found))

    def _order(self, records: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        shuffled = list(records)
        self._rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda r: r[0])  # sort is stable: equal preferences stay shuffled

    async def resolve(self, domain: str) -> MXResult:
        """Resolve ``domain`` to mail exchangers with addresses, or to a soft/hard failure.

        With ``cache_seconds``, answers are reused for that long (equal-preference hosts reshuffled on
        each use), and concurrent lookups of one domain share one set of queries: a burst of batches for
        one destination asks DNS once, not once per batch.
        """
        domain = domain.rstrip(".").lower()
        if not self._config.cache_seconds:
            return await self._resolve(domain)
        cached = self._cache.get(domain)
        if cached is not None:
            return attrs.evolve(cached, hosts=self._reorder(cached.hosts)) if cached.hosts else cached
        return await self._lookups.run(domain, lambda: self._resolve_and_cache(domain))

    async def _resolve_and_cache(self, domain: str) -> MXResult:
        result = await self._resolve(domain)
        if result.failure is None or result.failure.kind == "hard":
            self._cache.put(domain, result)
        return result

    def _reorder(self, hosts: tuple[MXHost, ...]) -> tuple[MXHost, ...]:
        shuffled = list(hosts)
        self._rng.shuffle(shuffled)
        return tuple(sorted(shuffled, key=lambda h: h.preference))

    async def _resolve(self, domain: str) -> MXResult:
        try:
            response = await self.query(domain, dns.rdatatype.MX)
        except DNSTemporaryError as e:
            return _soft(domain, f"DNS lookup of MX records for {domain} failed: {e}")
        except dns.exception.DNSException as e:
            return MXResult(domain, failure=MXFailure("hard", "5.1.2", f"Invalid domain {domain}: {e}"))
        if response.rcode() == dns.rcode.NXDOMAIN:
            return MXResult(domain, failure=MXFailure("hard", "5.1.2", f"Domain {domain} does not exist"))
        records: list[tuple[int, str]] = []
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.MX:
                for rdata in rrset:
                    assert isinstance(rdata, dns.rdtypes.ANY.MX.MX)
                    records.append((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
        real = [(p, h) for p, h in records if h not in ("", ".")]
        if records and not real:
            return MXResult(
                domain,
                failure=MXFailure(
                    "hard", "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)"
                ),
            )
        implicit = not records
        if implicit:
            real = [(0, domain)]  # RFC 5321 §5.1: the domain itself is the implicit MX

        async def lookup(host: str) -> tuple[str, tuple[str, ...] | str]:
            try:
                return host, await self.addresses(host)
            except DNSTemporaryError as e:
                return host, str(e)

        ordered = self._order(real)
        looked_up = await gatherResults([Deferred.fromCoroutine(lookup(h)) for _, h in ordered])
        found = dict(looked_up)
        hosts: list[MXHost] = []
        problems: list[str] = []
        for preference, host in ordered:
            result = found[host]
            if isinstance(result, str):
                problems.append(f"{host}: {result}")
            elif result:
                hosts.append(MXHost(host, preference, result))
        if hosts:
            return MXResult(domain, hosts=tuple(hosts), implicit=implicit)
        if problems:
            return _soft(
                domain, f"DNS lookup of mail server addresses for {domain} failed: {'; '.join(problems)}"
            )
        if implicit:
            return MXResult(
                domain, failure=MXFailure("hard", "5.1.2", f"Domain {domain} has no MX or address records")
            )
        names = ", ".join(h for _, h in ordered)
        return MXResult(
            domain,
            failure=MXFailure("hard", "5.4.4", f"Mail servers for {domain} have no addresses ({names})"),
        )


def _soft(domain: str, text: str) -> MXResult:
    return MXResult(domain, failure=MXFailure("soft", "4.4.3", text))


async def _stop(port: object) -> None:
    result = port.stopListening()  # type: ignore[attr-defined]
    if isinstance(result, Deferred):
        await result


def parse_nameservers(
    entries: Sequence[str], resolv_conf: str = "/etc/resolv.conf"
) -> tuple[tuple[str, int], ...]:
    """``dns.nameservers`` entries (``host``, ``host:port``, ``[v6]:port``) as (host, port) pairs.

    With no entries, the ``nameserver`` lines of ``resolv_conf`` (read once at start-up, as libc does);
    raises ValueError naming the bad entry, or when neither gives a server.
    """
    servers: list[tuple[str, int]] = []
    if not entries:
        try:
            with open(resolv_conf, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(f"no dns.nameservers configured and {resolv_conf} unreadable: {e}") from e
        for line in lines:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                servers.append((fields[1].split("%")[0], 53))
        if not servers:
            raise ValueError(f"no dns.nameservers configured and no nameserver line in {resolv_conf}")
        return tuple(servers)
    for entry in entries:
        host, port = entry, 53
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest:
                port = _port(entry, rest.removeprefix(":"))
        elif entry.count(":") == 1:
            host, _, text = entry.partition(":")
            port = _port(entry, text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"nameserver {entry!r}: {host!r} is not an IP address") from None
        servers.append((host, port))
    return tuple(servers)


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"nameserver {entry!r}: bad port {text!r}")
    return int(text)

# mypy: disable-error-code="no-untyped-call"
"""A fake DNS server on loopback, serving a zone given as Python data.

Delivery tests need MX answers they control — including the failure modes a real resolver meets
(NXDOMAIN, SERVFAIL, silence) — without touching the network beyond 127.0.0.0/8. Built on
``twisted.names`` so it runs in the test's own reactor; also a script::

    python -m tools.fakedns --port 5353 --zone zone.json [--interface 127.0.0.1]

The zone maps a name to either a dict of record lists or a behaviour string::

    {
        "example.com": {"MX": [[10, "mx1.example.com"], [20, "mx2.example.com"]]},
        "mx1.example.com": {"A": ["127.0.0.2"]},
        "nullmx.test": {"MX": [[0, "."]]},        # RFC 7505 null MX
        "broken.test": "SERVFAIL",
        "slow.test": "TIMEOUT",                    # never answered
    }

Names absent from the zone answer NXDOMAIN; a present name without the asked type answers NOERROR with
no records (NODATA). Supported types: A, AAAA, MX, CNAME, TXT.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.names import common, dns, error, server

Zone = MutableMapping[str, Any]

_TYPES: dict[str, int] = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "CNAME": dns.CNAME, "TXT": dns.TXT}


def _record(kind: str, name: str, value: Any, ttl: int) -> dns.RRHeader:
    payload: Any
    if kind == "A":
        payload = dns.Record_A(value, ttl=ttl)
    elif kind == "AAAA":
        payload = dns.Record_AAAA(value, ttl=ttl)
    elif kind == "MX":
        preference, exchange = value
        payload = dns.Record_MX(int(preference), b"" if exchange in ("", ".") else exchange.encode(), ttl=ttl)
    elif kind == "CNAME":
        payload = dns.Record_CNAME(value.encode(), ttl=ttl)
    elif kind == "TXT":
        # A TXT record is a list of character-strings of at most 255 octets (RFC 1035 §3.3.14): a list
        # value gives the strings as they are, a longer string is split as DNS servers publish it.
        if isinstance(value, list):
            parts = [part.encode() for part in value]
        else:
            raw = value.encode()
            parts = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        payload = dns.Record_TXT(*parts, ttl=ttl)
    else:
        raise ValueError(f"unsupported record type {kind!r} for {name}")
    return dns.RRHeader(name=name.encode(), type=_TYPES[kind], ttl=ttl, payload=payload, auth=True)


class _ServerFailure(Exception):
    """The zone says this name answers SERVFAIL."""


class ZoneResolver(common.ResolverBase):  # type: ignore[misc]
    """An authority answering from ``zone``; edit ``zone`` at any time to change the answers."""

    def __init__(self, zone: Zone, ttl: int = 60) -> None:
        super().__init__()
        self.zone = zone
        self.ttl = ttl
        self.queries: list[tuple[str, int]] = []

    def _entry(self, name: str) -> Any:
        for key, value in self.zone.items():
            if key.lower().rstrip(".") == name:
                return value
        return None

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object) -> defer.Deferred[Any]:
        text = name.decode("ascii", "replace").lower().rstrip(".")
        self.queries.append((text, type))
        entry = self._entry(text)
        if entry is None:
            return defer.fail(error.AuthoritativeDomainError(text))
        if entry == "SERVFAIL":
            return defer.fail(_ServerFailure(text))  # any non-DomainError becomes SERVFAIL
        if entry == "TIMEOUT":
            return defer.Deferred()  # never answered: the client must time out
        answers: list[dns.RRHeader] = []
        for kind, values in entry.items():
            code = _TYPES[kind.upper()]
            if type in (code, dns.ALL_RECORDS) or (code == dns.CNAME and type != dns.CNAME):
                answers.extend(_record(kind.upper(), text, v, self.ttl) for v in values)
        return defer.succeed((answers, [], []))


class _ZoneServerFactory(server.DNSServerFactory):  # type: ignore[misc]
    """Answers SERVFAIL for scripted failures without logging them (trial fails on logged errors)."""

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(_ServerFailure):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


@attrs.define
class FakeDNS:
    """A running fake DNS server: UDP and TCP on the same ``host``:``port``."""

    resolver: ZoneResolver
    udp: IListeningPort
    tcp: IListeningPort | None

    @property
    def host(self) -> str:
        return str(self.udp.getHost().host)  # type: ignore[attr-defined]

    @property
    def port(self) -> int:
        return int(self.udp.getHost().port)  # type: ignore[attr-defined]

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` as a resolver configuration wants it."""
        return (self.host, self.port)

    async def stop(self) -> None:
        for p in (self.udp, self.tcp):
            if p is not None:
                result = p.stopListening()
                if isinstance(result, defer.Deferred):
                    await result


def start_fake_dns(
    reactor: IReactorUDP, zone: Zone, interface: str = "127.0.0.1", port: int = 0, tcp: bool = True
) -> FakeDNS:
    """Listen on ``interface``:``port`` (0 = any free port) and serve ``zone``; returns the server handle.

    ``reactor`` must also provide IReactorTCP when ``tcp`` is set (for truncated answers, RFC 7766).
    """
    resolver = ZoneResolver(zone)
    factory = _ZoneServerFactory(authorities=[resolver])
    # With port 0 the kernel picks a free UDP port whose TCP twin may be taken: try another pair.
    for attempt in range(20):
        udp = reactor.listenUDP(
            port, dns.DNSDatagramProtocol(factory), interface=interface, maxPacketSize=65535
        )
        if not tcp:
            return FakeDNS(resolver, udp, None)
        bound = udp.getHost().port  # type: ignore[attr-defined]
        try:
            tcp_port = IReactorTCP(reactor).listenTCP(bound, factory, interface=interface)
        except CannotListenError:
            udp.stopListening()
            if port != 0 or attempt == 19:
                raise
            continue
        return FakeDNS(resolver, udp, tcp_port)
    raise AssertionError("unreachable")


class _Silent(DatagramProtocol):
    """Reads queries and never answers."""

    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received += 1


def start_silent_dns(reactor: IReactorUDP, interface: str = "127.0.0.1") -> IListeningPort:
    """A UDP port that swallows every query: a DNS server that has died without closing its port."""
    return reactor.listenUDP(0, _Silent(), interface=interface, maxPacketSize=65535)


def load_zone(path: Path) -> Zone:
    """Read a zone from a JSON file in the format above."""
    data = json.loads(path.read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the zone must be a JSON object")
    return dict(data)


def main(argv: list[str] | None = None) -> None:
    """Run the fake DNS server until interrupted."""
    from twisted.internet import task

    parser = argparse.ArgumentParser(prog="python -m tools.fakedns", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5353)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--zone", type=Path, required=True, help="JSON zone file")
    args = parser.parse_args(argv)
    zone = load_zone(args.zone)

    def run(reactor: Any) -> defer.Deferred[None]:
        fake = start_fake_dns(reactor, zone, args.interface, args.port)
        print(f"fake DNS on {fake.host}:{fake.port} serving {len(zone)} names", file=sys.stderr)
        return defer.Deferred()

    task.react(run)


if __name__ == "__main__":
    main()

"""Test doubles for the outgoing webhook POST: a resolver with fixed answers and a real HTTP receiver.

The receiver is a twisted.web server on 127.0.0.1, port 0, optionally over TLS; it records every request
(headers and exact body) and can hold requests unanswered until a test lets them go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IResolutionReceiver,
)
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mtad.webhooks.guard import parse_networks
from tests.outbound.support import until

#: The tests' operator allow-list: receivers run on loopback.
LOOPBACK = parse_networks(["127.0.0.0/8"])


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FixedResolver:
    """Answers each name with fixed addresses (none for an unknown name), as the reactor's resolver would
    (every address given to the receiver, then ``resolutionComplete``); records the names asked."""

    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self.answers.get(hostName, ()):
            if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
                resolutionReceiver.addressResolved(IPv6Address("TCP", address, portNumber))
            else:
                resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@attrs.frozen
class Received:
    method: bytes
    path: bytes
    headers: dict[str, str]
    body: bytes


class _Hook(Resource):
    isLeaf = True

    def __init__(self, receiver: Receiver) -> None:
        super().__init__()
        self._receiver = receiver

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        r = self._receiver
        assert request.content is not None and request.method is not None and request.uri is not None
        headers = {
            k.decode().lower(): b", ".join(v).decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        r.received.append(Received(request.method, request.uri, headers, request.content.read()))
        if r.hold:
            r.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(r.code)  # type: ignore[no-untyped-call]
        for name, value in r.response_headers.items():
            request.responseHeaders.setRawHeaders(name, [value])
        return r.body


class Receiver:
    """A webhook receiver answering ``code`` with ``body`` (or holding requests while ``hold`` is set)."""

    def __init__(
        self, code: int = 200, body: bytes = b"OK", response_headers: dict[str, str] | None = None
    ) -> None:
        self.code = code
        self.body = body
        self.response_headers = response_headers or {}
        self.hold = False
        self.received: list[Received] = []
        self.held: list[Request] = []
        self.factory = WrappingFactory(Site(_Hook(self)))  # type: ignore[no-untyped-call]
        self.connections = 0
        self.port: IListeningPort | None = None

    def listen(self, reactor: Any, tls: CertificateOptions | None = None) -> int:
        """Start listening on 127.0.0.1 (TLS with ``tls``); returns the port number."""
        original = self.factory.registerProtocol

        def count(protocol: Any) -> None:
            self.connections += 1
            original(protocol)

        self.factory.registerProtocol = count  # type: ignore[method-assign]
        if tls is None:
            self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        else:
            self.port = reactor.listenSSL(0, self.factory, tls, interface="127.0.0.1")
        assert self.port is not None
        number: int = self.port.getHost().port  # type: ignore[attr-defined]
        return number

    def release(self) -> None:
        """Answer every held request and stop holding."""
        self.hold = False
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(self.code)  # type: ignore[no-untyped-call]
            request.write(self.body)  # type: ignore[no-untyped-call]
            request.finish()  # type: ignore[no-untyped-call]

    async def close(self, reactor: Any) -> None:
        """Stop listening and wait until every connection to it is gone (trial checks for leftovers)."""
        if self.port is not None:
            await self.port.stopListening()
        await until(reactor, lambda: not self.factory.protocols)

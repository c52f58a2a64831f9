"""The daemon's HTTP site: routing by path prefix and the request body bound, over real loopback TCP."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource

from admin_api.site import make_site
from tests.redis_server import real_reactor


class Echo(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Any) -> bytes:
        args = b"&".join(k + b"=" + b",".join(v) for k, v in sorted(request.args.items()))
        return (
            self.name + b" " + request.path + b" " + str(len(request.content.read())).encode() + b" " + args
        )


class Collect(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)


class SiteTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor: Any = real_reactor()
        site = make_site([(b"/status", Echo(b"status")), (b"/api/v1/", Echo(b"api"))], max_body=1000)
        self.access: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "mtad.http.access":
                self.access.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def exchange(self, request: bytes) -> bytes:
        collect = Collect(request)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, collect)  # type: ignore[no-untyped-call]
        return await collect.done

    async def test_routes_by_prefix(self) -> None:
        """Each app gets the paths under its prefix, with the full path; anything else is 404."""
        api = await self.exchange(b"POST /api/v1/send/message HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        self.assertTrue(api.startswith(b"HTTP/1.0 200"), api)
        self.assertTrue(api.endswith(b"api /api/v1/send/message 3 "), api)
        status = await self.exchange(b"GET /status HTTP/1.0\r\n\r\n")
        self.assertTrue(status.endswith(b"status /status 0 "), status)
        missing = await self.exchange(b"GET /other HTTP/1.0\r\n\r\n")
        self.assertTrue(missing.startswith(b"HTTP/1.0 404"), missing)

    async def test_access_log(self) -> None:
        """Each request is one structured access event; quotes and escapes in client text stay escaped."""
        await self.exchange(
            b'GET /status?a=1 HTTP/1.0\r\nUser-Agent: evil" agent\\x\r\nReferer: http://r.example/\r\n\r\n'
        )
        await self.exchange(b"GET /nowhere HTTP/1.0\r\n\r\n")
        self.assertEqual(len(self.access), 2, self.access)
        first, second = self.access
        self.assertEqual(
            {k: first[k] for k in ("client", "method", "uri", "protocol", "code", "referrer", "agent")},
            {
                "client": "127.0.0.1",
                "method": "GET",
                "uri": "/status?a=1",
                "protocol": "HTTP/1.0",
                "code": 200,
                "referrer": "http://r.example/",
                "agent": 'evil\\" agent\\\\x',
            },
        )
        self.assertEqual(first["length"], len(b"status /status 0 a=1"))
        self.assertEqual(
            formatEvent(first),
            '127.0.0.1 "GET /status?a=1 HTTP/1.0" 200 20 "http://r.example/" "evil\\" agent\\\\x"',
        )
        self.assertEqual((second["uri"], second["code"]), ("/nowhere", 404))

    async def test_form_bodies_parsed(self) -> None:
        """URL-encoded and multipart POST bodies still reach the app as arguments; JSON bodies do not."""
        form = b"a=1&b=x+y"
        answer = await self.exchange(
            b"POST /api/v1/x?q=2 HTTP/1.0\r\nContent-Type: Application/X-WWW-Form-Urlencoded; charset=utf-8"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(form), form)
        )
        self.assertTrue(answer.endswith(b"a=1&b=x y&q=2"), answer)
        multipart = b'--XX\r\nContent-Disposition: form-data; name="params"\r\n\r\n{}\r\n--XX--\r\n'
        answer = await self.exchange(
            b"POST /api/v1/x HTTP/1.0\r\nContent-Type: multipart/form-data; boundary=XX"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(multipart), multipart)
        )
        self.assertTrue(answer.endswith(b"params={}"), answer)
        json_body = b'{"a": 1}'
        answer = await self.exchange(
            b"POST /api/v1/x?q=2 HTTP/1.0\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(json_body), json_body)
        )
        self.assertTrue(answer.endswith(b"api /api/v1/x 8 q=2"), answer)

    async def test_declared_oversize_body_refused(self) -> None:
        """A Content-Length over the bound is answered 413 before the body is read."""
        answer = await self.exchange(
            b"POST /api/v1/send/raw HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)

    async def test_chunked_oversize_body_refused(self) -> None:
        """A chunked body that grows past the bound is cut off with 413; the app never sees it."""
        chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
        request = (
            b"POST /api/v1/send/raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk * 2
            + b"0\r\n\r\n"
        )
        answer = await self.exchange(request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"api /api/v1", answer)

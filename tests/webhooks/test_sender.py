"""`WebhookSender` against real receivers on 127.0.0.1: status codes, headers, timeouts, TLS, the guard, caps.

I/O runs on the reactor trial runs; time (the timeout, durations) is a `Clock` the tests advance.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from mtad import __version__
from mtad.tls import ensure_self_signed, server_context
from mtad.webhooks.guard import IPNetwork
from mtad.webhooks.sender import (
    CONNECTION_FAILED,
    DESTINATION_REFUSED,
    INVALID_CERTIFICATE,
    TIMED_OUT,
    NotStarted,
    SenderSettings,
    SendResult,
    WebhookSender,
    _decode_excerpt,
    guarded_agent,
)
from mtad.webhooks.signing import WebhookSigner
from tests.outbound.support import until
from tests.redis_server import real_reactor
from tests.webhooks.support import LOOPBACK, FixedResolver, Receiver

BODY = json.dumps(
    {"event": "MessageSent", "timestamp": 1.5, "uuid": "u-1", "payload": {"subject": "Héllo"}}
).encode()

_SIGNER: WebhookSigner | None = None


def signer() -> WebhookSigner:
    """One key for the module: generating a 2048-bit key per test would dominate the run time."""
    global _SIGNER
    if _SIGNER is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _SIGNER = WebhookSigner(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return _SIGNER


class _Resetting(Protocol):
    """Reads the request, then resets the connection (SO_LINGER 0 makes close send RST)."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        handle: socket.socket = self.transport.getHandle()  # type: ignore[attr-defined]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()  # type: ignore[attr-defined]


@implementer(IAgent)
class NotingAgent:
    """Counts the responses (status and headers) the agent has received, before any body is read."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent
        self.responses = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        def note(response: IResponse) -> IResponse:
            self.responses += 1
            return response

        return self._agent.request(method, uri, headers, bodyProducer).addCallback(note)


class SenderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor: Any = real_reactor()
        self.clock = Clock()
        self.resolver = FixedResolver({"receiver.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]})

    def sender(
        self,
        allowed: tuple[IPNetwork, ...] = LOOPBACK,
        settings: SenderSettings | None = None,
        tls_policy: IPolicyForHTTPS | None = None,
        resolver: IHostnameResolver | None = None,
        reactor: Any = None,
        **kwargs: Any,
    ) -> WebhookSender:
        agent = guarded_agent(
            reactor or self.reactor, resolver or self.resolver, allowed, tls_policy=tls_policy
        )
        return WebhookSender(agent, self.clock, signer(), settings or SenderSettings(), **kwargs)

    def receiver(self, tls: Any = None, **kwargs: Any) -> tuple[Receiver, int]:
        receiver = Receiver(**kwargs)
        port = receiver.listen(self.reactor, tls)
        self.addCleanup(receiver.close, self.reactor)
        return receiver, port

    def tls_server(self, hostname: str) -> tuple[Any, Certificate]:
        cert, key = ensure_self_signed(Path(self.mktemp()), hostname)
        return server_context(cert, key), Certificate.loadPEM(cert.read_bytes())

    async def test_delivered_with_signature_and_exact_body(self) -> None:
        """2xx is ok; the receiver gets the exact body, Postal's signature headers, JSON type and our UA."""
        receiver, port = self.receiver(code=200, body=b"thanks")
        self.clock.advance(100)
        result = await self.sender().post(f"http://127.0.0.1:{port}/hooks/postal?x=1", BODY)
        self.assertEqual(result, SendResult(200, "thanks", 0.0, None))
        self.assertTrue(result.ok)
        [request] = receiver.received
        self.assertEqual((request.method, request.path, request.body), (b"POST", b"/hooks/postal?x=1", BODY))
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertEqual(request.headers["user-agent"], f"mtad/{__version__}")
        self.assertEqual(request.headers["content-length"], str(len(BODY)))
        self.assertEqual(request.headers["x-postal-signature-kid"], signer().kid)
        public = serialization.load_der_public_key(base64.b64decode(signer().public_key_for_anymail()))
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(
            base64.b64decode(request.headers["x-postal-signature"]),
            request.body,
            padding.PKCS1v15(),
            hashes.SHA1(),
        )
        public.verify(
            base64.b64decode(request.headers["x-postal-signature-256"]),
            request.body,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        self.assertNotIn("cookie", request.headers)

    async def test_credentials_in_the_url_are_basic_auth(self) -> None:
        """``user:secret@`` in the URL becomes Basic Authorization (percent-decoded), kept out of Host."""
        receiver, port = self.receiver()
        result = await self.sender().post(f"http://anymail:s%40cret@receiver.test:{port}/t/", BODY)
        self.assertTrue(result.ok, result)
        [request] = receiver.received
        self.assertEqual(
            request.headers["authorization"], "Basic " + base64.b64encode(b"anymail:s@cret").decode()
        )
        self.assertEqual(request.headers["host"], f"receiver.test:{port}")
        self.assertEqual(request.path, b"/t/")

    async def test_server_error_is_a_failure(self) -> None:
        """A 500 is not ok; its status and body excerpt are the result."""
        _, port = self.receiver(code=500, body=b"Internal Server Error")
        result = await self.sender().post(f"http://127.0.0.1:{port}/", BODY)
        self.assertEqual(
            (result.ok, result.status_code, result.body_excerpt, result.error),
            (False, 500, "Internal Server Error", None),
        )

    async def test_redirect_not_followed(self) -> None:
        """A 302 is the result (a failure); the Location is never requested."""
        target, target_port = self.receiver()
        receiver, port = self.receiver(
            code=302,
            body=b"moved",
            response_headers={"Location": f"http://127.0.0.1:{target_port}/elsewhere"},
        )
        result = await self.sender().post(f"http://127.0.0.1:{port}/", BODY)
        self.assertEqual((result.ok, result.status_code), (False, 302))
        self.assertEqual(len(receiver.received), 1)
        self.assertEqual(target.received, [])

    async def test_excerpt_capped(self) -> None:
        """Only the first ``excerpt_bytes`` of a large answer are kept, cut on a character boundary."""
        _, port = self.receiver(body="é".encode() * 50_000)
        result = await self.sender(settings=SenderSettings(excerpt_bytes=1023)).post(
            f"http://127.0.0.1:{port}/", BODY
        )
        self.assertTrue(result.ok)
        self.assertEqual(result.body_excerpt, "é" * 511)

    def test_decode_excerpt(self) -> None:
        """Excerpts decode as UTF-8: a cut character at the end is dropped, invalid bytes replaced."""
        self.assertEqual(_decode_excerpt("aé".encode()[:2]), "a")
        self.assertEqual(_decode_excerpt(b"a\xffb"), "a\ufffdb")

    async def test_never_answering_receiver_times_out(self) -> None:
        """A receiver that takes the request and never answers is -1 "Timed out after 5s" when 5 s pass."""
        receiver, port = self.receiver()
        receiver.hold = True
        d = self.sender().post(f"http://127.0.0.1:{port}/", BODY)
        await until(self.reactor, lambda: bool(receiver.held))
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = await d
        self.assertEqual(result, SendResult(TIMED_OUT, "Timed out after 5s", 5.0, "Timed out after 5s"))

    async def test_answer_cut_off_by_the_timeout(self) -> None:
        """An answer whose body stalls past the timeout is -1 too: the whole exchange is timed."""
        receiver, port = self.receiver()
        receiver.hold = True
        agent = NotingAgent(guarded_agent(self.reactor, self.resolver, LOOPBACK))
        d = WebhookSender(agent, self.clock, signer()).post(f"http://127.0.0.1:{port}/", BODY)
        await until(self.reactor, lambda: bool(receiver.held))
        request = receiver.held.pop()
        request.setResponseCode(200)  # type: ignore[no-untyped-call]
        request.responseHeaders.setRawHeaders(b"content-length", [b"100"])
        request.write(b"partial")  # type: ignore[no-untyped-call]
        await until(self.reactor, lambda: agent.responses == 1)
        self.clock.advance(5)
        result = await d
        self.assertEqual((result.status_code, result.body_excerpt), (TIMED_OUT, "Timed out after 5s"))

    async def test_cancelled_by_the_caller(self) -> None:
        """Cancelling a POST in flight fails it with CancelledError, closes the connection, frees the slot."""
        receiver, port = self.receiver()
        receiver.hold = True
        sender = self.sender()
        url = f"http://127.0.0.1:{port}/"
        d = sender.post(url, BODY)
        await until(self.reactor, lambda: bool(receiver.held))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(sender.in_flight(url), 0)
        await until(self.reactor, lambda: not receiver.factory.protocols)

    async def test_connection_refused(self) -> None:
        """A closed port is -2 with the error's text."""
        closed = self.reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        port = closed.getHost().port
        await closed.stopListening()
        result = await self.sender().post(f"http://127.0.0.1:{port}/", BODY)
        self.assertEqual(result.status_code, CONNECTION_FAILED)
        assert result.error is not None
        self.assertIn("refused", result.error.lower())
        self.assertEqual(result.body_excerpt, result.error)

    async def test_connection_reset(self) -> None:
        """A receiver that resets the connection after the request is -2."""
        listening = self.reactor.listenTCP(0, Factory.forProtocol(_Resetting), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        result = await self.sender().post(f"http://127.0.0.1:{listening.getHost().port}/", BODY)
        self.assertEqual(result.status_code, CONNECTION_FAILED)
        assert result.error is not None
        self.assertIn("lost", result.error.lower())

    async def test_unknown_name(self) -> None:
        """A name that does not resolve is -2."""
        result = await self.sender().post("http://unknown.test/", BODY)
        self.assertEqual(result.status_code, CONNECTION_FAILED)
        self.assertIn("unknown.test", result.body_excerpt)

    async def test_untrusted_certificate(self) -> None:
        """A self-signed certificate is -3 "Invalid SSL certificate"; nothing reaches the receiver's app."""
        context, _ = self.tls_server("receiver.test")
        receiver, port = self.receiver(tls=context)
        result = await self.sender().post(f"https://receiver.test:{port}/", BODY)
        self.assertEqual(
            (result.status_code, result.body_excerpt), (INVALID_CERTIFICATE, "Invalid SSL certificate")
        )
        self.assertEqual(receiver.received, [])

    async def test_certificate_verified_for_the_url_hostname(self) -> None:
        """A trusted certificate for the URL's name is ok; the same certificate under another name is -3."""
        context, certificate = self.tls_server("receiver.test")
        receiver, port = self.receiver(tls=context)
        trusting = BrowserLikePolicyForHTTPS(trustRoot=certificate)  # type: ignore[no-untyped-call]
        resolver = FixedResolver({"receiver.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        sender = self.sender(tls_policy=trusting, resolver=resolver)
        good = await sender.post(f"https://receiver.test:{port}/", BODY)
        self.assertEqual((good.status_code, good.body_excerpt), (200, "OK"))
        self.assertEqual([r.body for r in receiver.received], [BODY])
        wrong = await sender.post(f"https://other.test:{port}/", BODY)
        self.assertEqual(wrong.status_code, INVALID_CERTIFICATE)

    async def test_guard_refuses_loopback_without_allow_list(self) -> None:
        """Without the allow-list, a loopback receiver (literal or by name) is -4 and never connected to."""
        receiver, port = self.receiver()
        sender = self.sender(allowed=())
        for url in (f"http://127.0.0.1:{port}/", f"http://receiver.test:{port}/"):
            result = await sender.post(url, BODY)
            self.assertEqual(result.status_code, DESTINATION_REFUSED, url)
            self.assertIn("is not permitted: 127.0.0.1 is a loopback address", result.body_excerpt)
        self.assertEqual(receiver.connections, 0)

    def test_guard_refuses_metadata_address(self) -> None:
        """A name resolving to 169.254.169.254 is -4 and no connection is even attempted."""
        memory = MemoryReactorClock()
        d = self.sender(reactor=memory).post("http://metadata.test/latest/meta-data/", BODY)
        result = self.successResultOf(d)
        self.assertEqual(result.status_code, DESTINATION_REFUSED)
        self.assertEqual(
            result.body_excerpt,
            "Destination 'metadata.test' (169.254.169.254) is not permitted: "
            "169.254.169.254 is a link-local address (the cloud metadata service)",
        )
        self.assertEqual(memory.tcpClients, [])

    def test_invalid_url(self) -> None:
        """A URL that is not http(s) with a host is -2, without any request."""
        memory = MemoryReactorClock()
        sender = self.sender(reactor=memory)
        for url in ("ftp://receiver.test/", "http:///path", "http://receiver.test:99999/"):
            result = self.successResultOf(sender.post(url, BODY))
            self.assertEqual(result.status_code, CONNECTION_FAILED, url)
            self.assertIn("invalid URL", result.error or "")
        self.assertEqual(memory.tcpClients, [])

    async def test_per_receiver_cap(self) -> None:
        """With a cap of 1, a second request to a busy receiver waits while another receiver is served."""
        slow, slow_port = self.receiver()
        slow.hold = True
        fast, fast_port = self.receiver()
        sender = self.sender(settings=SenderSettings(per_url_concurrency=1))
        slow_url = f"http://127.0.0.1:{slow_port}/"
        first = sender.post(slow_url, b'{"n":1}')
        await until(self.reactor, lambda: len(slow.held) == 1)
        second = sender.post(slow_url, b'{"n":2}')
        other = await sender.post(f"http://127.0.0.1:{fast_port}/", b'{"n":3}')
        self.assertTrue(other.ok)
        self.assertEqual([r.body for r in fast.received], [b'{"n":3}'])
        self.assertNoResult(second)
        self.assertEqual(sender.in_flight(slow_url), 1)
        self.assertEqual([r.body for r in slow.received], [b'{"n":1}'])
        slow.release()
        self.assertTrue((await first).ok)
        self.assertTrue((await second).ok)
        self.assertEqual([r.body for r in slow.received], [b'{"n":1}', b'{"n":2}'])
        self.assertEqual(sender.in_flight(slow_url), 0)
        self.assertEqual(sender._slots, {})

    async def test_no_slot_by_start_by_is_not_started(self) -> None:
        """A POST with ``start_by`` still waiting for its receiver's slot then fails with NotStarted and
        is never sent, leaving the queue; one cancelled by its caller while waiting is CancelledError; one
        that gets its slot in time is sent."""
        slow, port = self.receiver()
        slow.hold = True
        sender = self.sender(settings=SenderSettings(per_url_concurrency=1))
        url = f"http://127.0.0.1:{port}/"
        first = sender.post(url, b'{"n":1}')
        await until(self.reactor, lambda: len(slow.held) == 1)
        late = sender.post(url, b'{"n":2}', start_by=self.clock.seconds() + 2)
        cancelled = sender.post(url, b'{"n":3}', start_by=self.clock.seconds() + 2)
        in_time = sender.post(url, b'{"n":4}', start_by=self.clock.seconds() + 10)
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.clock.advance(1.9)
        self.assertNoResult(late)
        self.clock.advance(0.1)
        self.failureResultOf(late, NotStarted)
        slow.release()
        self.assertTrue((await first).ok)
        self.assertTrue((await in_time).ok)
        self.assertEqual([r.body for r in slow.received], [b'{"n":1}', b'{"n":4}'])
        self.assertEqual(sender._slots, {})

    async def test_signs_in_a_worker_thread(self) -> None:
        """With ``in_thread``, the signature is made in a worker thread and still verifies."""
        from twisted.internet.threads import deferToThreadPool

        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-signing")
        pool.start()
        self.addCleanup(pool.stop)
        threads: list[str] = []

        def in_thread(fn: Any) -> Deferred[dict[str, str]]:
            def run() -> dict[str, str]:
                import threading

                threads.append(threading.current_thread().name)
                result: dict[str, str] = fn()
                return result

            return deferToThreadPool(self.reactor, pool, run)

        receiver, port = self.receiver()
        result = await self.sender(in_thread=in_thread).post(f"http://127.0.0.1:{port}/", BODY)
        self.assertTrue(result.ok)
        self.assertEqual(len(threads), 1)
        self.assertEqual(
            receiver.received[0].headers["x-postal-signature"], signer().sign(BODY)["X-Postal-Signature"]
        )

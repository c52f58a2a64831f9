"""Twisted glue of the SMTP server: order with slow policies, timers, limits, AUTH limiter, real STARTTLS."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtad.smtp.policy import AuthIdentity, Envelope, SessionInfo
from mtad.smtp.reply import Reply
from mtad.smtp.server import ServerTimeouts
from mtad.smtp.server_protocol import AuthFailureLimiter, SMTPServerFactory
from mtad.tls import ensure_self_signed, server_context
from tests.smtp.test_server_support import TestPolicy, parse_replies

PLAIN_OK = b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"
PLAIN_BAD = b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong") + b"\r\n"


class SlowPolicy:
    """A policy whose every answer is a Deferred the test fires."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Deferred[Any]]] = []
        self.accepted: list[bytes] = []

    def _later(self, kind: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((kind, d))
        return d

    def authenticate(
        self, session: SessionInfo, username: str, password: str
    ) -> Deferred[AuthIdentity | None]:
        return self._later("auth")

    def check_mail_from(self, session: SessionInfo, address: str) -> Deferred[Reply | None]:
        return self._later("mail")

    def check_rcpt(self, session: SessionInfo, mail_from: str, address: str) -> Deferred[Reply | None]:
        return self._later("rcpt")

    def accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Deferred[Reply]:
        self.accepted.append(message)
        return self._later("accept")

    def fire(self, result: object) -> str:
        kind, d = self.pending.pop(0)
        d.callback(result)
        return kind


class FailingPolicy(TestPolicy):
    """Raises synchronously on MAIL and fails asynchronously on accept."""

    def check_mail_from(self, session: SessionInfo, address: str) -> Deferred[Reply | None]:
        raise RuntimeError("database is down")

    def accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Deferred[Reply]:
        return fail(RuntimeError("redis is down"))


def connect(factory: SMTPServerFactory, ip: str = "192.0.2.5") -> tuple[Protocol, StringTransport]:
    addr = IPv4Address("TCP", ip, 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 25), peerAddress=addr)
    proto.makeConnection(transport)
    return proto, transport


def replies(transport: StringTransport) -> list[str]:
    out = parse_replies(transport.value())
    transport.clear()
    return out


def make_factory(policy: Any, clock: Clock | None = None, **kw: Any) -> SMTPServerFactory:
    return SMTPServerFactory(policy, hostname="mx.mtad.test", clock=clock or Clock(), listener="test", **kw)


class OrderingTests(SynchronousTestCase):
    def test_pause_while_policy_pending(self) -> None:
        """Reading pauses while a policy Deferred is pending; queued commands are answered after, in order."""
        policy = SlowPolicy()
        proto, transport = connect(make_factory(policy))
        self.assertEqual(replies(transport), ["220 mx.mtad.test ESMTP mtad ready"])
        proto.dataReceived(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\nRCPT TO:<b@example.test>\r\n"
        )
        self.assertEqual(len(replies(transport)), 1)
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(b"DATA\r\n")  # data already in flight when the pause took effect
        self.assertEqual(replies(transport), [])
        self.assertEqual(policy.fire(None), "mail")
        self.assertEqual(replies(transport), ["250 2.1.0 Sender OK", "250 2.0.0 OK"])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(policy.fire(Reply(550, "5.1.1", "No such user")), "rcpt")
        self.assertEqual(replies(transport), ["550 5.1.1 No such user", "554 5.5.1 No valid recipients"])
        self.assertEqual(transport.producerState, "producing")

    def test_accept_reply_after_storage(self) -> None:
        """The reply to the end of data is the policy's, sent only when its Deferred fires."""
        policy = SlowPolicy()
        proto, transport = connect(make_factory(policy))
        proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<>\r\n")
        policy.fire(None)
        proto.dataReceived(b"RCPT TO:<b@example.test>\r\n")
        policy.fire(None)
        proto.dataReceived(b"DATA\r\nhello\r\n.\r\nQUIT\r\n")
        self.assertEqual(replies(transport)[-1], "354 End data with <CR><LF>.<CR><LF>")
        self.assertEqual(len(policy.accepted), 1)
        self.assertFalse(transport.disconnecting)
        policy.fire(Reply(250, "2.0.0", "Queued as Q1"))
        self.assertEqual(
            replies(transport), ["250 2.0.0 Queued as Q1", "221 2.0.0 mx.mtad.test closing connection"]
        )
        self.assertTrue(transport.disconnecting)

    def test_long_synchronous_burst(self) -> None:
        """Thousands of pipelined commands answered synchronously do not recurse (no stack overflow)."""
        policy = TestPolicy()
        proto, transport = connect(make_factory(policy))
        proto.dataReceived(b"EHLO c.example\r\n" + b"MAIL FROM:<a@example.org>\r\nRSET\r\n" * 3000)
        out = replies(transport)
        self.assertEqual(len(out), 1 + 1 + 6000)
        self.assertEqual(out[-2:], ["250 2.1.0 Sender OK", "250 2.0.0 OK"])

    def test_policy_exceptions(self) -> None:
        """A policy that raises or fails is logged and answered 451 4.3.0; the session continues."""
        policy = FailingPolicy()
        proto, transport = connect(make_factory(policy))
        proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
        self.assertEqual(
            replies(transport)[2:], ["451 4.3.0 Temporary failure, try again later", "250 2.0.0 OK"]
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_disconnect_mid_data(self) -> None:
        """A client that disconnects mid-DATA hands nothing to the policy and frees its connection slot."""
        policy = TestPolicy()
        factory = make_factory(policy)
        proto, _ = connect(factory)
        proto.dataReceived(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n"
        )
        self.assertEqual(factory.connections, 1)
        proto.connectionLost(Failure(ConnectionError("gone")))
        proto.dataReceived(b".\r\n")
        self.assertEqual(policy.accepted, [])
        self.assertEqual(factory.connections, 0)
        self.assertEqual(factory.connections_per_ip, {})

    def test_answer_after_disconnect(self) -> None:
        """A policy answer arriving after the client left writes nothing and raises nothing."""
        policy = SlowPolicy()
        proto, transport = connect(make_factory(policy))
        proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        transport.clear()
        proto.connectionLost(Failure(ConnectionError("gone")))
        policy.fire(None)
        self.assertEqual(transport.value(), b"")

    def test_implicit_tls(self) -> None:
        """On an implicit-TLS listener the session starts with tls=True: AUTH offered, no STARTTLS."""
        proto, transport = connect(make_factory(TestPolicy(), tls_mode="implicit"))
        proto.dataReceived(b"EHLO c.example\r\n")
        ehlo = replies(transport)[1]
        self.assertIn("250-AUTH PLAIN LOGIN", ehlo)
        self.assertNotIn("STARTTLS", ehlo)

    def test_factory_arguments_checked(self) -> None:
        """An unknown tls_mode, or starttls without a context, is refused at construction."""
        self.assertRaises(ValueError, make_factory, TestPolicy(), tls_mode="maybe")
        self.assertRaises(ValueError, make_factory, TestPolicy(), tls_mode="starttls")


class ShutdownTests(SynchronousTestCase):
    def test_idle_sessions_closed_busy_sessions_left_to_finish(self) -> None:
        """close_sessions answers idle sessions 421 4.3.2 and closes them; one storing a message is left."""
        policy = SlowPolicy()
        factory = make_factory(policy)
        _, idle = connect(factory, "192.0.2.1")
        busy_proto, busy = connect(factory, "192.0.2.2")
        busy_proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        replies(idle)
        replies(busy)
        self.assertEqual(factory.close_sessions(), 1)
        self.assertEqual(replies(idle), ["421 4.3.2 mx.mtad.test shutting down"])
        self.assertTrue(idle.disconnecting)
        self.assertFalse(busy.disconnecting)
        self.assertEqual(factory.close_sessions(even_busy=True), 0)
        self.assertTrue(busy.disconnecting)


class TimeoutTests(SynchronousTestCase):
    def test_idle_timeout(self) -> None:
        """Client silence past the timeout gets 421 4.4.2 and the close; activity restarts the timer."""
        clock = Clock()
        proto, transport = connect(
            make_factory(TestPolicy(), clock, timeouts=ServerTimeouts(command=300, data=200))
        )
        clock.advance(299)
        proto.dataReceived(b"EHLO c.example\r\n")
        clock.advance(299)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        transport.clear()
        clock.advance(200)
        self.assertEqual(replies(transport), ["421 4.4.2 mx.mtad.test Idle timeout, closing connection"])
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_timeout_while_policy_pending(self) -> None:
        """While we wait for the policy the client is not timed out; the timer restarts after the answer."""
        clock = Clock()
        policy = SlowPolicy()
        proto, transport = connect(make_factory(policy, clock))
        proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10_000)
        self.assertFalse(transport.disconnecting)
        policy.fire(None)
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 10_300)


class LimitTests(SynchronousTestCase):
    def test_connections_per_ip(self) -> None:
        """Past max_connections_per_ip a client gets 421 4.7.0 and the close; closing frees a slot."""
        factory = make_factory(TestPolicy(), max_connections_per_ip=2)
        first, _ = connect(factory)
        connect(factory)
        _, refused = connect(factory)
        self.assertEqual(refused.value(), b"421 4.7.0 Too many connections, try again later\r\n")
        self.assertTrue(refused.disconnecting)
        _, other_ip = connect(factory, "192.0.2.6")
        self.assertTrue(other_ip.value().startswith(b"220 "))
        first.connectionLost(Failure(ConnectionError("closed")))
        _, again = connect(factory)
        self.assertTrue(again.value().startswith(b"220 "))
        self.assertEqual(factory.connections, 3)

    def test_connections_per_listener(self) -> None:
        """Past max_connections any client gets 421 4.7.0."""
        factory = make_factory(TestPolicy(), max_connections=1)
        connect(factory, "192.0.2.1")
        _, refused = connect(factory, "192.0.2.2")
        self.assertTrue(refused.value().startswith(b"421 4.7.0"))
        self.assertEqual(factory.connections_per_ip, {"192.0.2.1": 1})

    def test_auth_failure_limiter(self) -> None:
        """After 5 failed AUTHs in the window an IP gets 454 4.7.0, the policy unasked, until it passes."""
        clock = Clock()
        policy = TestPolicy()
        factory = make_factory(
            policy,
            clock,
            allow_plaintext_auth=True,
            max_bad_commands=100,
            timeouts=ServerTimeouts(command=900),
        )
        proto, transport = connect(factory)
        proto.dataReceived(b"EHLO c.example\r\n" + PLAIN_BAD * 5)
        self.assertEqual([r[:9] for r in replies(transport)[2:]], ["535 5.7.8"] * 5)
        proto.dataReceived(PLAIN_OK)
        self.assertEqual(
            replies(transport), ["454 4.7.0 Too many failed authentication attempts, try again later"]
        )
        self.assertEqual(policy.calls.count("auth"), 5)
        _, other = connect(factory, "192.0.2.99")
        other.clear()
        self.assertEqual(factory.auth_limiter.blocked("192.0.2.99"), False)
        clock.advance(301)
        proto.dataReceived(PLAIN_OK)
        self.assertEqual(replies(transport), ["235 2.7.0 Authentication successful"])

    def test_unavailable_limiter_does_not_refuse_auth(self) -> None:
        """When the shared failure counter cannot be read (Redis away), AUTH is decided by the policy."""

        class BrokenLimiter:
            def is_blocked(self, client_ip: str) -> Deferred[bool]:
                return fail(ConnectionError("redis is down"))

            def add_failure(self, client_ip: str) -> Deferred[None]:
                return fail(ConnectionError("redis is down"))

        policy = TestPolicy()
        factory = make_factory(policy, allow_plaintext_auth=True, auth_limiter=BrokenLimiter())
        proto, transport = connect(factory)
        proto.dataReceived(b"EHLO c.example\r\n" + PLAIN_BAD + PLAIN_OK)
        self.assertEqual([r[:9] for r in replies(transport)[2:]], ["535 5.7.8", "235 2.7.0"])
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 3)

    def test_limiter_window(self) -> None:
        """The limiter counts failures per IP in a sliding window and forgets old ones."""
        clock = Clock()
        limiter = AuthFailureLimiter(clock, max_failures=2, window=10)
        limiter.record_failure("a")
        clock.advance(5)
        limiter.record_failure("a")
        self.assertTrue(limiter.blocked("a"))
        self.assertFalse(limiter.blocked("b"))
        clock.advance(5)
        self.assertFalse(limiter.blocked("a"))
        clock.advance(5)
        self.assertFalse(limiter.blocked("a"))
        self.assertEqual(limiter._failures, {})


class _TLSClient(Protocol):
    """A scripted client: pipelines EHLO, STARTTLS and an injection attempt, then talks under TLS."""

    def __init__(self, tls_options: Any) -> None:
        self.tls_options = tls_options
        self.received = b""
        self.tls_replies: list[str] = []
        self.stage = "greeting"
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<injected@example.org>\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.stage == "greeting" and b"\r\n220 2.0.0" in self.received:
            self.stage = "tls"
            self.received = b""
            transport: Any = self.transport
            transport.startTLS(self.tls_options)
            transport.write(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n")
        elif self.stage == "tls" and self.received.endswith(b"closing connection\r\n"):
            self.tls_replies = parse_replies(self.received)
            self.stage = "done"

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.callback(None)


class RealSTARTTLSTests(TestCase):
    async def test_starttls_over_loopback(self) -> None:
        """Real STARTTLS on 127.0.0.1: plain text pipelined after STARTTLS is dropped; AUTH offered after."""
        from twisted.internet import reactor as _reactor  # tests only: a real socket needs the real reactor

        reactor: Any = _reactor
        cert, key = ensure_self_signed(Path(self.mktemp()), "mx.mtad.test")
        policy = TestPolicy()
        factory = make_factory(policy, reactor, tls_mode="starttls", tls_context=server_context(cert, key))
        tcp: IReactorTCP = reactor
        port = tcp.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _TLSClient(ssl.CertificateOptions())
        client_factory = ClientFactory.forProtocol(lambda: client)
        tcp.connectTCP("127.0.0.1", port.getHost().port, client_factory)  # type: ignore[attr-defined,arg-type]
        await client.done
        self.assertEqual(client.stage, "done")
        ehlo, mail, quit_ = client.tls_replies
        self.assertIn("250-AUTH PLAIN LOGIN", ehlo)
        self.assertNotIn("STARTTLS", ehlo)
        self.assertEqual(mail, "250 2.1.0 Sender OK")  # not 503 nested MAIL: the injection was discarded
        self.assertEqual(quit_, "221 2.0.0 mx.mtad.test closing connection")
        self.assertEqual(policy.calls, ["mail"])

"""Twisted glue of the SMTP client: transport, timer, TLS and the connection it makes."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mtad.smtp.client import ClientTimeouts, OutgoingMessage, SessionReport, SMTPClientMachine
from mtad.smtp.client_protocol import (
    ConnectFailed,
    SMTPClientProtocol,
    run_session,
)
from tools.sink import Sink, SinkBehaviour

MSG = OutgoingMessage("m1", "from@mtad.test", ("a@example.test",), b"Subject: x\n\nbody\n")


class FakeTLS:
    """iosim's stand-in for a TLS context: both ends 'verify' each other (real TLS is in test_deliverer)."""

    def iosimVerify(self, other: object) -> bool:
        return True


def results(d: Deferred[SessionReport]) -> list[SessionReport]:
    out: list[SessionReport] = []
    d.addCallback(out.append)
    return out


class ProtocolTests(SynchronousTestCase):
    """The glue carries out the machine's actions on a transport and a clock."""

    def test_greeting_timeout_aborts(self) -> None:
        """No greeting within the timeout aborts the connection and reports a timeout (injected clock)."""
        clock = Clock()
        proto = SMTPClientProtocol(SMTPClientMachine("h", [MSG], timeouts=ClientTimeouts(greeting=60)), clock)
        transport = StringTransport()
        proto.makeConnection(transport)
        reports = results(proto.done)
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnected)  # aborted, not a polite close
        proto.connectionLost(Failure(ConnectionError("aborted")))
        [report] = reports
        assert report.failure is not None
        self.assertEqual(report.failure.stage, "timeout")
        self.assertEqual(report.unattempted, (MSG,))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timer_reset_by_reply(self) -> None:
        """Each reply restarts the timer with the next command's timeout."""
        clock = Clock()
        timeouts = ClientTimeouts(greeting=10, ehlo=20)
        proto = SMTPClientProtocol(SMTPClientMachine("h", [MSG], timeouts=timeouts), clock)
        transport = StringTransport()
        proto.makeConnection(transport)
        clock.advance(9)
        proto.dataReceived(b"220 hi\r\n")
        self.assertEqual(transport.value(), b"EHLO h\r\n")
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 29)

    def test_iosim_session_with_starttls(self) -> None:
        """Paired in memory with the sink, the client upgrades with STARTTLS and delivers."""
        sink = Sink(SinkBehaviour(starttls=True), FakeTLS())
        clock = Clock()
        machine = SMTPClientMachine("out.mtad.test", [MSG, MSG])
        client, _server, pump = iosim.connectedServerAndClient(
            lambda: sink.buildProtocol(None),
            lambda: SMTPClientProtocol(machine, clock, FakeTLS()),
            greet=False,
        )
        reports = results(client.done)
        pump.flush()
        self.assertEqual(len(sink.messages), 2)
        self.assertTrue(all(m.tls for m in sink.messages))
        self.assertEqual(sink.messages[0].data, b"Subject: x\r\n\r\nbody\r\n")
        [report] = reports
        self.assertTrue(report.tls)
        self.assertIsNone(report.failure)
        self.assertEqual([r.reply.code for o in report.outcomes for r in o.replies], [250, 250])
        self.assertIn("STARTTLS", sink.sessions[0].commands)

    def test_iosim_no_tls_options_skips_starttls(self) -> None:
        """Without TLS options the client never issues STARTTLS even when offered."""
        sink = Sink(SinkBehaviour(starttls=True))
        machine = SMTPClientMachine("h", [MSG])
        _client, _server, pump = iosim.connectedServerAndClient(
            lambda: sink.buildProtocol(None), lambda: SMTPClientProtocol(machine, Clock()), greet=False
        )
        pump.flush()
        self.assertNotIn("STARTTLS", sink.sessions[0].commands)
        self.assertEqual(len(sink.messages), 1)


class ConnectTests(SynchronousTestCase):
    """run_session connects from the chosen source address."""

    def test_bind_address(self) -> None:
        """The connection binds the source IP and uses the configured connect timeout."""
        reactor = MemoryReactorClock()
        machine = SMTPClientMachine("h", [MSG], timeouts=ClientTimeouts(connect=12))
        d = Deferred.fromCoroutine(
            run_session(reactor, reactor, "127.0.0.2", 2525, machine, bind_ip="127.0.0.10")
        )
        [(host, port, factory, timeout, bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout, bind), ("127.0.0.2", 2525, 12, ("127.0.0.10", 0)))
        reactor.connectors[0].stopConnecting()
        reactor.advance(0)
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectFailed)

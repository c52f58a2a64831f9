"""Twisted glue for the sans-I/O SMTP client: sockets, TLS and the reply timer.

All decisions are in :class:`mtad.smtp.client.SMTPClientMachine`; this module only carries out its
actions on a transport and an injected clock (DESIGN invariant 5).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtad.smtp.client import (
    Action,
    ArmTimer,
    ClientTimeouts,
    Close,
    Send,
    SessionReport,
    SMTPClientMachine,
    StartTLS,
)


def opportunistic_tls_options() -> ssl.CertificateOptions:
    """Client TLS settings for opportunistic STARTTLS: encrypt, but do not verify (RFC 7435 §3).

    An MX certificate rarely matches anything verifiable (RFC 7672 §1.3); refusing would push the mail
    to plain text, which is worse. MTA-STS/DANE would be where verification starts.
    """
    return ssl.CertificateOptions(verify=False)


class _OneConnection(ClientFactory):
    """``connectProtocol`` without its factory's two log lines per connection (a busy MTA makes many)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


class SMTPClientProtocol(Protocol):
    """Feeds a :class:`SMTPClientMachine` from a transport; ``done`` fires with its report on disconnect."""

    log = Logger()

    def __init__(
        self, machine: SMTPClientMachine, clock: IReactorTime, tls_options: Any | None = None
    ) -> None:
        self.machine = machine
        self.clock = clock
        self.tls_options = tls_options
        if tls_options is None:
            machine.try_starttls = False
        self.done: Deferred[SessionReport] = Deferred()
        self._timer: IDelayedCall | None = None
        self._timed_out = False

    def connectionMade(self) -> None:
        self._apply(self.machine.connection_made())

    def dataReceived(self, data: bytes) -> None:
        self._apply(self.machine.data_received(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self._apply(self.machine.connection_lost(reason.getErrorMessage()))
        if not self.done.called:
            self.done.callback(self.machine.report())

    def _timeout(self) -> None:
        self._timer = None
        self._timed_out = True
        self._apply(self.machine.timed_out())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _apply(self, actions: list[Action]) -> None:
        transport = self.transport
        for action in actions:
            if isinstance(action, Send):
                assert transport is not None
                transport.write(action.data)
            elif isinstance(action, StartTLS):
                assert transport is not None
                transport.startTLS(self.tls_options)  # type: ignore[attr-defined]
            elif isinstance(action, ArmTimer):
                self._cancel_timer()
                self._timer = self.clock.callLater(action.seconds, self._timeout)
            elif isinstance(action, Close):
                self._cancel_timer()
                if transport is None:
                    continue
                if self._timed_out:
                    # a peer that stopped answering may also have stopped reading: do not wait to flush
                    transport.abortConnection()  # type: ignore[attr-defined]
                else:
                    transport.loseConnection()


class ConnectFailed(Exception):
    """The TCP connection could not be made (refused, unreachable, timed out)."""


async def run_session(
    reactor: IReactorTCP,
    clock: IReactorTime,
    host: str,
    port: int,
    machine: SMTPClientMachine,
    *,
    bind_ip: str | None = None,
    tls_options: Any | None = None,
    timeouts: ClientTimeouts | None = None,
) -> SessionReport:
    """Connect to ``host``:``port`` from ``bind_ip`` and run ``machine`` to the end.

    Raises :class:`ConnectFailed` when no connection is made; otherwise every outcome, including a
    dropped connection, is in the returned report.
    """
    timeout = (timeouts or machine.timeouts).connect
    bind = (bind_ip, 0) if bind_ip else None
    endpoint: Any
    if ":" in host:
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)  # type: ignore[no-untyped-call]
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    protocol = SMTPClientProtocol(machine, clock, tls_options)
    try:
        await endpoint.connect(_OneConnection(protocol))
    except Exception as e:
        raise ConnectFailed(str(e) or e.__class__.__name__) from e
    return await protocol.done

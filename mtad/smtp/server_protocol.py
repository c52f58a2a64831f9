"""Twisted glue for the sans-I/O SMTP server: transport, TLS, idle timer, policy calls, limits.

All protocol decisions are in :class:`mtad.smtp.server.SMTPServerMachine`. This module carries out its
actions and asks the policy. While a policy Deferred is pending the transport is paused
(``pauseProducing``), so pipelined input waits in the kernel rather than in our memory, and replies go out
strictly in command order (RFC 2920 §3). The factory counts connections per listener and per client IP
and keeps the failed-AUTH limiter, because both span sessions.
"""

from __future__ import annotations

import secrets
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtad.smtp.policy import AuthIdentity, SMTPPolicy
from mtad.smtp.reply import Reply
from mtad.smtp.server import (
    AcceptMessage,
    Action,
    Authenticate,
    CheckMailFrom,
    CheckRcpt,
    Close,
    Connection,
    PolicyRequest,
    Send,
    ServerSettings,
    ServerTimeouts,
    SMTPServerMachine,
    StartTLS,
)

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_AUTH_FAILURES = Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
TLS_MODES = ("none", "starttls", "implicit")


class AuthLimiter(TypingProtocol):
    """Counts failed AUTH attempts per client IP; `mtad.queue.limits.AuthFailureCounter` is the shared one."""

    def is_blocked(self, client_ip: str) -> Deferred[bool]: ...

    def add_failure(self, client_ip: str) -> Deferred[None]: ...


class AuthFailureLimiter:
    """Failed AUTH attempts per client IP in a sliding window, in memory (the default without Redis).

    Password guessing is slowed per process: after ``max_failures`` failures within ``window`` seconds an
    IP gets ``454 4.7.0`` (RFC 4954 §6, temporary) for AUTH until its oldest failure leaves the window.
    The policy is not even asked then, so a blocked guesser costs no credential lookups. Per-process state
    is a deliberate simplification: several processes each allow ``max_failures``.
    """

    def __init__(self, clock: IReactorTime, max_failures: int = 5, window: float = 300.0) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str) -> deque[float] | None:
        failures = self._failures.get(ip)
        if failures is None:
            return None
        horizon = self.clock.seconds() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[ip]
            return None
        return failures

    def blocked(self, ip: str) -> bool:
        failures = self._recent(ip)
        return failures is not None and len(failures) >= self.max_failures

    def record_failure(self, ip: str) -> None:
        if len(self._failures) > 10000:  # keep memory bounded under a spray of source addresses
            for known in list(self._failures):
                self._recent(known)
        failures = self._recent(ip)
        if failures is None:
            failures = self._failures[ip] = deque()
        failures.append(self.clock.seconds())

    def is_blocked(self, client_ip: str) -> Deferred[bool]:
        return succeed(self.blocked(client_ip))

    def add_failure(self, client_ip: str) -> Deferred[None]:
        self.record_failure(client_ip)
        return succeed(None)


class SMTPServerProtocol(Protocol):
    """Feeds one :class:`SMTPServerMachine` from a transport and asks the factory's policy."""

    log = Logger()

    def __init__(self, factory: SMTPServerFactory, client_ip: str) -> None:
        self.server_factory = factory
        self.client_ip = client_ip
        self.machine: SMTPServerMachine | None = None
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._lost = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        peer, host = transport.getPeer(), transport.getHost()
        connection = Connection(
            session_id=self.server_factory.new_session_id(),
            client_ip=self.client_ip or getattr(peer, "host", ""),
            client_port=getattr(peer, "port", 0),
            server_ip=getattr(host, "host", ""),
            server_port=getattr(host, "port", 0),
            tls=self.server_factory.implicit_tls,
        )
        self.machine = SMTPServerMachine(
            self.server_factory.settings, connection, self.server_factory.clock.seconds
        )
        self._apply(self.machine.connection_made())

    def dataReceived(self, data: bytes) -> None:
        assert self.machine is not None
        self._apply(self.machine.data_received(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_timer()
        if self.machine is not None:
            self.machine.connection_lost()
        self.server_factory.sessions.discard(self)
        self.server_factory.connection_closed(self.client_ip)

    # -- actions ----------------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        """Carry out actions in order; a policy answer that is already there is applied in this loop.

        Iterating instead of recursing keeps a long pipelined burst with a synchronous policy from
        exhausting the stack.
        """
        queue = deque(actions)
        transport: Any = self.transport
        while queue:
            action = queue.popleft()
            if self._lost:
                break
            if isinstance(action, Send):
                transport.write(action.data)
            elif isinstance(action, StartTLS):
                transport.startTLS(self.server_factory.tls_context)
            elif isinstance(action, Close):
                self._cancel_timer()
                transport.loseConnection()
            else:
                answered = self._ask(action)
                if answered is not None:
                    queue.extend(answered)
        self._rearm()

    def _ask(self, request: PolicyRequest) -> list[Action] | None:
        """Ask the policy; actions at once if it answered synchronously, else None and pause reading."""
        d = maybeDeferred(self._call_policy, request)
        d.addCallbacks(
            lambda result: self._answered(request, result),
            lambda failure: self._failed(request, failure),
        )
        immediate: list[list[Action]] = []
        asynchronous = False

        def deliver(actions: list[Action]) -> None:
            if not asynchronous:
                immediate.append(actions)
                return
            self._resume_with(actions)

        d.addCallback(deliver)
        d.addErrback(lambda f: self.log.failure("smtp server glue failed", f))
        if immediate:
            return immediate[0]
        asynchronous = True
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._cancel_timer()
        return None

    def _resume_with(self, actions: list[Action]) -> None:
        if self._lost:
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        self._apply(actions)

    def _call_policy(self, request: PolicyRequest) -> Deferred[Any]:
        policy = self.server_factory.policy
        if isinstance(request, CheckMailFrom):
            return policy.check_mail_from(request.session, request.address)
        if isinstance(request, CheckRcpt):
            return policy.check_rcpt(request.session, request.mail_from, request.address)
        if isinstance(request, Authenticate):
            return self._authenticate(request)
        return policy.accept_message(request.session, request.envelope, request.message)

    def _authenticate(self, request: Authenticate) -> Deferred[Any]:
        """Ask the policy unless this client IP has failed too often (RFC 4954 §6: 454 4.7.0)."""
        ip = request.session.client_ip

        def unknown(failure: Failure) -> bool:
            # The counter lives in Redis; while Redis is away, authenticate without it rather than refuse.
            self.log.failure("smtp auth limiter unavailable for {client_ip}", failure, client_ip=ip)
            return False

        def decide(blocked: bool) -> Deferred[Any]:
            if blocked:
                return succeed(TOO_MANY_AUTH_FAILURES)
            return self.server_factory.policy.authenticate(
                request.session, request.username, request.password
            )

        return self.server_factory.auth_limiter.is_blocked(ip).addErrback(unknown).addCallback(decide)

    def _answered(self, request: PolicyRequest, result: Reply | AuthIdentity | None) -> list[Action]:
        assert self.machine is not None
        if isinstance(request, Authenticate):
            if result is None:
                recorded = self.server_factory.auth_limiter.add_failure(request.session.client_ip)
                recorded.addErrback(
                    lambda f: self.log.failure("smtp auth failure not counted", f)  # type: ignore[arg-type]
                )
                self.log.info(
                    "smtp auth failed for {username} from {client_ip} in {session_id}",
                    username=request.username,
                    client_ip=request.session.client_ip,
                    session_id=request.session.session_id,
                )
        elif isinstance(request, AcceptMessage) and isinstance(result, Reply):
            self.log.info(
                "smtp {session_id} message from {mail_from} to {count} recipients: {reply}",
                session_id=request.session.session_id,
                mail_from=request.envelope.mail_from,
                count=len(request.envelope.rcpt_to),
                reply=str(result),
            )
        return self.machine.policy_answered(result)

    def _failed(self, request: PolicyRequest, failure: Failure) -> list[Action]:
        assert self.machine is not None
        self.log.failure(
            "smtp policy failed on {request} in {session_id}",
            failure,
            request=type(request).__name__,
            session_id=request.session.session_id,
        )
        return self.machine.policy_failed()

    # -- idle timer -------------------------------------------------------------------------------

    def _rearm(self) -> None:
        self._cancel_timer()
        if self._lost or self.machine is None:
            return
        seconds = self.machine.idle_timeout()
        if seconds is not None:
            self._timer = self.server_factory.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        assert self.machine is not None
        self.log.info("smtp idle timeout from {client_ip}", client_ip=self.client_ip)
        self._apply(self.machine.timed_out())


class _RefuseConnection(Protocol):
    """Answers ``421 4.7.0`` and closes (RFC 5321 §3.8: a server may refuse service with 421)."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(TOO_MANY_CONNECTIONS.to_bytes())
        transport.loseConnection()


class SMTPServerFactory(ServerFactory):
    """Builds SMTP sessions for one listener and enforces its connection limits.

    ``tls_mode`` is ``none``, ``starttls`` (``tls_context`` required; STARTTLS offered after EHLO) or
    ``implicit`` (the listening endpoint is already TLS, RFC 8314; sessions start with ``tls=True``).
    ``tls_context`` is whatever ``ITLSTransport.startTLS`` accepts (e.g. ``ssl.CertificateOptions``).
    """

    log = Logger()

    def __init__(
        self,
        policy: SMTPPolicy,
        *,
        hostname: str,
        clock: IReactorTime,
        listener: str = "smtp",
        tls_mode: str = "none",
        tls_context: object | None = None,
        allow_plaintext_auth: bool = False,
        max_message_size: int = 25 * 1024 * 1024,
        max_recipients: int = 100,
        max_connections: int = 1000,
        max_connections_per_ip: int = 50,
        max_bad_commands: int = 10,
        max_auth_failures: int = 5,
        auth_failure_window: float = 300.0,
        auth_limiter: AuthLimiter | None = None,
        timeouts: ServerTimeouts | None = None,
        new_session_id: Callable[[], str] | None = None,
    ) -> None:
        if tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {TLS_MODES}, not {tls_mode!r}")
        if tls_mode == "starttls" and tls_context is None:
            raise ValueError("tls_mode 'starttls' needs a tls_context")
        self.policy = policy
        self.clock = clock
        self.tls_context = tls_context
        self.implicit_tls = tls_mode == "implicit"
        self.settings = ServerSettings(
            hostname=hostname,
            listener=listener,
            max_message_size=max_message_size,
            max_recipients=max_recipients,
            max_bad_commands=max_bad_commands,
            starttls=tls_mode == "starttls",
            allow_plaintext_auth=allow_plaintext_auth,
            timeouts=timeouts or ServerTimeouts(),
        )
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.auth_limiter: AuthLimiter = (
            auth_limiter
            if auth_limiter is not None
            else AuthFailureLimiter(clock, max_auth_failures, auth_failure_window)
        )
        self.new_session_id = new_session_id or (lambda: secrets.token_hex(8))
        self.connections = 0
        self.connections_per_ip: defaultdict[str, int] = defaultdict(int)
        self.sessions: set[SMTPServerProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        ip = str(getattr(addr, "host", ""))
        if (
            self.connections >= self.max_connections
            or self.connections_per_ip[ip] >= self.max_connections_per_ip
        ):
            if not self.connections_per_ip[ip]:
                del self.connections_per_ip[ip]
            self.log.warn(
                "smtp connection from {client_ip} refused on {listener}: too many connections",
                client_ip=ip,
                listener=self.settings.listener,
            )
            refuse = _RefuseConnection()
            refuse.factory = self
            return refuse
        self.connections += 1
        self.connections_per_ip[ip] += 1
        protocol = SMTPServerProtocol(self, ip)
        protocol.factory = self
        self.sessions.add(protocol)
        return protocol

    def close_sessions(self, even_busy: bool = False) -> int:
        """Shutdown: tell open sessions ``421 4.3.2`` and close them (RFC 5321 §3.8); return how many remain.

        Sessions waiting on the policy (a message being stored) are left to finish unless ``even_busy``.
        A client cut off before its 250 still holds its message and retries; nothing accepted is lost.
        """
        for protocol in list(self.sessions):
            if not even_busy and protocol.machine is not None and protocol.machine.waiting:
                continue
            self.sessions.discard(protocol)
            transport = protocol.transport
            if transport is not None:
                transport.write(Reply(421, "4.3.2", f"{self.settings.hostname} shutting down").to_bytes())
                transport.loseConnection()
        return len(self.sessions)

    def connection_closed(self, ip: str) -> None:
        """A session ended: free its connection slots."""
        self.connections -= 1
        self.connections_per_ip[ip] -= 1
        if self.connections_per_ip[ip] <= 0:
            del self.connections_per_ip[ip]

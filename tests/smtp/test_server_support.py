"""Shared helpers for the SMTP server tests: a synchronous test policy and a machine driver."""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, succeed

from mtad.smtp.policy import AuthIdentity, Envelope, SessionInfo
from mtad.smtp.reply import Reply
from mtad.smtp.server import (
    AcceptMessage,
    Action,
    Authenticate,
    CheckMailFrom,
    CheckRcpt,
    Close,
    Connection,
    Send,
    ServerSettings,
    SMTPServerMachine,
    StartTLS,
)

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
LOCAL_DOMAINS = ("example.test", "bücher.test")
USERS = {"user": "secret", "üser": "pässword"}


def decide(request: CheckMailFrom | CheckRcpt | Authenticate | AcceptMessage) -> Reply | AuthIdentity | None:
    """A small application policy: local domains, relay only when authenticated, one user table.

    This is the shape of the app's real relay decision (DESIGN invariant 4): RCPT to a domain we do not
    route is ``554 5.7.1`` unless the session authenticated.
    """
    if isinstance(request, CheckMailFrom):
        if request.address.startswith("blocked@"):
            return Reply(550, "5.7.1", "Sender blocked")
        return None
    if isinstance(request, CheckRcpt):
        domain = request.address.rpartition("@")[2].lower()
        if request.address.lower() == "postmaster" or domain in LOCAL_DOMAINS or request.session.auth:
            return None
        if domain == "needs-auth.test":
            return Reply(530, "5.7.0", "Authentication required")
        return Reply(554, "5.7.1", "Relay access denied")
    if isinstance(request, Authenticate):
        if USERS.get(request.username) == request.password:
            return AuthIdentity(request.username, credential_id=7, server_id=3)
        return None
    return Reply(250, "2.0.0", f"Queued as q{len(request.envelope.rcpt_to)}")


class TestPolicy:
    """:func:`decide` as an :class:`~mtad.smtp.policy.SMTPPolicy` answering with fired Deferreds."""

    def __init__(self) -> None:
        self.accepted: list[tuple[SessionInfo, Envelope, bytes]] = []
        self.calls: list[str] = []

    def authenticate(
        self, session: SessionInfo, username: str, password: str
    ) -> Deferred[AuthIdentity | None]:
        self.calls.append("auth")
        result = decide(Authenticate(session, username, password))
        assert not isinstance(result, Reply)
        return succeed(result)

    def check_mail_from(self, session: SessionInfo, address: str) -> Deferred[Reply | None]:
        self.calls.append("mail")
        result = decide(CheckMailFrom(session, address))
        assert not isinstance(result, AuthIdentity)
        return succeed(result)

    def check_rcpt(self, session: SessionInfo, mail_from: str, address: str) -> Deferred[Reply | None]:
        self.calls.append("rcpt")
        result = decide(CheckRcpt(session, mail_from, address))
        assert not isinstance(result, AuthIdentity)
        return succeed(result)

    def accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Deferred[Reply]:
        self.calls.append("accept")
        self.accepted.append((session, envelope, message))
        return succeed(Reply(250, "2.0.0", "Queued as q1"))


def parse_replies(data: bytes) -> list[str]:
    """Wire replies to strings: one per reply, continuation lines joined with newlines."""
    replies: list[str] = []
    current: list[str] = []
    for line in data.decode("utf-8").split("\r\n")[:-1]:
        current.append(line)
        if len(line) < 4 or line[3] == " ":
            replies.append("\n".join(current))
            current = []
    assert not current, f"unterminated reply {current!r}"
    assert data.endswith(b"\r\n") or not data
    return replies


class Driver:
    """Runs a machine the way the glue does, answering policy requests with :func:`decide`.

    With ``auto=False`` requests are collected in ``requests`` and answered by the test.
    """

    def __init__(
        self,
        settings: ServerSettings | None = None,
        *,
        tls: bool = False,
        auto: bool = True,
        client_ip: str = "192.0.2.1",
    ) -> None:
        self.settings = settings or ServerSettings(hostname="mx.mtad.test", listener="test")
        connection = Connection("sess1", client_ip, 40000, "127.0.0.1", 25, tls=tls)
        self.machine = SMTPServerMachine(self.settings, connection, lambda: NOW)
        self.auto = auto
        self.out = bytearray()
        self.requests: list[CheckMailFrom | CheckRcpt | Authenticate | AcceptMessage] = []
        self.accepted: list[AcceptMessage] = []
        self.closed = False
        self.tls_started = 0
        self.run(self.machine.connection_made())

    def run(self, actions: list[Action]) -> None:
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Send):
                self.out += action.data
            elif isinstance(action, Close):
                self.closed = True
            elif isinstance(action, StartTLS):
                self.tls_started += 1
            else:
                self.requests.append(action)
                if isinstance(action, AcceptMessage):
                    self.accepted.append(action)
                if self.auto:
                    queue.extend(self.machine.policy_answered(decide(action)))

    def feed(self, data: bytes, bytewise: bool = False) -> None:
        if bytewise:
            for i in range(len(data)):
                self.run(self.machine.data_received(data[i : i + 1]))
        else:
            self.run(self.machine.data_received(data))

    def answer(self, result: Reply | AuthIdentity | None) -> None:
        self.run(self.machine.policy_answered(result))

    def replies(self) -> list[str]:
        """Replies after the greeting."""
        return parse_replies(bytes(self.out))[1:]

    def take(self) -> list[str]:
        """Replies since the last take (the greeting excluded on the first)."""
        replies = parse_replies(bytes(self.out))
        self.out.clear()
        if replies and replies[0].startswith("220 mx.mtad.test ESMTP"):
            replies = replies[1:]
        return replies

    def codes(self) -> list[str]:
        """First line of each reply after the last take, as 'code enhanced'."""
        return [" ".join(r.split("\n")[-1].split(" ")[:2]) for r in self.take()]

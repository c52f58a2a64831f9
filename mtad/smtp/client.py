"""Sans-I/O SMTP client: bytes from the server in, bytes to send and actions out.

The machine knows nothing of sockets, clocks or policy (crossbar's MQTT ``tx.py`` is the model): the
Twisted glue in :mod:`mtad.smtp.client_protocol` feeds it what the server sends and carries out the
actions it returns (send bytes, start TLS, arm the reply timer, close). That keeps every branch of the
conversation testable with plain byte strings.

One machine drives one connection through RFC 5321 §3 and §4: greeting, EHLO (HELO when EHLO is not
understood, §3.2), opportunistic STARTTLS (RFC 3207; RFC 7435 — certificates are not checked), and then
any number of messages, each a MAIL/RCPT.../DATA transaction (PIPELINING per RFC 2920 when offered), with
RSET between them (§4.1.1.5) and QUIT at the end. SIZE (RFC 1870), 8BITMIME (RFC 6152) and SMTPUTF8
(RFC 6531) parameters are sent when offered and needed. Results are per recipient.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

import attrs

from mtad.smtp.reply import Reply

MAX_LINE = 8192  # RFC 5321 §4.5.3.1.5 says 512 for replies; real servers send longer lines
MAX_REPLY_LINES = 1000


@attrs.frozen
class OutgoingMessage:
    """One message to send: envelope and the exact bytes (headers and body, any line endings)."""

    id: str
    mail_from: str
    recipients: tuple[str, ...]
    body: bytes


@attrs.frozen
class ClientTimeouts:
    """Seconds to wait for each reply; defaults are RFC 5321 §4.5.3.2's minimums.

    ``connect`` is used by the glue (TCP connect), the others by the machine. The body is handed to the
    transport in one piece, so the data-block (§4.5.3.2.5) and final-reply (§4.5.3.2.6) limits are applied
    as one timer of ``data_block + end_of_data`` after the body is written.
    """

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    end_of_data: float = 600.0
    rset: float = 120.0
    quit: float = 30.0


@attrs.frozen
class Send:
    """Write these bytes to the server."""

    data: bytes


@attrs.frozen
class StartTLS:
    """Switch the connection to TLS now (after a 220 reply to STARTTLS, RFC 3207 §4)."""


@attrs.frozen
class ArmTimer:
    """(Re)start the reply timer: call :meth:`SMTPClientMachine.timed_out` after ``seconds``."""

    seconds: float
    stage: str


@attrs.frozen
class Close:
    """Close the connection (after writing what was sent) and stop the timer."""


Action = Send | StartTLS | ArmTimer | Close


@attrs.frozen
class RecipientReply:
    """The reply that decided one recipient's fate in this session.

    ``remote`` is False when mtad made the reply up (a SIZE limit, a lost connection, a timeout);
    ``stage`` names the command the reply answered (``mail``, ``rcpt``, ``data``, ``end-of-data``,
    ``size``, ``smtputf8``, ``connection``, ``timeout``).
    """

    recipient: str
    reply: Reply
    remote: bool
    stage: str


@attrs.frozen
class MessageOutcome:
    """One message's per-recipient results on this connection."""

    message: OutgoingMessage
    replies: tuple[RecipientReply, ...]


@attrs.frozen
class SessionFailure:
    """Why a session ended before all its messages were tried.

    ``tls_failed`` marks a failed TLS handshake after STARTTLS: the caller should reconnect without
    STARTTLS (opportunistic TLS must not make mail undeliverable, RFC 7435 §3).
    """

    stage: str
    text: str
    reply: Reply | None = None
    tls_failed: bool = False


@attrs.frozen
class SessionReport:
    """Everything a finished session produced."""

    outcomes: tuple[MessageOutcome, ...]
    unattempted: tuple[OutgoingMessage, ...]
    failure: SessionFailure | None
    tls: bool
    greeting: Reply | None
    extensions: tuple[tuple[str, str], ...]


@attrs.frozen
class _Expect:
    kind: str
    timeout: float
    recipient: str = ""


@attrs.define
class _Transaction:
    message: OutgoingMessage
    pipelined: bool
    accepted: list[str] = attrs.Factory(list)
    replies: dict[str, RecipientReply] = attrs.Factory(dict)
    mail_failure: Reply | None = None
    next_rcpt: int = 0


_REPLY_LINE = re.compile(r"^(\d{3})([ -]?)(.*)$")
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def prepare_body(body: bytes) -> bytes:
    """The DATA payload: CRLF line endings (RFC 5321 §2.3.8), dot-stuffed (§4.5.2), ending ``CRLF.CRLF``."""
    lines = _LINE_END.split(body)
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def message_size(body: bytes) -> int:
    """Octets of the message after CRLF normalisation, as the SIZE parameter counts them (RFC 1870 §3)."""
    lines = _LINE_END.split(body)
    if lines and lines[-1] == b"":
        lines.pop()
    return sum(len(line) + 2 for line in lines)


def parse_reply(lines: Sequence[tuple[int, str]]) -> Reply:
    """Build a Reply from ``(code, text)`` lines, lifting an RFC 3463 enhanced code off each line."""
    code = lines[0][0]
    enhanced = ""
    texts: list[str] = []
    for i, (_, text) in enumerate(lines):
        match = _ENHANCED.match(text)
        if match is not None and (i == 0 or match.group(1) == enhanced):
            enhanced = match.group(1)
            text = text[match.end() :]
        texts.append(text)
    return Reply(code, enhanced, "\n".join(texts))


def _synthetic(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


class SMTPClientMachine:
    """The client side of one SMTP connection, delivering ``messages`` in order.

    Call :meth:`connection_made` once connected, :meth:`data_received` with every chunk, and
    :meth:`timed_out` / :meth:`connection_lost` when those happen; each returns the actions to carry out.
    :meth:`report` gives the results once :attr:`done` is set.
    """

    def __init__(
        self,
        helo_name: str,
        messages: Sequence[OutgoingMessage],
        *,
        starttls: bool = True,
        timeouts: ClientTimeouts = ClientTimeouts(),
    ) -> None:
        self.helo_name = helo_name
        self.try_starttls = starttls
        self.timeouts = timeouts
        self.tls = False
        self.done = False
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self.failure: SessionFailure | None = None
        self._queue: deque[OutgoingMessage] = deque(messages)
        self._outcomes: list[MessageOutcome] = []
        self._expect: deque[_Expect] = deque()
        self._buffer = b""
        self._lines: list[tuple[int, str]] = []
        self._txn: _Transaction | None = None
        self._tls_pending = False
        self._need_rset = False

    # -- inputs ---------------------------------------------------------------------------------------

    def connection_made(self) -> list[Action]:
        """The TCP connection is up: wait for the greeting (RFC 5321 §3.1)."""
        return self._await("greeting", self.timeouts.greeting)

    def data_received(self, data: bytes) -> list[Action]:
        """Parse server replies out of ``data`` (any chunking) and react to each complete one."""
        if self.done:
            return []
        self._buffer += data
        actions: list[Action] = []
        while not self.done:
            match = _LINE_END.search(self._buffer)
            if match is None:
                if len(self._buffer) > MAX_LINE:
                    actions += self._protocol_error("reply line too long")
                break
            raw, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            if match.group() == b"\r" and not self._buffer:
                # a CR at the end of this chunk may be the first half of CRLF: wait for more
                self._buffer = raw + b"\r"
                break
            line = raw.decode("utf-8", "replace")
            parsed = _REPLY_LINE.match(line)
            if parsed is None:
                actions += self._protocol_error(f"unparsable reply line {line[:80]!r}")
                break
            self._lines.append((int(parsed.group(1)), parsed.group(3)))
            if parsed.group(2) == "-" and len(self._lines) < MAX_REPLY_LINES:
                continue
            reply = parse_reply(self._lines)
            self._lines = []
            actions += self._on_reply(reply)
        return actions

    def timed_out(self) -> list[Action]:
        """The armed timer fired: the server did not answer in time (RFC 5321 §4.5.3.2)."""
        if self.done:
            return []
        if not self._expect or self._expect[0].kind in ("quit", "dot-abort"):
            return self._close()
        head = self._expect[0]
        text = f"Timed out after {head.timeout:g} s waiting for a reply to {head.kind.upper()}"
        self._fail_unresolved(_synthetic(451, "4.4.2", text), "timeout")
        self.failure = SessionFailure("timeout", text)
        return self._close()

    def connection_lost(self, reason: str) -> list[Action]:
        """The server closed the connection (or it broke)."""
        if self.done:
            return []
        if self._expect and self._expect[0].kind == "quit":
            return self._close()
        if self._tls_pending:
            self.failure = SessionFailure("starttls", f"TLS negotiation failed: {reason}", tls_failed=True)
            self.tls = False
            return self._close()
        stage = self._expect[0].kind if self._expect else "idle"
        text = f"Connection lost while waiting for a reply to {stage.upper()}: {reason}"
        self._fail_unresolved(_synthetic(451, "4.4.2", text), "connection")
        self.failure = SessionFailure("connection", text)
        return self._close()

    def report(self) -> SessionReport:
        """What happened: per-message outcomes, messages never tried, and why the session ended early."""
        unattempted = tuple(self._queue)
        return SessionReport(
            outcomes=tuple(self._outcomes),
            unattempted=unattempted,
            failure=self.failure,
            tls=self.tls,
            greeting=self.greeting,
            extensions=tuple(sorted(self.extensions.items())),
        )

    # -- plumbing -------------------------------------------------------------------------------------

    def _await(self, kind: str, timeout: float, recipient: str = "") -> list[Action]:
        self._expect.append(_Expect(kind, timeout, recipient))
        if len(self._expect) == 1:
            return [ArmTimer(timeout, kind)]
        return []

    def _send(self, command: str, kind: str, timeout: float, recipient: str = "") -> list[Action]:
        return [Send(command.encode("utf-8") + b"\r\n"), *self._await(kind, timeout, recipient)]

    def _close(self) -> list[Action]:
        self.done = True
        self._expect.clear()
        return [Close()]

    def _quit_and_close(self) -> list[Action]:
        self.done = True
        self._expect.clear()
        return [Send(b"QUIT\r\n"), Close()]

    def _protocol_error(self, text: str) -> list[Action]:
        self._fail_unresolved(_synthetic(451, "4.5.0", f"SMTP protocol error: {text}"), "connection")
        self.failure = SessionFailure("protocol", f"SMTP protocol error: {text}")
        return self._close()

    def _fail_unresolved(self, reply: Reply, stage: str, remote: bool = False) -> None:
        """Give every recipient of the transaction in progress that has no result yet ``reply``."""
        txn = self._txn
        if txn is None:
            return
        self._txn = None
        results = []
        for rcpt in txn.message.recipients:
            result = txn.replies.get(rcpt)
            if result is None:
                if txn.mail_failure is not None:
                    result = RecipientReply(rcpt, txn.mail_failure, True, "mail")
                else:
                    result = RecipientReply(rcpt, reply, remote, stage)
            results.append(result)
        self._outcomes.append(MessageOutcome(txn.message, tuple(results)))

    def _on_reply(self, reply: Reply) -> list[Action]:
        if not self._expect:
            return self._protocol_error(f"unexpected reply {reply}")
        expect = self._expect.popleft()
        if reply.code == 421 and expect.kind not in ("quit", "dot-abort"):
            # RFC 5321 §3.8: the server is shutting the channel; the rest of its replies will not come
            self._tls_pending = False
            self._fail_unresolved(reply, expect.kind, remote=True)
            self.failure = SessionFailure(expect.kind, f"Server closed the session: {reply}", reply)
            return self._quit_and_close()
        handler = getattr(self, "_on_" + expect.kind.replace("-", "_"))
        actions: list[Action] = handler(expect, reply)
        if self._expect and not self.done and not any(isinstance(a, ArmTimer) for a in actions):
            head = self._expect[0]  # the next pipelined reply now has its own full timeout
            actions.append(ArmTimer(head.timeout, head.kind))
        return actions

    # -- session --------------------------------------------------------------------------------------

    def _on_greeting(self, expect: _Expect, reply: Reply) -> list[Action]:
        self.greeting = reply
        if reply.code != 220:
            self.failure = SessionFailure("greeting", f"Server refused the session: {reply}", reply)
            return self._quit_and_close()
        return self._send(f"EHLO {self.helo_name}", "ehlo", self.timeouts.ehlo)

    def _on_ehlo(self, expect: _Expect, reply: Reply) -> list[Action]:
        if not reply.is_positive:
            if reply.is_permanent and not self.tls:
                # RFC 5321 §3.2: a server that does not know EHLO gets HELO
                return self._send(f"HELO {self.helo_name}", "helo", self.timeouts.ehlo)
            self.failure = SessionFailure("ehlo", f"Server refused EHLO: {reply}", reply)
            return self._quit_and_close()
        self._tls_pending = False
        self.extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                self.extensions[keyword.upper()] = params.strip()
        if self.try_starttls and not self.tls and "STARTTLS" in self.extensions:
            return self._send("STARTTLS", "starttls", self.timeouts.starttls)
        return self._next_message()

    def _on_helo(self, expect: _Expect, reply: Reply) -> list[Action]:
        if not reply.is_positive:
            self.failure = SessionFailure("helo", f"Server refused HELO: {reply}", reply)
            return self._quit_and_close()
        self.extensions = {}
        return self._next_message()

    def _on_starttls(self, expect: _Expect, reply: Reply) -> list[Action]:
        if reply.code != 220:
            return self._next_message()  # opportunistic: carry on in plain text (RFC 3207 §4)
        self.tls = True
        self._tls_pending = True
        # RFC 3207 §4.2: forget everything learnt before TLS and say EHLO again
        return [StartTLS(), *self._send(f"EHLO {self.helo_name}", "ehlo", self.timeouts.ehlo)]

    def _on_quit(self, expect: _Expect, reply: Reply) -> list[Action]:
        return self._close()

    # -- transactions ---------------------------------------------------------------------------------

    def _local_refusal(self, message: OutgoingMessage) -> tuple[Reply, str] | None:
        size_param = self.extensions.get("SIZE")
        if size_param is not None and size_param.isdigit() and int(size_param) > 0:
            size = message_size(message.body)
            if size > int(size_param):
                return (
                    _synthetic(
                        552,
                        "5.3.4",
                        f"Message size {size} bytes exceeds the {size_param} bytes the server accepts",
                    ),
                    "size",
                )
        if not _ascii(message.mail_from, *message.recipients) and "SMTPUTF8" not in self.extensions:
            return (
                _synthetic(
                    553, "5.6.7", "Non-ASCII addresses need SMTPUTF8, which the server does not offer"
                ),
                "smtputf8",
            )
        return None

    def _next_message(self) -> list[Action]:
        while self._queue:
            message = self._queue[0]
            refusal = self._local_refusal(message)
            if refusal is None:
                break
            self._queue.popleft()
            reply, stage = refusal
            self._outcomes.append(
                MessageOutcome(
                    message, tuple(RecipientReply(r, reply, False, stage) for r in message.recipients)
                )
            )
        if not self._queue:
            return self._send("QUIT", "quit", self.timeouts.quit)
        if self._need_rset:
            self._need_rset = False
            return self._send("RSET", "rset", self.timeouts.rset)
        message = self._queue.popleft()
        pipelined = "PIPELINING" in self.extensions
        self._txn = _Transaction(message, pipelined)
        self._need_rset = True
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={message_size(message.body)}"
        if _EIGHT_BIT.search(message.body) and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if not _ascii(message.mail_from, *message.recipients):
            params += " SMTPUTF8"
        mail = f"MAIL FROM:<{message.mail_from}>{params}"
        if not pipelined:
            return self._send(mail, "mail", self.timeouts.mail)
        # RFC 2920 §3.1: MAIL, every RCPT and DATA may go in one batch; replies come back in order
        actions = self._send(mail, "mail", self.timeouts.mail)
        for rcpt in message.recipients:
            actions += self._send(f"RCPT TO:<{rcpt}>", "rcpt", self.timeouts.rcpt, rcpt)
        actions += self._send("DATA", "data", self.timeouts.data)
        data = b"".join(a.data for a in actions if isinstance(a, Send))
        return [Send(data), *(a for a in actions if not isinstance(a, Send))]

    def _on_rset(self, expect: _Expect, reply: Reply) -> list[Action]:
        if not reply.is_positive:
            self.failure = SessionFailure("rset", f"Server refused RSET: {reply}", reply)
            return self._quit_and_close()
        return self._next_message()

    def _on_mail(self, expect: _Expect, reply: Reply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        if not reply.is_positive:
            txn.mail_failure = reply
            if not txn.pipelined:
                return self._finish(None, "mail")
            return []
        if not txn.pipelined:
            return self._send_next_rcpt(txn)
        return []

    def _send_next_rcpt(self, txn: _Transaction) -> list[Action]:
        rcpt = txn.message.recipients[txn.next_rcpt]
        txn.next_rcpt += 1
        return self._send(f"RCPT TO:<{rcpt}>", "rcpt", self.timeouts.rcpt, rcpt)

    def _on_rcpt(self, expect: _Expect, reply: Reply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        if txn.mail_failure is None:
            if reply.is_positive:
                txn.accepted.append(expect.recipient)
            else:
                txn.replies[expect.recipient] = RecipientReply(expect.recipient, reply, True, "rcpt")
        if txn.pipelined:
            return []
        if txn.next_rcpt < len(txn.message.recipients):
            return self._send_next_rcpt(txn)
        if not txn.accepted:
            return self._finish(None, "rcpt")
        return self._send("DATA", "data", self.timeouts.data)

    def _on_data(self, expect: _Expect, reply: Reply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        if reply.code == 354:
            if txn.mail_failure is not None or not txn.accepted:
                # RFC 2920 §3.1: DATA accepted with no valid recipient — send an empty message's end
                return [Send(b".\r\n"), *self._await("dot-abort", self.timeouts.end_of_data)]
            body = prepare_body(txn.message.body)
            timeout = self.timeouts.data_block + self.timeouts.end_of_data
            return [Send(body), *self._await("end-of-data", timeout)]
        return self._finish(reply, "data")

    def _on_dot_abort(self, expect: _Expect, reply: Reply) -> list[Action]:
        return self._finish(None, "data")

    def _on_end_of_data(self, expect: _Expect, reply: Reply) -> list[Action]:
        return self._finish(reply, "end-of-data")

    def _finish(self, final: Reply | None, stage: str) -> list[Action]:
        """Close the transaction: accepted recipients get ``final``; the rest have their own replies."""
        txn = self._txn
        assert txn is not None
        self._txn = None
        results = []
        for rcpt in txn.message.recipients:
            if txn.mail_failure is not None:
                results.append(RecipientReply(rcpt, txn.mail_failure, True, "mail"))
            elif rcpt in txn.replies:
                results.append(txn.replies[rcpt])
            else:
                assert final is not None
                results.append(RecipientReply(rcpt, final, True, stage))
        self._outcomes.append(MessageOutcome(txn.message, tuple(results)))
        return self._next_message()


def _ascii(*texts: str) -> bool:
    return all(t.isascii() for t in texts)

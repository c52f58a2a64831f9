"""Sans-I/O ESMTP server: bytes from the client in, replies and actions out.

The machine knows nothing of sockets, clocks or policy (like :mod:`mtad.smtp.client`): the Twisted glue in
:mod:`mtad.smtp.server_protocol` feeds it what the client sends and carries out the actions it returns
(send bytes, start TLS, close, ask the policy). While a policy question is outstanding the machine
buffers input and answers nothing, so replies always come in command order, pipelined or not
(RFC 2920 §3; Twisted's own server gets this wrong, twisted/twisted#8126).

Behaviour chosen where the RFCs leave room (all deliberate, all tested):

* Lines end in CRLF only (RFC 5321 §2.3.8). A command line holding a bare CR or LF is answered
  ``500 5.5.2`` as soon as the LF arrives; NUL bytes give ``500 5.5.2``. A command line over 512 octets
  (12288 for AUTH, RFC 4954 §4) gives ``500 5.5.6`` once it ends; its bytes are discarded, not buffered.
* In DATA only ``CRLF . CRLF`` ends the message, so ``LF . LF``, ``CR . CR`` and ``LF . CRLF`` never do
  (the "SMTP smuggling" family). A message holding any bare CR or LF is refused at its end with
  ``550 5.6.0`` (:data:`BARE_NEWLINE`), so no other server ever sees an ambiguous message from us.
* A text line over 1000 octets including CRLF (RFC 5321 §4.5.3.1.6) refuses the message at its end with
  ``500 5.5.6``; an oversize message (RFC 1870) with ``552 5.3.4``. Once a message is refused its
  remaining bytes are discarded as they arrive: memory per session is bounded by the message size limit.
* Replies carry RFC 3463 enhanced codes, except the greeting and EHLO (RFC 2034 §3) and the 3xx
  intermediate replies (354, 334), for which RFC 3463 defines no class.
* ``BDAT`` (RFC 3030) chunks are always read to their declared end, even when refused, so the session
  stays in step; the same bare CR/LF and line-length rules apply to the assembled message.
* After ``max_bad_commands`` protocol errors the error is answered, then ``421 4.7.0`` and the close.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import re
from collections.abc import Callable

import attrs

from mtad.smtp.policy import AuthIdentity, Envelope, SessionInfo
from mtad.smtp.reply import Reply

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_COMMAND_LINE = 512
#: RFC 4954 §4: AUTH command and response lines may be up to 12288 octets.
MAX_AUTH_LINE = 12288
#: RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
MAX_TEXT_LINE = 1000

BARE_NEWLINE = Reply(
    550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF (RFC 5321 §2.3.8)"
)
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long: message lines are limited to 1000 octets")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_QUOTED = r'"(?:[^"\\\r\n]|\\[ -~\u0080-\U0010ffff])*"'
_LABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[!-Z^-~]+\]"
_MAILBOX = rf"(?:{_DOT_ATOM}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})"
# A path, with an ignored source route (RFC 5321 §4.1.1.3), then ESMTP parameters.
_PATH_RE = re.compile(
    rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?(?P<mailbox>{_MAILBOX})?>(?P<params>.*)\Z", re.DOTALL
)
_HELO_RE = re.compile(r"(?:\[[!-Z^-~]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_.])?)\Z")
_BDAT_RE = re.compile(r"(\d{1,18})(?: +(LAST))? *\Z", re.IGNORECASE)
_UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})


@attrs.frozen
class ServerTimeouts:
    """Seconds of client silence before ``421 4.4.2`` and the close.

    RFC 5321 §4.5.3.2.7: a server SHOULD wait at least 5 minutes for the next command. The client waits 3
    minutes per data block (§4.5.3.2.5), so 5 minutes between data blocks is generous and still bounded.
    While a policy decision is pending there is no client timeout: the client is waiting for us.
    """

    command: float = 300.0
    data: float = 300.0


@attrs.frozen
class ServerSettings:
    """Per-listener settings for the state machine (the factory builds one)."""

    hostname: str
    listener: str = "smtp"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_bad_commands: int = 10
    #: STARTTLS is offered (RFC 3207); the glue has a TLS context to start.
    starttls: bool = False
    #: Offer AUTH without TLS (trusted networks only, DESIGN invariant 4).
    allow_plaintext_auth: bool = False
    timeouts: ServerTimeouts = ServerTimeouts()


@attrs.frozen
class Connection:
    """Facts about one connection known when it is made."""

    session_id: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    #: The listener is implicit TLS (RFC 8314), so the session starts encrypted.
    tls: bool = False


@attrs.frozen
class Send:
    """Write these bytes to the client."""

    data: bytes


@attrs.frozen
class StartTLS:
    """Start TLS now: the 220 to STARTTLS has been written (RFC 3207 §4)."""


@attrs.frozen
class Close:
    """Close the connection once what was sent is written."""


@attrs.frozen
class CheckMailFrom:
    """Ask the policy about MAIL FROM; answer with :meth:`SMTPServerMachine.policy_answered`."""

    session: SessionInfo
    address: str


@attrs.frozen
class CheckRcpt:
    """Ask the policy about RCPT TO."""

    session: SessionInfo
    mail_from: str
    address: str


@attrs.frozen
class Authenticate:
    """Ask the policy to check credentials (answer with an identity, None, or a Reply to send)."""

    session: SessionInfo
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class AcceptMessage:
    """Hand a complete message to the policy for durable storage; answer with the Reply to send."""

    session: SessionInfo
    envelope: Envelope
    message: bytes = attrs.field(repr=False)


PolicyRequest = CheckMailFrom | CheckRcpt | Authenticate | AcceptMessage
Action = Send | StartTLS | Close | PolicyRequest


def _send(reply: Reply) -> Send:
    return Send(reply.to_bytes())


@attrs.define
class _Transaction:
    mail_from: str
    body_8bit: bool
    smtputf8: bool
    rcpts: list[str] = attrs.Factory(list)
    # message data (DATA or BDAT)
    parts: list[bytes] = attrs.Factory(list)
    size: int = 0
    oversize: bool = False
    too_long: bool = False
    bare: bool = False
    skipping_line: bool = False
    bdat: bool = False

    @property
    def refused(self) -> bool:
        return self.oversize or self.too_long or self.bare

    def refusal(self) -> Reply | None:
        if self.oversize:
            return MESSAGE_TOO_BIG
        if self.too_long:
            return TEXT_LINE_TOO_LONG
        if self.bare:
            return BARE_NEWLINE
        return None


@attrs.define
class _Chunk:
    remaining: int
    size: int
    last: bool
    error: Reply | None


class _Mode:
    COMMAND = "command"
    AUTH = "auth"
    DATA = "data"
    BDAT = "bdat"
    CLOSED = "closed"


def _has_long_line(data: bytes) -> bool:
    """True if any CRLF-delimited line exceeds RFC 5321 §4.5.3.1.6's 998 octets of text."""
    return len(data) > MAX_TEXT_LINE - 2 and max(map(len, data.split(b"\r\n"))) > MAX_TEXT_LINE - 2


def _has_bare_newline(data: bytes) -> bool:
    """True if a CR or LF appears other than in a CRLF pair (RFC 5321 §2.3.8).

    Every CRLF accounts for one CR and one LF, so equal counts mean no strays; ``bytes.count`` runs at
    memory speed where a regular expression with look-arounds does not.
    """
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    session_id: str,
    recipient: str | None,
    when: float,
) -> bytes:
    """The ``Received:`` trace field of RFC 5321 §4.4 (protocol names from RFC 3848 and RFC 6531).

    The ``for`` clause names the recipient only when there is exactly one, so a message to many does not
    disclose its other recipients to each of them.
    """
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    date = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
    for_clause = f"\r\n\tfor <{recipient}>" if recipient is not None else ""
    text = (
        f"Received: from {helo} ({literal})\r\n\tby {hostname} with {protocol} id {session_id}"
        f"{for_clause}; {date}\r\n"
    )
    return text.encode("utf-8")


class SMTPServerMachine:
    """One ESMTP session (RFC 5321) as a state machine.

    Call :meth:`connection_made` once, then :meth:`data_received` with whatever arrives. When an action
    is a policy request, no more input is processed until :meth:`policy_answered` or
    :meth:`policy_failed` is called; input meanwhile is buffered (the glue pauses the transport).
    """

    def __init__(self, settings: ServerSettings, connection: Connection, now: Callable[[], float]) -> None:
        self.settings = settings
        self.connection = connection
        self._now = now
        self._mode = _Mode.COMMAND
        self._buffer = bytearray()
        self._skipping_line = False
        self._pending: PolicyRequest | None = None
        self._helo: str | None = None
        self._esmtp = False
        self._tls = connection.tls
        self._auth: AuthIdentity | None = None
        self._txn: _Transaction | None = None
        self._chunk: _Chunk | None = None
        self._errors = 0
        self._auth_mechanism = ""
        self._auth_username: str | None = None
        self._pending_txn: _Transaction | None = None

    # -- public interface -------------------------------------------------------------------------

    @property
    def session(self) -> SessionInfo:
        """The session as the policy sees it now."""
        c = self.connection
        return SessionInfo(
            session_id=c.session_id,
            client_ip=c.client_ip,
            client_port=c.client_port,
            server_ip=c.server_ip,
            server_port=c.server_port,
            helo=self._helo,
            tls=self._tls,
            auth=self._auth,
            listener=self.settings.listener,
            rcpt_to=tuple(self._txn.rcpts) if self._txn is not None else (),
        )

    @property
    def closed(self) -> bool:
        return self._mode == _Mode.CLOSED

    @property
    def waiting(self) -> bool:
        """A policy request is outstanding."""
        return self._pending is not None

    def idle_timeout(self) -> float | None:
        """Seconds of client silence to allow now; None while we, not the client, are to act."""
        if self._mode == _Mode.CLOSED or self._pending is not None:
            return None
        if self._mode in (_Mode.DATA, _Mode.BDAT):
            return self.settings.timeouts.data
        return self.settings.timeouts.command

    def connection_made(self) -> list[Action]:
        """The greeting (RFC 5321 §4.3.1; no enhanced code, RFC 2034 §3)."""
        return [_send(Reply(220, "", f"{self.settings.hostname} ESMTP mtad ready"))]

    def data_received(self, data: bytes) -> list[Action]:
        if self._mode == _Mode.CLOSED:
            return []
        self._buffer += data
        return self._process()

    def policy_answered(self, result: Reply | AuthIdentity | None) -> list[Action]:
        """The policy's answer to the outstanding request; then buffered input is processed."""
        request = self._pending
        if request is None or self._mode == _Mode.CLOSED:
            self._pending = None
            return []
        self._pending = None
        out: list[Action] = []
        if isinstance(request, CheckMailFrom):
            self._mail_answered(out, request, result)
        elif isinstance(request, CheckRcpt):
            self._rcpt_answered(out, request, result)
        elif isinstance(request, Authenticate):
            self._auth_answered(out, result)
        else:
            out.append(_send(result if isinstance(result, Reply) else TEMPORARY_FAILURE))
        if self._mode != _Mode.CLOSED:
            out += self._process()
        return out

    def policy_failed(self) -> list[Action]:
        """The policy raised (the glue logged it): answer with a temporary error and go on."""
        request = self._pending
        if request is None or self._mode == _Mode.CLOSED:
            self._pending = None
            return []
        self._pending = None
        reply = AUTH_TEMPORARY_FAILURE if isinstance(request, Authenticate) else TEMPORARY_FAILURE
        return [_send(reply), *self._process()]

    def timed_out(self) -> list[Action]:
        """The client was silent too long (RFC 5321 §4.5.3.2): 421 and close; a partial message is lost."""
        if self._mode == _Mode.CLOSED:
            return []
        self._close_session()
        return [
            _send(Reply(421, "4.4.2", f"{self.settings.hostname} Idle timeout, closing connection")),
            Close(),
        ]

    def connection_lost(self) -> None:
        """The client went away: drop everything, including a partly received message."""
        self._close_session()

    # -- input loop -------------------------------------------------------------------------------

    def _close_session(self) -> None:
        self._mode = _Mode.CLOSED
        self._buffer.clear()
        self._txn = None
        self._chunk = None

    def _process(self) -> list[Action]:
        out: list[Action] = []
        while self._mode != _Mode.CLOSED and self._pending is None:
            if self._mode == _Mode.DATA:
                progressed = self._step_data(out)
            elif self._mode == _Mode.BDAT:
                progressed = self._step_bdat(out)
            else:
                progressed = self._step_line(out)
            if not progressed:
                break
        return out

    def _line_limit(self) -> int:
        if self._mode == _Mode.AUTH or bytes(self._buffer[:5]).upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def _step_line(self, out: list[Action]) -> bool:
        buf = self._buffer
        newline = buf.find(b"\n")
        if self._skipping_line:
            if newline < 0:
                buf.clear()
                return False
            del buf[: newline + 1]
            self._skipping_line = False
            self._mode = _Mode.COMMAND
            self._error(out, LINE_TOO_LONG)
            return True
        limit = self._line_limit()
        if newline < 0:
            if len(buf) >= limit:
                # the line cannot fit any more: discard it as it comes, answer when it ends
                buf.clear()
                self._skipping_line = True
            return False
        line = bytes(buf[: newline + 1])
        del buf[: newline + 1]
        if len(line) > limit:
            self._mode = _Mode.COMMAND
            self._error(out, LINE_TOO_LONG)
        elif not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            self._mode = _Mode.COMMAND
            self._error(out, Reply(500, "5.5.2", "Bare CR or LF in command; lines must end with CRLF"))
        elif b"\0" in line:
            self._mode = _Mode.COMMAND
            self._error(out, Reply(500, "5.5.2", "NUL character in command"))
        else:
            try:
                text = line[:-2].decode("utf-8")
            except UnicodeDecodeError:
                self._mode = _Mode.COMMAND
                self._error(out, Reply(500, "5.5.2", "Command is not valid UTF-8"))
                return True
            if self._mode == _Mode.AUTH:
                self._auth_response(out, text)
            else:
                self._command(out, text)
        return True

    def _error(self, out: list[Action], reply: Reply) -> None:
        """Answer a protocol error and count it; too many and the session ends (421 4.7.0)."""
        out.append(_send(reply))
        self._errors += 1
        if self._errors >= self.settings.max_bad_commands:
            out += [_send(TOO_MANY_ERRORS), Close()]
            self._close_session()

    # -- commands ---------------------------------------------------------------------------------

    def _command(self, out: list[Action], text: str) -> None:
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip(" ")
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb.isalpha() else None
        if handler is not None:
            handler(out, arg)
        elif verb in _UNIMPLEMENTED:
            self._error(out, Reply(502, "5.5.1", f"{verb} not implemented"))
        else:
            self._error(out, Reply(500, "5.5.1", "Command unrecognized"))

    def _cmd_ehlo(self, out: list[Action], arg: str) -> None:
        self._greet(out, arg, esmtp=True)

    def _cmd_helo(self, out: list[Action], arg: str) -> None:
        self._greet(out, arg, esmtp=False)

    def _greet(self, out: list[Action], arg: str, esmtp: bool) -> None:
        """EHLO/HELO (RFC 5321 §4.1.1.1); either resets any transaction (§4.1.4)."""
        if not _HELO_RE.match(arg):
            self._error(out, Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} <domain>"))
            return
        self._txn = None
        self._helo = arg
        self._esmtp = esmtp
        host = self.settings.hostname
        if not esmtp:
            out.append(_send(Reply(250, "", host)))
            return
        lines = [
            f"{host} greets {arg}",
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
        ]
        if self.settings.starttls and not self._tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        out.append(_send(Reply(250, "", "\n".join(lines))))

    def _auth_offered(self) -> bool:
        return self._auth is None and (self._tls or self.settings.allow_plaintext_auth)

    def _cmd_mail(self, out: list[Action], arg: str) -> None:
        if self._helo is None:
            self._error(out, Reply(503, "5.5.1", "Send EHLO or HELO first"))
            return
        if self._txn is not None:
            self._error(out, Reply(503, "5.5.1", "Nested MAIL command"))
            return
        if arg[:5].upper() != "FROM:":
            self._error(out, Reply(501, "5.5.2", "Syntax: MAIL FROM:<address>"))
            return
        match = _PATH_RE.match(arg[5:].lstrip(" "))
        if match is None:
            self._error(out, Reply(501, "5.1.7", "Bad sender address syntax"))
            return
        address = match["mailbox"] or ""
        params = self._params(out, match["params"])
        if params is None:
            return
        given = bool(params)  # ESMTP parameters need EHLO (RFC 5321 §4.1.1.2)
        body = (params.pop("BODY", "7BIT") or "").upper()
        smtputf8 = "SMTPUTF8" in params
        if params.pop("SMTPUTF8", None) is not None:  # RFC 6531 §3.4: the parameter takes no value
            self._error(out, Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            return
        size = (params.pop("SIZE") or "") if "SIZE" in params else None
        params.pop("AUTH", None)  # RFC 4954 §5: accepted and not trusted
        extra = bool(params)
        if extra or body not in ("7BIT", "8BITMIME") or (given and not self._esmtp):
            self._error(out, Reply(555, "5.5.4", "Unsupported MAIL parameter"))
            return
        if size is not None:
            if not size.isdigit():
                self._error(out, Reply(501, "5.5.4", "Syntax: SIZE=<octets>"))
                return
            if int(size) > self.settings.max_message_size:
                out.append(_send(MESSAGE_TOO_BIG))  # RFC 1870 §6.1
                return
        if not self._address_ok(out, address, smtputf8, "5.1.7"):
            return
        self._pending = CheckMailFrom(self.session, address)
        self._pending_txn = _Transaction(address, body_8bit=body == "8BITMIME", smtputf8=smtputf8)
        out.append(self._pending)

    def _params(self, out: list[Action], text: str) -> dict[str, str | None] | None:
        """ESMTP parameters after a path (RFC 5321 §4.1.2): ``KEY[=VALUE]`` separated by spaces."""
        params: dict[str, str | None] = {}
        if text and not text.startswith(" "):
            self._error(out, Reply(501, "5.5.4", "Syntax error in parameters"))
            return None
        for item in text.split():
            key, eq, value = item.partition("=")
            key = key.upper()
            if not key or key in params or (eq and not value):
                self._error(out, Reply(501, "5.5.4", "Syntax error in parameters"))
                return None
            params[key] = value if eq else None
        return params

    def _address_ok(self, out: list[Action], address: str, smtputf8: bool, bad_code: str) -> bool:
        """RFC 5321 §4.5.3.1 length limits and RFC 6531 §3.4 (UTF-8 only with SMTPUTF8)."""
        local, _, domain = address.rpartition("@")
        if len(local.encode()) > 64 or len(domain.encode()) > 255 or len(address.encode()) > 254:
            self._error(out, Reply(501, bad_code, "Address too long"))
            return False
        if not smtputf8 and not address.isascii():
            out.append(_send(Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")))
            return False
        return True

    def _mail_answered(self, out: list[Action], request: CheckMailFrom, result: object) -> None:
        txn = self._pending_txn
        if isinstance(result, Reply) and not result.is_positive:
            out.append(_send(result))
            return
        self._txn = txn
        out.append(_send(result if isinstance(result, Reply) else Reply(250, "2.1.0", "Sender OK")))

    def _cmd_rcpt(self, out: list[Action], arg: str) -> None:
        txn = self._txn
        if txn is None or txn.bdat:
            self._error(out, Reply(503, "5.5.1", "Need MAIL command"))
            return
        if arg[:3].upper() != "TO:":
            self._error(out, Reply(501, "5.5.2", "Syntax: RCPT TO:<address>"))
            return
        path = arg[3:].lstrip(" ")
        match = _PATH_RE.match(path)
        if match is not None and match["mailbox"]:
            address, rest = match["mailbox"], match["params"]
        elif path[:12].lower() == "<postmaster>":  # RFC 5321 §4.5.1: no domain needed
            address, rest = path[1:11], path[12:]
        else:
            self._error(out, Reply(501, "5.1.3", "Bad recipient address syntax"))
            return
        params = self._params(out, rest)
        if params is None:
            return
        if params:
            self._error(out, Reply(555, "5.5.4", "Unsupported RCPT parameter"))
            return
        if len(txn.rcpts) >= self.settings.max_recipients:
            out.append(_send(TOO_MANY_RECIPIENTS))  # RFC 5321 §4.5.3.1.10
            return
        if not self._address_ok(out, address, txn.smtputf8, "5.1.3"):
            return
        self._pending = CheckRcpt(self.session, txn.mail_from, address)
        out.append(self._pending)

    def _rcpt_answered(self, out: list[Action], request: CheckRcpt, result: object) -> None:
        if isinstance(result, Reply) and not result.is_positive:
            out.append(_send(result))
            return
        if self._txn is not None:
            self._txn.rcpts.append(request.address)
        out.append(_send(result if isinstance(result, Reply) else Reply(250, "2.1.5", "Recipient OK")))

    def _transaction_ready(self, out: list[Action]) -> _Transaction | None:
        txn = self._txn
        if txn is None:
            self._error(out, Reply(503, "5.5.1", "Need MAIL command"))
            return None
        if not txn.rcpts:
            self._error(out, Reply(554, "5.5.1", "No valid recipients"))  # RFC 5321 §3.3
            return None
        return txn

    def _cmd_data(self, out: list[Action], arg: str) -> None:
        if arg:
            self._error(out, Reply(501, "5.5.4", "Syntax: DATA"))
            return
        txn = self._transaction_ready(out)
        if txn is None:
            return
        if txn.bdat:
            self._error(out, Reply(503, "5.5.1", "DATA not allowed after BDAT"))  # RFC 3030 §2
            return
        self._mode = _Mode.DATA
        out.append(_send(Reply(354, "", "End data with <CR><LF>.<CR><LF>")))

    def _cmd_bdat(self, out: list[Action], arg: str) -> None:
        match = _BDAT_RE.match(arg)
        if match is None:
            self._error(out, Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]"))
            return
        size = int(match[1])
        error: Reply | None = None
        txn = self._txn
        if txn is None:
            error = Reply(503, "5.5.1", "Need MAIL command")
        elif not txn.rcpts:
            error = Reply(554, "5.5.1", "No valid recipients")
        else:
            txn.bdat = True
        # RFC 3030 §2: the chunk is read whatever the answer, so the session stays in step
        self._chunk = _Chunk(remaining=size, size=size, last=match[2] is not None, error=error)
        self._mode = _Mode.BDAT

    def _cmd_rset(self, out: list[Action], arg: str) -> None:
        if arg:
            self._error(out, Reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._txn = None
        out.append(_send(Reply(250, "2.0.0", "OK")))

    def _cmd_noop(self, out: list[Action], arg: str) -> None:
        out.append(_send(Reply(250, "2.0.0", "OK")))

    def _cmd_quit(self, out: list[Action], arg: str) -> None:
        out += [_send(Reply(221, "2.0.0", f"{self.settings.hostname} closing connection")), Close()]
        self._close_session()

    def _cmd_vrfy(self, out: list[Action], arg: str) -> None:
        if not arg:
            self._error(out, Reply(501, "5.5.4", "Syntax: VRFY <address>"))
            return
        # RFC 5321 §3.5.3: 252 when the server will not verify but will accept mail
        out.append(
            _send(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))
        )

    def _cmd_help(self, out: list[Action], arg: str) -> None:
        text = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
        out.append(_send(Reply(214, "2.0.0", text)))

    def _cmd_starttls(self, out: list[Action], arg: str) -> None:
        if not self.settings.starttls:
            self._error(out, Reply(502, "5.5.1", "STARTTLS not available"))
            return
        if self._tls:
            self._error(out, Reply(503, "5.5.1", "TLS already active"))
            return
        if not self._esmtp:
            self._error(out, Reply(503, "5.5.1", "Send EHLO first"))
            return
        if arg:
            self._error(out, Reply(501, "5.5.4", "Syntax: STARTTLS"))  # RFC 3207 §4
            return
        out += [_send(Reply(220, "2.0.0", "Ready to start TLS")), StartTLS()]
        # RFC 3207 §4.2: forget everything learnt in plain text. Input already buffered after the
        # STARTTLS line came in plain text and would be taken as sent under TLS: discard it
        # (CVE-2011-0411, command injection).
        self._buffer.clear()
        self._tls = True
        self._helo = None
        self._esmtp = False
        self._auth = None
        self._txn = None

    # -- AUTH (RFC 4954) --------------------------------------------------------------------------

    def _cmd_auth(self, out: list[Action], arg: str) -> None:
        if not self._esmtp:
            self._error(out, Reply(503, "5.5.1", "Send EHLO first"))
            return
        if self._auth is not None:
            self._error(out, Reply(503, "5.5.1", "Already authenticated"))  # RFC 4954 §4
            return
        if self._txn is not None:
            self._error(out, Reply(503, "5.5.1", "AUTH not permitted during a mail transaction"))
            return
        if not self._auth_offered():
            self._error(
                out, Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            )
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip(" ")
        if not mechanism:
            self._error(out, Reply(501, "5.5.4", "Syntax: AUTH <mechanism> [initial-response]"))
            return
        if mechanism not in ("PLAIN", "LOGIN"):
            self._error(out, Reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        self._auth_mechanism = mechanism
        self._auth_username = None
        if not initial:
            self._mode = _Mode.AUTH
            out.append(Send(b"334 \r\n" if mechanism == "PLAIN" else b"334 VXNlcm5hbWU6\r\n"))
            return
        self._auth_response(out, initial)

    def _auth_response(self, out: list[Action], text: str) -> None:
        """One client response in the AUTH exchange (initial response or after a 334)."""
        self._mode = _Mode.COMMAND
        if text == "*":
            self._error(out, AUTH_CANCELLED)  # RFC 4954 §4
            return
        try:
            raw = b"" if text == "=" else base64.b64decode(text, validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._error(out, Reply(501, "5.5.2", "Invalid base64 data"))
            return
        if self._auth_mechanism == "LOGIN":
            if self._auth_username is None:
                self._auth_username = decoded
                self._mode = _Mode.AUTH
                out.append(Send(b"334 UGFzc3dvcmQ6\r\n"))
                return
            username, password = self._auth_username, decoded
        else:
            fields = decoded.split("\0")
            if len(fields) != 3:
                self._error(out, Reply(501, "5.5.2", "Malformed PLAIN response"))
                return
            authzid, username, password = fields
            if authzid and authzid != username:  # acting as someone else is not offered
                self._error(out, AUTH_INVALID)
                return
        self._pending = Authenticate(self.session, username, password)
        out.append(self._pending)

    def _auth_answered(self, out: list[Action], result: object) -> None:
        if isinstance(result, AuthIdentity):
            self._auth = result
            out.append(_send(Reply(235, "2.7.0", "Authentication successful")))
        elif isinstance(result, Reply):
            out.append(_send(result))
        else:
            self._error(out, AUTH_INVALID)

    # -- message data -----------------------------------------------------------------------------

    def _step_data(self, out: list[Action]) -> bool:
        """Consume DATA input: complete lines only, so the buffer always starts at a line start.

        Only CRLF "." CRLF ends the message (RFC 5321 §4.1.1.4); the buffer is bounded by one line of
        1000 octets plus one read, because an overlong partial line is discarded as it arrives.
        """
        buf = self._buffer
        txn = self._txn
        assert txn is not None
        if txn.skipping_line:
            end = buf.find(b"\r\n")
            if end < 0:
                keep = 1 if buf.endswith(b"\r") else 0  # the CR of a CRLF split across reads
                del buf[: len(buf) - keep]
                return False
            del buf[: end + 2]
            txn.skipping_line = False
            return True
        if buf.startswith(b".\r\n"):
            del buf[:3]
            self._end_of_data(out)
            return True
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._data_lines(txn, bytes(buf[: end + 2]))
            del buf[: end + 5]
            self._end_of_data(out)
            return True
        last = buf.rfind(b"\r\n")
        if last >= 0:
            self._data_lines(txn, bytes(buf[: last + 2]))
            del buf[: last + 2]
            return True
        keep = 1 if buf.endswith(b"\r") else 0
        if len(buf) - keep > MAX_TEXT_LINE - 2:
            txn.too_long = True
            txn.skipping_line = True
            txn.parts.clear()
            del buf[: len(buf) - keep]
            return True
        return False

    def _data_lines(self, txn: _Transaction, lines: bytes) -> None:
        """Check and store complete lines (ending in CRLF, not the terminator), dot-unstuffed (§4.5.2)."""
        if not txn.bare and _has_bare_newline(lines):
            txn.bare = True
        if not txn.too_long and _has_long_line(lines):
            txn.too_long = True
        if txn.refused:
            txn.parts.clear()
            txn.size += len(lines)
            return
        if lines.startswith(b"."):
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", b"\r\n")
        self._store(txn, lines)

    def _store(self, txn: _Transaction, data: bytes) -> None:
        txn.size += len(data)
        if txn.size > self.settings.max_message_size:
            txn.oversize = True
            txn.parts.clear()
        elif not txn.refused:
            txn.parts.append(data)

    def _end_of_data(self, out: list[Action]) -> None:
        txn = self._txn
        assert txn is not None
        self._mode = _Mode.COMMAND
        self._txn = None  # RFC 5321 §4.1.1.4: the end of data ends the transaction, whatever the reply
        refusal = txn.refusal()
        if refusal is not None:
            out.append(_send(refusal))
            return
        self._accept(out, txn, b"".join(txn.parts))

    def _step_bdat(self, out: list[Action]) -> bool:
        chunk = self._chunk
        assert chunk is not None
        if chunk.remaining:
            if not self._buffer:
                return False
            take = min(chunk.remaining, len(self._buffer))
            data = bytes(self._buffer[:take])
            del self._buffer[:take]
            chunk.remaining -= take
            if chunk.error is None and self._txn is not None:
                self._store(self._txn, data)
            return True
        self._chunk = None
        self._mode = _Mode.COMMAND
        txn = self._txn
        if chunk.error is not None or txn is None:
            self._error(out, chunk.error or Reply(503, "5.5.1", "Need MAIL command"))
            return True
        if txn.oversize:
            self._txn = None  # RFC 3030 §2: the transaction has failed; no more chunks will come
            out.append(_send(MESSAGE_TOO_BIG))
            return True
        if not chunk.last:
            out.append(_send(Reply(250, "2.0.0", f"{chunk.size} octets received")))
            return True
        self._txn = None
        message = b"".join(txn.parts)
        if _has_bare_newline(message):
            txn.bare = True
        if _has_long_line(message):
            txn.too_long = True
        refusal = txn.refusal()
        if refusal is not None:
            out.append(_send(refusal))
            return True
        self._accept(out, txn, message)
        return True

    def _accept(self, out: list[Action], txn: _Transaction, body: bytes) -> None:
        """Prepend our Received field (RFC 5321 §4.4) and hand the message to the policy."""
        if self._esmtp:
            protocol = "UTF8SMTP" if txn.smtputf8 else "ESMTP"
            protocol += ("S" if self._tls else "") + ("A" if self._auth is not None else "")
        else:
            protocol = "SMTP"
        header = received_header(
            helo=self._helo or "unknown",
            client_ip=self.connection.client_ip,
            hostname=self.settings.hostname,
            protocol=protocol,
            session_id=self.connection.session_id,
            recipient=txn.rcpts[0] if len(txn.rcpts) == 1 else None,
            when=self._now(),
        )
        message = header + body
        envelope = Envelope(
            mail_from=txn.mail_from,
            rcpt_to=tuple(txn.rcpts),
            body_8bit=txn.body_8bit,
            smtputf8=txn.smtputf8,
            size=len(message),
        )
        self._pending = AcceptMessage(self.session, envelope, message)
        out.append(self._pending)

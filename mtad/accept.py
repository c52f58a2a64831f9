"""Accepting a message: from an envelope and its bytes to queued per-recipient messages in Redis.

This is the step every way in shares (SMTP today, the HTTP send API later; DESIGN "the flow of a message"),
so it knows nothing of SMTP or HTTP. As in Postal, each recipient becomes its own message with its own id
and token, while the body is stored once: `RedisQueue.enqueue` writes the body, every message, its due
entry and its ``message.queued`` event in one script call. When `Acceptor.accept` returns, the messages
are durable (DESIGN invariant 1), and only then may the caller say 250 or HTTP success.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Awaitable, Callable, Sequence

import attrs
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.mail.compose import format_date, new_message_id
from mtad.mail.headers import decode_value as _decode
from mtad.mail.headers import header_addresses, header_section, read_fields
from mtad.queue.model import NewMessage, RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from mtad.store.messages import Scope
from mtad.store.servers import Server, ServerMode

#: Postal's message tokens: twelve random letters and digits (URL-safe, ~71 bits).
TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 12

#: Postal's delivery details for a message held because of its server's mode.
DEVELOPMENT_MODE_HOLD = "Server is in development mode."


class ServerSuspended(Exception):
    """The server is suspended: it may not send, so nothing is queued (SMTP answers ``554 5.7.1``)."""

    def __init__(self, server: Server) -> None:
        super().__init__(f"server {server.full_permalink} is suspended")
        self.server = server


@attrs.frozen
class AcceptedMessage:
    """One recipient's queued message."""

    id: int
    token: str
    rcpt_to: str
    #: The message's Message-ID (without angle brackets) as recorded: the one added if it had none.
    message_id: str | None = None


@attrs.frozen
class MessageHeaders:
    """What the queue and the history need from a message's header section, parsed once per message."""

    #: Decoded to Unicode (RFC 2047 encoded words and RFC 6532 UTF-8 alike); None when absent.
    subject: str | None
    #: Without angle brackets, as Postal stores it; None when absent or empty.
    message_id: str | None
    #: The last ``X-Postal-Tag`` field, as Postal takes it; None when absent or empty.
    tag: str | None


_TOKEN_SPACE = len(TOKEN_ALPHABET) ** TOKEN_LENGTH


def new_token() -> str:
    """A fresh message token as Postal makes them (used in tracking and return paths).

    Unguessable, so from ``secrets``; one uniform draw over all tokens, written in the alphabet's base,
    rather than a draw per character (each a urandom call: a twelfth of the cost, on every message).
    """
    n = secrets.randbelow(_TOKEN_SPACE)
    base = len(TOKEN_ALPHABET)
    chars = []
    for _ in range(TOKEN_LENGTH):
        n, digit = divmod(n, base)
        chars.append(TOKEN_ALPHABET[digit])
    return "".join(chars)


_WANTED = frozenset((b"subject", b"message-id", b"x-postal-tag", b"date"))


def parse_headers(message: bytes) -> MessageHeaders:
    """Subject, Message-ID and tag of ``message``; malformed or missing fields give None, never an error."""
    return _message_headers(read_fields(header_section(message), _WANTED))


def _message_headers(fields: dict[bytes, list[bytes]]) -> MessageHeaders:
    subjects = fields.get(b"subject")
    subject = _decode(subjects[0]) if subjects else None
    ids = fields.get(b"message-id")
    message_id = None
    if ids:
        # As Postal: drop everything up to the last "<" and from the next ">": "<a@b>" → "a@b".
        message_id = _decode(ids[0]).rpartition("<")[2].partition(">")[0].strip()
    tags = fields.get(b"x-postal-tag")
    tag = _decode(tags[-1]).strip() if tags else ""
    return MessageHeaders(subject=subject, message_id=message_id or None, tag=tag or None)


def complete_submission(message: bytes, *, hostname: str, timestamp: float) -> tuple[bytes, MessageHeaders]:
    """``message`` with the Date and Message-ID fields it lacks added, and its headers (`parse_headers`).

    RFC 5322 §3.6 requires both fields; a submission server may add them when missing (RFC 6409 §8.2,
    §8.3; RFC 5321 §6.4), which is what a bare ``EmailMessage`` sent with smtplib needs. Date is
    ``timestamp`` (the time of acceptance), Message-ID is new on ``hostname`` and is the message id
    returned. The header section is read once, for this and for `parse_headers` alike.

    A field is added only where there is none at all. A field that is present but empty or garbled is
    left as it is (Message-ID then records as None, as Postal's parse does): adding a second one would
    break RFC 5322 §3.6's "at most one" and leave receivers to pick, and replacing the sender's field
    would change content the sender wrote (and may have signed itself). The fields go at the end of
    the header section, as Postfix's cleanup adds them, so the trace fields (our Received) stay one
    block at the top (RFC 5322 §3.6: trace fields are kept in blocks prepended to the message). Line
    ends follow the message's first one: CRLF from SMTP, possibly bare LF from the send API.
    """
    section = header_section(message)
    fields = read_fields(section, _WANTED)
    headers = _message_headers(fields)
    added: list[bytes] = []
    if b"date" not in fields:
        added.append(b"Date: " + format_date(timestamp).encode("ascii"))
    if b"message-id" not in fields:
        message_id = new_message_id(hostname)
        added.append(b"Message-ID: <" + message_id.encode("utf-8") + b">")
        headers = attrs.evolve(headers, message_id=message_id)
    if not added:
        return message, headers
    # A message that starts with its blank line has an empty section; look at that line's end then.
    probe = section or message[:2]
    newline = probe.find(b"\n")
    eol = b"\n" if newline >= 0 and probe[newline - 1 : newline] != b"\r" else b"\r\n"
    end = len(section)
    if section and not section.endswith(b"\n"):
        added.insert(0, b"")  # a header-only message whose last line has no line end: end it first
    return message[:end] + eol.join(added) + eol + message[end:], headers


async def headers_authenticated(
    message: bytes, address_allowed: Callable[[str], Awaitable[bool]], *, allow_sender: bool
) -> bool:
    """Whether ``message``'s header fields name a sender its server may send as (Postal's
    ``Server#find_authenticated_domain_from_headers``, for SMTP and ``send/raw`` alike).

    Every From address must be allowed (``address_allowed``); failing that, where the server has
    ``allow_sender``, every Sender address. A missing or empty field never authenticates.
    """
    for name in ("from", "sender") if allow_sender else ("from",):
        addresses = header_addresses(message, name) or [""]
        for address in addresses:
            if not await address_allowed(address):
                break
        else:
            return True
    return False


class Acceptor:
    """Turns one accepted message into per-recipient queued messages with one Redis call.

    ``timeout`` bounds that call on ``clock``: Redis that does not answer in time is `RedisUnavailable`,
    and the caller answers "try again later". The script may still complete after the deadline, so a
    client that retries can cause a duplicate: at-least-once, never a success for a message not stored.
    """

    log = Logger()

    def __init__(
        self,
        queue: RedisQueue,
        clock: IReactorTime,
        *,
        default_pool: str = "default",
        timeout: float = 30.0,
        hostname: str = "localhost",
    ) -> None:
        """``hostname`` (``[general] hostname``) is the domain of the Message-IDs submissions lacking
        one get (`complete_submission`)."""
        self.queue = queue
        self.clock = clock
        self.default_pool = default_pool
        self.timeout = timeout
        self.hostname = hostname

    async def accept(
        self,
        server: Server,
        scope: str,
        mail_from: str,
        rcpt_to: Sequence[str],
        message: bytes,
        *,
        hold_reason: str | None = None,
        limit_hold: bool = False,
        tag: str | None = None,
        received_with_ssl: bool = False,
        bounce: bool = False,
    ) -> list[AcceptedMessage]:
        """Queue ``message`` once for each of ``rcpt_to``; the messages are durable when this returns.

        ``hold_reason`` (e.g. the credential is set to hold) is stored with each message, and the
        delivery service holds such messages rather than delivering them; a server in development mode
        holds with Postal's reason when the caller gave none. ``limit_hold``: the hold is the server's
        send limit's, which releases it when its window has room (`mtad.limits.release`). ``tag``
        defaults to the message's ``X-Postal-Tag`` field, as in Postal. Raises `ServerSuspended` or
        `RedisUnavailable`.

        Every way in submits through here, so an outgoing message (a submission) lacking Date or
        Message-ID gets them here, before anything stores or signs it (`complete_submission`); its
        recorded Message-ID (queue and ``message.queued`` event) is then the added one, as returned in
        each `AcceptedMessage`. Incoming mail is relayed as it came (RFC 5321 §6.4: only an originating
        or submission server may add them).
        """
        if server.suspended:
            raise ServerSuspended(server)
        if not rcpt_to:
            raise ValueError("a message needs at least one recipient")
        if not hold_reason and server.mode is ServerMode.DEVELOPMENT:
            hold_reason = DEVELOPMENT_MODE_HOLD
        now = self.clock.seconds()
        if scope == Scope.OUTGOING.value:
            message, headers = complete_submission(message, hostname=self.hostname, timestamp=now)
        else:
            headers = parse_headers(message)
        if tag is None:
            tag = headers.tag
        fields: dict[str, str] = {}
        if headers.message_id is not None:
            fields["message_id"] = headers.message_id
        if headers.subject is not None:
            # Delivery events (and so webhooks) name the subject; the queue keeps no other copy of it.
            fields["subject"] = headers.subject
        if tag:
            fields["tag"] = tag
        if hold_reason:
            fields["hold_reason"] = hold_reason
            if limit_hold:
                fields["limit_hold"] = str(server.id)
        event = {
            "subject": headers.subject,
            "message_id": headers.message_id,
            "tag": tag or None,
            "received_with_ssl": received_with_ssl,
            "bounce": bounce,
        }
        new = [
            NewMessage(
                token=new_token(),
                server_id=server.id,
                scope=scope,
                mail_from=mail_from,
                rcpt_to=rcpt,
                pool=self.default_pool,
                fields=fields,
                event=event,
            )
            for rcpt in rcpt_to
        ]
        d = self.queue.enqueue(message, new, now)
        d.addTimeout(self.timeout, self.clock)
        try:
            ids = await d
        except DeferredTimeoutError:
            raise RedisUnavailable(f"Redis did not store the message within {self.timeout} s") from None
        # No log line here: the SMTP server logs each message with its reply (ids included) and the HTTP
        # site each request; a third line per message costs the send API a twentieth of its CPU.
        return [
            AcceptedMessage(id=i, token=m.token, rcpt_to=m.rcpt_to, message_id=headers.message_id)
            for i, m in zip(ids, new, strict=True)
        ]

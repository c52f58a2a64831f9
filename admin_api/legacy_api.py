"""``/api/v1``: Postal's legacy HTTP API (send/message, send/raw, messages/message, messages/deliveries).

The wire format is Postal's (``app/controllers/legacy_api/*.rb`` at 3.3.6), so Postal's clients work
unchanged: GET, POST, PUT and PATCH alike; parameters as a JSON body or a ``params`` field holding JSON
(and, beyond Postal, as Rails-style form and query fields: `admin_api.params.request_params`);
the server named by the ``X-Server-API-Key`` header; and always HTTP 200 with the envelope
``{"status": "success" | "error" | "parameter-error", "time": seconds, "flags": {}, "data": {...}}``.

Who may send what is the submission policy's (`mtad.submission.SubmissionPolicy`, shared with SMTP);
this module asks it in Postal's order and words its answers as Postal's errors. Sending is built for
throughput: once the policy's caches are warm, a send does no SQL at all and exactly one Redis call, the
`Acceptor`'s, which stores the body once and one message per recipient; success is only answered after
that call returns, so success means durable (DESIGN invariant 1). A revoked key, a suspended server or a
newly verified domain take effect within the policy's ``cache_seconds``; recording a credential's last
use runs beside the request, never in its way.

Where we differ from Postal, on purpose:

- ``id`` may be a string of digits (Postal answers HTTP 500); a message still only in the queue (not yet
  recorded in SQL) is found too.
- Addresses, custom field names and base64 are checked, and malformed ones are a ``parameter-error``
  naming the parameter (Postal queued messages that could never be delivered, or decoded garbage).
- A recipient given twice gets one message. ``bounce: true`` sends with the null reverse-path ``<>``
  (RFC 5321 §4.5.5), which is what Postal does at delivery time.
- Failures Postal never had to report: ``QueueUnavailable`` and ``QueueFull`` (nothing was stored: try
  again later), ``TemporaryFailure`` (the database or domain check did not answer), ``MessageTooLarge``,
  and ``InternalError``. All are ``status: "error"``; none is ever answered for a stored message.
- The bodies, attachments, headers and raw message of ``messages/message`` come from the queue until the
  message is recorded, then from the raw messages kept in SQL (`mtad.store.raw_messages`). Once retention
  has deleted the raw message they are what Postal answers for a purged one (`PURGED_RAW_EXPANSIONS`);
  unlike Postal, ``details.size`` keeps the message's size.
"""

from __future__ import annotations

import base64
import copy
import email.parser
import email.policy
import email.utils
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from email.message import EmailMessage
from typing import Any, Concatenate, ParamSpec, TypeVar

import attrs
from klein import Klein
from sqlalchemy.engine import Connection
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from admin_api import params as p
from admin_api.params import ParameterError
from mtad.accept import parse_headers
from mtad.mail.compose import Attachment, Draft, compose, new_message_id, received_value
from mtad.mail.headers import header_section
from mtad.queue.redis_queue import RedisQueue
from mtad.store.credentials import Credential
from mtad.store.db import Database
from mtad.store.messages import Delivery, Message, MessageStatus, Scope, find_message, list_deliveries
from mtad.store.raw_messages import raw_message_data
from mtad.store.servers import Server
from mtad.submission.answers import Permit, Refusal, Refused, Submitter
from mtad.submission.credentials import find_api_credential as find_api_credential  # manage_api's
from mtad.submission.policy import SubmissionPolicy
from mtad.submission.unavailable import PolicyUnavailable

P = ParamSpec("P")
T = TypeVar("T")

#: Postal routes every legacy API path for these four methods.
METHODS = ["GET", "POST", "PUT", "PATCH"]

#: Postal's limit per address list (To, Cc and Bcc each).
MAX_ADDRESSES = 50

#: Postal's texts for the errors of ``send/message`` (``LegacyAPI::SendController::ERROR_MESSAGES``).
SEND_ERRORS = {
    "NoRecipients": "There are no recipients defined to receive this message",
    "NoContent": "There is no content defined for this e-mail",
    "TooManyToAddresses": "The maximum number of To addresses has been reached (maximum 50)",
    "TooManyCCAddresses": "The maximum number of CC addresses has been reached (maximum 50)",
    "TooManyBCCAddresses": "The maximum number of BCC addresses has been reached (maximum 50)",
    "FromAddressMissing": "The From address is missing and is required",
    "UnauthenticatedFromAddress": "The From address is not authorised to send mail from this server",
    "AttachmentMissingName": "An attachment is missing a name",
    "AttachmentMissingData": "An attachment is missing data",
}

#: Expansions that need the message itself, not just its history row.
RAW_EXPANSIONS = frozenset({"plain_body", "html_body", "attachments", "headers", "raw_message"})

#: Postal's expansions for a message whose raw message is gone (``Postal::MessageDB::Message`` once
#: retention has set ``raw_table`` to NULL): no parsed mail, so no bodies and no attachments; headers parsed
#: from empty headers; and ``raw_message`` is the empty headers and body joined by a blank line, base64.
PURGED_RAW_EXPANSIONS: dict[str, Any] = {
    "plain_body": None,
    "html_body": None,
    "attachments": [],
    "headers": {},
    "raw_message": "DQoNCg==\n",
}

#: A request body may be this many times the largest message (plus 1 MiB): base64 makes a message a third
#: larger, and JSON escaping of non-ASCII text can make it larger still.
REQUEST_SIZE_FACTOR = 2

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.default)
_RAW_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_PARSER = email.parser.BytesParser(policy=email.policy.default)


#: Attachment octets up to which a message is built inline; larger ones go to ``in_thread``.
INLINE_COMPOSE_LIMIT = 256 * 1024

#: Runs a function in a worker thread: ``in_thread(fn)`` fires with ``fn()``'s result.
InThread = Callable[[Callable[[], bytes]], Awaitable[bytes]]


class APIError(Exception):
    """An ``error`` envelope: Postal's ``code`` plus ``message`` and any other data."""

    def __init__(self, code: str, message: str | None = None, **data: Any) -> None:
        super().__init__(code)
        self.code = code
        self.data = {**({"message": message} if message is not None else {}), **data}


def send_error(code: str) -> APIError:
    return APIError(code, SEND_ERRORS[code])


def temporary_failure(what: str) -> APIError:
    return APIError("TemporaryFailure", f"{what} did not answer; nothing was done, try again later")


#: Postal's error for each refusal the send API can meet (``data.code`` and ``data.message``).
REFUSAL_ERRORS = {
    Refusal.SERVER_SUSPENDED: ("ServerSuspended", "The mail server has been suspended"),
    Refusal.FROM_NOT_ALLOWED: ("UnauthenticatedFromAddress", SEND_ERRORS["UnauthenticatedFromAddress"]),
    Refusal.QUEUE_FULL: (
        "QueueFull",
        "The queue is out of storage; the message was not queued, try again later",
    ),
    Refusal.QUEUE_UNAVAILABLE: (
        "QueueUnavailable",
        "The queue is unavailable; the message was not queued, try again later",
    ),
    Refusal.SEND_LIMIT_EXCEEDED: (
        "SendLimitExceeded",
        "The mail server's send limit has been reached; the message was not queued, try again later",
    ),
}


def refusal_error(refused: Refused) -> APIError:
    """The submission policy's "no" as Postal's error."""
    code, message = REFUSAL_ERRORS.get(
        refused.reason, ("InvalidServerAPIKey", "The API token provided in X-Server-API-Key was not valid.")
    )
    return APIError(code, message)


@attrs.frozen
class Caller:
    """Who is asking: the API credential and its server (the submitter), and the client's address."""

    submitter: Submitter
    client_ip: str

    @property
    def credential(self) -> Credential:
        return self.submitter.credential

    @property
    def server(self) -> Server:
        return self.submitter.server


def find_message_and_raw(conn: Connection, id: int, with_raw: bool) -> tuple[Message, bytes | None] | None:
    """A recorded message and (if ``with_raw``) its raw message, None when gone; None if not recorded."""
    message = find_message(conn, id)
    if message is None:
        return None
    if not with_raw or message.raw_message_id is None:
        return message, None
    return message, raw_message_data(conn, message.raw_message_id)


def find_deliveries(conn: Connection, server_id: int, message_id: int) -> list[Delivery] | None:
    """The delivery attempts of one of the server's messages; None if the server has no such message."""
    message = find_message(conn, message_id)
    if message is None or message.server_id != server_id:
        return None
    return list_deliveries(conn, message_id)


def ruby_base64(data: bytes) -> str:
    """Base64 as Ruby's ``Base64.encode64`` writes it (Postal's API): 60-character lines, each ending in
    a newline."""
    text = base64.b64encode(data).decode("ascii")
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))


def _body_text(message: EmailMessage, subtype: str) -> str | None:
    try:
        part = message.get_body(preferencelist=(subtype,))
        if part is None or part.get_content_type() != f"text/{subtype}":
            return None
        content = part.get_content()
    except Exception:
        return None
    # Lines end in CRLF on the wire; JSON clients expect text with plain newlines.
    return content.replace("\r\n", "\n") if isinstance(content, str) else None


def _attachments(message: EmailMessage) -> list[dict[str, Any]]:
    found = []
    for part in message.walk():
        if part.is_multipart() or (part.get_filename() is None and not part.is_attachment()):
            continue
        try:
            data = part.get_payload(decode=True)
        except Exception:
            continue
        data = data if isinstance(data, bytes) else b""
        found.append(
            {
                "filename": str(part.get_filename() or ""),
                "content_type": part.get_content_type(),
                "data": ruby_base64(data),
                "size": len(data),
                "hash": hashlib.sha1(data).hexdigest(),
            }
        )
    return found


def _headers(raw: bytes) -> dict[str, list[str]]:
    """Every field by lower-case name, values decoded, in order (Postal's ``message.headers``)."""
    headers: dict[str, list[str]] = {}
    for name, value in _HEADER_PARSER.parsebytes(header_section(raw)).raw_items():
        try:
            text = str(email.policy.default.header_fetch_parse(name, value))
        except Exception:  # a field the modern parser cannot decode: its raw value, unfolded
            text = " ".join(value.split())
        headers.setdefault(name.lower(), []).append(text)
    return headers


def raw_expansions(raw: bytes | None, wanted: frozenset[str]) -> dict[str, Any]:
    """The expansions read from the message itself; Postal's purged answer when it is gone (None)."""
    if raw is None:
        return {name: copy.copy(value) for name, value in PURGED_RAW_EXPANSIONS.items() if name in wanted}
    data: dict[str, Any] = {}
    parsed: EmailMessage | None
    try:
        parsed = _PARSER.parsebytes(raw)
    except Exception:
        parsed = None
    if "plain_body" in wanted:
        data["plain_body"] = None if parsed is None else _body_text(parsed, "plain")
    if "html_body" in wanted:
        data["html_body"] = None if parsed is None else _body_text(parsed, "html")
    if "attachments" in wanted:
        data["attachments"] = None if parsed is None else _attachments(parsed)
    if "headers" in wanted:
        data["headers"] = _headers(raw)
    if "raw_message" in wanted:
        data["raw_message"] = ruby_base64(raw)
    return data


def message_data(message: Message, wanted: frozenset[str], raw: bytes | None) -> dict[str, Any]:
    """``messages/message``'s answer, keys as Postal's ``MessagesController#message`` writes them."""
    data: dict[str, Any] = {"id": message.id, "token": message.token}
    if "status" in wanted:
        data["status"] = {
            "status": message.status.value,
            "last_delivery_attempt": message.last_delivery_attempt,
            "held": message.held,
            "hold_expiry": message.hold_expiry,
        }
    if "details" in wanted:
        data["details"] = {
            "rcpt_to": message.rcpt_to,
            "mail_from": message.mail_from,
            "subject": message.subject,
            "message_id": message.message_id,
            "timestamp": message.timestamp,
            "direction": message.scope.value,
            # A string, as Postal's varchar column gives it.
            "size": str(message.size),
            # Postal's column defaults to 0, not null, for a message that is no bounce of ours.
            "bounce": message.bounce,
            "bounce_for_id": message.bounce_for_id or 0,
            "tag": message.tag,
            "received_with_ssl": message.received_with_ssl,
        }
    if "inspection" in wanted:
        # No spam or threat inspection yet: Postal's values for an uninspected message.
        data["inspection"] = {
            "inspected": False,
            "spam": False,
            "spam_score": 0.0,
            "threat": False,
            "threat_details": None,
        }
    data.update(raw_expansions(raw, wanted & RAW_EXPANSIONS))
    if "activity_entries" in wanted:
        # Open and click tracking are not there yet.
        data["activity_entries"] = {"loads": [], "clicks": []}
    return data


def delivery_data(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "status": delivery.status.value,
        "details": delivery.details,
        "output": delivery.output.strip() if delivery.output is not None else None,
        "sent_with_ssl": delivery.sent_with_ssl,
        "log_id": delivery.log_id,
        "time": delivery.time,
        "timestamp": delivery.timestamp,
    }


def queued_message(id: int, fields: Mapping[str, str], body: bytes) -> Message:
    """A message from its queue entry, for one accepted but not yet recorded in SQL (status Pending, or
    Held when it waits in the held set)."""
    held = fields.get("state") == "held"
    try:
        scope = Scope(fields.get("scope", ""))
    except ValueError:
        scope = Scope.OUTGOING
    return Message(
        id=id,
        token=fields.get("token", ""),
        server_id=int(fields.get("server_id", "0")),
        scope=scope,
        rcpt_to=fields.get("rcpt_to", ""),
        mail_from=fields.get("mail_from", ""),
        subject=parse_headers(body).subject,
        message_id=fields.get("message_id"),
        size=len(body),
        status=MessageStatus.HELD if held else MessageStatus.PENDING,
        held=held,
        hold_expiry=None,
        last_delivery_attempt=None,
        tag=fields.get("tag"),
        timestamp=float(fields.get("created_at", "0")),
    )


def _client_ip(request: IRequest) -> str:
    address = request.getClientAddress()  # type: ignore[no-untyped-call]
    if isinstance(address, IPv4Address | IPv6Address):
        return str(address.host)
    return "127.0.0.1"


class LegacyAPI:
    """The ``/api/v1`` Klein app; serve ``LegacyAPI(...).app.resource()`` in the daemon's Site.

    ``submission`` decides who may send what (credentials, may-send-as, holds) and queues what it
    permits. ``database`` and ``queue`` answer ``messages/*``; every database call there is bounded by
    ``timeout`` seconds.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        database: Database,
        submission: SubmissionPolicy,
        queue: RedisQueue,
        *,
        max_message_size: int,
        hostname: str,
        timeout: float = 30.0,
        in_thread: InThread | None = None,
    ) -> None:
        """``in_thread`` runs CPU-heavy work (building a message with large attachments) off the reactor
        thread; without it, that work runs inline."""
        self.in_thread = in_thread
        self.clock = clock
        self.database = database
        self.submission = submission
        self.queue = queue
        self.max_message_size = max_message_size
        self.max_request_size = REQUEST_SIZE_FACTOR * max_message_size + 1024 * 1024
        self.hostname = hostname
        self.timeout = timeout

    # -- routes ---------------------------------------------------------------------------------------

    @app.route("/api/v1/send/message", methods=METHODS)
    async def send_message_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.send_message)

    @app.route("/api/v1/send/raw", methods=METHODS)
    async def send_raw_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.send_raw)

    @app.route("/api/v1/messages/message", methods=METHODS)
    async def message_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.message)

    @app.route("/api/v1/messages/deliveries", methods=METHODS)
    async def deliveries_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.deliveries)

    # -- envelope -------------------------------------------------------------------------------------

    async def _respond(
        self, request: IRequest, action: Callable[[Caller, dict[str, Any]], Awaitable[Any]]
    ) -> bytes:
        """Authenticate, read the parameters, run ``action`` and wrap what it gives in Postal's envelope."""
        start = self.clock.seconds()
        status = "success"
        data: Any
        try:
            caller = await self._authenticate(request)
            data = await action(caller, self._params(request))
        except APIError as e:
            status, data = "error", {**e.data, "code": e.code}
        except ParameterError as e:
            status, data = "parameter-error", {"message": e.message}
        except PolicyUnavailable as e:  # logged by the policy
            error = temporary_failure(e.what)
            status, data = "error", {**error.data, "code": error.code}
        except CancelledError:
            # Klein cancels the handler when the client closes the connection: nobody is left to answer.
            # A send may have been queued all the same (as when the answer is lost on the way).
            self.log.info(
                "legacy API: the client closed the connection before {path} was answered", path=request.path
            )
            raise
        except Exception:
            self.log.failure("legacy API request {path} failed", path=request.path)
            status = "error"
            data = {
                "code": "InternalError",
                "message": "An unexpected error occurred and has been logged; the request may not have "
                "been completed",
            }
        envelope = {
            "status": status,
            "time": round(self.clock.seconds() - start, 3),
            "flags": {},
            "data": data,
        }
        request.setHeader(b"content-type", b"application/json; charset=utf-8")  # type: ignore[no-untyped-call]
        return json.dumps(envelope).encode("ascii")

    def _params(self, request: IRequest) -> dict[str, Any]:
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        if size > self.max_request_size:
            raise APIError(
                "MessageTooLarge",
                f"The request body is {size} bytes; the largest accepted is {self.max_request_size} bytes",
            )
        content.seek(0)
        body = content.read()
        raw_type = request.getHeader(b"content-type")  # type: ignore[no-untyped-call]
        content_type = (raw_type or b"").decode("latin-1")
        # The raw query and body rather than Twisted's ``request.args``: those are read for POST only,
        # grouped by name (losing the order ``attachments[][name]`` needs) and split on ";" as well.
        query = request.uri.partition(b"?")[2]
        return p.request_params(content_type, body, query)

    # -- authentication -------------------------------------------------------------------------------

    async def _authenticate(self, request: IRequest) -> Caller:
        """The caller named by ``X-Server-API-Key``, with Postal's three errors."""
        header = request.getHeader(b"x-server-api-key")  # type: ignore[no-untyped-call]
        key = header.decode("utf-8", "replace").strip() if header else ""
        if not key:
            raise APIError("AccessDenied", "Must be authenticated as a server.")
        found = await self.submission.api_submitter(key)
        if isinstance(found, Refused):
            if found.reason is Refusal.UNKNOWN_CREDENTIAL:
                raise APIError(
                    "InvalidServerAPIKey",
                    "The API token provided in X-Server-API-Key was not valid.",
                    token=key,
                )
            raise refusal_error(found)
        return Caller(submitter=found, client_ip=_client_ip(request))

    async def _db(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a unit of work; `TemporaryFailure` if it fails or takes more than ``timeout``."""
        d = self.database.run(fn, *args, **kwargs)
        d.addTimeout(self.timeout, self.clock)
        try:
            return await d
        except DeferredTimeoutError:
            self.log.warn("legacy API: the database did not answer within {timeout} s", timeout=self.timeout)
            raise temporary_failure("The database") from None
        except Exception:
            self.log.failure("legacy API: database lookup failed")
            raise temporary_failure("The database") from None

    # -- send -----------------------------------------------------------------------------------------

    async def send_message(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        """``send/message``: build the message from fields, one message per recipient."""
        given = p.parse_send_message(params)
        # Postal's checks, in Postal's order (OutgoingMessagePrototype#validate; the first one wins).
        if not (given.to or given.cc or given.bcc):
            raise send_error("NoRecipients")
        for addresses, code in (
            (given.to, "TooManyToAddresses"),
            (given.cc, "TooManyCCAddresses"),
            (given.bcc, "TooManyBCCAddresses"),
        ):
            if len(addresses) > MAX_ADDRESSES:
                raise send_error(code)
        if p.is_blank(given.plain_body) and p.is_blank(given.html_body):
            raise send_error("NoContent")
        if given.from_ is None:
            raise send_error("FromAddressMissing")
        permit = await self.submission.may_send_as(
            caller.submitter, given.from_.address, given.sender.address if given.sender else None
        )
        if isinstance(permit, Refused):
            raise refusal_error(permit)
        for attachment in given.attachments:
            if not attachment.name.strip():
                raise send_error("AttachmentMissingName")
            if not attachment.data:
                raise send_error("AttachmentMissingData")
        now = self.clock.seconds()
        message_id = new_message_id(self.hostname)
        draft = Draft(
            from_=given.from_,
            to=given.to,
            cc=given.cc,
            sender=given.sender,
            reply_to=given.reply_to,
            subject=given.subject,
            plain_body=given.plain_body,
            html_body=given.html_body,
            headers=given.headers,
            attachments=tuple(
                Attachment(filename=a.name, content_type=a.content_type, data=a.data or b"")
                for a in given.attachments
            ),
        )
        received = received_value(caller.client_ip, self.hostname, now)
        attached = sum(len(a.data) for a in draft.attachments)
        if self.in_thread is not None and attached > INLINE_COMPOSE_LIMIT:
            # Encoding megabytes of attachments takes tens of milliseconds per megabyte: not on the reactor.
            message = await self.in_thread(
                lambda: compose(draft, message_id=message_id, timestamp=now, received=received)
            )
        else:
            message = compose(draft, message_id=message_id, timestamp=now, received=received)
        recipients = [m.address for m in (*given.to, *given.cc, *given.bcc)]
        mail_from = "" if given.bounce else given.from_.address
        messages, _ = await self._accept(
            permit, mail_from, recipients, message, tag=given.tag, bounce=given.bounce
        )
        return {"message_id": message_id, "messages": messages}

    async def send_raw(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        """``send/raw``: a complete message, base64, for the given envelope."""
        given = p.parse_send_raw(params)
        self._check_size(len(given.data))
        permit = await self.submission.may_send_message(caller.submitter, given.data)
        if isinstance(permit, Refused):
            raise refusal_error(permit)
        recipients = list(dict.fromkeys(given.rcpt_to))
        if not recipients:
            return {"message_id": None, "messages": {}}
        mail_from = "" if given.bounce else given.mail_from
        # The Message-ID as queued: the message's own, or the one accepting added (`complete_submission`).
        messages, message_id = await self._accept(
            permit, mail_from, recipients, given.data, tag=None, bounce=given.bounce
        )
        return {"message_id": message_id, "messages": messages}

    def _check_size(self, size: int) -> None:
        if size > self.max_message_size:
            raise APIError(
                "MessageTooLarge",
                f"The message is {size} bytes; the largest accepted is {self.max_message_size} bytes",
            )

    async def _accept(
        self,
        permit: Permit,
        mail_from: str,
        recipients: list[str],
        message: bytes,
        *,
        tag: str | None,
        bounce: bool,
    ) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Queue ``message`` once per distinct recipient (one Redis call); Postal's ``messages`` map and
        the Message-ID the messages were queued with. ``bounce``: the caller says it is a bounce, which
        is recorded (Postal's ``bounce`` column) as well as sent from ``<>``."""
        self._check_size(len(message))
        unique = list(dict.fromkeys(recipients))
        # As Postal records every message sent through its API: received_with_ssl.
        queued = await self.submission.submit(
            permit, mail_from, unique, message, tag=tag, received_with_ssl=True, bounce=bounce
        )
        if isinstance(queued, Refused):
            if queued.detail:
                self.log.warn("legacy API: message not queued: {error}", error=queued.detail)
            raise refusal_error(queued)
        accepted = queued.messages
        return {m.rcpt_to: {"id": m.id, "token": m.token} for m in accepted}, accepted[0].message_id

    # -- messages -------------------------------------------------------------------------------------

    async def message(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        """``messages/message``: one of the server's messages, with the expansions asked for."""
        given, id = p.message_id(params)
        wanted = p.expansions(params)
        raw_wanted = bool(wanted & RAW_EXPANSIONS)
        message: Message | None = None
        raw: bytes | None = None
        if id is not None:
            found = await self._db(find_message_and_raw, id, raw_wanted)
            if found is not None:
                message, raw = found
            if message is not None and message.server_id != caller.server.id:
                raise APIError("MessageNotFound", "No message found matching provided ID", id=given)
        # Not recorded yet, recorded without a raw message in SQL, or only a stand-in for it recorded by
        # its delivery: while it is still queued (a retry, a hold), the queue has what SQL lacks.
        if id is not None and (message is None or message.stand_in or (raw_wanted and raw is None)):
            queued = await self._queued(caller.server, id, required=message is None)
            if queued is not None:
                fields, raw = queued
                if message is None:
                    message = queued_message(id, fields, raw)
                elif message.stand_in:
                    message = attrs.evolve(
                        queued_message(id, fields, raw),
                        status=message.status,
                        held=message.held,
                        hold_expiry=message.hold_expiry,
                        last_delivery_attempt=message.last_delivery_attempt,
                    )
        if message is None:
            raise APIError("MessageNotFound", "No message found matching provided ID", id=given)
        return message_data(message, wanted, raw)

    async def deliveries(self, caller: Caller, params: dict[str, Any]) -> list[dict[str, Any]]:
        """``messages/deliveries``: the delivery attempts of one of the server's messages, oldest first."""
        given, id = p.message_id(params)
        found = None if id is None else await self._db(find_deliveries, caller.server.id, id)
        if found is None:
            if id is not None and await self._queued(caller.server, id, required=True) is not None:
                return []  # accepted, not recorded yet: no attempt so far
            raise APIError("MessageNotFound", "No message found matching provided ID", id=given)
        return [delivery_data(d) for d in found]

    async def _queued(
        self, server: Server, id: int, *, required: bool
    ) -> tuple[dict[str, str], bytes] | None:
        """The queue entry and body of one of ``server``'s messages while it is still queued.

        If Redis fails and the answer depends on it (``required``) that is a `TemporaryFailure`;
        otherwise the body is reported as unavailable.
        """
        try:
            fields = await self.queue.message_fields(id)
            if not fields or fields.get("server_id") != str(server.id):
                return None
            body = await self.queue.body(fields)
        except Exception as e:
            self.log.warn(
                "legacy API: could not read message {id} from the queue: {error}", id=id, error=str(e)
            )
            if required:
                raise temporary_failure("The queue") from None
            return None
        return (fields, body) if body is not None else None

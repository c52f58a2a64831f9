"""``/api/v2``: mtad's own management API, for one server at a time: held messages, webhooks and the
suppression list.

Unlike ``/api/v1`` this API owes nothing to Postal's wire format, so it speaks plain HTTP: JSON in and out,
and the status code says what happened: 200 done; 201 created; 400 bad input, with an error naming the
field; 401 no or an unknown API key; 403 the server is suspended; 404 no such (held) message or webhook of
this server; 503 Redis or the database did not answer (nothing was done, or, in bulk, the error lists the
ids done in ``completed``). Every error body is ``{"error": {"code": ..., "message": ..., "field": ...}}``.
``GET /api/v2/openapi.json`` serves the OpenAPI document (`admin_api.manage_openapi`), which a test keeps
equal to the routes served here.

The caller is the server whose API credential is in ``X-Server-API-Key``, looked up as the legacy API
looks it up (`admin_api.legacy_api.find_api_credential`), but on every request: management calls are few,
and a revoked key or a suspended server must stop them at once. Everything is scoped to that server: a
message of another server is answered exactly like one that does not exist.

Held messages are listed from SQL (status ``Held`` as the recorder wrote it, so a message held a moment
ago may not be listed yet) and released or cancelled in Redis (`mtad.outbound.held_actions`), where the
hold lives: a message listed as held may have been released, cancelled or expired since, and is then
reported as not held.

Webhooks (`mtad.store.webhooks`) are the server's own; a webhook is named in paths by its id or its uuid.
Their request log is read newest first in pages: each page's ``next_before`` is the ``before`` of the next.

The suppression list (`mtad.store.suppressions`) is the server's own too: paged by page number with
the total (filtered by ``source`` and an address substring ``search``), an entry named in paths by its
address; ``GET /api/v2/suppressions/export`` streams the whole list as JSON lines or CSV
(`mtad.suppression.export`), read in chunks of one short transaction each.

Endpoints and routes (`mtad.store.routes`) say where the server's incoming mail goes: an endpoint (HTTP,
SMTP or an address to forward to) is named in paths by its uuid or name (matched first), or its id; a
route by its uuid, forwarding token or address (``local@domain``, ``*@domain``, ``__returnpath__``), or
its id. The store's rules decide what may be added; its errors name the field (400), a name or address
already taken is 409.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

import attrs
import sqlalchemy as sa
from klein import Klein
from sqlalchemy.engine import Connection
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from admin_api.legacy_api import find_api_credential
from admin_api.manage_openapi import OPENAPI
from mtad.config import SuppressionConfig
from mtad.outbound.held_actions import (
    CONCURRENCY,
    NOT_HELD,
    HeldAction,
    HeldActionFailed,
    act_on_held,
    act_on_one,
)
from mtad.queue.model import RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from mtad.store import routes as route_store
from mtad.store import suppressions as suppression_store
from mtad.store import webhooks as webhook_store
from mtad.store.credentials import Credential, touch_credential
from mtad.store.db import AlreadyExists, Database, FieldError
from mtad.store.db import NotFound as StoreNotFound
from mtad.store.messages import HeldFilter, Message, held_message_ids, list_held_messages
from mtad.store.routes import Endpoint, EndpointKind, Route, RouteError
from mtad.store.servers import Server
from mtad.store.suppressions import Suppression, SuppressionError
from mtad.store.webhooks import Webhook, WebhookRequest
from mtad.suppression import export as suppression_export
from mtad.suppression.policy import expires_at as suppression_expiry

P = ParamSpec("P")
T = TypeVar("T")

#: Message ids are 64-bit (``messages.id`` is a BIGINT).
MAX_ID = 2**63 - 1

#: ``GET /api/v2/held`` lists this many messages unless ``limit`` says otherwise, and at most ``MAX_LIMIT``.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

#: Ids one bulk request may name (filters and ``all`` have no limit).
MAX_BULK_IDS = 10_000

#: The filters of held messages, in the query of ``GET /api/v2/held`` and the body of bulk requests.
FILTERS = ("rcpt_to", "mail_from", "before")

#: A credential's last use is written at most this often.
TOUCH_SECONDS = 60.0

#: The fields of a webhook in ``POST /api/v2/webhooks`` and ``PATCH /api/v2/webhooks/{id}``.
WEBHOOK_FIELDS = ("url", "name", "events", "enabled")

#: The fields of an entry in ``POST /api/v2/suppressions``.
SUPPRESSION_FIELDS = ("address", "source", "reason", "expires_at")

#: The fields of each kind of endpoint in ``POST /api/v2/endpoints``, besides ``kind`` and ``name``; the
#: first is required.
ENDPOINT_FIELDS: dict[EndpointKind, tuple[str, ...]] = {
    EndpointKind.HTTP: ("url", "encoding", "format", "strip_replies", "include_attachments", "timeout"),
    EndpointKind.SMTP: ("hostname", "port", "tls_mode"),
    EndpointKind.ADDRESS: ("address",),
}

#: The fields of a route in ``POST /api/v2/routes``.
ROUTE_FIELDS = ("address", "mode", "spam_mode", "endpoints")

_DIGITS = re.compile(r"[0-9]{1,19}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ROUTE_PARAMETER = re.compile(r"<(?:[a-z_]+:)?([a-z_]+)>")


class ManageError(Exception):
    """An error answer: HTTP ``status`` and the JSON error (``field`` names the input at fault)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field, **self.extra}}


def bad_input(field: str | None, message: str) -> ManageError:
    return ManageError(400, "InvalidParameter", message, field)


def not_held(message_id: int) -> ManageError:
    return ManageError(404, "NotHeld", f"message {message_id} is {NOT_HELD}")


def queue_unavailable(**extra: Any) -> ManageError:
    return ManageError(503, "QueueUnavailable", "The queue (Redis) did not answer; try again later", **extra)


def webhook_not_found(ref: str) -> ManageError:
    return ManageError(404, "WebhookNotFound", f"the server has no webhook {ref}")


def suppression_not_found(address: str) -> ManageError:
    return ManageError(404, "SuppressionNotFound", f"{address} is not on the server's suppression list")


def endpoint_not_found(ref: str) -> ManageError:
    return ManageError(404, "EndpointNotFound", f"the server has no endpoint {ref!r}")


def route_not_found(ref: str) -> ManageError:
    return ManageError(404, "RouteNotFound", f"the server has no route {ref!r}")


def database_unavailable() -> ManageError:
    return ManageError(503, "DatabaseUnavailable", "The database did not answer; try again later")


# -- input ------------------------------------------------------------------------------------------------


def parse_time(field: str, value: object) -> float:
    """A time given as Unix seconds (a number) or an ISO 8601 / RFC 3339 date or date-time (UTC unless it
    has an offset)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise bad_input(field, f"`{field}` must be a finite number of seconds")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            return _iso_time(field, text)
        if not math.isfinite(seconds):
            raise bad_input(field, f"`{field}` must be a finite number of seconds")
        return seconds
    raise bad_input(field, f"`{field}` must be Unix seconds or an ISO 8601 date-time")


def _iso_time(field: str, text: str) -> float:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise bad_input(
            field, f"`{field}` is not a time: {text!r} (use 2024-05-01T12:00:00Z or Unix seconds)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_address_pattern(field: str, value: object) -> str:
    """A recipient or sender filter: an address, ``*`` matching any run of characters."""
    if not isinstance(value, str) or not value.strip():
        raise bad_input(field, f"`{field}` must be a non-empty string (an address; * matches anything)")
    return value.strip()


def parse_message_id(field: str, value: object) -> int:
    """A message id: a positive 64-bit integer (a JSON integer, not a string, a float or a boolean)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_ID:
        raise bad_input(field, f"`{field}` must be a message id (a positive integer)")
    return value


def held_filter(server: Server, given: Mapping[str, object]) -> HeldFilter:
    """The server's held messages that match the filters in ``given`` (already checked to be known)."""
    return HeldFilter(
        server_id=server.id,
        rcpt_to=parse_address_pattern("rcpt_to", given["rcpt_to"]) if "rcpt_to" in given else None,
        mail_from=parse_address_pattern("mail_from", given["mail_from"]) if "mail_from" in given else None,
        held_before=parse_time("before", given["before"]) if "before" in given else None,
    )


@attrs.frozen
class ListQuery:
    where: HeldFilter
    limit: int


def query_parameters(args: Mapping[bytes, list[bytes]], known: tuple[str, ...]) -> dict[str, str]:
    """A query's parameters: each of ``known`` at most once, no others."""
    given: dict[str, str] = {}
    for raw_name, values in args.items():
        name = raw_name.decode("utf-8", "replace")
        if name not in known:
            raise bad_input(name, f"unknown query parameter `{name}`")
        if len(values) != 1:
            raise bad_input(name, f"`{name}` given {len(values)} times")
        try:
            given[name] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise bad_input(name, f"`{name}` is not UTF-8") from None
    return given


def parse_limit(given: dict[str, str]) -> int:
    """The ``limit`` of a list (removed from ``given``): 1 to `MAX_LIMIT`, `DEFAULT_LIMIT` if absent."""
    if "limit" not in given:
        return DEFAULT_LIMIT
    text = given.pop("limit")
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
        raise bad_input("limit", f"`limit` must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def parse_list_query(server: Server, args: Mapping[bytes, list[bytes]]) -> ListQuery:
    """The query of ``GET /api/v2/held``: each known parameter at most once, no unknown ones."""
    given = query_parameters(args, (*FILTERS, "limit"))
    limit = parse_limit(given)
    return ListQuery(where=held_filter(server, given), limit=limit)


@attrs.frozen
class RequestLogQuery:
    uuid: str | None
    before_id: int | None
    limit: int


def parse_request_log_query(args: Mapping[bytes, list[bytes]]) -> RequestLogQuery:
    """The query of the webhook request log: ``limit``, ``before`` (a request id) and ``uuid``."""
    given = query_parameters(args, ("limit", "before", "uuid"))
    limit = parse_limit(given)
    before_id = None
    if "before" in given:
        text = given["before"]
        if not _DIGITS.fullmatch(text) or not 0 < int(text) <= MAX_ID:
            raise bad_input("before", "`before` must be a request id (a positive integer)")
        before_id = int(text)
    uuid = given.get("uuid")
    if uuid is not None and not uuid.strip():
        raise bad_input("uuid", "`uuid` must not be empty")
    return RequestLogQuery(uuid=None if uuid is None else uuid.strip(), before_id=before_id, limit=limit)


def webhook_reference(id: str) -> dict[str, Any]:
    """How a path names a webhook: ``{"id": 5}`` or ``{"uuid": ...}``, as `find_webhook` takes it."""
    if _DIGITS.fullmatch(id) and 0 < int(id) <= MAX_ID:
        return {"id": int(id)}
    if _UUID.fullmatch(id):
        return {"uuid": id.lower()}
    raise bad_input("id", "`id` must be a webhook's id (a positive integer) or its uuid")


def _json_body(body: bytes, shape: str) -> dict[str, Any]:
    """The JSON object in ``body``; 400 InvalidJSON if it is not JSON, or (saying ``shape``) no object."""
    try:
        given = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManageError(400, "InvalidJSON", f"The body is not valid JSON: {e}") from None
    if not isinstance(given, dict):
        raise ManageError(400, "InvalidJSON", shape)
    return given


@attrs.frozen
class WebhookInput:
    """The fields of a webhook request body; those not given are `webhook_store.KEEP` (or None)."""

    url: str | None
    name: str | None
    events: list[str] | webhook_store.Keep | None
    enabled: bool | None


def parse_webhook_input(body: bytes, *, create: bool) -> WebhookInput:
    """A webhook body: ``url`` (required to create), ``name``, ``events`` (an array of event names, or
    null for all; absent is all to create, unchanged to update), ``enabled``; nothing else."""
    given = _json_body(body, 'The body must be a JSON object: {"url": ..., "events": [...], ...}')
    for field in given:
        if field not in WEBHOOK_FIELDS:
            raise bad_input(field, f"unknown field `{field}`; a webhook has {', '.join(WEBHOOK_FIELDS)}")
    if not create and not given:
        raise bad_input(None, f"nothing to change: give any of {', '.join(WEBHOOK_FIELDS)}")
    url = given.get("url")
    if create and url is None:
        raise bad_input("url", "`url` is required: the http or https URL to POST events to")
    if "url" in given and not isinstance(url, str):
        raise bad_input("url", "`url` must be a string: an http or https URL")
    name = given.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_input("name", "`name` must be a string")
    if not create and "name" in given and name is None:
        raise bad_input("name", "`name` must be a string")
    events: list[str] | webhook_store.Keep | None = None if create else webhook_store.KEEP
    if "events" in given:
        events = given["events"]
        if events is not None and not isinstance(events, list):
            raise bad_input("events", "`events` must be an array of event names, or null for all events")
    enabled = given.get("enabled")
    if "enabled" in given and not isinstance(enabled, bool):
        raise bad_input("enabled", "`enabled` must be true or false")
    return WebhookInput(url=url, name=name, events=events, enabled=enabled)


@attrs.frozen
class Selection:
    """The messages a bulk request names: its ``ids`` (in order, each once), or the filter to pick them
    from SQL with."""

    ids: tuple[int, ...] | None
    where: HeldFilter | None


def parse_selection(server: Server, body: bytes) -> Selection:
    """The body of a bulk request: ``{"ids": [...]}``, filters (``rcpt_to``, ``mail_from``, ``before``),
    ``{"all": true}`` (with or without filters); never ids together with filters or ``all``."""
    given = _json_body(body, 'The body must be a JSON object: {"ids": [...]}, filters or {"all": true}')
    for name in given:
        if name not in ("ids", "all", *FILTERS):
            raise bad_input(name, f"unknown field `{name}`")
    everything = given.get("all", False)
    if not isinstance(everything, bool):
        raise bad_input("all", "`all` must be true or false")
    if "ids" in given:
        others = [name for name in given if name != "ids"]
        if others:
            raise bad_input(
                others[0], f"give `ids`, or filters (or `all`), not both (`ids` and `{others[0]}`)"
            )
        ids = given["ids"]
        if not isinstance(ids, list) or not ids:
            raise bad_input("ids", "`ids` must be a non-empty array of message ids")
        if len(ids) > MAX_BULK_IDS:
            raise bad_input("ids", f"`ids` may name at most {MAX_BULK_IDS} messages; got {len(ids)}")
        parsed = [parse_message_id(f"ids[{i}]", value) for i, value in enumerate(ids)]
        return Selection(ids=tuple(dict.fromkeys(parsed)), where=None)
    if not everything and not any(name in given for name in FILTERS):
        raise bad_input(
            None,
            'name the messages: {"ids": [...]}, filters (rcpt_to, mail_from, before), or {"all": true} for '
            "every held message of the server",
        )
    return Selection(ids=None, where=held_filter(server, given))


# -- output -----------------------------------------------------------------------------------------------


def held_data(message: Message) -> dict[str, Any]:
    """A held message as ``GET /api/v2/held`` lists it; times are Unix seconds."""
    return {
        "id": message.id,
        "token": message.token,
        "rcpt_to": message.rcpt_to,
        "mail_from": message.mail_from,
        "subject": message.subject,
        "message_id": message.message_id,
        "tag": message.tag,
        "size": message.size,
        "timestamp": message.timestamp,
        # A held message's last delivery attempt is the hold itself.
        "held_at": message.last_delivery_attempt,
        "hold_expiry": message.hold_expiry,
    }


def webhook_data(webhook: Webhook) -> dict[str, Any]:
    """A webhook as the API gives it; ``events`` is null for all events; times are Unix seconds."""
    return {
        "id": webhook.id,
        "uuid": webhook.uuid,
        "name": webhook.name,
        "url": webhook.url,
        "enabled": webhook.enabled,
        "all_events": webhook.all_events,
        "events": None
        if webhook.all_events
        else [e for e in webhook_store.WEBHOOK_EVENTS if e in webhook.events],
        "created_at": webhook.created_at,
        "updated_at": webhook.updated_at,
        "last_used_at": webhook.last_used_at,
    }


def webhook_request_data(request: WebhookRequest) -> dict[str, Any]:
    """One logged attempt as the API gives it; ``payload`` is the JSON body sent, as sent (a string)."""
    return {
        "id": request.id,
        "uuid": request.uuid,
        "webhook_id": request.webhook_id,
        "event": request.event,
        "url": request.url,
        "attempt": request.attempt,
        "timestamp": request.timestamp,
        "status_code": request.status_code,
        "duration": request.duration,
        "response": request.response,
        "payload": request.payload,
        "will_retry": request.will_retry,
        "error": request.error,
    }


def _request_page(found: list[WebhookRequest], limit: int) -> dict[str, Any]:
    page = found[:limit]
    more = len(found) > limit
    return {
        "requests": [webhook_request_data(r) for r in page],
        "more": more,
        "next_before": page[-1].id if more else None,
    }


def _webhook_requests(
    conn: Connection, server_id: int, reference: dict[str, Any] | None, query: RequestLogQuery
) -> list[WebhookRequest] | None:
    """The log page of the server (or of its webhook named by ``reference``); None if no such webhook."""
    webhook_id = None
    if reference is not None:
        webhook = webhook_store.find_webhook(conn, server_id=server_id, **reference)
        if webhook is None:
            return None
        webhook_id = webhook.id
    return webhook_store.list_webhook_requests(
        conn,
        server_id,
        webhook_id=webhook_id,
        uuid=query.uuid,
        before_id=query.before_id,
        limit=query.limit + 1,
    )


def _find_webhook_id(conn: Connection, server_id: int, reference: dict[str, Any]) -> int | None:
    webhook = webhook_store.find_webhook(conn, server_id=server_id, **reference)
    return None if webhook is None else webhook.id


def _update_webhook(
    conn: Connection, server_id: int, reference: dict[str, Any], changes: WebhookInput, now: float
) -> Webhook | None:
    """The webhook named by ``reference`` changed, or None if the server has no such webhook."""
    webhook_id = _find_webhook_id(conn, server_id, reference)
    if webhook_id is None:
        return None
    try:
        return webhook_store.update_webhook(
            conn,
            webhook_id,
            now,
            server_id=server_id,
            name=changes.name,
            url=changes.url,
            enabled=changes.enabled,
            events=changes.events,
        )
    except StoreNotFound:  # deleted a moment ago
        return None


def _remove_webhook(conn: Connection, server_id: int, reference: dict[str, Any]) -> Webhook | None:
    """The webhook named by ``reference``, deleted; None if the server has no such webhook."""
    webhook_id = _find_webhook_id(conn, server_id, reference)
    if webhook_id is None:
        return None
    try:
        return webhook_store.remove_webhook(conn, webhook_id, server_id)
    except StoreNotFound:  # deleted a moment ago
        return None


@attrs.frozen
class SuppressionQuery:
    page: int
    per_page: int
    source: str | None
    search: str | None


def _positive_parameter(given: dict[str, str], name: str, default: int, maximum: int) -> int:
    if name not in given:
        return default
    text = given[name]
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= maximum:
        raise bad_input(name, f"`{name}` must be an integer from 1 to {maximum}")
    return int(text)


def parse_suppression_query(args: Mapping[bytes, list[bytes]], *, export: bool = False) -> SuppressionQuery:
    """The query of ``GET /api/v2/suppressions``: ``page``, ``per_page``, ``source``, ``search``; of the
    export, ``format`` (read by the caller), ``source`` and ``search``."""
    known = ("format", "source", "search") if export else ("page", "per_page", "source", "search")
    given = query_parameters(args, known)
    source = given.get("source")
    if source is not None:
        source = suppression_store.check_source(source).value
    search = given.get("search")
    if search is not None:
        search = search.strip() or None
    return SuppressionQuery(
        page=_positive_parameter(given, "page", 1, MAX_ID),
        per_page=_positive_parameter(
            given, "per_page", suppression_store.DEFAULT_PER_PAGE, suppression_store.MAX_PER_PAGE
        ),
        source=source,
        search=search,
    )


@attrs.frozen
class SuppressionInput:
    address: str
    source: suppression_store.SuppressionSource
    reason: str | None
    #: The expiry asked for: a time, None for never, or `webhook_store.KEEP` for the default.
    expires_at: float | webhook_store.Keep | None


def parse_suppression_input(body: bytes, now: float) -> SuppressionInput:
    """A new entry: ``address`` (required), ``source`` (default ``Manual``), ``reason``, ``expires_at``
    (a time; null: never; absent: the configured default for the source); nothing else."""
    given = _json_body(body, 'The body must be a JSON object: {"address": ..., "reason": ...}')
    for field in given:
        if field not in SUPPRESSION_FIELDS:
            raise bad_input(field, f"unknown field `{field}`; an entry has {', '.join(SUPPRESSION_FIELDS)}")
    if "address" not in given:
        raise bad_input("address", "`address` is required: the e-mail address not to send to")
    address = suppression_store.check_address(given["address"])
    source = suppression_store.check_source(given.get("source", "Manual"))
    reason = given.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise bad_input("reason", "`reason` must be a string")
    expires_at: float | webhook_store.Keep | None = webhook_store.KEEP
    if "expires_at" in given:
        expires_at = None if given["expires_at"] is None else parse_time("expires_at", given["expires_at"])
        if expires_at is not None and expires_at <= now:
            raise bad_input("expires_at", "`expires_at` must be in the future (or null: never)")
    return SuppressionInput(address=address, source=source, reason=reason, expires_at=expires_at)


def suppression_page_data(page: suppression_store.SuppressionPage) -> dict[str, Any]:
    return {
        "suppressions": [suppression_export.suppression_data(s) for s in page.suppressions],
        "page": page.page,
        "per_page": page.per_page,
        "total": page.total,
        "pages": page.pages,
    }


# -- endpoints and routes ---------------------------------------------------------------------------------


@attrs.frozen
class EndpointInput:
    """A new endpoint: its kind, name and the fields of its kind that were given (the store checks them
    and fills in the rest)."""

    kind: EndpointKind
    name: str
    fields: dict[str, Any]


def _kind_fields(kind: EndpointKind) -> str:
    return ", ".join(ENDPOINT_FIELDS[kind])


def parse_endpoint_input(body: bytes) -> EndpointInput:
    """``kind`` (``HTTP``, ``SMTP``, ``Address``), ``name``, and the fields of that kind (`ENDPOINT_FIELDS`,
    the first required); a field of another kind or of none is refused, naming it."""
    given = _json_body(body, 'The body must be a JSON object: {"kind": "HTTP", "name": ..., "url": ...}')
    every = {field for fields in ENDPOINT_FIELDS.values() for field in fields}
    for field in given:
        if field not in ("kind", "name") and field not in every:
            raise bad_input(
                field,
                f"unknown field `{field}`; an endpoint has kind, name and, by kind: "
                + "; ".join(f"{k}: {_kind_fields(k)}" for k in EndpointKind),
            )
    if "kind" not in given:
        raise bad_input("kind", "`kind` is required: HTTP, SMTP or Address")
    kind = next(
        (
            k
            for k in EndpointKind
            if isinstance(given["kind"], str) and given["kind"].strip().lower() == k.lower()
        ),
        None,
    )
    if kind is None:
        raise bad_input("kind", f"`kind` is {given['kind']!r}; it must be one of HTTP, SMTP, Address")
    for field in given:
        if field in every and field not in ENDPOINT_FIELDS[kind]:
            raise bad_input(
                field, f"`{field}` is not a field of an {kind} endpoint, which has {_kind_fields(kind)}"
            )
    name = given.get("name")
    if name is None:
        raise bad_input("name", "`name` is required: the endpoint's name, unique in the server")
    if not isinstance(name, str):
        raise bad_input("name", "`name` must be a non-empty string")
    for field in ("strip_replies", "include_attachments"):
        if field in given and not isinstance(given[field], bool):
            raise bad_input(field, f"`{field}` must be true or false")
    required = ENDPOINT_FIELDS[kind][0]
    if given.get(required) is None:
        raise bad_input(required, f"`{required}` is required for an {kind} endpoint")
    fields = {field: value for field, value in given.items() if field in ENDPOINT_FIELDS[kind]}
    return EndpointInput(kind=kind, name=name, fields=fields)


@attrs.frozen
class RouteInput:
    address: str
    mode: object
    spam_mode: object
    #: Endpoint names or uuids, in order.
    endpoints: tuple[str, ...]


def parse_route_input(body: bytes) -> RouteInput:
    """``address`` (required), ``mode`` (default ``Endpoint``), ``spam_mode`` (default ``Mark``),
    ``endpoints`` (names or uuids of the server's endpoints); nothing else."""
    given = _json_body(body, 'The body must be a JSON object: {"address": ..., "endpoints": [...]}')
    for field in given:
        if field not in ROUTE_FIELDS:
            raise bad_input(field, f"unknown field `{field}`; a route has {', '.join(ROUTE_FIELDS)}")
    address = given.get("address")
    if address is None:
        raise bad_input("address", "`address` is required: local@domain, *@domain or __returnpath__")
    if not isinstance(address, str):
        raise bad_input("address", "`address` must be a string: local@domain, *@domain or __returnpath__")
    refs = given.get("endpoints", [])
    if refs is None:
        refs = []
    if not isinstance(refs, list):
        raise bad_input("endpoints", "`endpoints` must be an array of endpoint names or uuids")
    for n, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            raise bad_input(f"endpoints[{n}]", f"`endpoints[{n}]` must be an endpoint's name or uuid")
    return RouteInput(
        address=address,
        mode=given.get("mode", route_store.RouteMode.ENDPOINT.value),
        spam_mode=given.get("spam_mode", route_store.SpamMode.MARK.value),
        endpoints=tuple(ref.strip() for ref in refs),
    )


def endpoint_data(endpoint: Endpoint) -> dict[str, Any]:
    """An endpoint as the API gives it: every field of every kind, null where not of its kind."""
    http = endpoint.kind is EndpointKind.HTTP
    return {
        "id": endpoint.id,
        "uuid": endpoint.uuid,
        "kind": endpoint.kind.value,
        "name": endpoint.name,
        "url": endpoint.url,
        "encoding": None if endpoint.encoding is None else endpoint.encoding.value,
        "format": None if endpoint.format is None else endpoint.format.value,
        "strip_replies": endpoint.strip_replies if http else None,
        "include_attachments": endpoint.include_attachments if http else None,
        "timeout": endpoint.timeout,
        "hostname": endpoint.hostname,
        "port": endpoint.port,
        "tls_mode": None if endpoint.tls_mode is None else endpoint.tls_mode.value,
        "address": endpoint.address,
    }


def route_data(route: Route) -> dict[str, Any]:
    """A route as the API gives it; ``domain`` is null for the return-path route."""
    return {
        "id": route.id,
        "uuid": route.uuid,
        "address": route.address,
        "name": route.name,
        "domain": route.domain,
        "mode": route.mode.value,
        "spam_mode": route.spam_mode.value,
        "token": route.token,
        "endpoints": [{"uuid": e.uuid, "name": e.name, "kind": e.kind.value} for e in route.endpoints],
    }


def _add_endpoint(conn: Connection, server_id: int, given: EndpointInput, now: float) -> Endpoint:
    fields = dict(given.fields)
    if given.kind is EndpointKind.HTTP:
        url = fields.pop("url")
        return route_store.add_http_endpoint(conn, server_id, given.name, url, now, **fields)
    if given.kind is EndpointKind.SMTP:
        hostname = fields.pop("hostname")
        return route_store.add_smtp_endpoint(conn, server_id, given.name, hostname, now, **fields)
    return route_store.add_address_endpoint(conn, server_id, given.name, fields["address"], now)


def _find_endpoint(conn: Connection, server_id: int, ref: str) -> Endpoint:
    """The server's endpoint whose uuid (any case) or name is ``ref``, else whose id it is."""
    for candidate in dict.fromkeys((ref, ref.lower() if _UUID.fullmatch(ref) else ref)):
        try:
            return route_store.get_endpoint(conn, server_id, candidate)
        except StoreNotFound:
            pass
    if _DIGITS.fullmatch(ref) and 0 < int(ref) <= MAX_ID:
        return route_store.get_endpoint(conn, server_id, int(ref))
    raise StoreNotFound(f"the server has no endpoint {ref!r}")


def _remove_endpoint(conn: Connection, server_id: int, ref: str, now: float) -> Endpoint:
    return route_store.remove_endpoint(conn, server_id, _find_endpoint(conn, server_id, ref).id, now)


def _add_route(conn: Connection, server_id: int, given: RouteInput, now: float) -> Route:
    """The route, its endpoints named by name or uuid; one the server does not have is a bad input naming
    it (not a 404: the path was found)."""
    chosen: list[int | str] = []
    for n, ref in enumerate(given.endpoints):
        try:
            chosen.append(_find_endpoint(conn, server_id, ref).id)
        except StoreNotFound:
            raise RouteError(
                f"endpoints[{n}]", f"`endpoints[{n}]`: the server has no endpoint {ref!r}"
            ) from None
    return route_store.add_route(
        conn, server_id, given.address, now, mode=given.mode, spam_mode=given.spam_mode, endpoints_=chosen
    )


def _find_route(conn: Connection, server_id: int, ref: str) -> Route:
    """The server's route whose uuid (any case), token or address is ``ref``, else whose id it is."""
    try:
        return route_store.get_route(conn, server_id, ref.lower())
    except StoreNotFound:
        if _DIGITS.fullmatch(ref) and 0 < int(ref) <= MAX_ID:
            return route_store.get_route(conn, server_id, int(ref))
        raise


def _remove_route(conn: Connection, server_id: int, ref: str) -> Route:
    return route_store.remove_route(conn, server_id, _find_route(conn, server_id, ref).id)


def route_paths(app: Klein) -> dict[str, set[str]]:
    """Every path ``app`` routes (OpenAPI's ``{name}`` for Klein's ``<name>``) with its methods, lower
    case, without the HEAD and OPTIONS that Werkzeug adds by itself."""
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        path = _ROUTE_PARAMETER.sub(r"{\1}", rule.rule)
        methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
        routes.setdefault(path, set()).update(methods)
    return routes


class ManageAPI:
    """The ``/api/v2`` Klein app; serve ``ManageAPI(...).app.resource()`` in the daemon's Site.

    Database calls are bounded by ``timeout`` seconds on ``clock``; a bulk action works on at most
    ``concurrency`` messages at a time.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        database: Database,
        queue: RedisQueue,
        *,
        timeout: float = 30.0,
        concurrency: int = CONCURRENCY,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        self.clock = clock
        self.database = database
        self.queue = queue
        self.suppression = suppression if suppression is not None else SuppressionConfig()
        self.timeout = timeout
        self.concurrency = concurrency
        self._document = json.dumps(OPENAPI, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"

    # -- routes ---------------------------------------------------------------------------------------

    @app.route("/api/v2/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")  # type: ignore[no-untyped-call]
        return self._document

    @app.route("/api/v2/held", methods=["GET"])
    async def list_held_route(self, request: IRequest) -> bytes:
        return await self._respond(request, lambda server: self.list_held(server, request.args))

    @app.route("/api/v2/held/<id>/release", methods=["POST"])
    async def release_one_route(self, request: IRequest, id: str) -> bytes:
        return await self._respond(
            request, lambda server: self.act_on_message(server, HeldAction.RELEASE, id)
        )

    @app.route("/api/v2/held/<id>/cancel", methods=["POST"])
    async def cancel_one_route(self, request: IRequest, id: str) -> bytes:
        return await self._respond(request, lambda server: self.act_on_message(server, HeldAction.CANCEL, id))

    @app.route("/api/v2/held/release", methods=["POST"])
    async def release_many_route(self, request: IRequest) -> bytes:
        return await self._respond(
            request, lambda server: self.act_on_selection(server, HeldAction.RELEASE, _body(request))
        )

    @app.route("/api/v2/held/cancel", methods=["POST"])
    async def cancel_many_route(self, request: IRequest) -> bytes:
        return await self._respond(
            request, lambda server: self.act_on_selection(server, HeldAction.CANCEL, _body(request))
        )

    @app.route("/api/v2/webhooks", methods=["GET"])
    async def list_webhooks_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.list_webhooks)

    @app.route("/api/v2/webhooks", methods=["POST"])
    async def add_webhook_route(self, request: IRequest) -> bytes:
        return await self._respond(
            request, lambda server: self.add_webhook(server, request, _body(request)), status=201
        )

    @app.route("/api/v2/webhooks/<id>", methods=["GET"])
    async def get_webhook_route(self, request: IRequest, id: str) -> bytes:
        return await self._respond(request, lambda server: self.get_webhook(server, id))

    @app.route("/api/v2/webhooks/<id>", methods=["PATCH"])
    async def update_webhook_route(self, request: IRequest, id: str) -> bytes:
        return await self._respond(request, lambda server: self.update_webhook(server, id, _body(request)))

    @app.route("/api/v2/webhooks/<id>", methods=["DELETE"])
    async def remove_webhook_route(self, request: IRequest, id: str) -> bytes:
        return await self._respond(request, lambda server: self.remove_webhook(server, id))

    @app.route("/api/v2/webhooks/<id>/requests", methods=["GET"])
    async def webhook_requests_route(self, request: IRequest, id: str) -> bytes:
        return await self._respond(request, lambda server: self.webhook_requests(server, request.args, id))

    @app.route("/api/v2/webhook-requests", methods=["GET"])
    async def all_webhook_requests_route(self, request: IRequest) -> bytes:
        return await self._respond(request, lambda server: self.webhook_requests(server, request.args))

    @app.route("/api/v2/suppressions", methods=["GET"])
    async def list_suppressions_route(self, request: IRequest) -> bytes:
        return await self._respond(request, lambda server: self.list_suppressions(server, request.args))

    @app.route("/api/v2/suppressions", methods=["POST"])
    async def add_suppression_route(self, request: IRequest) -> bytes:
        return await self._respond(
            request, lambda server: self.add_suppression(server, request, _body(request)), status=201
        )

    @app.route("/api/v2/suppressions/export", methods=["GET"])
    async def export_suppressions_route(self, request: IRequest) -> bytes:
        return await self._export_suppressions(request)

    @app.route("/api/v2/suppressions/<path:address>", methods=["GET"])
    async def get_suppression_route(self, request: IRequest, address: str) -> bytes:
        return await self._respond(request, lambda server: self.get_suppression(server, address))

    @app.route("/api/v2/suppressions/<path:address>", methods=["DELETE"])
    async def remove_suppression_route(self, request: IRequest, address: str) -> bytes:
        return await self._respond(request, lambda server: self.remove_suppression(server, address))

    @app.route("/api/v2/endpoints", methods=["GET"])
    async def list_endpoints_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.list_endpoints)

    @app.route("/api/v2/endpoints", methods=["POST"])
    async def add_endpoint_route(self, request: IRequest) -> bytes:
        return await self._respond(
            request, lambda server: self.add_endpoint(server, request, _body(request)), status=201
        )

    @app.route("/api/v2/endpoints/<endpoint_ref>", methods=["GET"])
    async def get_endpoint_route(self, request: IRequest, endpoint_ref: str) -> bytes:
        return await self._respond(request, lambda server: self.get_endpoint(server, endpoint_ref))

    @app.route("/api/v2/endpoints/<endpoint_ref>", methods=["DELETE"])
    async def remove_endpoint_route(self, request: IRequest, endpoint_ref: str) -> bytes:
        return await self._respond(request, lambda server: self.remove_endpoint(server, endpoint_ref))

    @app.route("/api/v2/routes", methods=["GET"])
    async def list_routes_route(self, request: IRequest) -> bytes:
        return await self._respond(request, self.list_routes)

    @app.route("/api/v2/routes", methods=["POST"])
    async def add_route_route(self, request: IRequest) -> bytes:
        return await self._respond(
            request, lambda server: self.add_route(server, request, _body(request)), status=201
        )

    @app.route("/api/v2/routes/<route_ref>", methods=["GET"])
    async def get_route_route(self, request: IRequest, route_ref: str) -> bytes:
        return await self._respond(request, lambda server: self.get_route(server, route_ref))

    @app.route("/api/v2/routes/<route_ref>", methods=["DELETE"])
    async def remove_route_route(self, request: IRequest, route_ref: str) -> bytes:
        return await self._respond(request, lambda server: self.remove_route(server, route_ref))

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._error(request, ManageError(404, "NotFound", f"no such endpoint: {_path(request)}"))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        refused = failure.value
        assert isinstance(refused, MethodNotAllowed)
        allowed = sorted(m for m in refused.valid_methods or () if m not in ("HEAD", "OPTIONS"))
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))  # type: ignore[no-untyped-call]
        method = request.method.decode("ascii", "replace")  # type: ignore[attr-defined]
        error = ManageError(
            405, "MethodNotAllowed", f"{_path(request)} answers {', '.join(allowed)}, not {method}"
        )
        return self._error(request, error)

    # -- actions --------------------------------------------------------------------------------------

    async def list_held(self, server: Server, args: Mapping[bytes, list[bytes]]) -> dict[str, Any]:
        """The server's held messages matching the query, longest held first."""
        query = parse_list_query(server, args)
        found = await self._db(list_held_messages, query.where, limit=query.limit + 1)
        return {"messages": [held_data(m) for m in found[: query.limit]], "more": len(found) > query.limit}

    async def act_on_message(self, server: Server, action: HeldAction, id: str) -> dict[str, Any]:
        """Release or cancel one of the server's held messages; 404 if it is not held."""
        message_id = parse_message_id("id", int(id) if _DIGITS.fullmatch(id) else None)
        try:
            done = await act_on_one(action, self.queue, message_id, self.clock.seconds(), server.id)
        except RedisUnavailable as e:
            self.log.warn(
                "management API: {action} of {id} failed: {error}", action=action.name, id=id, error=str(e)
            )
            raise queue_unavailable() from None
        if not done:
            raise not_held(message_id)
        return {"id": message_id, action.value: True}

    async def act_on_selection(self, server: Server, action: HeldAction, body: bytes) -> dict[str, Any]:
        """Release or cancel the server's held messages named by ids, or matching filters (or all)."""
        selection = parse_selection(server, body)
        if selection.ids is not None:
            ids: list[int] = list(selection.ids)
        else:
            assert selection.where is not None
            ids = await self._db(held_message_ids, selection.where)
        try:
            outcome = await act_on_held(
                action,
                self.queue,
                ids,
                self.clock.seconds(),
                server_id=server.id,
                concurrency=self.concurrency,
            )
        except HeldActionFailed as e:
            if not isinstance(e.error, RedisUnavailable):
                raise e.error from None
            self.log.warn(
                "management API: bulk {action} stopped after {done} of {total}: {error}",
                action=action.name,
                done=len(e.done),
                total=len(ids),
                error=str(e.error),
            )
            raise queue_unavailable(requested=len(ids), completed=list(e.done)) from None
        return {"requested": len(ids), action.value: len(outcome.done), "not_held": list(outcome.not_held)}

    async def list_webhooks(self, server: Server) -> dict[str, Any]:
        """The server's webhooks, oldest first."""
        found = await self._db(webhook_store.list_webhooks, server.id)
        return {"webhooks": [webhook_data(w) for w in found]}

    async def add_webhook(self, server: Server, request: IRequest, body: bytes) -> dict[str, Any]:
        """Add a webhook to the server; 201 with it, and its address in Location."""
        given = parse_webhook_input(body, create=True)
        assert given.url is not None and not isinstance(given.events, webhook_store.Keep)
        webhook = await self._db(
            webhook_store.add_webhook,
            server.id,
            given.name,
            given.url,
            self.clock.seconds(),
            events=given.events,
            enabled=True if given.enabled is None else given.enabled,
        )
        request.setHeader(b"location", f"/api/v2/webhooks/{webhook.id}".encode("ascii"))  # type: ignore[no-untyped-call]
        return webhook_data(webhook)

    async def get_webhook(self, server: Server, id: str) -> dict[str, Any]:
        webhook = await self._db(webhook_store.find_webhook, server_id=server.id, **webhook_reference(id))
        if webhook is None:
            raise webhook_not_found(id)
        return webhook_data(webhook)

    async def update_webhook(self, server: Server, id: str, body: bytes) -> dict[str, Any]:
        """Change the settings given in the body; the webhook as it is now."""
        reference = webhook_reference(id)
        changes = parse_webhook_input(body, create=False)
        webhook = await self._db(_update_webhook, server.id, reference, changes, self.clock.seconds())
        if webhook is None:
            raise webhook_not_found(id)
        return webhook_data(webhook)

    async def remove_webhook(self, server: Server, id: str) -> dict[str, Any]:
        """Delete a webhook; its logged requests stay (without it)."""
        webhook = await self._db(_remove_webhook, server.id, webhook_reference(id))
        if webhook is None:
            raise webhook_not_found(id)
        return {"id": webhook.id, "uuid": webhook.uuid, "deleted": True}

    async def webhook_requests(
        self, server: Server, args: Mapping[bytes, list[bytes]], id: str | None = None
    ) -> dict[str, Any]:
        """A page of the server's webhook request log (of one webhook, if ``id`` names it), newest
        first."""
        reference = None if id is None else webhook_reference(id)
        query = parse_request_log_query(args)
        found = await self._db(_webhook_requests, server.id, reference, query)
        if found is None:
            assert id is not None
            raise webhook_not_found(id)
        return _request_page(found, query.limit)

    async def list_suppressions(self, server: Server, args: Mapping[bytes, list[bytes]]) -> dict[str, Any]:
        """A page of the server's suppressed addresses, newest first, with the total."""
        query = parse_suppression_query(args)
        page = await self._db(
            suppression_store.list_suppressions,
            server.id,
            self.clock.seconds(),
            page=query.page,
            per_page=query.per_page,
            source=query.source,
            search=query.search,
        )
        return suppression_page_data(page)

    async def add_suppression(self, server: Server, request: IRequest, body: bytes) -> dict[str, Any]:
        """List an address for the server (merged with an entry already there); 201 with the entry."""
        now = self.clock.seconds()
        given = parse_suppression_input(body, now)
        expires_at = (
            suppression_expiry(self.suppression, given.source, now)
            if isinstance(given.expires_at, webhook_store.Keep)
            else given.expires_at
        )
        entry: Suppression = await self._db(
            suppression_store.add_suppression,
            server.id,
            given.address,
            given.source,
            now,
            reason=given.reason,
            expires_at=expires_at,
        )
        location = f"/api/v2/suppressions/{quote(entry.address, safe='@')}"
        request.setHeader(b"location", location.encode("ascii"))  # type: ignore[no-untyped-call]
        return suppression_export.suppression_data(entry)

    async def get_suppression(self, server: Server, address: str) -> dict[str, Any]:
        entry = await self._db(suppression_store.find_suppression, server.id, address, self.clock.seconds())
        if entry is None:
            raise suppression_not_found(address)
        return suppression_export.suppression_data(entry)

    async def remove_suppression(self, server: Server, address: str) -> dict[str, Any]:
        """Take an address off the list: mail to it is sent again (within seconds: the delivery check
        caches answers briefly)."""
        entry = await self._db(suppression_store.remove_suppression, server.id, address)
        if entry is None:
            raise suppression_not_found(address)
        return {"address": entry.address, "deleted": True}

    async def list_endpoints(self, server: Server) -> dict[str, Any]:
        """The server's endpoints, by name."""
        found = await self._db(route_store.list_endpoints, server.id)
        return {"endpoints": [endpoint_data(e) for e in found]}

    async def add_endpoint(self, server: Server, request: IRequest, body: bytes) -> dict[str, Any]:
        """Add an endpoint to the server; 201 with it, and its address in Location; 409 if the name is
        taken."""
        given = parse_endpoint_input(body)
        try:
            endpoint = await self._db(_add_endpoint, server.id, given, self.clock.seconds())
        except AlreadyExists as e:
            raise ManageError(409, "EndpointExists", str(e), "name") from None
        request.setHeader(b"location", f"/api/v2/endpoints/{endpoint.uuid}".encode("ascii"))  # type: ignore[no-untyped-call]
        return endpoint_data(endpoint)

    async def get_endpoint(self, server: Server, ref: str) -> dict[str, Any]:
        try:
            endpoint = await self._db(_find_endpoint, server.id, ref)
        except StoreNotFound:
            raise endpoint_not_found(ref) from None
        return endpoint_data(endpoint)

    async def remove_endpoint(self, server: Server, ref: str) -> dict[str, Any]:
        """Delete an endpoint; a route in Endpoint mode left with none turns to Reject."""
        try:
            endpoint = await self._db(_remove_endpoint, server.id, ref, self.clock.seconds())
        except StoreNotFound:
            raise endpoint_not_found(ref) from None
        return {"id": endpoint.id, "uuid": endpoint.uuid, "name": endpoint.name, "deleted": True}

    async def list_routes(self, server: Server) -> dict[str, Any]:
        """The server's routes, by domain and name."""
        found = await self._db(route_store.list_routes, server.id)
        return {"routes": [route_data(r) for r in found]}

    async def add_route(self, server: Server, request: IRequest, body: bytes) -> dict[str, Any]:
        """Add a route to the server; 201 with it, and its address in Location; 409 if the address has a
        route already (of any server)."""
        given = parse_route_input(body)
        try:
            route = await self._db(_add_route, server.id, given, self.clock.seconds())
        except AlreadyExists as e:
            raise ManageError(409, "RouteExists", str(e), "address") from None
        request.setHeader(b"location", f"/api/v2/routes/{route.uuid}".encode("ascii"))  # type: ignore[no-untyped-call]
        return route_data(route)

    async def get_route(self, server: Server, ref: str) -> dict[str, Any]:
        try:
            route = await self._db(_find_route, server.id, ref)
        except StoreNotFound:
            raise route_not_found(ref) from None
        return route_data(route)

    async def remove_route(self, server: Server, ref: str) -> dict[str, Any]:
        try:
            route = await self._db(_remove_route, server.id, ref)
        except StoreNotFound:
            raise route_not_found(ref) from None
        return {"id": route.id, "uuid": route.uuid, "address": route.address, "deleted": True}

    async def _export_suppressions(self, request: IRequest) -> bytes:
        """The whole list as JSON lines or CSV, written a chunk at a time as it is read.

        Errors before the first chunk are answered as JSON like any other; a failure after it (the
        answer has begun) drops the connection, so the client sees a cut-off download, never a short
        list that looks complete.
        """
        try:
            server = await self._authenticate(request)
            given = query_parameters(request.args, ("format", "source", "search"))
            format = given.get("format", "jsonl")
            if format not in suppression_export.FORMATS:
                raise bad_input("format", "`format` must be jsonl or csv")
            query = parse_suppression_query(request.args, export=True)
            now = self.clock.seconds()
            chunk = await self._export_chunk(server, now, 0, query)
        except ManageError as e:
            return self._error(request, e)
        except SuppressionError as e:
            return self._error(request, bad_input(e.field, e.message))
        request.setResponseCode(200)  # type: ignore[no-untyped-call]
        content_type = suppression_export.CONTENT_TYPES[format].encode("ascii")
        request.setHeader(b"content-type", content_type)  # type: ignore[no-untyped-call]
        request.setHeader(b"cache-control", b"no-store")  # type: ignore[no-untyped-call]
        if format == "csv":
            request.write(suppression_export.csv_header().encode("utf-8"))  # type: ignore[no-untyped-call]
        try:
            while chunk:
                request.write(suppression_export.chunk(chunk, format).encode("utf-8"))  # type: ignore[no-untyped-call]
                chunk = await self._export_chunk(server, now, chunk[-1].id, query)
        except Exception:
            self.log.failure("management API: suppression export cut off")
            request.loseConnection()  # type: ignore[attr-defined]
        return b""

    async def _export_chunk(
        self, server: Server, now: float, after_id: int, query: SuppressionQuery
    ) -> list[Suppression]:
        found: list[Suppression] = await self._db(
            suppression_store.export_suppressions,
            server.id,
            now,
            after_id=after_id,
            source=query.source,
            search=query.search,
        )
        return found

    # -- plumbing -------------------------------------------------------------------------------------

    async def _respond(
        self, request: IRequest, action: Callable[[Server], Awaitable[Any]], status: int = 200
    ) -> bytes:
        """Authenticate, run ``action`` for the caller's server and answer its result as JSON (``status``),
        or the error it raised with its status."""
        try:
            server = await self._authenticate(request)
            data = await action(server)
        except ManageError as e:
            return self._error(request, e)
        except FieldError as e:
            # Every store's bad input (webhooks, suppressions, routes) names its field.
            return self._error(request, bad_input(e.field, e.message))
        except CancelledError:
            # Klein cancels the handler when the client goes away: nobody is left to answer.
            self.log.info(
                "management API: the client closed the connection before {path} was answered",
                path=_path(request),
            )
            raise
        except Exception:
            self.log.failure("management API request {path} failed", path=_path(request))
            error = ManageError(
                500,
                "InternalError",
                "An unexpected error occurred and has been logged; the request may not have been completed",
            )
            return self._error(request, error)
        return _json(request, status, data)

    def _error(self, request: IRequest, error: ManageError) -> bytes:
        if error.status == 401:
            request.setHeader(b"www-authenticate", b'APIKey header="X-Server-API-Key"')  # type: ignore[no-untyped-call]
        return _json(request, error.status, error.body())

    async def _authenticate(self, request: IRequest) -> Server:
        header = request.getHeader(b"x-server-api-key")  # type: ignore[no-untyped-call]
        key = header.decode("utf-8", "replace").strip() if header else ""
        if not key:
            raise ManageError(
                401, "Unauthenticated", "Send a server's API key in the X-Server-API-Key header"
            )
        found = await self._db(find_api_credential, key)
        if found is None:
            raise ManageError(401, "InvalidServerAPIKey", "The API key in X-Server-API-Key is not valid")
        credential, server = found
        if server.suspended:
            # The reason tells the application what to fix (an automatic suspension says which rate).
            raise ManageError(
                403, "ServerSuspended", "The mail server has been suspended", reason=server.suspension_reason
            )
        self._record_use(credential)
        return server

    def _record_use(self, credential: Credential) -> None:
        """Write the credential's last use beside the request, unless it was written a moment ago."""
        now = self.clock.seconds()
        if credential.last_used_at is not None and credential.last_used_at > now - TOUCH_SECONDS:
            return
        d = self.database.run(touch_credential, credential.id, now)
        d.addErrback(
            lambda f: self.log.failure(
                "could not record use of credential {credential_id}", f, credential_id=credential.id
            )
        )

    async def _db(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a unit of work; 503 if the database fails or takes more than ``timeout``."""
        d = self.database.run(fn, *args, **kwargs)
        d.addTimeout(self.timeout, self.clock)
        try:
            return await d
        except DeferredTimeoutError:
            self.log.warn(
                "management API: the database did not answer within {timeout} s", timeout=self.timeout
            )
            raise database_unavailable() from None
        except sa.exc.SQLAlchemyError:
            self.log.failure("management API: database call failed")
            raise database_unavailable() from None


def _body(request: IRequest) -> bytes:
    content = request.content
    content.seek(0)
    body: bytes = content.read()
    return body


def _path(request: IRequest) -> str:
    path: bytes = request.path  # type: ignore[attr-defined]
    return path.decode("utf-8", "replace")


def _json(request: IRequest, status: int, data: Any) -> bytes:
    request.setResponseCode(status)  # type: ignore[no-untyped-call]
    request.setHeader(b"content-type", b"application/json; charset=utf-8")  # type: ignore[no-untyped-call]
    request.setHeader(b"cache-control", b"no-store")  # type: ignore[no-untyped-call]
    return json.dumps(data, ensure_ascii=False).encode("utf-8")

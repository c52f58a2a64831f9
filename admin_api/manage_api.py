"""``/api/v2``: mtad's own management API, for one server at a time; held messages so far.

Unlike ``/api/v1`` this API owes nothing to Postal's wire format, so it speaks plain HTTP: JSON in and out,
and the status code says what happened: 200 done; 400 bad input, with an error naming the field; 401 no
or an unknown API key; 403 the server is suspended; 404 no such (held) message of this server; 503 Redis
or the database did not answer (nothing was done, or, in bulk, the error lists the ids done in
``completed``). Every error body is ``{"error": {"code": ..., "message": ..., "field": ...}}``.
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
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

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
from mtad.store.credentials import Credential, touch_credential
from mtad.store.db import Database
from mtad.store.messages import HeldFilter, Message, held_message_ids, list_held_messages
from mtad.store.servers import Server

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

_DIGITS = re.compile(r"[0-9]{1,19}")
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


def parse_list_query(server: Server, args: Mapping[bytes, list[bytes]]) -> ListQuery:
    """The query of ``GET /api/v2/held``: each known parameter at most once, no unknown ones."""
    given: dict[str, str] = {}
    for raw_name, values in args.items():
        name = raw_name.decode("utf-8", "replace")
        if name not in (*FILTERS, "limit"):
            raise bad_input(name, f"unknown query parameter `{name}`")
        if len(values) != 1:
            raise bad_input(name, f"`{name}` given {len(values)} times")
        try:
            given[name] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise bad_input(name, f"`{name}` is not UTF-8") from None
    limit = DEFAULT_LIMIT
    if "limit" in given:
        text = given.pop("limit")
        if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
            raise bad_input("limit", f"`limit` must be an integer from 1 to {MAX_LIMIT}")
        limit = int(text)
    return ListQuery(where=held_filter(server, given), limit=limit)


@attrs.frozen
class Selection:
    """The messages a bulk request names: its ``ids`` (in order, each once), or the filter to pick them
    from SQL with."""

    ids: tuple[int, ...] | None
    where: HeldFilter | None


def parse_selection(server: Server, body: bytes) -> Selection:
    """The body of a bulk request: ``{"ids": [...]}``, filters (``rcpt_to``, ``mail_from``, ``before``),
    ``{"all": true}`` (with or without filters); never ids together with filters or ``all``."""
    try:
        given = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManageError(400, "InvalidJSON", f"The body is not valid JSON: {e}") from None
    if not isinstance(given, dict):
        raise ManageError(
            400, "InvalidJSON", 'The body must be a JSON object: {"ids": [...]}, filters or {"all": true}'
        )
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
    ) -> None:
        self.clock = clock
        self.database = database
        self.queue = queue
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

    # -- plumbing -------------------------------------------------------------------------------------

    async def _respond(self, request: IRequest, action: Callable[[Server], Awaitable[Any]]) -> bytes:
        """Authenticate, run ``action`` for the caller's server and answer its result as JSON (200), or the
        error it raised with its status."""
        try:
            server = await self._authenticate(request)
            data = await action(server)
        except ManageError as e:
            return self._error(request, e)
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
        return _json(request, 200, data)

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
            raise ManageError(403, "ServerSuspended", "The mail server has been suspended")
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

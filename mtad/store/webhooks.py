"""Webhooks: where a server's events are POSTed, which events each gets, and the log of every request.

The configuration follows Postal's (``app/models/webhook.rb``): a webhook has a name, an http(s) URL, an
``enabled`` flag and either all events or a chosen set (``webhook_events`` rows, none when ``all_events``).
Postal's ``sign`` flag is left out: Postal ignores it and signs every request, and so do we.

The dispatcher asks `webhooks_for_event` once per event, so that is one indexed query. Each attempt to send
is logged in ``webhook_requests`` by `record_webhook_requests`, idempotent on (``uuid``, ``attempt``): the
dispatcher reads the event stream at least once, and a batch recorded again adds nothing. ``uuid`` is the
payload's uuid, which (as in Postal, where it is the ``WebhookRequest``'s) is one per event *and webhook*
and the same on every retry. The log is kept `DEFAULT_RETENTION_SECONDS` (Postal prunes after 10 days;
its documentation says 7) by `WebhookRequestRetention`.

URLs are checked more precisely than Postal's character-class regex: http or https, a host, no user
name or password (they would be sent to every proxy and logged), no whitespace or other characters
outside RFC 3986. The address guard against private destinations is the sender's job, at request time,
since DNS answers change.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import uuid as uuid_module
from collections.abc import Collection, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.store.db import FieldError, NotFound, insert_ignoring_duplicates
from mtad.store.raw_messages import UnitOfWork
from mtad.store.tables import servers, webhook_events, webhook_requests, webhooks
from mtad.sweeps import PeriodicSweep

#: Every event a webhook can be sent: Postal's (``WebhookEvent::EVENTS`` and the send-limit events its
#: ``Server`` triggers), then mtad's own. Each may be chosen, the send-limit events too, which Postal's UI
#: does not offer (so there they reach only all-events webhooks): a webhook that does not choose them does
#: not get them, so one configured as Postal allows gets exactly Postal's events.
WEBHOOK_EVENTS: tuple[str, ...] = (
    "MessageSent",
    "MessageDelayed",
    "MessageDeliveryFailed",
    "MessageHeld",
    "MessageBounced",
    "MessageLinkClicked",
    "MessageLoaded",
    "DomainDNSError",
    "SendLimitApproaching",
    "SendLimitExceeded",
    "MessageSuppressed",
    "SpamComplaint",
    "ServerSuspended",
)

#: Postal prunes its webhook request log after 10 days (``PruneWebhookRequestsScheduledTask``).
DEFAULT_RETENTION_SECONDS = 10 * 86400.0

#: Postal's pseudo status codes for requests that got no HTTP answer (``Postal::HTTP``, and ``-4`` from
#: its address guard since 3.3.7).
PSEUDO_STATUS_CODES = {
    -1: "timed out",
    -2: "connection failed",
    -3: "invalid TLS certificate",
    -4: "destination not allowed",
}

#: ``webhooks.name`` holds this many characters.
MAX_NAME_LENGTH = 255

#: A host name as it may appear in a URL (letters, digits, hyphens, dots; underscores occur in practice).
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
#: RFC 3986 §2: unreserved, reserved and ``%`` (of percent-encodings); nothing else may appear in a URL.
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
_PERCENT_ENCODING = re.compile(r"%(?![0-9A-Fa-f]{2})")


class WebhookError(FieldError):
    """A webhook setting is wrong; ``field`` names it (``url``, ``events[2]``), and so does the message."""


class Keep(enum.Enum):
    """The type of `KEEP`."""

    KEEP = "keep"


#: `update_webhook`'s ``events`` when they are not to change (``None`` means all events).
KEEP = Keep.KEEP


@attrs.frozen
class Webhook:
    id: int
    server_id: int
    uuid: str
    name: str
    url: str
    enabled: bool
    #: Sent every event; ``events`` is then empty.
    all_events: bool
    #: The events it is sent when not ``all_events``.
    events: frozenset[str]
    created_at: float
    updated_at: float
    #: When a request to it last succeeded.
    last_used_at: float | None

    def wants(self, event: str) -> bool:
        """Whether this webhook is sent ``event`` (enabled or not)."""
        return self.all_events or event in self.events


@attrs.frozen
class WebhookRequest:
    """One attempt to send an event to a webhook, as logged; ``id`` is given by the database."""

    server_id: int
    #: ``None`` once the webhook has been deleted.
    webhook_id: int | None
    uuid: str
    event: str
    url: str
    attempt: int
    timestamp: float
    #: HTTP status, or a negative pseudo code: -1 timeout, -2 connection failed, -3 TLS certificate
    #: refused, -4 destination not allowed (Postal's codes).
    status_code: int
    #: Seconds the request took.
    duration: float
    #: The start of the response body.
    response: str | None
    #: The JSON body sent.
    payload: str = attrs.field(repr=False)
    will_retry: bool
    error: str | None = None
    id: int | None = None


def describe_status(status_code: int) -> str:
    """A logged status code for people: ``200``, or ``-1 (timed out)`` for a pseudo code."""
    meaning = PSEUDO_STATUS_CODES.get(status_code)
    return str(status_code) if meaning is None else f"{status_code} ({meaning})"


# -- checks -----------------------------------------------------------------------------------------------


def check_url(url: object, field: str = "url") -> str:
    """``url`` if it may be a webhook's URL; `WebhookError` saying what is wrong otherwise."""
    if not isinstance(url, str):
        raise WebhookError(field, f"`{field}` must be a string")
    url = url.strip()
    if not url:
        raise WebhookError(field, f"`{field}` must be an http or https URL")
    if any(c.isspace() for c in url):
        raise WebhookError(field, f"`{field}` must not contain whitespace (percent-encode spaces as %20)")
    if not url.isascii():
        raise WebhookError(
            field,
            f"`{field}` must be ASCII: percent-encode other characters (RFC 3986) and write an "
            "internationalized domain name in A-labels (xn--...)",
        )
    bad = _URL_CHARACTERS.fullmatch(url) is None or _PERCENT_ENCODING.search(url) is not None
    if bad:
        raise WebhookError(
            field, f"`{field}` has characters a URL may not contain unencoded (RFC 3986 §2): {url!r}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise WebhookError(field, f"`{field}` is not a valid URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"not {parts.scheme!r}" if parts.scheme else "and must start with http:// or https://"
        raise WebhookError(field, f"`{field}` must use http or https, {scheme}")
    if "@" in parts.netloc:
        raise WebhookError(
            field,
            f"`{field}` must not contain a user name or password: requests are signed "
            "(X-Postal-Signature), so the receiver can check them without one",
        )
    host = parts.hostname or ""
    if not host:
        raise WebhookError(field, f"`{field}` must name a host: {url!r}")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise WebhookError(field, f"`{field}` has an invalid IPv6 address: {host!r}") from None
    elif _HOST_NAME.fullmatch(host) is None or ".." in host:
        raise WebhookError(field, f"`{field}` has an invalid host name: {host!r}")
    if port == 0:
        raise WebhookError(field, f"`{field}` has port 0")
    return url


def check_events(events: Iterable[object], field: str = "events") -> frozenset[str]:
    """The events named, each a known one (`WEBHOOK_EVENTS`, exactly spelled); at least one."""
    chosen = set()
    for index, event in enumerate(events):
        if not isinstance(event, str) or event not in WEBHOOK_EVENTS:
            shown = repr(event) if isinstance(event, str) else f"a {type(event).__name__}"
            raise WebhookError(
                f"{field}[{index}]",
                f"`{field}[{index}]` is {shown}, not a webhook event; the events are "
                + ", ".join(WEBHOOK_EVENTS),
            )
        chosen.add(event)
    if not chosen:
        raise WebhookError(
            field,
            f"`{field}` must name at least one event (leave it out for all events; to stop a webhook, "
            "disable it)",
        )
    return frozenset(chosen)


def check_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str):
        raise WebhookError(field, f"`{field}` must be a string")
    name = " ".join(name.split())
    if not name:
        raise WebhookError(field, f"`{field}` must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise WebhookError(field, f"`{field}` must be at most {MAX_NAME_LENGTH} characters")
    return name


# -- webhooks ---------------------------------------------------------------------------------------------

_COLUMNS = (
    webhooks.c.id,
    webhooks.c.server_id,
    webhooks.c.uuid,
    webhooks.c.name,
    webhooks.c.url,
    webhooks.c.enabled,
    webhooks.c.all_events,
    webhooks.c.created_at,
    webhooks.c.updated_at,
    webhooks.c.last_used_at,
)


def _from_row(row: sa.Row[*tuple[Any, ...]], events: Iterable[str]) -> Webhook:
    all_events = bool(row.all_events)
    return Webhook(
        id=row.id,
        server_id=row.server_id,
        uuid=row.uuid,
        name=row.name,
        url=row.url,
        enabled=bool(row.enabled),
        all_events=all_events,
        events=frozenset() if all_events else frozenset(events),
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_used_at=row.last_used_at,
    )


def _load(conn: Connection, query: sa.Select[Any]) -> list[Webhook]:
    """The webhooks ``query`` (over `_COLUMNS`) selects, in its order, with their events: two queries."""
    rows = conn.execute(query).all()
    events: dict[int, list[str]] = {}
    ids = [row.id for row in rows if not row.all_events]
    if ids:
        chosen = conn.execute(
            sa.select(webhook_events.c.webhook_id, webhook_events.c.event).where(
                webhook_events.c.webhook_id.in_(ids)
            )
        )
        for webhook_id, event in chosen:
            events.setdefault(webhook_id, []).append(event)
    return [_from_row(row, events.get(row.id, ())) for row in rows]


def _default_name(url: str) -> str:
    return (urlsplit(url).hostname or url)[:MAX_NAME_LENGTH]


def add_webhook(
    conn: Connection,
    server_id: int,
    name: str | None,
    url: str,
    now: float,
    events: Iterable[str] | None = None,
    enabled: bool = True,
) -> Webhook:
    """Add a webhook to a server, for ``events`` or (``None``) all of them; named after its host if
    ``name`` is None. `WebhookError` names the setting that is wrong."""
    url = check_url(url)
    name = _default_name(url) if name is None else check_name(name)
    chosen = None if events is None else check_events(events)
    if conn.execute(sa.select(servers.c.id).where(servers.c.id == server_id)).first() is None:
        raise NotFound(f"no server with id {server_id}")
    result = conn.execute(
        webhooks.insert().values(
            server_id=server_id,
            uuid=str(uuid_module.uuid4()),
            name=name,
            url=url,
            enabled=enabled,
            all_events=chosen is None,
            created_at=now,
            updated_at=now,
        )
    )
    (id_,) = result.inserted_primary_key or (None,)
    assert id_ is not None
    if chosen is not None:
        conn.execute(webhook_events.insert(), [{"webhook_id": id_, "event": e} for e in sorted(chosen)])
    return get_webhook(conn, int(id_))


def find_webhook(
    conn: Connection, *, id: int | None = None, uuid: str | None = None, server_id: int | None = None
) -> Webhook | None:
    """The webhook with ``id`` or ``uuid`` (give one), of server ``server_id`` if given; else None.

    A webhook of another server is not found, exactly as one that does not exist.
    """
    if (id is None) == (uuid is None):
        raise ValueError("give a webhook's id or its uuid")
    query = sa.select(*_COLUMNS)
    query = query.where(webhooks.c.id == id) if id is not None else query.where(webhooks.c.uuid == uuid)
    if server_id is not None:
        query = query.where(webhooks.c.server_id == server_id)
    found = _load(conn, query)
    return found[0] if found else None


def get_webhook(conn: Connection, id: int, server_id: int | None = None) -> Webhook:
    """As `find_webhook` by id, but `NotFound` if there is no such webhook (of that server)."""
    webhook = find_webhook(conn, id=id, server_id=server_id)
    if webhook is None:
        raise NotFound(f"no webhook with id {id}")
    return webhook


def list_webhooks(conn: Connection, server_id: int | None = None) -> list[Webhook]:
    """A server's webhooks (all servers' if ``server_id`` is None), oldest first."""
    query = sa.select(*_COLUMNS).order_by(webhooks.c.server_id, webhooks.c.id)
    if server_id is not None:
        query = query.where(webhooks.c.server_id == server_id)
    return _load(conn, query)


def update_webhook(
    conn: Connection,
    id: int,
    now: float,
    *,
    server_id: int | None = None,
    name: str | None = None,
    url: str | None = None,
    enabled: bool | None = None,
    events: Iterable[str] | Keep | None = KEEP,
) -> Webhook:
    """Change the settings given (``None`` leaves one as it is, except ``events``, where ``None`` means
    all events and `KEEP` leaves them); the webhook as it is now. `NotFound` if there is no such webhook
    (of ``server_id``, when given)."""
    values: dict[str, Any] = {}
    if url is not None:
        values["url"] = check_url(url)
    if name is not None:
        values["name"] = check_name(name)
    if enabled is not None:
        values["enabled"] = enabled
    chosen = None if events is None or events is KEEP else check_events(events)
    current = get_webhook(conn, id, server_id)
    if events is not KEEP:
        values["all_events"] = chosen is None
        conn.execute(webhook_events.delete().where(webhook_events.c.webhook_id == current.id))
        if chosen is not None:
            conn.execute(
                webhook_events.insert(), [{"webhook_id": current.id, "event": e} for e in sorted(chosen)]
            )
    if values:
        conn.execute(webhooks.update().where(webhooks.c.id == current.id).values(updated_at=now, **values))
    return get_webhook(conn, current.id)


def remove_webhook(conn: Connection, id: int, server_id: int | None = None) -> Webhook:
    """Delete a webhook (of ``server_id``, when given) and its event choices; its logged requests stay,
    without it. The webhook as it was; `NotFound` if there is none."""
    webhook = get_webhook(conn, id, server_id)
    conn.execute(webhooks.delete().where(webhooks.c.id == webhook.id))
    return webhook


def webhooks_for_event(conn: Connection, server_id: int, event: str) -> list[Webhook]:
    """The server's enabled webhooks that are sent ``event``, oldest first.

    Called for every event, so one query: the server's enabled webhooks (by the index on ``server_id``)
    that take all events or have chosen this one (by ``webhook_events``' primary key), each with its
    chosen events joined in (a row per event; a webhook for all events has none).
    """
    wanted = webhook_events.alias("wanted")
    chosen = sa.exists().where(wanted.c.webhook_id == webhooks.c.id, wanted.c.event == event)
    rows = conn.execute(
        sa.select(*_COLUMNS, webhook_events.c.event.label("chosen_event"))
        .select_from(webhooks.outerjoin(webhook_events, webhook_events.c.webhook_id == webhooks.c.id))
        .where(
            webhooks.c.server_id == server_id,
            webhooks.c.enabled == sa.true(),
            sa.or_(webhooks.c.all_events == sa.true(), chosen),
        )
        .order_by(webhooks.c.id)
    ).all()
    grouped: dict[int, tuple[sa.Row[*tuple[Any, ...]], list[str]]] = {}
    for row in rows:
        _, events = grouped.setdefault(row.id, (row, []))
        if row.chosen_event is not None:
            events.append(row.chosen_event)
    return [_from_row(row, events) for row, events in grouped.values()]


def touch_last_used(conn: Connection, webhook_ids: Collection[int], now: float) -> None:
    """Record that requests to these webhooks succeeded at ``now`` (never moving a later time back)."""
    if not webhook_ids:
        return
    conn.execute(
        webhooks.update()
        .where(
            webhooks.c.id.in_(sorted(set(webhook_ids))),
            sa.or_(webhooks.c.last_used_at.is_(None), webhooks.c.last_used_at < now),
        )
        .values(last_used_at=now)
    )


# -- the request log --------------------------------------------------------------------------------------


def record_webhook_requests(conn: Connection, requests: Sequence[WebhookRequest]) -> None:
    """Log attempts; one already logged (same ``uuid`` and ``attempt``) is left as it was.

    An attempt whose webhook has been deleted since is logged without it (``webhook_id`` NULL) rather
    than failing the batch on the foreign key.
    """
    if not requests:
        return
    named = {r.webhook_id for r in requests if r.webhook_id is not None}
    existing = (
        set(conn.execute(sa.select(webhooks.c.id).where(webhooks.c.id.in_(sorted(named)))).scalars())
        if named
        else set()
    )
    insert_ignoring_duplicates(
        conn,
        webhook_requests,
        [
            {
                "server_id": r.server_id,
                "webhook_id": r.webhook_id if r.webhook_id in existing else None,
                "uuid": r.uuid,
                "event": r.event,
                "url": r.url,
                "attempt": r.attempt,
                "timestamp": r.timestamp,
                "status_code": r.status_code,
                "duration": r.duration,
                "response": r.response,
                "payload": r.payload,
                "will_retry": r.will_retry,
                "error": r.error,
            }
            for r in requests
        ],
    )


def record_webhook_attempt(conn: Connection, request: WebhookRequest, succeeded_at: float | None) -> None:
    """One dispatcher attempt in one transaction: its log row and, when it succeeded, its webhook's last
    use."""
    record_webhook_requests(conn, [request])
    if succeeded_at is not None and request.webhook_id is not None:
        touch_last_used(conn, [request.webhook_id], succeeded_at)


def list_webhook_requests(
    conn: Connection,
    server_id: int | None,
    webhook_id: int | None = None,
    uuid: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[WebhookRequest]:
    """Logged requests, newest first (by time, then id), of a server (all servers' if None), of one
    webhook, of one ``uuid`` (the attempts for one event and webhook), up to ``limit``.

    ``before_id`` pages on: the requests after the one with that id in this order. If that request has
    been deleted under retention since, so have the older ones, and the page is empty.
    """
    query = sa.select(webhook_requests)
    if server_id is not None:
        query = query.where(webhook_requests.c.server_id == server_id)
    if webhook_id is not None:
        query = query.where(webhook_requests.c.webhook_id == webhook_id)
    if uuid is not None:
        query = query.where(webhook_requests.c.uuid == uuid)
    if before_id is not None:
        cursor = (
            sa.select(webhook_requests.c.timestamp)
            .where(webhook_requests.c.id == before_id)
            .scalar_subquery()
        )
        query = query.where(
            sa.or_(
                webhook_requests.c.timestamp < cursor,
                sa.and_(webhook_requests.c.timestamp == cursor, webhook_requests.c.id < before_id),
            )
        )
    query = query.order_by(webhook_requests.c.timestamp.desc(), webhook_requests.c.id.desc()).limit(limit)
    return [
        WebhookRequest(
            id=row.id,
            server_id=row.server_id,
            webhook_id=row.webhook_id,
            uuid=row.uuid,
            event=row.event,
            url=row.url,
            attempt=row.attempt,
            timestamp=row.timestamp,
            status_code=row.status_code,
            duration=row.duration,
            response=row.response,
            payload=row.payload,
            will_retry=bool(row.will_retry),
            error=row.error,
        )
        for row in conn.execute(query)
    ]


def delete_webhook_requests_before(conn: Connection, cutoff: float, limit: int) -> int:
    """Delete up to ``limit`` logged requests made before ``cutoff``, oldest first; return how many."""
    ids = list(
        conn.execute(
            sa.select(webhook_requests.c.id)
            .where(webhook_requests.c.timestamp < cutoff)
            .order_by(webhook_requests.c.timestamp, webhook_requests.c.id)
            .limit(limit)
        ).scalars()
    )
    if ids:
        conn.execute(webhook_requests.delete().where(webhook_requests.c.id.in_(ids)))
    return len(ids)


class WebhookRequestRetention(PeriodicSweep):
    """Every ``interval`` seconds, deletes logged webhook requests older than ``keep_seconds``.

    As `mtad.store.raw_messages.RawMessageRetention`: transactions of at most ``batch`` rows until one
    comes back short, the first sweep at start, a failed sweep logged and tried again at the next
    interval; several processes sweeping at once delete each row once.
    """

    log = Logger()
    task = "webhook request retention"

    def __init__(
        self,
        clock: IReactorTime,
        database: UnitOfWork,
        keep_seconds: float = DEFAULT_RETENTION_SECONDS,
        interval: float = 3600.0,
        batch: int = 1000,
    ) -> None:
        if keep_seconds < 0:
            raise ValueError(f"keep_seconds must not be negative, got {keep_seconds!r}")
        super().__init__(clock, interval, batch)
        self._database = database
        self.keep_seconds = keep_seconds

    async def sweep(self) -> int:
        """Delete the requests retention no longer keeps; return how many were deleted."""
        deleted = 0
        while not self._stopping:
            cutoff = self._clock.seconds() - self.keep_seconds
            count: int = await self._database.run(delete_webhook_requests_before, cutoff, self.batch)
            deleted += count
            if count < self.batch:
                break
        if deleted:
            self.log.info(
                "deleted {count} webhook requests older than {days:g} days",
                count=deleted,
                days=self.keep_seconds / 86400,
            )
        return deleted

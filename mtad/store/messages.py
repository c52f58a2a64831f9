"""Message history: one row per recipient, and one row per delivery attempt.

Rows are written by the event recorder (``mtad.events.recorder``) from the event stream, at least once, so
every write here is idempotent: a message is keyed by the id Redis allocated for it, a delivery by the id of
the event that reported it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import insert_ignoring_duplicates
from mtad.store.tables import deliveries, messages


class MessageStatus(enum.StrEnum):
    """Postal's message statuses, which its API and webhooks expose unchanged."""

    PENDING = "Pending"
    SENT = "Sent"
    SOFT_FAIL = "SoftFail"
    HARD_FAIL = "HardFail"
    HELD = "Held"
    BOUNCED = "Bounced"
    HOLD_CANCELLED = "HoldCancelled"
    PROCESSED = "Processed"
    ERROR = "Error"


class Scope(enum.StrEnum):
    OUTGOING = "outgoing"
    INCOMING = "incoming"


@attrs.frozen
class Message:
    id: int
    token: str
    server_id: int
    scope: Scope
    rcpt_to: str
    mail_from: str
    subject: str | None
    #: The Message-ID header (RFC 5322 §3.6.4).
    message_id: str | None
    size: int
    status: MessageStatus
    held: bool
    hold_expiry: float | None
    last_delivery_attempt: float | None
    tag: str | None
    #: When the message was accepted.
    timestamp: float
    #: Whether it reached us over TLS (always true for the HTTP API, as in Postal).
    received_with_ssl: bool = False
    #: Its raw message in `mtad.store.raw_messages` (shared by the messages of one accept); None for
    #: messages recorded before raw messages were kept.
    raw_message_id: int | None = None


@attrs.frozen
class Delivery:
    id: int
    event_id: str
    message_id: int
    attempt: int
    status: MessageStatus
    code: int | None
    output: str | None
    details: str | None
    sent_with_ssl: bool
    log_id: str | None
    #: Seconds the attempt took.
    time: float | None
    timestamp: float


@attrs.frozen
class DeliveryAttempt:
    """A delivery attempt to record, as reported by the event with id ``event_id``."""

    event_id: str
    message_id: int
    attempt: int
    status: MessageStatus
    output: str | None
    details: str | None
    sent_with_ssl: bool
    timestamp: float
    code: int | None = None
    log_id: str | None = None
    time: float | None = None
    #: For ``Held``: when the hold lapses.
    hold_expiry: float | None = None


def record_messages(conn: Connection, new_messages: list[Message], now: float) -> None:
    """Insert messages that are not recorded yet; ones already recorded are left as they are.

    A message's delivery can be recorded before the message itself: recorders in several processes share
    the event stream, and one may commit a batch of deliveries before another commits the batch with the
    matching ``message.queued`` events. The delivery's status update then found no row, so the newly
    inserted messages take the latest attempt already recorded for them.
    """
    insert_ignoring_duplicates(
        conn,
        messages,
        [
            {
                "id": m.id,
                "token": m.token,
                "server_id": m.server_id,
                "scope": m.scope.value,
                "rcpt_to": m.rcpt_to,
                "mail_from": m.mail_from,
                "subject": m.subject,
                "message_id": m.message_id,
                "size": m.size,
                "status": m.status.value,
                "held": m.held,
                "hold_expiry": m.hold_expiry,
                "last_delivery_attempt": m.last_delivery_attempt,
                "tag": m.tag,
                "timestamp": m.timestamp,
                "received_with_ssl": m.received_with_ssl,
                "raw_message_id": m.raw_message_id,
                "created_at": now,
                "updated_at": now,
            }
            for m in new_messages
        ],
    )
    _apply_recorded_deliveries(conn, [m.id for m in new_messages], now)


def _apply_recorded_deliveries(conn: Connection, ids: list[int], now: float) -> None:
    if not ids:
        return
    found = conn.execute(
        sa.select(
            deliveries.c.message_id, deliveries.c.status, deliveries.c.timestamp, deliveries.c.id
        ).where(deliveries.c.message_id.in_(ids))
    ).all()
    latest: dict[int, tuple[float, int, str]] = {}
    for message_id, status, timestamp, row_id in found:
        if message_id not in latest or (timestamp, row_id) > latest[message_id][:2]:
            latest[message_id] = (timestamp, row_id, status)
    if not latest:
        return
    # Only messages no attempt has reached yet: one with an attempt applied (a replayed batch) keeps it,
    # with the hold expiry that the attempt row does not keep (the queue in Redis enforces that one).
    conn.execute(
        _STATUS_UPDATE.where(messages.c.last_delivery_attempt.is_(None)).values(updated_at=now),
        [
            {
                "b_id": message_id,
                "b_timestamp": timestamp,
                "b_status": status,
                "b_held": status == MessageStatus.HELD.value,
                "b_hold_expiry": None,
            }
            for message_id, (timestamp, _, status) in latest.items()
        ],
    )


#: A message's status from a delivery attempt, unless a later attempt is already recorded (a replayed
#: old event must not turn a Sent message back into SoftFail).
_STATUS_UPDATE = (
    messages.update()
    .where(
        messages.c.id == sa.bindparam("b_id"),
        sa.or_(
            messages.c.last_delivery_attempt.is_(None),
            messages.c.last_delivery_attempt <= sa.bindparam("b_timestamp"),
        ),
    )
    .values(
        status=sa.bindparam("b_status"),
        held=sa.bindparam("b_held"),
        hold_expiry=sa.bindparam("b_hold_expiry"),
        last_delivery_attempt=sa.bindparam("b_timestamp"),
    )
)


def record_delivery(conn: Connection, attempt: DeliveryAttempt, now: float) -> None:
    """Record one delivery attempt; see `record_deliveries`."""
    record_deliveries(conn, [attempt], now)


def record_deliveries(conn: Connection, attempts: Sequence[DeliveryAttempt], now: float) -> None:
    """Insert delivery attempts (once per event) and bring their messages' status up to date.

    A message is updated only if the attempt is not older than the last one recorded, so a replayed old
    event cannot turn a Sent message back into SoftFail. Both statements run once for the whole batch
    (executemany, in order): the recorder's SQL time per event is what bounds its throughput.
    """
    if not attempts:
        return
    insert_ignoring_duplicates(
        conn,
        deliveries,
        [
            {
                "event_id": attempt.event_id,
                "message_id": attempt.message_id,
                "attempt": attempt.attempt,
                "status": attempt.status.value,
                "code": attempt.code,
                "output": attempt.output,
                "details": attempt.details,
                "sent_with_ssl": attempt.sent_with_ssl,
                "log_id": attempt.log_id,
                "time": attempt.time,
                "timestamp": attempt.timestamp,
            }
            for attempt in attempts
        ],
    )
    update = _STATUS_UPDATE.values(updated_at=now)
    rows = []
    for attempt in attempts:
        held = attempt.status is MessageStatus.HELD
        rows.append(
            {
                "b_id": attempt.message_id,
                "b_timestamp": attempt.timestamp,
                "b_status": attempt.status.value,
                "b_held": held,
                "b_hold_expiry": attempt.hold_expiry if held else None,
            }
        )
    conn.execute(update, rows)


def _message_from_row(row: sa.Row[*tuple[Any, ...]]) -> Message:
    return Message(
        id=row.id,
        token=row.token,
        server_id=row.server_id,
        scope=Scope(row.scope),
        rcpt_to=row.rcpt_to,
        mail_from=row.mail_from,
        subject=row.subject,
        message_id=row.message_id,
        size=row.size,
        status=MessageStatus(row.status),
        held=bool(row.held),
        hold_expiry=row.hold_expiry,
        last_delivery_attempt=row.last_delivery_attempt,
        tag=row.tag,
        timestamp=row.timestamp,
        received_with_ssl=bool(row.received_with_ssl),
        raw_message_id=row.raw_message_id,
    )


def _delivery_from_row(row: sa.Row[*tuple[Any, ...]]) -> Delivery:
    return Delivery(
        id=row.id,
        event_id=row.event_id,
        message_id=row.message_id,
        attempt=row.attempt,
        status=MessageStatus(row.status),
        code=row.code,
        output=row.output,
        details=row.details,
        sent_with_ssl=bool(row.sent_with_ssl),
        log_id=row.log_id,
        time=row.time,
        timestamp=row.timestamp,
    )


_MESSAGE_COLUMNS = [c for c in messages.c if c.name not in ("created_at", "updated_at")]


def find_message(conn: Connection, id: int) -> Message | None:
    row = conn.execute(sa.select(*_MESSAGE_COLUMNS).where(messages.c.id == id)).one_or_none()
    return None if row is None else _message_from_row(row)


def list_messages(
    conn: Connection, server_id: int, limit: int = 100, before: float | None = None
) -> list[Message]:
    """A server's messages, newest first; page with ``before`` = the last timestamp seen."""
    query = sa.select(*_MESSAGE_COLUMNS).where(messages.c.server_id == server_id)
    if before is not None:
        query = query.where(messages.c.timestamp < before)
    query = query.order_by(messages.c.timestamp.desc(), messages.c.id.desc()).limit(limit)
    return [_message_from_row(row) for row in conn.execute(query)]


@attrs.frozen
class HeldFilter:
    """Which held messages an operator command lists, releases or cancels; None matches anything.

    ``rcpt_to`` and ``mail_from`` match whole addresses, ignoring case; ``*`` in them matches any run of
    characters (``*@example.com``). ``held_before`` selects messages held before that time.
    """

    server_id: int | None = None
    rcpt_to: str | None = None
    mail_from: str | None = None
    held_before: float | None = None


def _address_condition(column: sa.ColumnElement[Any], pattern: str) -> sa.ColumnElement[bool]:
    value = pattern.strip().lower()
    if "*" not in value:
        return sa.func.lower(column) == value
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
    return sa.func.lower(column).like(escaped, escape="\\")


def _held_query(columns: Sequence[Any], where: HeldFilter) -> sa.Select[Any]:
    query = sa.select(*columns).where(messages.c.status == MessageStatus.HELD.value)
    if where.server_id is not None:
        query = query.where(messages.c.server_id == where.server_id)
    if where.rcpt_to is not None:
        query = query.where(_address_condition(messages.c.rcpt_to, where.rcpt_to))
    if where.mail_from is not None:
        query = query.where(_address_condition(messages.c.mail_from, where.mail_from))
    if where.held_before is not None:
        # A Held message's last delivery attempt is the hold itself.
        query = query.where(messages.c.last_delivery_attempt < where.held_before)
    return query.order_by(messages.c.last_delivery_attempt, messages.c.id)


def list_held_messages(conn: Connection, where: HeldFilter, limit: int | None = None) -> list[Message]:
    """Messages whose recorded status is Held and that match ``where``, the longest held first."""
    query = _held_query(_MESSAGE_COLUMNS, where)
    if limit is not None:
        query = query.limit(limit)
    return [_message_from_row(row) for row in conn.execute(query)]


def held_message_ids(conn: Connection, where: HeldFilter) -> list[int]:
    """The ids of every message `list_held_messages` would return, for acting on them in bulk."""
    return [
        row.id for row in conn.execute(_held_query([messages.c.id, messages.c.last_delivery_attempt], where))
    ]


def list_deliveries(conn: Connection, message_id: int) -> list[Delivery]:
    """A message's delivery attempts in the order they happened."""
    query = (
        sa.select(deliveries)
        .where(deliveries.c.message_id == message_id)
        .order_by(deliveries.c.timestamp, deliveries.c.id)
    )
    return [_delivery_from_row(row) for row in conn.execute(query)]

"""Message history: one row per recipient, and one row per delivery attempt.

Rows are written by the event recorder (``mtad.events.recorder``) from the event stream, at least once, so
every write here is idempotent: a message is keyed by the id Redis allocated for it, a delivery by the id of
the event that reported it.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import StoreError, insert_ignoring_duplicates
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
    #: A report that came back to a return path (`mtad.bounces`), and the message it was matched to.
    bounce: bool = False
    bounce_for_id: int | None = None

    @property
    def stand_in(self) -> bool:
        """The row a delivery recorded before its message created (`record_deliveries`): the envelope and
        the attempt's status, not the message's own details. No accepted message has size 0: SMTP and
        ``send/message`` prepend a Received field, and ``send/raw`` needs an authenticated From field."""
        return self.size == 0


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
    #: The message's envelope as the attempt's event names it, for the row an attempt recorded before its
    #: message creates (see `record_deliveries`); None where the event does not say.
    server_id: int | None = None
    token: str | None = None
    scope: Scope | None = None
    mail_from: str | None = None
    rcpt_to: str | None = None


#: The columns a message's ``message.queued`` event knows; its delivery attempts set the others.
_OWN_COLUMNS = (
    "token",
    "server_id",
    "scope",
    "rcpt_to",
    "mail_from",
    "subject",
    "message_id",
    "size",
    "tag",
    "timestamp",
    "received_with_ssl",
    "raw_message_id",
    "bounce",
    "bounce_for_id",
)
#: The columns the latest delivery attempt sets.
_ATTEMPT_COLUMNS = ("status", "held", "hold_expiry", "last_delivery_attempt")


def record_messages(conn: Connection, new_messages: Sequence[Message], now: float) -> None:
    """Record messages; one whose delivery is recorded already keeps that delivery's status.

    A message's delivery can be recorded before the message itself: recorders in several processes share
    the event stream, and one may commit a batch of deliveries before another commits the batch with the
    matching ``message.queued`` events, or while it is still uncommitted. So neither write reads the
    other's table to catch up (under READ COMMITTED or a REPEATABLE READ snapshot, two concurrent
    transactions can each miss the other's uncommitted row). Both are upserts of the message row instead:
    a delivery creates the row when it is missing (`record_deliveries`), and recording a message that has
    a row sets only the message's own columns, keeping the status its attempts gave it (a queued event
    knows of no attempt; a new row takes the message's status as given). The primary key makes the
    second writer wait for the first and then update the row the first committed, on SQLite, PostgreSQL
    and MySQL alike, so the result is the same in either order, without table locks.

    Recording a message again (a replayed event, which carries the same values) rewrites the same values.
    Rows are written in id order so that two batches lock the rows they share in the same order.
    """
    unique: dict[int, Message] = {}
    for m in new_messages:
        unique.setdefault(m.id, m)
    _upsert_messages(
        conn,
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
                "bounce": m.bounce,
                "bounce_for_id": m.bounce_for_id,
                "created_at": now,
                "updated_at": now,
            }
            for _, m in sorted(unique.items())
        ],
        (*_OWN_COLUMNS, "updated_at"),
        if_newer=False,
    )


def record_delivery(conn: Connection, attempt: DeliveryAttempt, now: float) -> None:
    """Record one delivery attempt; see `record_deliveries`."""
    record_deliveries(conn, [attempt], now)


def record_deliveries(conn: Connection, attempts: Sequence[DeliveryAttempt], now: float) -> None:
    """Insert delivery attempts (once per event) and bring their messages' status up to date.

    A message takes an attempt's status only if the attempt is not older than the last one recorded, so
    a replayed old event cannot turn a Sent message back into SoftFail; of several attempts for one message
    in the batch, the latest is applied (the last one given, among equally recent ones), as applying them
    one by one would. Each statement runs once for the whole batch: the recorder's SQL time per event is
    what bounds its throughput.

    A message not recorded yet (see `record_messages`) gets a row from its latest attempt: the envelope
    the event names (server, token, addresses), the attempt's time standing in for when it was accepted,
    size 0, no subject. Recording the message replaces those. If its ``message.queued`` event is lost
    (trimmed from the stream unread), the row stays so: the message and its attempts are still found by
    id for its server, with what is known of it, rather than attempts belonging to no message at all. An
    event naming no server gives server 0, which is no server's, so no API shows that row.
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
    # The latest attempt of each message, in id order: two batches lock the rows they share in one order.
    latest: dict[int, DeliveryAttempt] = {}
    for attempt in attempts:
        known = latest.get(attempt.message_id)
        if known is None or attempt.timestamp >= known.timestamp:
            latest[attempt.message_id] = attempt
    rows = []
    for message_id, attempt in sorted(latest.items()):
        held = attempt.status is MessageStatus.HELD
        rows.append(
            {
                "id": message_id,
                "token": attempt.token or "",
                "server_id": attempt.server_id or 0,
                "scope": (attempt.scope or Scope.OUTGOING).value,
                "rcpt_to": attempt.rcpt_to or "",
                "mail_from": attempt.mail_from or "",
                "size": 0,
                "status": attempt.status.value,
                "held": held,
                "hold_expiry": attempt.hold_expiry if held else None,
                "last_delivery_attempt": attempt.timestamp,
                "timestamp": attempt.timestamp,
                "created_at": now,
                "updated_at": now,
            }
        )
    _upsert_messages(conn, rows, (*_ATTEMPT_COLUMNS, "updated_at"), if_newer=True)


def _upsert_messages(
    conn: Connection, rows: list[dict[str, Any]], columns: tuple[str, ...], if_newer: bool
) -> None:
    """Insert message rows; where one exists, set ``columns`` from the new row (``if_newer``: only if the
    new row's attempt is not older than the recorded one)."""
    if rows:
        conn.execute(_upsert_statement(conn.dialect.name, columns, if_newer), rows)


@functools.cache
def _upsert_statement(dialect: str, columns: tuple[str, ...], if_newer: bool) -> sa.Executable:
    """Built once per kind: the recorder runs these for every batch.

    On PostgreSQL SQLAlchemy runs an ``ON CONFLICT`` statement once per row, and the server parses it
    each time; so the condition is one ``WHERE`` rather than a ``CASE`` per column (MySQL, which has no
    ``WHERE`` there, gets all rows in one statement).
    """
    recorded = messages.c.last_delivery_attempt
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        upsert = mysql.insert(messages)
        new = upsert.inserted
        newer = sa.or_(recorded.is_(None), recorded <= new.last_delivery_attempt)
        # MySQL assigns columns in order, each seeing those before it: the last attempt time, which
        # ``newer`` compares, goes last.
        ordered = sorted(columns, key=lambda name: name == "last_delivery_attempt")
        return upsert.on_duplicate_key_update(
            [
                (name, sa.case((newer, new[name]), else_=messages.c[name]) if if_newer else new[name])
                for name in ordered
            ]
        )
    insert: Any
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        insert = sqlite.insert(messages)
    elif dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        insert = postgresql.insert(messages)
    else:
        raise StoreError(f"unsupported database {dialect!r}")
    new = insert.excluded
    statement: sa.Executable = insert.on_conflict_do_update(
        index_elements=[messages.c.id],
        set_={name: new[name] for name in columns},
        where=sa.or_(recorded.is_(None), recorded <= new.last_delivery_attempt) if if_newer else None,
    )
    return statement


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
        bounce=bool(row.bounce),
        bounce_for_id=row.bounce_for_id,
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


def find_messages_by_tokens(conn: Connection, tokens: Sequence[str]) -> list[Message]:
    """The messages with these tokens (Postal's ``X-Postal-MsgID`` matching), in the order of ``tokens``.

    Tokens are compared exactly: they are mixed-case. (A token is unique in practice, ~71 random bits;
    should two messages share one, both are returned.)
    """
    if not tokens:
        return []
    rows = conn.execute(sa.select(*_MESSAGE_COLUMNS).where(messages.c.token.in_(list(tokens)))).all()
    order = {token: n for n, token in enumerate(tokens)}
    found = [_message_from_row(row) for row in rows if row.token in order]
    return sorted(found, key=lambda m: (order[m.token], m.id))


def last_attempt(conn: Connection, message_id: int) -> int:
    """The highest attempt number among a message's recorded deliveries; 0 when it has none."""
    found = conn.execute(
        sa.select(sa.func.max(deliveries.c.attempt)).where(deliveries.c.message_id == message_id)
    ).scalar_one()
    return int(found or 0)


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

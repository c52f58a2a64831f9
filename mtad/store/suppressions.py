"""The suppression list: addresses a server does not send to, each with why, since when and until when.

One row per (server, address), the address lower-cased (`normalize_address`), so a lookup is one indexed
equality. Each row has a ``source`` (`SuppressionSource`: a hard bounce, repeated soft failures, a
complaint, an operator, an unsubscribe), words for people (``reason``), the message that caused it when
one did, and ``expires_at`` (None: never). Unlike Postal (``../shared/reference/postal.md`` §4.7), whose
list was never pruned (postalserver/postal#815) and could not be edited (#58, #1282), expired rows are
ignored by every lookup at once and deleted by `SuppressionExpiry`, and the list is edited, paged and
exported through `add_suppression`, `remove_suppression`, `list_suppressions` and
`export_suppressions`.

Adding an address already listed keeps one row (`add_suppression`): the newer cause replaces the older
one's source, reason, message and time, and the expiry only ever moves later (never-expiring wins), so a
hard bounce after a complaint does not let the address expire in 30 days. A cause that is older than the
row's (an event handled late or twice) changes only the expiry, by the same rule; so handling the same
event again changes nothing, and two processes adding the same address at once leave one row.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.store.db import FieldError, NotFound, insert_ignoring_duplicates
from mtad.store.raw_messages import UnitOfWork
from mtad.store.tables import servers, suppressions
from mtad.sweeps import PeriodicSweep

#: ``suppressions.address`` holds this many characters (RFC 5321 §4.5.3.1: 64 + 1 + 255).
MAX_ADDRESS_LENGTH = 320

#: ``list_suppressions`` gives this many rows a page unless asked otherwise, and at most ``MAX_PER_PAGE``.
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 1000

#: Addresses per ``IN (...)`` list: well inside every backend's limit on bound parameters.
_LOOKUP_CHUNK = 500


class SuppressionSource(enum.StrEnum):
    """Why an address is suppressed."""

    #: A permanent failure saying the mailbox does not exist (category ``bad_mailbox``), at delivery
    #: time or in a bounce.
    HARD_BOUNCE = "HardBounce"
    #: Soft failures in a row with no successful delivery between.
    SOFT_FAILURES = "SoftFailures"
    #: The recipient reported a message as spam (an ARF feedback report).
    COMPLAINT = "Complaint"
    #: An operator added it.
    MANUAL = "Manual"
    #: The recipient unsubscribed.
    UNSUBSCRIBE = "Unsubscribe"


_SOURCES = frozenset(s.value for s in SuppressionSource)


class SuppressionError(FieldError):
    """A suppression's input is wrong; ``field`` names it (``address``, ``source``, ...)."""


@attrs.frozen
class Suppression:
    id: int
    server_id: int
    #: Lower-cased.
    address: str
    source: SuppressionSource
    #: The SMTP reply, DSN status or the operator's note.
    reason: str | None
    #: The message whose delivery, bounce or complaint caused it.
    message_id: int | None
    #: When its (latest) cause happened.
    created_at: float
    #: None: never expires.
    expires_at: float | None

    def active_at(self, now: float) -> bool:
        """Whether the address is still suppressed at ``now``."""
        return self.expires_at is None or self.expires_at > now


@attrs.frozen
class SuppressionPage:
    """One page of `list_suppressions`: ``total`` rows match the filters in all."""

    suppressions: tuple[Suppression, ...]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


def normalize_address(address: str) -> str:
    """The form an address is listed and looked up in: without surrounding space, lower-cased.

    RFC 5321 §2.4 lets a local part be case-sensitive, but no mailbox provider treats ``Bob@`` and
    ``bob@`` as two people, and a list that missed ``Bob@`` would send to a known bad mailbox again.
    """
    return address.strip().lower()


def check_address(address: object, field: str = "address") -> str:
    """``address`` normalized if it can be listed; `SuppressionError` saying what is wrong otherwise."""
    if not isinstance(address, str):
        raise SuppressionError(field, f"`{field}` must be a string: an e-mail address")
    normalized = normalize_address(address)
    local, at, domain = normalized.rpartition("@")
    if not at or not local or not domain:
        raise SuppressionError(field, f"`{field}` must be an e-mail address (local@domain), not {address!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in normalized):
        raise SuppressionError(field, f"`{field}` must not contain spaces or control characters")
    if len(normalized) > MAX_ADDRESS_LENGTH:
        raise SuppressionError(field, f"`{field}` must be at most {MAX_ADDRESS_LENGTH} characters")
    return normalized


def check_source(source: object, field: str = "source") -> SuppressionSource:
    """``source`` as a `SuppressionSource` (exactly spelled); `SuppressionError` listing them otherwise."""
    if isinstance(source, str) and source in _SOURCES:
        return SuppressionSource(source)
    shown = repr(source) if isinstance(source, str) else f"a {type(source).__name__}"
    raise SuppressionError(
        field, f"`{field}` is {shown}; the sources are {', '.join(s.value for s in SuppressionSource)}"
    )


def _from_row(row: sa.Row[*tuple[Any, ...]]) -> Suppression:
    return Suppression(
        id=row.id,
        server_id=row.server_id,
        address=row.address,
        source=SuppressionSource(row.source),
        reason=row.reason,
        message_id=row.message_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


def _later(a: float | None, b: float | None) -> float | None:
    """The later of two expiries, None (never) being the latest."""
    return None if a is None or b is None else max(a, b)


def _merged(existing: Suppression, new: Suppression) -> Suppression:
    """``existing`` after ``new`` is added (see the module docstring)."""
    if not existing.active_at(new.created_at):
        # Expired (not swept yet): the address was no longer suppressed, so this starts afresh.
        return attrs.evolve(new, id=existing.id)
    expires_at = _later(existing.expires_at, new.expires_at)
    if new.created_at >= existing.created_at:
        return attrs.evolve(new, id=existing.id, expires_at=expires_at)
    return attrs.evolve(existing, expires_at=expires_at)


def _select(conn: Connection, server_id: int, address: str, *, lock: bool = False) -> Suppression | None:
    query = sa.select(suppressions).where(
        suppressions.c.server_id == server_id, suppressions.c.address == address
    )
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).one_or_none()
    return None if row is None else _from_row(row)


def add_suppression(
    conn: Connection,
    server_id: int,
    address: str,
    source: SuppressionSource | str,
    at: float,
    *,
    reason: str | None = None,
    message_id: int | None = None,
    expires_at: float | None = None,
) -> Suppression:
    """List ``address`` for the server as of ``at`` until ``expires_at`` (None: never); the row as it is
    now, merged with one already there (see the module docstring). `SuppressionError` names the input
    that is wrong; `NotFound` if there is no such server.

    Insert-if-absent, then update the row locked: two transactions adding the same address at once
    wait for each other on the unique key instead of one failing.
    """
    address = check_address(address)
    source = check_source(source)
    if expires_at is not None and expires_at <= at:
        raise SuppressionError("expires_at", "`expires_at` must be later than now")
    if reason is not None:
        reason = reason.strip() or None
    if conn.execute(sa.select(servers.c.id).where(servers.c.id == server_id)).first() is None:
        raise NotFound(f"no server with id {server_id}")
    values: dict[str, Any] = {
        "server_id": server_id,
        "address": address,
        "source": source.value,
        "reason": reason,
        "message_id": message_id,
        "created_at": at,
        "expires_at": expires_at,
    }
    insert_ignoring_duplicates(conn, suppressions, [values])
    existing = _select(conn, server_id, address, lock=True)
    assert existing is not None
    new = Suppression(
        id=existing.id,
        server_id=server_id,
        address=address,
        source=source,
        reason=reason,
        message_id=message_id,
        created_at=at,
        expires_at=expires_at,
    )
    merged = _merged(existing, new)
    if merged != existing:
        conn.execute(
            suppressions.update()
            .where(suppressions.c.id == existing.id)
            .values(
                source=merged.source.value,
                reason=merged.reason,
                message_id=merged.message_id,
                created_at=merged.created_at,
                expires_at=merged.expires_at,
            )
        )
    return merged


def add_suppressions(conn: Connection, new: Iterable[Suppression]) -> list[Suppression]:
    """`add_suppression` for each of ``new`` (their ``id`` is ignored), in one transaction, in order;
    rows of servers deleted meanwhile are skipped rather than failing the rest."""
    added = []
    for s in new:
        try:
            added.append(
                add_suppression(
                    conn,
                    s.server_id,
                    s.address,
                    s.source,
                    s.created_at,
                    reason=s.reason,
                    message_id=s.message_id,
                    expires_at=s.expires_at,
                )
            )
        except NotFound:
            continue
    return added


def find_suppression(
    conn: Connection, server_id: int, address: str, now: float | None = None
) -> Suppression | None:
    """The server's row for ``address`` (any case), if active at ``now`` when given; else None."""
    found = _select(conn, server_id, normalize_address(address))
    if found is None or (now is not None and not found.active_at(now)):
        return None
    return found


def remove_suppression(conn: Connection, server_id: int, address: str) -> Suppression | None:
    """Take ``address`` off the server's list; the row removed (even an expired one), or None."""
    found = _select(conn, server_id, normalize_address(address))
    if found is None:
        return None
    conn.execute(suppressions.delete().where(suppressions.c.id == found.id))
    return found


@attrs.frozen
class Delivered:
    """A message delivered (``Sent``) to ``address`` of a server at ``at``: evidence the mailbox works."""

    server_id: int
    address: str
    at: float
    message_id: int | None = None


def remove_delivered(
    conn: Connection, delivered: Iterable[Delivered], sources: Collection[SuppressionSource]
) -> list[Suppression]:
    """Take off the list each address a message was delivered to, when its row is of one of ``sources``
    and its cause is not newer than the delivery; the rows removed.

    Postal does the same after every ``Sent`` (``remove_recipient_from_suppression_list_on_success``):
    a mailbox that took mail is no bad mailbox. The time test makes it safe to run late or twice: a
    delivery handled again after a crash, or one overtaken by a later bounce or complaint, never removes
    the suppression that came after it. Every delivery of a batch costs one indexed query together (per
    500 addresses), almost always finding nothing; each row found is deleted only if it still passes the
    test, so a cause written meanwhile by another transaction survives.
    """
    latest: dict[tuple[int, str], Delivered] = {}
    for d in delivered:
        key = (d.server_id, normalize_address(d.address))
        if key not in latest or d.at > latest[key].at:
            latest[key] = d
    wanted = sorted(s.value for s in sources)
    if not latest or not wanted:
        return []
    addresses = sorted({address for _, address in latest})
    server_ids = sorted({server_id for server_id, _ in latest})
    candidates: list[tuple[Suppression, float]] = []
    for start in range(0, len(addresses), _LOOKUP_CHUNK):
        rows = conn.execute(
            sa.select(suppressions).where(
                suppressions.c.address.in_(addresses[start : start + _LOOKUP_CHUNK]),
                suppressions.c.server_id.in_(server_ids),
                suppressions.c.source.in_(wanted),
            )
        )
        for row in rows:
            found = latest.get((row.server_id, row.address))
            if found is not None and row.created_at <= found.at:
                candidates.append((_from_row(row), found.at))
    removed = []
    for candidate, at in candidates:
        result = conn.execute(
            suppressions.delete().where(
                suppressions.c.id == candidate.id,
                suppressions.c.source.in_(wanted),
                suppressions.c.created_at <= at,
            )
        )
        if result.rowcount:
            removed.append(candidate)
    return removed


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered(
    query: sa.Select[Any],
    server_id: int,
    now: float,
    source: SuppressionSource | str | None,
    search: str | None,
) -> sa.Select[Any]:
    query = query.where(
        suppressions.c.server_id == server_id,
        sa.or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > now),
    )
    if source is not None:
        query = query.where(suppressions.c.source == check_source(source).value)
    if search is not None and search.strip():
        pattern = f"%{_like_escaped(normalize_address(search))}%"
        query = query.where(suppressions.c.address.like(pattern, escape="\\"))
    return query


def list_suppressions(
    conn: Connection,
    server_id: int,
    now: float,
    *,
    page: int = 1,
    per_page: int = DEFAULT_PER_PAGE,
    source: SuppressionSource | str | None = None,
    search: str | None = None,
) -> SuppressionPage:
    """Page ``page`` (from 1) of the server's addresses suppressed at ``now``, newest cause first, of
    ``source`` and containing ``search`` (ignoring case) when given; with how many match in all."""
    if page < 1:
        raise SuppressionError("page", "`page` must be at least 1")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise SuppressionError("per_page", f"`per_page` must be from 1 to {MAX_PER_PAGE}")
    total = conn.execute(
        _filtered(sa.select(sa.func.count()).select_from(suppressions), server_id, now, source, search)
    ).scalar_one()
    rows = conn.execute(
        _filtered(sa.select(suppressions), server_id, now, source, search)
        .order_by(suppressions.c.created_at.desc(), suppressions.c.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    return SuppressionPage(tuple(_from_row(r) for r in rows), int(total), page, per_page)


def export_suppressions(
    conn: Connection,
    server_id: int,
    now: float,
    *,
    after_id: int = 0,
    limit: int = 1000,
    source: SuppressionSource | str | None = None,
    search: str | None = None,
) -> list[Suppression]:
    """Up to ``limit`` of the server's addresses suppressed at ``now`` (filtered as `list_suppressions`),
    by id, after ``after_id``: an export reads the whole list in these chunks, one short transaction
    each, however long the list, and rows added meanwhile are not skipped or repeated."""
    rows = conn.execute(
        _filtered(sa.select(suppressions), server_id, now, source, search)
        .where(suppressions.c.id > after_id)
        .order_by(suppressions.c.id)
        .limit(limit)
    )
    return [_from_row(r) for r in rows]


def active_suppressions(
    conn: Connection, recipients: Collection[tuple[int, str]], now: float
) -> dict[tuple[int, str], Suppression]:
    """Which of ``recipients`` (server id, address in any case) are suppressed at ``now``, keyed by
    (server id, normalized address): one query for a delivery batch (per 500 distinct addresses)."""
    wanted = {(server_id, normalize_address(address)) for server_id, address in recipients}
    addresses = sorted({address for _, address in wanted})
    server_ids = sorted({server_id for server_id, _ in wanted})
    found: dict[tuple[int, str], Suppression] = {}
    for start in range(0, len(addresses), _LOOKUP_CHUNK):
        rows = conn.execute(
            sa.select(suppressions).where(
                suppressions.c.address.in_(addresses[start : start + _LOOKUP_CHUNK]),
                suppressions.c.server_id.in_(server_ids),
                sa.or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > now),
            )
        )
        for row in rows:
            key = (row.server_id, row.address)
            if key in wanted:
                found[key] = _from_row(row)
    return found


def delete_expired_suppressions(conn: Connection, now: float, limit: int) -> int:
    """Delete up to ``limit`` rows that expired before ``now``, oldest expiry first; how many."""
    ids = list(
        conn.execute(
            sa.select(suppressions.c.id)
            .where(suppressions.c.expires_at.is_not(None), suppressions.c.expires_at <= now)
            .order_by(suppressions.c.expires_at, suppressions.c.id)
            .limit(limit)
        ).scalars()
    )
    if ids:
        conn.execute(suppressions.delete().where(suppressions.c.id.in_(ids)))
    return len(ids)


class SuppressionExpiry(PeriodicSweep):
    """Every ``interval`` seconds, deletes expired suppressions in transactions of at most ``batch``.

    Lookups already ignore expired rows; this keeps the table from growing without bound (Postal's
    prune job was never scheduled, postalserver/postal#815). Several processes sweeping at once delete
    each row once.
    """

    log = Logger()
    task = "suppression expiry"

    def __init__(
        self, clock: IReactorTime, database: UnitOfWork, interval: float = 3600.0, batch: int = 1000
    ) -> None:
        super().__init__(clock, interval, batch)
        self._database = database

    async def sweep(self) -> int:
        deleted = 0
        while not self._stopping:
            count: int = await self._database.run(
                delete_expired_suppressions, self._clock.seconds(), self.batch
            )
            deleted += count
            if count < self.batch:
                break
        if deleted:
            self.log.info("deleted {count} expired suppressions", count=deleted)
        return deleted

"""Raw messages under retention: the octets of each accepted message, kept in SQL after it left the queue.

A body is stored once per accept, however many recipients share it, under the id Redis gave it (the first
message id of the accept; ``messages.raw_message_id`` points at it). The recorder stores it in the same
transaction as the messages of its ``message.queued`` events, so a recorded message always has its raw
message until retention deletes it. Storing is idempotent (the id is the key), as the recorder's events
arrive at least once.

Each raw message is split into parts of at most `PART_SIZE` octets: one row per part keeps every
statement well below MySQL's ``max_allowed_packet`` (16 MiB by default on MariaDB), which a whole 25 MiB
message would exceed.

Retention is Postal's ``raw_message_retention_days`` and ``raw_message_retention_size``, installation-wide:
`RawMessageRetention` deletes raw messages accepted more than ``keep_seconds`` ago and, with a size cap, the
oldest ones until the rest fit. The messages themselves stay (with their history); asking the API for a
deleted raw message gets Postal's answer for a purged one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.store.db import insert_ignoring_duplicates
from mtad.store.tables import raw_message_parts, raw_messages
from mtad.sweeps import PeriodicSweep

#: Octets per stored part of a raw message.
PART_SIZE = 1024 * 1024


@attrs.frozen
class RawMessage:
    """A raw message to store: ``id`` is the id of the first message of its accept."""

    id: int
    server_id: int
    #: When it was accepted; retention counts from here.
    timestamp: float
    data: bytes


def store_raw_messages(conn: Connection, raw: Sequence[RawMessage], now: float) -> None:
    """Store raw messages not stored yet; ones already there (same id) are left as they are."""
    if not raw:
        return
    insert_ignoring_duplicates(
        conn,
        raw_messages,
        [
            {
                "id": r.id,
                "server_id": r.server_id,
                "timestamp": r.timestamp,
                "size": len(r.data),
                "created_at": now,
            }
            for r in raw
        ],
    )
    parts = []
    for r in raw:
        # Part 0 always exists, even for an empty message.
        for number, start in enumerate(range(0, max(len(r.data), 1), PART_SIZE)):
            parts.append({"raw_message_id": r.id, "part": number, "data": r.data[start : start + PART_SIZE]})
    insert_ignoring_duplicates(conn, raw_message_parts, parts)


def raw_message_data(conn: Connection, raw_message_id: int) -> bytes | None:
    """The octets of a stored raw message; None if there is none (deleted under retention, or never kept)."""
    rows = conn.execute(
        sa.select(raw_message_parts.c.data)
        .where(raw_message_parts.c.raw_message_id == raw_message_id)
        .order_by(raw_message_parts.c.part)
    ).all()
    if not rows:
        return None
    # psycopg2 gives memoryview, the others bytes.
    return b"".join(bytes(row.data) for row in rows)


def _delete(conn: Connection, ids: list[int]) -> None:
    if ids:
        conn.execute(raw_message_parts.delete().where(raw_message_parts.c.raw_message_id.in_(ids)))
        conn.execute(raw_messages.delete().where(raw_messages.c.id.in_(ids)))


def delete_raw_messages_before(conn: Connection, before: float, limit: int) -> int:
    """Delete up to ``limit`` raw messages accepted before ``before``, oldest first; return how many."""
    ids = list(
        conn.execute(
            sa.select(raw_messages.c.id)
            .where(raw_messages.c.timestamp < before)
            .order_by(raw_messages.c.timestamp, raw_messages.c.id)
            .limit(limit)
        ).scalars()
    )
    _delete(conn, ids)
    return len(ids)


def delete_raw_messages_over(conn: Connection, max_bytes: int, limit: int) -> int:
    """Delete the oldest raw messages (up to ``limit``) until all of them take at most ``max_bytes``."""
    excess = raw_messages_size(conn) - max_bytes
    if excess <= 0:
        return 0
    oldest = conn.execute(
        sa.select(raw_messages.c.id, raw_messages.c.size)
        .order_by(raw_messages.c.timestamp, raw_messages.c.id)
        .limit(limit)
    )
    ids = []
    for row in oldest:
        ids.append(row.id)
        excess -= row.size
        if excess <= 0:
            break
    _delete(conn, ids)
    return len(ids)


def raw_messages_size(conn: Connection) -> int:
    """Octets of all stored raw messages."""
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(raw_messages.c.size), 0))).scalar_one())


class UnitOfWork(Protocol):
    """What the retention sweep needs of `mtad.store.db.Database`: run a sync function in a transaction."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class RawMessageRetention(PeriodicSweep):
    """Every ``interval`` seconds, deletes raw messages older than ``keep_seconds`` and, if ``max_bytes``
    is set, the oldest ones beyond that total size.

    Deletion goes in transactions of at most ``batch`` raw messages until one comes back short, so a
    backlog clears in one sweep without one huge transaction locking the tables. The first sweep runs at
    start. A failed sweep (database unavailable) is logged and the next one tries again. Several mtad
    processes may sweep at once: a raw message is deleted once, whoever gets there first.
    """

    log = Logger()
    task = "raw message retention"

    def __init__(
        self,
        clock: IReactorTime,
        database: UnitOfWork,
        keep_seconds: float,
        max_bytes: int | None = None,
        interval: float = 3600.0,
        batch: int = 1000,
    ) -> None:
        if keep_seconds < 0:
            raise ValueError(f"keep_seconds must not be negative, got {keep_seconds!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes!r}")
        super().__init__(clock, interval, batch)
        self._database = database
        self.keep_seconds = keep_seconds
        self.max_bytes = max_bytes

    async def sweep(self) -> int:
        """Delete the raw messages retention no longer keeps; return how many were deleted."""
        expired = 0
        while not self._stopping:
            before = self._clock.seconds() - self.keep_seconds
            count: int = await self._database.run(delete_raw_messages_before, before, self.batch)
            expired += count
            if count < self.batch:
                break
        over = 0
        while self.max_bytes is not None and not self._stopping:
            count = await self._database.run(delete_raw_messages_over, self.max_bytes, self.batch)
            over += count
            if count < self.batch:
                break
        if expired or over:
            self.log.info(
                "deleted {expired} raw messages older than {days:g} days and {over} over the size limit",
                expired=expired,
                days=self.keep_seconds / 86400,
                over=over,
            )
        return expired + over

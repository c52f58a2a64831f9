"""The archive catch-up: raw messages whose ``message.queued`` events the recorder never read.

Every accepted body stays pinned in Redis until it is in SQL (`mtad.events.recorder`). The recorder
releases the bodies its events name; but the event stream is capped (``XADD MAXLEN ~``), and an event
trimmed before the recorder read it (a recorder down for long, a burst beyond the cap) or otherwise lost
names its body to no one. Without a catch-up that body would stay in Redis forever, and its raw message
would never reach SQL.

So `ArchiveCatchUp` looks, every ``interval`` seconds, for bodies pinned longer than ``after`` seconds (the
queue lists every pinned body by accept time), stores them as raw messages with the same function as the
recorder and releases them the same way. Both are idempotent, so a recorder that reads the event after all
(it was only late) or a second mtad process sweeping at the same time changes nothing: the raw message is
stored once (its id is the key), a pin is removed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.events.recorder import UnitOfWork
from mtad.queue.model import PinnedBody
from mtad.store.raw_messages import RawMessage, store_raw_messages
from mtad.sweeps import PeriodicSweep


class PinnedBodies(Protocol):
    """What the catch-up needs of the queue (`mtad.queue.redis_queue.RedisQueue`)."""

    def pinned_before(self, before: float, limit: int, max_bytes: int) -> Deferred[list[PinnedBody]]:
        """Bodies pinned since at or before ``before``, oldest first, bounded by count and bytes."""

    def release_archived(self, raw_message_ids: Sequence[int]) -> Deferred[int]:
        """Unpin these bodies: they are in SQL now (idempotent)."""


class ArchiveCatchUp(PeriodicSweep):
    """Every ``interval`` seconds, archives the bodies pinned for longer than ``after`` seconds.

    Each batch (at most ``batch`` bodies and, beyond the first, ``batch_bytes`` of them) is read in one Redis
    call, stored in one transaction and released in one Redis call after the commit; batches follow each
    other until none is left, so a backlog clears in one sweep without one huge transaction. The first sweep
    runs at start. A failed sweep (Redis or the database unavailable) is logged and the next one tries
    again; a crash between storing and releasing only means the next sweep stores the batch again (a no-op).

    ``after`` should be well beyond how far the recorder normally lags, so that the recorder, not the
    catch-up, archives almost every body.
    """

    log = Logger()
    task = "raw message catch-up"

    def __init__(
        self,
        clock: IReactorTime,
        database: UnitOfWork,
        queue: PinnedBodies,
        after: float,
        interval: float = 300.0,
        batch: int = 100,
        batch_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if after < 0:
            raise ValueError(f"after must not be negative, got {after!r}")
        super().__init__(clock, interval, batch)
        self._database = database
        self._queue = queue
        self.after = after
        self.batch_bytes = batch_bytes

    async def sweep(self) -> int:
        """Archive and release every body pinned for longer than ``after``; return how many."""
        total = 0
        while not self._stopping:
            now = self._clock.seconds()
            pinned = await self._queue.pinned_before(now - self.after, self.batch, self.batch_bytes)
            if not pinned:
                break
            raw = [RawMessage(p.id, p.server_id, p.accepted_at, p.data) for p in pinned]
            await self._database.run(store_raw_messages, raw, now)
            await self._queue.release_archived([p.id for p in pinned])
            total += len(pinned)
        if total:
            self.log.warn(
                "archived {count} raw messages the recorder had not archived within {after:g}s of "
                "acceptance (their message.queued events were trimmed from the stream or not read yet)",
                count=total,
                after=self.after,
            )
        return total

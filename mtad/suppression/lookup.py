"""`SuppressionLookup`: which messages of a claimed batch go to a suppressed recipient.

The delivery service asks once per claimed batch, before anything is delivered
(`mtad.outbound.delivery`). The answer comes from SQL, where the list is (`mtad.store.suppressions`),
with one query for every recipient of the batch not already cached, run in the database thread pool
(`active_suppressions`), and each answer, suppressed or not, is kept ``cache_seconds`` per process.

SQL and not a Redis mirror: the list is edited by operators, the API and the trigger, all through SQL,
and a mirror would be one more copy to keep in step across processes and restores for a lookup that is
one indexed query per batch of up to a hundred messages. The price is that a change takes up to
``cache_seconds`` to reach a process that cached the address, which is why that is short; an expiry is
honoured at once even for cached entries, since each carries its ``expires_at``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mtad.caching import ExpiringCache
from mtad.store.suppressions import Suppression, active_suppressions, normalize_address


class UnitOfWork(Protocol):
    """What the lookup needs of `mtad.store.db.Database`."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class Recipient(Protocol):
    """What the lookup reads of a message (the queue's claimed messages are ones)."""

    @property
    def id(self) -> int: ...
    @property
    def server_id(self) -> int: ...
    @property
    def rcpt_to(self) -> str: ...


class _Absent(enum.Enum):
    ABSENT = "absent"


#: Cached for an address that is not suppressed (the cache's own None means "not cached").
_NOT_SUPPRESSED = _Absent.ABSENT


class SuppressionLookup:
    """Suppressed recipients of a batch, by message id (see the module docstring).

    ``timeout`` bounds the database's answer, so a stalled database delays a batch by at most that
    much: the caller then delivers without the check rather than not at all.
    """

    def __init__(
        self,
        database: UnitOfWork,
        clock: IReactorTime,
        cache_seconds: float = 15.0,
        timeout: float = 10.0,
        cache_size: int = 50_000,
    ) -> None:
        self._database = database
        self._clock = clock
        self.timeout = timeout
        self._cache: ExpiringCache[tuple[int, str], Suppression | _Absent] = ExpiringCache(
            clock, cache_seconds, cache_size
        )
        #: SQL queries made (for tests and metrics).
        self.queries = 0

    async def suppressed(self, messages: Iterable[Recipient]) -> dict[int, Suppression]:
        """The messages among ``messages`` whose recipient is suppressed now, with its entry."""
        now = self._clock.seconds()
        by_key: dict[tuple[int, str], list[int]] = {}
        for message in messages:
            key = (message.server_id, normalize_address(message.rcpt_to))
            by_key.setdefault(key, []).append(message.id)
        entries: dict[tuple[int, str], Suppression] = {}
        missing: list[tuple[int, str]] = []
        for key in by_key:
            cached = self._cache.get(key)
            if cached is None:
                missing.append(key)
            elif isinstance(cached, Suppression):
                entries[key] = cached
        if missing:
            self.queries += 1
            d = self._database.run(active_suppressions, missing, now)
            d.addTimeout(self.timeout, self._clock)
            found: dict[tuple[int, str], Suppression] = await d
            for key in missing:
                entry = found.get(key)
                self._cache.put(key, _NOT_SUPPRESSED if entry is None else entry)
                if entry is not None:
                    entries[key] = entry
        return {
            message_id: entry
            for key, entry in entries.items()
            if entry.active_at(now)
            for message_id in by_key[key]
        }

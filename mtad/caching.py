"""Small caches for lookups on hot paths (credentials, servers, domains, MX answers).

Both are per process and timed by the injected clock; values that must be shared by every process (limits,
counters) live in Redis instead (DESIGN.md invariant 6).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    """Values that expire ``seconds`` after they were stored, by the injected clock; at most ``size``."""

    def __init__(self, clock: IReactorTime, seconds: float, size: int = 10_000) -> None:
        self._clock = clock
        self._seconds = seconds
        self._size = size
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock.seconds():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        now = self._clock.seconds()
        if key not in self._entries and len(self._entries) >= self._size:
            for stale in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                del self._entries[stale]
            if len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]  # the oldest insertion
        self._entries.pop(key, None)
        self._entries[key] = (now + self._seconds, value)

    def __len__(self) -> int:
        return len(self._entries)


class SharedLookups(Generic[K, V]):
    """Concurrent lookups of the same key share one: the first caller runs it, the others wait for it.

    A cache that has just expired would otherwise send every request arriving during the refresh to the
    database at once (the SQLite pool has a single thread).
    """

    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[V]]] = {}

    async def run(self, key: K, lookup: Callable[[], Awaitable[V]]) -> V:
        waiting = self._waiting.get(key)
        if waiting is not None:
            d: Deferred[V] = Deferred()
            waiting.append(d)
            return await d
        self._waiting[key] = []
        try:
            value = await lookup()
        except Exception as e:
            for d in self._waiting.pop(key):
                d.errback(e)
            raise
        for d in self._waiting.pop(key):
            d.callback(value)
        return value


class CachedLookups(Generic[K, V]):
    """An `ExpiringCache` in front of `SharedLookups`: a value found is kept ``seconds``, and the lookups
    of a key not cached share one. ``None`` is never cached (it is the cache's "missing")."""

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self._cache: ExpiringCache[K, V] = ExpiringCache(clock, seconds)
        self._lookups: SharedLookups[K, V] = SharedLookups()

    async def get(self, key: K, lookup: Callable[[], Awaitable[V]]) -> V:
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        value = await self._lookups.run(key, lookup)
        if value is not None:
            self._cache.put(key, value)
        return value

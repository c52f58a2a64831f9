"""Shared pieces for outbound tests: an in-memory connection limiter and polling helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater


class MemoryLimiter:
    """In-memory stand-in for the Redis limiter with the same all-or-none lease semantics."""

    def __init__(self) -> None:
        self.slots: dict[str, dict[str, float]] = {}
        self.acquired: list[tuple[list[tuple[str, int]], str]] = []
        self.released: list[str] = []
        self.renewed: list[str] = []
        self.peak: dict[str, int] = {}

    def _live(self, key: str, now: float) -> dict[str, float]:
        live = {s: e for s, e in self.slots.get(key, {}).items() if e > now}
        self.slots[key] = live
        return live

    def acquire(self, keys: list[tuple[str, int]], slot_id: str, now: float, ttl: float) -> Deferred[bool]:
        for key, limit in keys:
            if len(self._live(key, now)) >= limit:
                return succeed(False)
        for key, _ in keys:
            self.slots[key][slot_id] = now + ttl
            self.peak[key] = max(self.peak.get(key, 0), len(self.slots[key]))
        self.acquired.append((keys, slot_id))
        return succeed(True)

    def renew(self, keys: list[str], slot_id: str, now: float, ttl: float) -> Deferred[None]:
        for key in keys:
            if slot_id in self.slots.get(key, {}):
                self.slots[key][slot_id] = now + ttl
        self.renewed.append(slot_id)
        return succeed(None)

    def release(self, keys: list[str], slot_id: str) -> Deferred[None]:
        for key in keys:
            self.slots.get(key, {}).pop(slot_id, None)
        self.released.append(slot_id)
        return succeed(None)

    def in_use(self) -> int:
        return sum(len(v) for v in self.slots.values())


async def until(reactor: Any, predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Let real loopback I/O run until ``predicate`` holds (fails the test after ``limit`` seconds)."""
    waited = 0.0
    while not predicate():
        if waited > limit:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.005, lambda: None)
        waited += 0.005

"""The status report behind ``GET /status``: queue depth, listeners, and whether Redis and SQL answer.

Each probe is bounded and independent, so a dead Redis shows as ``reachable: false`` instead of hanging
the endpoint that an operator opens precisely when something is wrong.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

import mtad
from mtad.queue.events import StreamStatus


class QueueProbe(Protocol):
    def stats(self, now: float) -> Deferred[Any]: ...
    def persistence_info(self) -> Deferred[dict[str, Any]]: ...


class EventsProbe(Protocol):
    def status(self) -> Deferred[StreamStatus]: ...


@attrs.frozen
class ListenerStatus:
    name: str
    kind: str
    endpoint: str
    tls: str


class StatusReporter:
    """Assembles the status report from live probes of the queue and the database."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        queue: QueueProbe,
        database_ping: Callable[[], Awaitable[None]],
        listeners: Sequence[ListenerStatus],
        embedded_redis: bool,
        timeout: float = 5.0,
        signing: Callable[[], dict[str, int]] | None = None,
        events: EventsProbe | None = None,
        events_alarm_length: int = 1_000_000,
        webhooks: Callable[[], Deferred[dict[str, int]]] | None = None,
        bounces: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        """``signing`` reports the DKIM signing workers; None when this process signs inline or does not
        deliver. ``events`` reports the event stream, with an alarm above ``events_alarm_length``.
        ``webhooks`` counts the webhook requests waiting (due or retrying later) and being sent;
        ``bounces`` the received bounces not yet processed."""
        self._clock = clock
        self._queue = queue
        self._database_ping = database_ping
        self._listeners = listeners
        self._embedded_redis = embedded_redis
        self._timeout = timeout
        self._signing = signing
        self._events = events
        self._events_alarm_length = events_alarm_length
        self._webhooks = webhooks
        self._bounces = bounces
        self.started_at = clock.seconds()

    def report(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._report())

    async def _bounded(self, d: Deferred[Any]) -> Any:
        d.addTimeout(self._timeout, self._clock)
        return await d

    async def _report(self) -> dict[str, Any]:
        now = self._clock.seconds()
        redis: dict[str, Any] = {"embedded": self._embedded_redis}
        queue: dict[str, Any] | None = None
        try:
            stats = await self._bounded(self._queue.stats(now))
            queue = {
                "due_now": stats.due_now,
                "scheduled_later": stats.scheduled,
                "leased": stats.leased,
                "held": stats.held,
                "oldest_message_age_seconds": stats.oldest_age_seconds,
            }
            redis["reachable"] = True
            redis["persistence"] = await self._bounded(self._queue.persistence_info())
        except Exception as e:
            self.log.warn("status: Redis probe failed: {error}", error=str(e))
            redis["reachable"] = False
            redis["error"] = str(e) or type(e).__name__
        events = await self._events_report() if redis.get("reachable") else None
        webhooks = await self._webhooks_report() if redis.get("reachable") else None
        bounces = await self._bounces_report() if redis.get("reachable") else None
        database: dict[str, Any]
        try:
            await self._bounded(Deferred.fromCoroutine(_awaitable(self._database_ping())))
            database = {"reachable": True}
        except Exception as e:
            self.log.warn("status: database probe failed: {error}", error=str(e))
            database = {"reachable": False, "error": str(e) or type(e).__name__}
        return {
            "version": mtad.__version__,
            "uptime_seconds": round(now - self.started_at, 3),
            "queue": queue,
            "redis": redis,
            "database": database,
            "listeners": [attrs.asdict(listener) for listener in self._listeners],
            "signing_workers": self._signing() if self._signing is not None else None,
            "events": events,
            "webhooks": webhooks,
            "bounces": bounces,
        }

    async def _webhooks_report(self) -> dict[str, Any] | None:
        if self._webhooks is None:
            return None
        try:
            depth: dict[str, Any] = await self._bounded(self._webhooks())
        except Exception as e:
            self.log.warn("status: webhook queue probe failed: {error}", error=str(e))
            return {"error": str(e) or type(e).__name__}
        return depth

    async def _bounces_report(self) -> dict[str, Any] | None:
        if self._bounces is None:
            return None
        try:
            pending = await self._bounded(Deferred.fromCoroutine(_value(self._bounces())))
        except Exception as e:
            self.log.warn("status: bounce inbox probe failed: {error}", error=str(e))
            return {"error": str(e) or type(e).__name__}
        return {"pending": pending}

    async def _events_report(self) -> dict[str, Any] | None:
        """The stream's length against its alarm bound, each consumer group's backlog, parked events."""
        if self._events is None:
            return None
        try:
            status = await self._bounded(self._events.status())
        except Exception as e:
            self.log.warn("status: event stream probe failed: {error}", error=str(e))
            return {"error": str(e) or type(e).__name__}
        return {
            "length": status.length,
            "alarm_length": self._events_alarm_length,
            "alarm": status.length > self._events_alarm_length,
            "parked": status.parked,
            "groups": {
                g.name: {
                    "consumers": g.consumers,
                    "pending": g.pending,
                    "last_delivered_id": g.last_delivered_id,
                }
                for g in status.groups
            },
        }


async def _awaitable(a: Awaitable[None]) -> None:
    await a


async def _value(a: Awaitable[int]) -> int:
    return await a

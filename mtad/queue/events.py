"""Reading the event stream with a consumer group: at-least-once delivery to each consumer kind.

Each kind of consumer (recorder, webhooks, suppression handling) is one consumer group; each process of
that kind is one consumer in it. Entries stay pending in the group until acknowledged, so a consumer that
crashes mid-batch reads its own pending entries again when it comes back, and entries pending on a
consumer that never comes back are taken over (XAUTOCLAIM, Redis >= 6.2) once idle for ``claim_idle``
seconds. Consumers must therefore be idempotent on the event id (DESIGN.md invariant 2).

`read` is meant for one sequential reader per consumer name (read, process, ack, read again), like the
recorder: it hands back its own unacknowledged entries first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mtad.queue.client import RedisClient
from mtad.queue.keys import QueueKeys
from mtad.queue.model import Event, QueueError


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_entry(entry: Sequence[Any]) -> Event | None:
    """A stream entry ``[id, [field, value, ...]]`` as an `Event`; None for a trimmed (deleted) entry."""
    if entry is None or entry[1] is None:
        return None
    fields = entry[1]
    values = {_text(fields[i]): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
    raw = values.get("data")
    try:
        data = json.loads(raw) if raw is not None else {}
    except ValueError:
        data = {"_undecodable": _text(raw)}
    if not isinstance(data, dict):
        data = {"_value": data}
    return Event(id=_text(entry[0]), type=_text(values.get("type", b"")), data=data)


class EventStream:
    """One consumer in one consumer group of the event stream (implements the recorder's EventSource)."""

    log = Logger()

    def __init__(
        self,
        client: RedisClient,
        group: str,
        consumer: str,
        keys: QueueKeys | None = None,
        claim_idle: float = 60.0,
        block: float | None = None,
    ) -> None:
        """``block`` makes `read` wait up to that many seconds for new entries (XREADGROUP BLOCK).

        Only use ``block`` with a client of its own: a blocked command holds up everything pipelined
        behind it on the same connection. Without it, `read` returns at once (possibly empty) and the
        caller polls on its clock.
        """
        self.client = client
        self.group = group
        self.consumer = consumer
        self.keys = keys if keys is not None else QueueKeys()
        self.claim_idle = claim_idle
        self.block = block
        self._group_ready = False
        self._claim_cursor = "0-0"

    def ensure_group(self) -> Deferred[None]:
        """Create the group (and the stream) if missing; new groups start at the stream's beginning."""
        return Deferred.fromCoroutine(self._ensure_group())

    async def _ensure_group(self) -> None:
        try:
            await self.client.execute("XGROUP", "CREATE", self.keys.events, self.group, "0", "MKSTREAM")
        except QueueError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def read(self, count: int) -> Deferred[list[Event]]:
        """Up to ``count`` events: this consumer's unacknowledged ones first, then abandoned ones of other
        consumers (idle over ``claim_idle``), then new ones."""
        return Deferred.fromCoroutine(self._read(count))

    async def _read(self, count: int) -> list[Event]:
        if not self._group_ready:
            await self._ensure_group()
        stream = self.keys.events
        mine = await self.client.execute(
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, "STREAMS", stream, "0"
        )
        events = await self._events_of(mine)
        if events:
            return events
        claimed = await self.client.execute(
            "XAUTOCLAIM",
            stream,
            self.group,
            self.consumer,
            int(self.claim_idle * 1000),
            self._claim_cursor,
            "COUNT",
            count,
        )
        self._claim_cursor = _text(claimed[0])
        events = [e for e in (parse_entry(entry) for entry in claimed[1]) if e is not None]
        if events:
            self.log.info(
                "took over {count} abandoned events in group {group}", count=len(events), group=self.group
            )
            return events
        args: list[str | bytes | int | float] = ["GROUP", self.group, self.consumer, "COUNT", count]
        if self.block is not None:
            args += ["BLOCK", int(self.block * 1000)]
        fresh = await self.client.execute("XREADGROUP", *args, "STREAMS", stream, ">")
        return await self._events_of(fresh)

    async def _events_of(self, reply: Any) -> list[Event]:
        if not reply:
            return []
        events = []
        trimmed = []
        for _stream, entries in reply:
            for entry in entries or []:
                event = parse_entry(entry)
                if event is None:
                    trimmed.append(_text(entry[0]))
                else:
                    events.append(event)
        if trimmed:
            # Trimmed (MAXLEN) before it was processed: nothing left to read, so acknowledge it away
            # rather than finding it pending forever.
            self.log.warn("{count} events were trimmed from the stream unread", count=len(trimmed))
            await self._ack(trimmed)
        return events

    def ack(self, ids: Sequence[str]) -> Deferred[None]:
        """Acknowledge events so that they are not read again by anyone in the group."""
        return Deferred.fromCoroutine(self._ack(ids))

    async def _ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self.client.execute("XACK", self.keys.events, self.group, *ids)

    def pending_count(self) -> Deferred[int]:
        """Entries delivered to the group but not yet acknowledged."""
        d = self.client.execute("XPENDING", self.keys.events, self.group)
        return d.addCallback(lambda reply: int(reply[0]))

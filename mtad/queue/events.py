"""Reading the event stream with a consumer group: at-least-once delivery to each consumer kind.

Each kind of consumer (recorder, webhooks, suppression handling) is one consumer group; each process of
that kind is one consumer in it. Entries stay pending in the group until acknowledged, so a consumer that
crashes mid-batch reads its own pending entries again when it comes back, and entries pending on a
consumer that never comes back are taken over (XAUTOCLAIM, Redis >= 6.2) once idle for ``claim_idle``
seconds. Consumers must therefore be idempotent on the event id (DESIGN.md invariant 2).

`read` is meant for one sequential reader per consumer name (read, process, ack, read again), as
`mtad.events.consumer.StreamConsumer` reads: it hands back its own unacknowledged entries first. It asks
Redis for them only when some may exist (at start, and while entries it handed out are unacknowledged),
and for abandoned entries of other consumers at most every quarter of ``claim_idle`` when it has a clock,
so an idle consumer polling often costs one command per poll.

Nothing here trims the stream: `StreamMaintenance.trim` removes only what every consumer group has been
given and acknowledged (DESIGN.md: no event is trimmed before every group has it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.events.schema import AnyEvent, encode
from mtad.queue.client import RedisClient
from mtad.queue.keys import PARK, TRIM_ACKNOWLEDGED, QueueKeys
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


class StreamAppender:
    """Appends events to the stream: for those no queue script writes along with its own change (a
    domain's DNS gone wrong, a server suspended). One ``XADD`` of the event's one encoding
    (`mtad.events.schema.encode`); never capped here (the stream is only trimmed behind every group)."""

    def __init__(self, client: RedisClient, keys: QueueKeys | None = None) -> None:
        self._client = client
        self._keys = keys if keys is not None else QueueKeys()

    def append(self, event: AnyEvent) -> Deferred[str]:
        """Fires with the new entry's id."""
        event_type, data = encode(event)
        d = self._client.execute("XADD", self._keys.events, "*", "type", event_type, "data", data)
        return d.addCallback(_text)


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
        clock: IReactorTime | None = None,
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
        self.clock = clock
        self._group_ready = False
        self._claim_cursor = "0-0"
        #: Ids handed out by `read` and not acknowledged since; None until the first read (unknown).
        self._outstanding: set[str] | None = None
        self._more_mine = False
        self._next_autoclaim = float("-inf")

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
        self._more_mine = False
        events = await self._read_unacknowledged(count)
        # A full read of this consumer's own pending entries may have left more of them behind: ask that
        # list again next time rather than believe these are all.
        self._outstanding = None if self._more_mine else {e.id for e in events}
        return events

    async def _read_unacknowledged(self, count: int) -> list[Event]:
        stream = self.keys.events
        if self._outstanding is None or self._outstanding:
            mine = await self.client.execute(
                "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, "STREAMS", stream, "0"
            )
            # Counted before parsing: entries trimmed away parse to nothing but still were pending.
            self._more_mine = sum(len(entries or ()) for _stream, entries in mine or ()) >= count
            events = await self._events_of(mine)
            if events:
                return events
        now = self.clock.seconds() if self.clock is not None else None
        if now is None or now >= self._next_autoclaim:
            if now is not None:
                self._next_autoclaim = now + self.claim_idle / 4
            events = await self._autoclaim(count)
            if events:
                return events
        args: list[str | bytes | int | float] = ["GROUP", self.group, self.consumer, "COUNT", count]
        if self.block is not None:
            args += ["BLOCK", int(self.block * 1000)]
        fresh = await self.client.execute("XREADGROUP", *args, "STREAMS", stream, ">")
        return await self._events_of(fresh)

    async def _autoclaim(self, count: int) -> list[Event]:
        stream = self.keys.events
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
            # Deleted (XDEL by an operator, or trimmed by an older mtad) before it was processed:
            # nothing left to read, so acknowledge it away rather than finding it pending forever.
            self.log.warn("{count} events were trimmed from the stream unread", count=len(trimmed))
            await self._ack(trimmed)
        return events

    def ack(self, ids: Sequence[str]) -> Deferred[None]:
        """Acknowledge events so that they are not read again by anyone in the group."""
        return Deferred.fromCoroutine(self._ack(ids))

    async def _ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self.client.execute("XACK", self.keys.events, self.group, *ids)
            if self._outstanding is not None:
                self._outstanding.difference_update(ids)

    def park(self, event: Event, reason: str) -> Deferred[bool]:
        """Move ``event``, which this group can never handle, to the parked stream and acknowledge it.

        One script, so the event is never both lost and acknowledged; False when it was no longer pending
        in the group (another consumer took it over and dealt with it).
        """
        # An entry whose data was not JSON keeps its text as it was (`parse_entry`).
        undecodable = event.data.get("_undecodable")
        raw = undecodable if isinstance(undecodable, str) else json.dumps(event.data, ensure_ascii=False)
        d = self.client.run_script(
            PARK,
            [self.keys.events, self.keys.parked_events],
            [self.group, event.id, event.type, raw, reason],
        )

        def parked(reply: Any) -> bool:
            if self._outstanding is not None:
                self._outstanding.discard(event.id)
            return bool(reply)

        return d.addCallback(parked)

    def pending_count(self) -> Deferred[int]:
        """Entries delivered to the group but not yet acknowledged."""
        d = self.client.execute("XPENDING", self.keys.events, self.group)
        return d.addCallback(lambda reply: int(reply[0]))


@attrs.frozen
class GroupStatus:
    """One consumer group of the event stream, for ``/status``."""

    name: str
    consumers: int
    #: Entries given to the group's consumers and not acknowledged yet.
    pending: int
    #: The last entry given to the group (``0-0`` when it never read).
    last_delivered_id: str


@attrs.frozen
class StreamStatus:
    """The event stream's length, its groups, and the events parked as unhandleable."""

    length: int
    groups: tuple[GroupStatus, ...]
    parked: int


class StreamMaintenance:
    """Trims the event stream behind every consumer group and reports on it."""

    def __init__(self, client: RedisClient, keys: QueueKeys | None = None) -> None:
        self.client = client
        self.keys = keys if keys is not None else QueueKeys()

    def trim(self, required_groups: Sequence[str]) -> Deferred[int]:
        """Delete the entries every group has acknowledged; fires with how many went.

        -1 (nothing trimmed) while one of ``required_groups`` does not exist yet: a group created later
        starts at the stream's beginning and must find every event still there.
        """
        d = self.client.run_script(TRIM_ACKNOWLEDGED, [self.keys.events], list(required_groups))
        return d.addCallback(int)

    def status(self) -> Deferred[StreamStatus]:
        return Deferred.fromCoroutine(self._status())

    async def _status(self) -> StreamStatus:
        length = int(await self.client.execute("XLEN", self.keys.events))
        parked = int(await self.client.execute("XLEN", self.keys.parked_events))
        groups: list[GroupStatus] = []
        if length or await self.client.execute("EXISTS", self.keys.events):
            for raw in await self.client.execute("XINFO", "GROUPS", self.keys.events):
                info = {_text(raw[i]): raw[i + 1] for i in range(0, len(raw) - 1, 2)}
                groups.append(
                    GroupStatus(
                        name=_text(info["name"]),
                        consumers=int(info["consumers"]),
                        pending=int(info["pending"]),
                        last_delivered_id=_text(info["last-delivered-id"]),
                    )
                )
        return StreamStatus(length=length, groups=tuple(groups), parked=parked)

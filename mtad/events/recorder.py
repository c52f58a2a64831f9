"""The recorder: reads the event stream and writes message history into SQL.

Events arrive at least once (DESIGN.md, invariant 2): a recorder that crashes after writing a batch but
before acknowledging it reads the same batch again. So `record_events` applies a batch in one transaction
and is idempotent: messages are keyed by their Redis-allocated id, deliveries by the event id, and a status
update never moves a message back to an older attempt's status. Events are acknowledged only after the
transaction commits. Recorders in several processes share the stream, so a message's deliveries may be
recorded by another recorder before (or while) this one records the message; the store makes the two
writes commute (`mtad.store.messages.record_messages`).

An event that cannot be understood (unknown type, missing or ill-typed field) is logged and acknowledged
rather than retried: retrying cannot fix it, and leaving it would stop the recorder on it forever.

The recorder also keeps raw messages (`mtad.store.raw_messages`). A ``message.queued`` event names its body
(``raw_message_id``), which stays pinned in Redis until the recorder releases it, however fast the message
is delivered. So for each batch the recorder reads the pinned bodies it names (one Redis call), stores them
in the same transaction as the messages, and only after the commit releases their pins (one Redis call),
then acknowledges the events. Crashing anywhere in between is harmless: before the release, the batch is
read again and the bodies stored again (a no-op); after it, the bodies are no longer pinned and are not read
again, and their rows are already there. A body whose event the recorder never reads (trimmed from the
stream) is stored and released by `mtad.events.archive.ArchiveCatchUp` once it has been pinned long enough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
from sqlalchemy.engine import Connection
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mtad.queue.model import Event, RedisUnavailable
from mtad.store.db import is_deadlock
from mtad.store.messages import (
    DeliveryAttempt,
    Message,
    MessageStatus,
    Scope,
    record_deliveries,
    record_messages,
)
from mtad.store.raw_messages import RawMessage, store_raw_messages

E = TypeVar("E", MessageStatus, Scope)

MESSAGE_QUEUED = "message.queued"
MESSAGE_DELIVERY = "message.delivery"
#: Times a batch is run when it keeps losing deadlocks, before the recorder backs off like any failure.
DEADLOCK_ATTEMPTS = 5


class EventSource(Protocol):
    """What the recorder needs of the event stream (the queue's consumer group implements it)."""

    def read(self, count: int) -> Deferred[list[Event]]:
        """Up to ``count`` events not yet acknowledged by this consumer; may wait a while for some."""

    def ack(self, ids: Sequence[str]) -> Deferred[None]:
        """Mark events as done so that they are not read again."""


class UnitOfWork(Protocol):
    """What the recorder needs of `mtad.store.db.Database`: run a sync function in a transaction."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class BodyArchive(Protocol):
    """What the recorder needs of the queue to keep raw messages (`mtad.queue.redis_queue.RedisQueue`)."""

    def bodies_to_archive(self, raw_message_ids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """The bodies among these still pinned for the archive, by id."""

    def release_archived(self, raw_message_ids: Sequence[int]) -> Deferred[int]:
        """Unpin these bodies: they are in SQL now (idempotent)."""


@attrs.frozen
class RecordResult:
    recorded: int
    #: Events that were not understood, with the reason, to be logged and acknowledged.
    rejected: tuple[tuple[str, str], ...] = ()
    #: Raw messages stored (or found already stored) by the batch.
    archived: int = 0


class _BadEvent(Exception):
    pass


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in data:
        raise _BadEvent(f"missing field {name!r}")
    value = data[name]
    # bool is an int in Python; a boolean where a number belongs is still a mistake.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise _BadEvent(f"field {name!r} has wrong type {type(value).__name__}")
    return value


def _optional(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if data.get(name) is None:
        return None
    return _field(data, name, kind)


def _number(data: Mapping[str, Any], name: str) -> float:
    return float(_field(data, name, (int, float)))


def _optional_number(data: Mapping[str, Any], name: str) -> float | None:
    value = _optional(data, name, (int, float))
    return None if value is None else float(value)


def _enum_field(data: Mapping[str, Any], name: str, enum: type[E]) -> E:
    value = _field(data, name, str)
    try:
        return enum(value)
    except ValueError:
        raise _BadEvent(f"field {name!r} has unknown value {value!r}") from None


def parse_queued(event: Event) -> Message:
    """A ``message.queued`` event as the Pending message row it creates."""
    data = event.data
    return Message(
        id=_field(data, "id", int),
        token=_field(data, "token", str),
        server_id=_field(data, "server_id", int),
        scope=_enum_field(data, "scope", Scope),
        rcpt_to=_field(data, "rcpt_to", str),
        mail_from=_field(data, "mail_from", str),
        subject=_optional(data, "subject", str),
        message_id=_optional(data, "message_id", str),
        size=_field(data, "size", int),
        status=MessageStatus.PENDING,
        held=False,
        hold_expiry=None,
        last_delivery_attempt=None,
        tag=_optional(data, "tag", str),
        timestamp=_number(data, "timestamp"),
        received_with_ssl=bool(_optional(data, "received_with_ssl", bool)),
        raw_message_id=_optional(data, "raw_message_id", int),
    )


def raw_message_ids(events: Sequence[Event]) -> list[int]:
    """The bodies the ``message.queued`` events of a batch name, each once, in order."""
    ids: dict[int, None] = {}
    for event in events:
        if event.type == MESSAGE_QUEUED:
            value = event.data.get("raw_message_id")
            if isinstance(value, int) and not isinstance(value, bool):
                ids[value] = None
    return list(ids)


def within_bytes(events: Sequence[Event], max_bytes: int) -> Sequence[Event]:
    """The longest prefix of ``events`` (at least one) whose distinct bodies add up to at most ``max_bytes``.

    Bounds the memory a batch of large messages takes (their bodies are read from Redis and written to SQL
    together); the events left out stay unacknowledged and come first in the next read.
    """
    seen: set[Any] = set()
    total = 0
    for n, event in enumerate(events):
        if event.type != MESSAGE_QUEUED:
            continue
        body, size = event.data.get("raw_message_id"), event.data.get("size")
        if body is None or body in seen or not isinstance(size, int):
            continue
        seen.add(body)
        total += size
        if total > max_bytes and n > 0:
            return events[:n]
    return events


def parse_delivery(event: Event) -> DeliveryAttempt:
    """A ``message.delivery`` event as the attempt it records.

    The event's envelope (server, token, scope, addresses) only stands in for the message while its
    ``message.queued`` event is not recorded (`mtad.store.messages.record_deliveries`), so an envelope
    field missing or ill-typed is left out rather than costing the attempt.
    """
    data = event.data
    return DeliveryAttempt(
        event_id=event.id,
        message_id=_field(data, "message_id", int),
        attempt=_field(data, "attempt", int),
        status=_enum_field(data, "status", MessageStatus),
        code=_optional(data, "code", int),
        output=_optional(data, "output", str),
        details=_optional(data, "details", str),
        sent_with_ssl=bool(_optional(data, "sent_with_ssl", bool)),
        log_id=_optional(data, "log_id", str),
        time=_optional_number(data, "time"),
        timestamp=_number(data, "timestamp"),
        hold_expiry=_optional_number(data, "hold_expiry"),
        server_id=_hint(data, "server_id", int),
        token=_hint(data, "token", str),
        scope=_hint_enum(data, "scope", Scope),
        mail_from=_hint(data, "mail_from", str),
        rcpt_to=_hint(data, "rcpt_to", str),
    )


def _hint(data: Mapping[str, Any], name: str, kind: type) -> Any:
    try:
        return _optional(data, name, kind)
    except _BadEvent:
        return None


def _hint_enum(data: Mapping[str, Any], name: str, enum: type[E]) -> E | None:
    try:
        return None if data.get(name) is None else _enum_field(data, name, enum)
    except _BadEvent:
        return None


def record_events(
    conn: Connection, events: Sequence[Event], now: float, bodies: Mapping[int, bytes] | None = None
) -> RecordResult:
    """Apply a batch of events in the caller's transaction; applying the same batch again changes nothing.

    Recording a message and recording its deliveries commute (`mtad.store.messages.record_messages`), as
    they must for deliveries another recorder commits first; so the batch's messages are written with one
    statement and its deliveries with another (executemany), whatever their order in the stream: fewer
    statements per batch, and rows taken in one order. ``bodies`` are the raw messages the queued events
    name, by id (see `raw_message_ids`); each is stored once.
    """
    recorded = 0
    rejected: list[tuple[str, str]] = []
    queued: list[Message] = []
    attempts: list[DeliveryAttempt] = []
    raw: dict[int, RawMessage] = {}
    bodies = bodies or {}
    for event in events:
        try:
            if event.type == MESSAGE_QUEUED:
                message = parse_queued(event)
                queued.append(message)
                body_id = message.raw_message_id
                if body_id is not None and body_id in bodies and body_id not in raw:
                    raw[body_id] = RawMessage(body_id, message.server_id, message.timestamp, bodies[body_id])
            elif event.type == MESSAGE_DELIVERY:
                attempts.append(parse_delivery(event))
            else:
                # Other consumers (webhooks) care about other events; the recorder skips them.
                continue
        except _BadEvent as e:
            rejected.append((event.id, str(e)))
            continue
        recorded += 1
    record_messages(conn, queued, now)
    record_deliveries(conn, attempts, now)
    store_raw_messages(conn, list(raw.values()), now)
    return RecordResult(recorded=recorded, rejected=tuple(rejected), archived=len(raw))


class Recorder(Service):
    """Reads batches from an `EventSource`, records them with `record_events`, acknowledges them.

    One batch at a time: reading, writing and acknowledging are sequential, so at most one batch is ever
    unacknowledged. After a failure (database down, Redis gone) it waits ``retry_delay`` seconds on the
    injected clock and reads again; the unacknowledged events come back then. The bodies in a batch are
    kept with ``archive`` (see the module docstring); a batch takes at most ``batch_bytes`` of them (or one
    message, however large).

    ``batch_size`` is 100 rather than more: parsing a batch (events, bodies) runs on the reactor thread in
    one go, so a batch of 500 stalls the send API for tens of milliseconds; 100 keeps the commits few
    (five a second at 500 messages a second) and the stalls short.
    """

    log = Logger()

    def __init__(
        self,
        database: UnitOfWork,
        source: EventSource,
        clock: IReactorTime,
        archive: BodyArchive,
        batch_size: int = 100,
        idle_delay: float = 1.0,
        retry_delay: float = 5.0,
        batch_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._database = database
        self._source = source
        self._clock = clock
        self._archive = archive
        self.batch_bytes = batch_bytes
        self.batch_size = batch_size
        self.idle_delay = idle_delay
        self.retry_delay = retry_delay
        self._loop: Deferred[None] | None = None
        self._waiting: Deferred[None] | None = None

    async def record_batch(self) -> int:
        """Read one batch, record it and acknowledge it; return how many events the batch had."""
        events = within_bytes(await self._source.read(self.batch_size), self.batch_bytes)
        if not events:
            return 0
        bodies = await self._archive.bodies_to_archive(raw_message_ids(events))
        result = await self._record(events, bodies)
        for event_id, reason in result.rejected:
            self.log.warn(
                "recorder dropped malformed event {event_id}: {reason}", event_id=event_id, reason=reason
            )
        # Only now, with the transaction committed. Bodies named only by malformed events are released
        # unstored rather than pinned forever.
        await self._archive.release_archived(list(bodies))
        await self._source.ack([event.id for event in events])
        return len(events)

    async def _record(self, events: Sequence[Event], bodies: dict[int, bytes]) -> RecordResult:
        """`record_events` in a transaction, run again at once if it loses a deadlock.

        Two recorders' batches can lock the same message rows in opposite orders (one records message 2
        and the delivery of message 1, the other message 1 and the delivery of 2). The database then rolls
        one back; the batch is idempotent, so it runs again rather than waiting ``retry_delay``.
        """
        attempt = 1
        while True:
            try:
                result: RecordResult = await self._database.run(
                    record_events, events, self._clock.seconds(), bodies
                )
                return result
            except Exception as e:
                if attempt == DEADLOCK_ATTEMPTS or not is_deadlock(e):
                    raise
            self.log.info(
                "recorder batch of {count} events lost a deadlock with another recorder; running it again",
                count=len(events),
            )
            attempt += 1

    async def _run(self) -> None:
        while self.running:
            try:
                count = await self.record_batch()
                delay = 0.0 if count else self.idle_delay
            except RedisUnavailable as e:
                # Expected while Redis restarts: a line, not a traceback.
                self.log.warn(
                    "recorder cannot read events ({error}); retrying in {delay}s",
                    error=str(e),
                    delay=self.retry_delay,
                )
                delay = self.retry_delay
            except Exception:
                self.log.failure(
                    "recorder failed to record a batch; retrying in {delay}s", delay=self.retry_delay
                )
                delay = self.retry_delay
            if delay and self.running:
                self._waiting = deferLater(self._clock, delay)
                try:
                    await self._waiting
                except Exception:
                    pass  # Cancelled by stopService.
                finally:
                    self._waiting = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self.log.failure("recorder stopped unexpectedly", f))

    def stopService(self) -> Deferred[None]:
        """Stop after the batch in hand is recorded (never mid-transaction); fires when the loop has ended."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._waiting is not None:
            self._waiting.cancel()
        loop, self._loop = self._loop, None
        if loop is None:
            return Deferred.fromCoroutine(_nothing())
        return loop


async def _nothing() -> None:
    return None

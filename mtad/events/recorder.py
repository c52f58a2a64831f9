"""The recorder: a handler of the event stream that writes message history into SQL.

Events arrive at least once (DESIGN.md, invariant 2; `mtad.events.consumer`): a recorder that crashes after
writing a batch but before it is acknowledged gets the same batch again. So `record_events` applies a batch
in one transaction and is idempotent: messages are keyed by their Redis-allocated id, deliveries by the
event id, and a status update never moves a message back to an older attempt's status. Recorders in several
processes share the stream, so a message's deliveries may be recorded by another recorder before (or while)
this one records the message; the store makes the two writes commute
(`mtad.store.messages.record_messages`).

The recorder also keeps raw messages (`mtad.store.raw_messages`). A ``message.queued`` event names its body
(``raw_message_id``), which stays pinned in Redis until the recorder releases it, however fast the message
is delivered. So for each batch the recorder reads the pinned bodies it names (one Redis call), stores them
in the same transaction as the messages, and only after the commit releases their pins (one Redis call);
the consumer then acknowledges the events. Crashing anywhere in between is harmless: before the release,
the batch is read again and the bodies stored again (a no-op); after it, the bodies are no longer pinned and
are not read again, and their rows are already there. A body whose event the recorder never handles (an
event parked as unreadable) is stored and released by `mtad.events.archive.ArchiveCatchUp` once it has been
pinned long enough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.events.schema import AnyEvent, BadEvent, MessageDelivery, MessageQueued, Received, decode_entry
from mtad.queue.model import Event
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

#: The consumer group of the recorders.
GROUP = "recorder"
#: The schema's type names, for callers that filter raw stream entries.
MESSAGE_QUEUED = MessageQueued.TYPE
MESSAGE_DELIVERY = MessageDelivery.TYPE
#: Times a batch is run when it keeps losing deadlocks, before the recorder fails like any failure.
DEADLOCK_ATTEMPTS = 5


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
    #: Raw messages stored (or found already stored) by the batch.
    archived: int = 0


def _received(event: Event | Received) -> Received:
    return event if isinstance(event, Received) else decode_entry(event)


def parse_queued(event: Event | Received) -> Message:
    """A ``message.queued`` event as the Pending message row it creates (`BadEvent` if it is not one)."""
    queued: AnyEvent = _received(event).event
    if not isinstance(queued, MessageQueued):
        raise BadEvent(f"not a {MESSAGE_QUEUED} event: {queued.TYPE}")
    return Message(
        id=queued.id,
        token=queued.token,
        server_id=queued.server_id,
        scope=Scope(queued.scope),
        rcpt_to=queued.rcpt_to,
        mail_from=queued.mail_from,
        subject=queued.subject,
        message_id=queued.message_id,
        size=queued.size,
        status=MessageStatus.PENDING,
        held=False,
        hold_expiry=None,
        last_delivery_attempt=None,
        tag=queued.tag,
        timestamp=queued.timestamp,
        received_with_ssl=queued.received_with_ssl,
        raw_message_id=queued.raw_message_id,
        bounce=queued.bounce,
        bounce_for_id=queued.bounce_for_id,
    )


def parse_delivery(event: Event | Received) -> DeliveryAttempt:
    """A ``message.delivery`` event as the attempt it records (`BadEvent` if it is not one).

    The event's envelope (server, token, scope, addresses) only stands in for the message while its
    ``message.queued`` event is not recorded (`mtad.store.messages.record_deliveries`).
    """
    received = _received(event)
    delivery = received.event
    if not isinstance(delivery, MessageDelivery):
        raise BadEvent(f"not a {MESSAGE_DELIVERY} event: {delivery.TYPE}")
    return DeliveryAttempt(
        event_id=received.id,
        message_id=delivery.message_id,
        attempt=delivery.attempt,
        status=MessageStatus(delivery.status),
        code=delivery.code,
        output=delivery.output,
        details=delivery.details,
        sent_with_ssl=delivery.sent_with_ssl,
        log_id=delivery.log_id,
        time=delivery.time,
        timestamp=delivery.timestamp,
        hold_expiry=delivery.hold_expiry,
        server_id=delivery.server_id,
        token=delivery.token,
        scope=None if delivery.scope is None else Scope(delivery.scope),
        mail_from=delivery.mail_from,
        rcpt_to=delivery.rcpt_to,
    )


def raw_message_ids(events: Sequence[Received]) -> list[int]:
    """The bodies the ``message.queued`` events of a batch name, each once, in order."""
    ids: dict[int, None] = {}
    for received in events:
        if isinstance(received.event, MessageQueued) and received.event.raw_message_id is not None:
            ids[received.event.raw_message_id] = None
    return list(ids)


def within_bytes(events: Sequence[Received], max_bytes: int) -> Sequence[Received]:
    """The longest prefix of ``events`` (at least one) whose distinct bodies add up to at most ``max_bytes``.

    Bounds the memory a batch of large messages takes (their bodies are read from Redis and written to SQL
    together); the events left out stay unacknowledged and come first in the next read.
    """
    seen: set[int] = set()
    total = 0
    for n, received in enumerate(events):
        event = received.event
        if not isinstance(event, MessageQueued) or event.raw_message_id is None:
            continue
        if event.raw_message_id in seen:
            continue
        seen.add(event.raw_message_id)
        total += event.size
        if total > max_bytes and n > 0:
            return events[:n]
    return events


def record_events(
    conn: Connection, events: Sequence[Received], now: float, bodies: Mapping[int, bytes] | None = None
) -> RecordResult:
    """Apply a batch of events in the caller's transaction; applying the same batch again changes nothing.

    Recording a message and recording its deliveries commute (`mtad.store.messages.record_messages`), as
    they must for deliveries another recorder commits first; so the batch's messages are written with one
    statement and its deliveries with another (executemany), whatever their order in the stream: fewer
    statements per batch, and rows taken in one order. ``bodies`` are the raw messages the queued events
    name, by id (see `raw_message_ids`); each is stored once. Events of other types are skipped: among
    them ``message.bounced`` and ``message.complaint``, whose rows (the report as an incoming message with
    ``bounce``/``bounce_for_id``, the original's ``Bounced`` delivery) come as queued and delivery events
    written with them (`mtad.bounces.matching`).
    """
    queued: list[Message] = []
    attempts: list[DeliveryAttempt] = []
    raw: dict[int, RawMessage] = {}
    bodies = bodies or {}
    for received in events:
        if isinstance(received.event, MessageQueued):
            message = parse_queued(received)
            queued.append(message)
            body_id = message.raw_message_id
            if body_id is not None and body_id in bodies and body_id not in raw:
                raw[body_id] = RawMessage(body_id, message.server_id, message.timestamp, bodies[body_id])
        elif isinstance(received.event, MessageDelivery):
            attempts.append(parse_delivery(received))
    record_messages(conn, queued, now)
    record_deliveries(conn, attempts, now)
    store_raw_messages(conn, list(raw.values()), now)
    return RecordResult(recorded=len(queued) + len(attempts), archived=len(raw))


class Recorder:
    """The recorder's `~mtad.events.consumer.EventHandler`: each batch into SQL in one transaction.

    A batch takes at most ``batch_bytes`` of bodies (or one message, however large). The consumer's batch
    size is 100 rather than more: decoding a batch (events, bodies) runs on the reactor thread in one go,
    so a batch of 500 stalls the send API for tens of milliseconds; 100 keeps the commits few (five a
    second at 500 messages a second) and the stalls short.
    """

    log = Logger()
    group = GROUP

    def __init__(
        self,
        database: UnitOfWork,
        clock: IReactorTime,
        archive: BodyArchive,
        batch_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._database = database
        self._clock = clock
        self._archive = archive
        self.batch_bytes = batch_bytes

    def take(self, events: Sequence[Received]) -> int:
        return len(within_bytes(events, self.batch_bytes))

    async def handle(self, events: Sequence[Received]) -> None:
        """Record the batch and its bodies, then release the bodies' pins (see the module docstring)."""
        bodies = await self._archive.bodies_to_archive(raw_message_ids(events))
        await self._record(events, bodies)
        # Only now, with the transaction committed.
        await self._archive.release_archived(list(bodies))

    async def _record(self, events: Sequence[Received], bodies: dict[int, bytes]) -> RecordResult:
        """`record_events` in a transaction, run again at once if it loses a deadlock.

        Two recorders' batches can lock the same message rows in opposite orders (one records message 2
        and the delivery of message 1, the other message 1 and the delivery of 2). The database then rolls
        one back; the batch is idempotent, so it runs again rather than waiting for the consumer's back-off.
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

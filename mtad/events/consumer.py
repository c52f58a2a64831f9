"""One loop that feeds the event stream to a handler: read a batch, handle it, acknowledge it.

Every consumer of the stream (the SQL recorder, the webhook dispatcher, suppression and send-limit logic)
is an `EventHandler` run by a `StreamConsumer`; the loop is written once:

- **At least once.** A batch is acknowledged only after ``handle`` has returned, and ``handle`` returns
  only once its work is durable (committed to SQL, written to Redis). A process that dies mid-batch leaves
  the batch pending; it reads it again when it comes back, or another consumer of the group takes it over
  (XAUTOCLAIM) once it has been idle for ``claim_idle``. Handlers are idempotent on the event's stream id.
- **Bad events are parked, not retried.** An entry no version of the schema can read (`BadEvent`) is moved
  to the parked stream (``events:parked``) with the reason and acknowledged, and logged. So is an event the
  handler fails on every time, found by handling the failing batch one event at a time after
  ``max_failures`` failures in a row; failures that are an outage (Redis or the database unreachable, a
  timeout) never park anything: the loop backs off and tries again, for as long as it takes.
- **Back-off.** After a failure the loop waits ``retry_delay``, doubling up to ``max_retry_delay``, on the
  injected clock; a success resets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import sqlalchemy as sa
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mtad.events.schema import BadEvent, Received, decode_entry
from mtad.queue.model import Event, QueueError


class EventSource(Protocol):
    """What the loop needs of the stream (`mtad.queue.events.EventStream` is one)."""

    group: str

    def read(self, count: int) -> Deferred[list[Event]]:
        """Up to ``count`` entries not yet acknowledged by this consumer, its own pending ones first."""

    def ack(self, ids: Sequence[str]) -> Deferred[None]:
        """Mark entries as done so that they are not read again by the group."""

    def park(self, event: Event, reason: str) -> Deferred[bool]:
        """Set an entry aside as unhandleable, acknowledging it in the same step."""


class EventHandler(Protocol):
    """A consumer of the stream: one consumer group (``group``) and what it does with a batch."""

    group: str

    def take(self, events: Sequence[Received]) -> int:
        """How many of ``events`` (a prefix, at least one) to handle in this batch; the rest wait."""

    async def handle(self, events: Sequence[Received]) -> None:
        """Do the work of ``events``; return only once it is durable. Must be idempotent."""


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says a store is unreachable or slow (retry), rather than that an event is bad."""
    if isinstance(error, QueueError | DeferredTimeoutError | TimeoutError | ConnectionError):
        return True
    return isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError)


class StreamConsumer(Service):
    """Runs one `EventHandler` over one `EventSource` until stopped (see the module docstring).

    ``idle_delay`` is the wait after an empty read; it bounds how late an event is handled when the stream
    is quiet (a webhook's delay), at one Redis command per wait.
    """

    log = Logger()

    def __init__(
        self,
        source: EventSource,
        handler: EventHandler,
        clock: IReactorTime,
        *,
        batch_size: int = 100,
        idle_delay: float = 1.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        max_failures: int = 5,
    ) -> None:
        if batch_size < 1 or max_failures < 1:
            raise ValueError("batch_size and max_failures must be at least 1")
        self.source = source
        self.handler = handler
        self.clock = clock
        self.batch_size = batch_size
        self.idle_delay = idle_delay
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.max_failures = max_failures
        self.handled = 0
        self.parked = 0
        self._failures = 0
        self._delay = retry_delay
        #: Events still to be handled one at a time, after a batch failed ``max_failures`` times.
        self._singly = 0
        self._last_batch = 0
        self._loop: Deferred[None] | None = None
        self._waiting: Deferred[None] | None = None

    @property
    def group(self) -> str:
        return self.handler.group

    async def run_once(self) -> int:
        """Read one batch, park what cannot be read, handle and acknowledge the rest.

        Returns how many events it dealt with (handled or parked): 0 only when there was nothing to read.
        """
        entries = await self.source.read(1 if self._singly else self.batch_size)
        if not entries:
            return 0
        received: list[Received] = []
        for entry in entries:
            try:
                received.append(decode_entry(entry))
            except BadEvent as e:
                await self._park(entry, str(e))
        parked = len(entries) - len(received)
        if not received:
            return parked
        batch = received[: max(1, self.handler.take(received))]
        self._last_batch = len(batch)
        try:
            await self.handler.handle(batch)
        except Exception as e:
            if is_outage(e) or len(batch) > 1 or self._failures + 1 < self.max_failures:
                raise
            # One event, failing every time, and not because a store is down: it never will succeed.
            by_id = {entry.id: entry for entry in entries}
            self.log.failure(
                "{group} cannot handle event {event_id} after {count} attempts; parking it",
                group=self.group,
                event_id=batch[0].id,
                count=self.max_failures,
            )
            await self._park(by_id[batch[0].id], f"{type(e).__name__}: {e}")
            self._failures = 0
            self._singly = max(0, self._singly - 1)
            return parked + 1
        await self.source.ack([event.id for event in batch])
        self.handled += len(batch)
        if self._singly:
            self._singly -= 1
        return parked + len(batch)

    async def _park(self, entry: Event, reason: str) -> None:
        self.log.warn(
            "{group} parked event {event_id} ({type}): {reason}",
            group=self.group,
            event_id=entry.id,
            type=entry.type,
            reason=reason,
        )
        await self.source.park(entry, reason)
        self.parked += 1

    async def _run(self) -> None:
        while self.running:
            try:
                count = await self.run_once()
            except Exception as e:
                self._failed(e)
                delay = self._delay
                self._delay = min(self._delay * 2, self.max_retry_delay)
            else:
                self._failures = 0
                self._delay = self.retry_delay
                delay = 0.0 if count else self.idle_delay
            if delay and self.running:
                await self._sleep(delay)

    def _failed(self, error: Exception) -> None:
        if is_outage(error):
            # Expected while Redis or the database restarts: a line, not a traceback, and never a park.
            self.log.warn(
                "{group} cannot handle events ({error}); retrying in {delay}s",
                group=self.group,
                error=str(error) or type(error).__name__,
                delay=self._delay,
            )
            return
        self._failures += 1
        self.log.failure(
            "{group} failed to handle a batch ({failures} in a row); retrying in {delay}s",
            group=self.group,
            failures=self._failures,
            delay=self._delay,
        )
        if self._failures >= self.max_failures and not self._singly:
            # Find the event that fails: the batch again, one event at a time.
            # As many single reads as the batch that failed had events, then batches again.
            self._singly = self._last_batch
            self._failures = 0

    async def _sleep(self, delay: float) -> None:
        self._waiting = deferLater(self.clock, delay)
        try:
            await self._waiting
        except CancelledError:
            pass  # Cancelled by stopService.
        finally:
            self._waiting = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self.log.failure("{group} stopped unexpectedly", f, group=self.group))

    def stopService(self) -> Deferred[None]:
        """Stop after the batch in hand is handled (never mid-batch); fires when the loop has ended."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._waiting is not None:
            self._waiting.cancel()
        loop, self._loop = self._loop, None
        if loop is None:
            return Deferred.fromCoroutine(_nothing())
        return loop


async def _nothing() -> None:
    return None

"""`WebhookDispatcher`: POSTs due webhook requests, logs every attempt, retries on Postal's schedule.

Each request is tried, and every attempt is written to the request log in SQL
(`mtad.store.webhooks.record_webhook_attempt`: url, status, duration, response excerpt, in the same
transaction as the webhook's last use) before the request
is settled in Redis; a dispatcher killed in between POSTs it again when its lease expires, and the log
keeps one row per (uuid, attempt). 2xx is success; anything else (a non-2xx answer, a redirect, a timeout,
a refused or reset connection, a bad certificate, an address the SSRF guard refuses) is retried after
``retry_delays`` (Postal: 2, 3, 6, 10 and 15 minutes), then given up with a log line and the last row's
``will_retry`` false.

Up to ``concurrency`` requests are in flight, at most the sender's ``per_receiver`` of them to one
receiver: the claim itself takes no more of a receiver's requests than this process has room for there
(`mtad.webhooks.queue.WebhookQueue.claim`), so a slow receiver, or one with a backlog, holds a few places
and never delays another server's webhooks.

The lease follows the sender's timeout (`lease_for`), so the requests a crashed process had in flight are
sent again soon after they would have timed out, not minutes later. It covers three things in a row: up
to one timeout waiting for the receiver's slot (behind that receiver's other requests), one timeout for
the attempt itself, and `SETTLE_MARGIN` for signing, the request log's SQL write, settling in Redis and
the clocks of processes on different machines. A request still waiting for its slot when the first of
them is used up is not sent (`NotStarted`) but given back, due at once with its attempts unchanged, so
a live process never POSTs a request whose lease another process may have taken over.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtad.events.recorder import UnitOfWork
from mtad.store.webhooks import WebhookRequest, record_webhook_attempt
from mtad.webhooks.queue import PendingRequest, WebhookQueue
from mtad.webhooks.sender import NotStarted

#: Postal's ``WebhookDeliveryService::RETRIES``: the wait after the 1st, 2nd, ... failed attempt.
POSTAL_RETRY_DELAYS = (120.0, 180.0, 360.0, 600.0, 900.0)


class SendOutcome(Protocol):
    """What the dispatcher needs of a POST's outcome (`mtad.webhooks.sender`)."""

    @property
    def ok(self) -> bool: ...
    @property
    def status_code(self) -> int: ...
    @property
    def body_excerpt(self) -> str: ...
    @property
    def duration(self) -> float: ...
    @property
    def error(self) -> str | None: ...


class Sender(Protocol):
    """What the dispatcher needs of `mtad.webhooks.sender.WebhookSender`."""

    @property
    def timeout(self) -> float:
        """Seconds an attempt may take once it has its receiver's slot."""
        ...

    @property
    def per_receiver(self) -> int:
        """Requests one receiver may have in flight from this process."""
        ...

    def post(self, url: str, body: bytes, *, start_by: float | None = None) -> Awaitable[SendOutcome]:
        """The attempt's outcome; `NotStarted`, with nothing sent, if it cannot start by ``start_by``."""
        ...


#: Seconds of a lease beyond the two timeouts (see the module docstring).
SETTLE_MARGIN = 5.0


def lease_for(timeout: float) -> float:
    """The lease of a request sent with ``timeout``: one timeout waiting for a slot, one for the attempt,
    and `SETTLE_MARGIN` (Postal's 5 s timeout: 15 s)."""
    return 2 * timeout + SETTLE_MARGIN


def retry_delay(attempt: int, delays: Sequence[float]) -> float | None:
    """The wait after failed attempt number ``attempt`` (1-based), or None to give up."""
    return delays[attempt - 1] if 1 <= attempt <= len(delays) else None


@attrs.frozen
class DispatchSettings:
    concurrency: int = 50
    batch_size: int = 50
    #: None: `lease_for` the sender's timeout (see the module docstring). Set only to test.
    lease_seconds: float | None = None
    poll_interval: float = 0.2
    retry_delays: tuple[float, ...] = POSTAL_RETRY_DELAYS


class WebhookDispatcher(Service):
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        queue: WebhookQueue,
        database: UnitOfWork,
        sender: Sender,
        settings: DispatchSettings | None = None,
    ) -> None:
        self._clock = clock
        self._queue = queue
        self._database = database
        self._sender = sender
        self.settings = settings or DispatchSettings()
        lease = self.settings.lease_seconds
        #: Seconds a claimed request is this dispatcher's.
        self.lease_seconds = lease_for(sender.timeout) if lease is None else lease
        #: Seconds after its claim by which a request must have its receiver's slot to be sent: the lease
        #: less the attempt and the margin (for a set lease, at least its start).
        self.start_within = max(0.0, self.lease_seconds - sender.timeout - SETTLE_MARGIN)
        self._in_flight: set[Deferred[None]] = set()
        #: Requests in flight per receiver (`mtad.webhooks.queue.receiver_of`).
        self._receivers: Counter[str] = Counter()
        self._loop: Deferred[None] | None = None
        self._waiting: Deferred[None] | None = None
        self.sent = 0
        self.failed = 0
        #: Requests given back untried because their receiver's slot came too late.
        self.given_back = 0

    async def run_once(self) -> int:
        """Claim what is due (up to the free slots) and start POSTing it; how many were claimed."""
        free = self.settings.concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        now = self._clock.seconds()
        claimed = await self._queue.claim(
            now,
            min(free, self.settings.batch_size),
            self.lease_seconds,
            per_receiver=self._sender.per_receiver,
            in_flight=self._receivers,
        )
        for request in claimed:
            self._start(request, now + self.start_within)
        return len(claimed)

    def _start(self, request: PendingRequest, start_by: float) -> None:
        self._receivers[request.receiver] += 1
        task = Deferred.fromCoroutine(self._attempt(request, start_by))
        self._in_flight.add(task)

        def finished(result: object) -> None:
            self._in_flight.discard(task)
            self._receivers[request.receiver] -= 1
            if not self._receivers[request.receiver]:
                del self._receivers[request.receiver]
            # A place is free: claim again now rather than after the poll interval, or a receiver with a
            # backlog would get its share of places only once per interval.
            if self._waiting is not None and not self._waiting.called:
                self._waiting.cancel()
            if isinstance(result, Failure):
                # The lease expires and the request is tried again, by this process or another.
                self.log.failure("webhook request {uuid} failed", result, uuid=request.uuid)

        task.addBoth(finished)

    async def _attempt(self, request: PendingRequest, start_by: float) -> None:
        try:
            outcome = await self._sender.post(request.url, request.body, start_by=start_by)
        except NotStarted:
            # Waited too long behind the receiver's other requests: give it back untried.
            self.given_back += 1
            await self._queue.retry(request, self._clock.seconds(), request.attempts)
            return
        attempt = request.attempts + 1
        now = self._clock.seconds()
        delay = None if outcome.ok else retry_delay(attempt, self.settings.retry_delays)
        row = WebhookRequest(
            server_id=request.server_id,
            webhook_id=request.webhook_id,
            uuid=request.uuid,
            event=request.event,
            url=request.url,
            attempt=attempt,
            timestamp=now,
            status_code=outcome.status_code,
            duration=outcome.duration,
            response=outcome.body_excerpt,
            payload=request.body.decode("utf-8", "replace"),
            will_retry=delay is not None,
            error=outcome.error,
        )
        await self._database.run(record_webhook_attempt, row, now if outcome.ok else None)
        if outcome.ok:
            self.sent += 1
            await self._queue.done(request)
        elif delay is not None:
            self.log.info(
                "webhook {event} {uuid} to {url} failed ({status}); retrying in {delay}s",
                event=request.event,
                uuid=request.uuid,
                url=request.url,
                status=outcome.status_code,
                delay=delay,
            )
            await self._queue.retry(request, now + delay, attempt)
        else:
            self.failed += 1
            self.log.warn(
                "webhook {event} {uuid} to {url} given up after {attempts} attempts (last: {status})",
                event=request.event,
                uuid=request.uuid,
                url=request.url,
                attempts=attempt,
                status=outcome.status_code,
            )
            await self._queue.done(request)

    async def _run(self) -> None:
        while self.running:
            try:
                claimed = await self.run_once()
            except Exception as e:
                self.log.warn("cannot claim webhook requests ({error}); retrying", error=str(e))
                claimed = 0
            if not claimed and self.running:
                self._waiting = deferLater(self._clock, self.settings.poll_interval)
                try:
                    await self._waiting
                except CancelledError:
                    pass
                finally:
                    self._waiting = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self.log.failure("webhook dispatcher stopped unexpectedly", f))

    def stopService(self) -> Deferred[None]:
        """Stop claiming; fires when the POSTs in flight have been settled (or their leases will expire)."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._waiting is not None:
            self._waiting.cancel()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            await loop
        if self._in_flight:
            await DeferredList(list(self._in_flight), consumeErrors=True)

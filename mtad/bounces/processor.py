"""`BounceProcessor`: reads what the bounce inbox holds and writes what it means onto the event stream.

For each entry (`mtad.bounces.inbox`), claimed with a lease:

1. parse it (`mtad.mail.bounces.parse_bounce`) in a worker thread: a hostile message can take the parser
   a second or more, which must not stall the reactor (DESIGN.md invariant 3);
2. find the message it is about: VERP first, then ``X-Postal-MsgID`` tokens, through SQL in the
   database's thread pool (`mtad.bounces.matching`);
3. append its events and settle the entry in one Redis step (`BounceInbox.finish`). The recorder then
   writes the SQL rows from those events, the webhooks and the suppression list read them too.

Nothing is written before step 3, and step 3 is atomic, so a processor that dies anywhere leaves the entry
leased until its lease expires, and then it is processed again from the start: no bounce is lost, none is
recorded twice. Of two processors holding the same entry (a lease that expired under a slow one), only the
lease holder's step 3 does anything.

An entry that cannot be processed is tried again later and goes to the back of the inbox, so it blocks
nothing; after ``max_claims`` tries (failures, or processors that died on it) it is recorded unread, with
an ``Error`` delivery saying why. An outage (Redis or the database down) is no fault of the entry: it is
given back uncounted and the loop backs off. A VERP address that checks out but whose message is not
recorded yet, or not recorded as delivered (the recorder lags, a quick bounce overtook it), is waited for,
up to ``original_wait``: marked before its ``Sent`` attempt is recorded, the message would be ``Sent`` again
after it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mtad.accept import MessageHeaders, parse_headers
from mtad.bounces.inbox import InboxEntry
from mtad.bounces.matching import (
    Received,
    ReturnPathDomains,
    candidates,
    decide,
    find_originals,
    unreadable,
)
from mtad.events.consumer import is_outage
from mtad.events.schema import AnyEvent
from mtad.mail.bounces import BounceReport, parse_bounce
from mtad.mail.verp import decode_return_path


@attrs.frozen
class Reading:
    """What the parser made of an entry: the report, and the headers it is recorded with."""

    report: BounceReport
    headers: MessageHeaders


def read(data: bytes, mail_from: str) -> Reading:
    """Parse one received message (CPU-bound: run it in a thread). Never raises."""
    return Reading(parse_bounce(data, mail_from=mail_from), parse_headers(data))


#: Runs a function in a worker thread: ``in_thread(fn)`` fires with ``fn()``'s result.
InThread = Callable[[Callable[[], Reading]], Awaitable[Reading]]


class Inbox(Protocol):
    """What the processor needs of `mtad.bounces.inbox.BounceInbox`."""

    async def claim(self, now: float, limit: int, lease_seconds: float) -> list[InboxEntry]: ...

    async def finish(
        self, entry: InboxEntry, server_id: int, events: Sequence[AnyEvent], now: float
    ) -> bool: ...

    async def retry(self, entry: InboxEntry, due_at: float, error: str, *, counted: bool = True) -> bool: ...


class UnitOfWork(Protocol):
    """What the processor needs of `mtad.store.db.Database`: run a sync function in a transaction."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


@attrs.frozen
class ProcessorSettings:
    """How the processor works through the inbox.

    ``batch_size`` entries are claimed at a time, each leased for ``lease_seconds``; ``poll_interval``
    is the wait when none is due. A failed entry is due again after ``retry_delay`` seconds, doubling per
    try up to ``max_retry_delay``, until ``max_claims`` tries; an outage backs the loop off from
    ``outage_delay`` up to ``max_outage_delay``. A match whose message is not recorded, or not as delivered,
    is looked up again after ``first_wait`` seconds, the wait doubling up to ``wait_interval``, until
    ``original_wait`` seconds after the bounce came.
    """

    batch_size: int = 10
    lease_seconds: float = 600.0
    poll_interval: float = 1.0
    retry_delay: float = 60.0
    max_retry_delay: float = 3600.0
    max_claims: int = 5
    outage_delay: float = 1.0
    max_outage_delay: float = 60.0
    original_wait: float = 900.0
    first_wait: float = 1.0
    wait_interval: float = 30.0

    def __attrs_post_init__(self) -> None:
        problems = [
            f"{name} must be at least 1, got {getattr(self, name)!r}"
            for name in ("batch_size", "max_claims")
            if getattr(self, name) < 1
        ]
        problems += [
            f"{name} must be positive, got {getattr(self, name)!r}"
            for name in (
                "lease_seconds",
                "poll_interval",
                "retry_delay",
                "max_retry_delay",
                "outage_delay",
                "max_outage_delay",
                "first_wait",
                "wait_interval",
            )
            if getattr(self, name) <= 0
        ]
        if self.original_wait < 0:
            problems.append(f"original_wait must not be negative, got {self.original_wait!r}")
        if problems:
            raise ValueError("; ".join(problems))


class ProcessingOutage(Exception):
    """An entry was given back because a store is down: `BounceProcessor.run_once` raises it for the
    loop to back off."""


class BounceProcessor(Service):
    """Processes the bounce inbox until stopped (see the module docstring).

    ``secret`` is the VERP secret (`mtad.bounces.return_path.verp_secret`); ``domains`` the return path
    domains its addresses may use.
    """

    log = Logger()

    def __init__(
        self,
        inbox: Inbox,
        database: UnitOfWork,
        clock: IReactorTime,
        in_thread: InThread,
        *,
        secret: bytes,
        domains: ReturnPathDomains,
        settings: ProcessorSettings | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the VERP secret must not be empty")
        self._inbox = inbox
        self._database = database
        self._clock = clock
        self._in_thread = in_thread
        self._secret = secret
        self.domains = domains
        self.settings = settings if settings is not None else ProcessorSettings()
        #: Entries settled (finished) by this processor, and of those recorded unread.
        self.processed = 0
        self.given_up = 0
        self._delay = self.settings.outage_delay
        self._stopping = False
        self._loop: Deferred[None] | None = None
        self._waiting: Deferred[None] | None = None

    async def run_once(self) -> int:
        """Claim one batch and settle or give back each entry; how many were claimed (0: none due).

        Raises when a store is down (after giving back what it could), for the loop to back off.
        """
        settings = self.settings
        entries = await self._inbox.claim(self._clock.seconds(), settings.batch_size, settings.lease_seconds)
        for n, entry in enumerate(entries):
            if self._stopping:
                await self._give_back(entries[n:], "processor stopping")
                break
            try:
                await self.process(entry)
            except ProcessingOutage:
                await self._give_back(entries[n + 1 :], "store unavailable")
                raise
        return len(entries)

    async def process(self, entry: InboxEntry) -> None:
        """Settle one claimed entry, or give it back to be tried again (see the module docstring)."""
        now = self._clock.seconds()
        if entry.claims > self.settings.max_claims:
            await self._give_up(entry, now)
            return
        try:
            reading = await self._in_thread(lambda: read(entry.data, entry.mail_from))
            found = candidates(self._secret, self.domains, entry.rcpt_to, reading.report)
            lookup = await self._database.run(find_originals, found)
            awaited = lookup.awaited()
            waited = now - entry.received_at
            if awaited and waited < self.settings.original_wait:
                ids = ", ".join(str(i) for i in awaited)
                self.log.info(
                    "bounce {bounce_id}: waiting for the delivery of message {ids} to be recorded",
                    bounce_id=entry.id,
                    ids=ids,
                )
                # The wait doubles: the recorder usually catches up within a second.
                delay = min(self.settings.wait_interval, max(self.settings.first_wait, waited))
                await self._inbox.retry(entry, now + delay, f"waiting for {ids}", counted=False)
                return
            received = _received(entry, reading)
            outcome = decide(received, lookup, now, secret=self._secret, domains=self.domains)
            settled = await self._inbox.finish(entry, outcome.server_id, outcome.events, now)
        except CancelledError:
            raise
        except Exception as e:
            await self._failed(entry, now, e)
            return
        if not settled:
            self.log.info(
                "bounce {bounce_id}: its lease expired, another processor has it", bounce_id=entry.id
            )
            return
        self.processed += 1
        self.log.info(
            "bounce {bounce_id} from {client_ip} to {rcpt_to} for server {server_id}: {summary}",
            bounce_id=entry.id,
            client_ip=entry.client_ip,
            rcpt_to=", ".join(entry.rcpt_to),
            server_id=outcome.server_id,
            summary=outcome.summary,
        )

    async def _failed(self, entry: InboxEntry, now: float, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if is_outage(error):
            self.log.warn(
                "bounce {bounce_id} not processed, a store is unavailable ({error}); trying again",
                bounce_id=entry.id,
                error=reason,
            )
            await self._retry(entry, now, reason, counted=False)
            raise ProcessingOutage(reason) from error
        delay = min(self.settings.retry_delay * 2 ** max(0, entry.claims - 1), self.settings.max_retry_delay)
        self.log.failure(
            "bounce {bounce_id} could not be processed (try {claims} of {max_claims}); again in {delay}s",
            bounce_id=entry.id,
            claims=entry.claims,
            max_claims=self.settings.max_claims,
            delay=delay,
        )
        await self._retry(entry, now + delay, reason, counted=True)

    async def _retry(self, entry: InboxEntry, due_at: float, reason: str, *, counted: bool) -> None:
        try:
            await self._inbox.retry(entry, due_at, reason, counted=counted)
        except Exception as e:  # Redis down too: the lease expires and the entry is due again then
            self.log.warn(
                "bounce {bounce_id} could not be given back ({error}); due again when its lease expires",
                bounce_id=entry.id,
                error=f"{type(e).__name__}: {e}",
            )

    async def _give_back(self, entries: Sequence[InboxEntry], reason: str) -> None:
        now = self._clock.seconds()
        for entry in entries:
            await self._retry(entry, now, reason, counted=False)

    async def _give_up(self, entry: InboxEntry, now: float) -> None:
        """Record an entry that failed ``max_claims`` times unread, so that it leaves the inbox."""
        server_id = 0
        for address in entry.rcpt_to:
            match = decode_return_path(self._secret, address, self.domains.of(address))
            if match is not None:
                server_id = match.server_id
                break
        error = entry.last_error or "its processor stopped while processing it"
        blank = Reading(BounceReport("not_a_bounce", "not read"), MessageHeaders(None, None, None))
        outcome = unreadable(
            _received(entry, blank), server_id, now, f"{entry.claims - 1} tries, last: {error}"
        )
        settled = await self._inbox.finish(entry, server_id, outcome.events, now)
        if settled:
            self.given_up += 1
            self.processed += 1
            self.log.error(
                "bounce {bounce_id} from {client_ip} recorded unread after {claims} tries: {error}",
                bounce_id=entry.id,
                client_ip=entry.client_ip,
                claims=entry.claims - 1,
                error=error,
            )

    # -- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while self.running:
            try:
                count = await self.run_once()
            except CancelledError:
                return
            except Exception as e:
                if not isinstance(e, ProcessingOutage):
                    self.log.warn("bounce inbox unavailable ({error})", error=f"{type(e).__name__}: {e}")
                delay = self._delay
                self._delay = min(self._delay * 2, self.settings.max_outage_delay)
            else:
                self._delay = self.settings.outage_delay
                delay = 0.0 if count else self.settings.poll_interval
            if delay and self.running:
                await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        self._waiting = deferLater(self._clock, delay)
        try:
            await self._waiting
        except CancelledError:
            pass  # cancelled by stopService
        finally:
            self._waiting = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self.log.failure("bounce processor stopped unexpectedly", f))

    def stopService(self) -> Deferred[None]:
        """Stop after the entry in hand (the rest of its batch is given back); fires when the loop ends."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._waiting is not None:
            self._waiting.cancel()
        loop, self._loop = self._loop, None
        if loop is None:
            return Deferred.fromCoroutine(_nothing())
        return loop


def _received(entry: InboxEntry, reading: Reading) -> Received:
    return Received(
        id=entry.id,
        token=entry.token,
        mail_from=entry.mail_from,
        rcpt_to=entry.rcpt_to,
        size=len(entry.data),
        received_with_ssl=entry.received_with_ssl,
        received_at=entry.received_at,
        report=reading.report,
        headers=reading.headers,
    )


async def _nothing() -> None:
    return None

"""The delivery service: claim due messages from the Redis queue, deliver them, settle every lease.

One loop per process claims up to ``batch_size`` due messages at a time while fewer than ``concurrency``
are in flight, groups them by (IP pool, recipient domain) and hands each group to the deliverer at once,
so messages for one domain share connections (the deliverer reuses a session for the whole group).
Every claimed message leaves the service settled in exactly one way (DESIGN.md invariant 2):

- ``Sent`` / ``HardFail``: acknowledged (deleted) with a ``message.delivery`` event;
- ``SoftFail``: retried at Postal's backoff (`mtad.outbound.retry.backoff`), or hard-failed once the
  attempts are used up;
- ``hold_reason`` set by the accept path (development mode, held credential): moved to the held set
  with a ``Held`` event, never delivered;
- recipient on its server's suppression list (when the service has a `SuppressionCheck`): acknowledged
  at once as ``HardFail``, its details naming the entry, with a ``message.suppressed`` event appended in
  the same step; never connected to;
- throttled (no connection slot anywhere): released, due again in ``retry_in`` seconds — no attempt
  counted, no event;
- the deliverer raised (a bug): a ``SoftFail`` like any other, so it is retried on the schedule and
  cannot spin;
- an error while settling (Redis trouble) or shutdown: released back to due.

A process that dies with messages leased loses nothing: the leases expire and any process claims the
messages again. A delivery that outlives half its lease extends it.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtad.bounces.return_path import ReturnPath
from mtad.events.schema import MessageDelivery, MessageSuppressed, delivery_event
from mtad.outbound.deliverer import BatchOutcome, DeliveryResult, RecipientResult
from mtad.outbound.pools import IPPool
from mtad.outbound.retry import DEFAULT_POLICY, RetryPolicy, backoff, max_attempts_details
from mtad.queue.model import ClaimedMessage, RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from mtad.smtp.client import OutgoingMessage
from mtad.store.messages import MessageStatus
from mtad.store.suppressions import Suppression

#: The message hash field the accept path sets to hold a message instead of delivering it.
HOLD_REASON_FIELD = "hold_reason"

_Work = Coroutine[Any, Any, None]


class SuppressionCheck(Protocol):
    """What the service needs to keep mail from suppressed recipients
    (`mtad.suppression.lookup.SuppressionLookup`)."""

    async def suppressed(self, messages: Sequence[ClaimedMessage]) -> Mapping[int, Suppression]:
        """The messages whose recipient is suppressed now, by message id, with the list entry."""
        ...


class BatchDeliverer(Protocol):
    """What the service needs of `mtad.outbound.deliverer.Deliverer`: deliver one domain's batch."""

    def deliver(
        self, domain: str, messages: Sequence[OutgoingMessage], pool: IPPool
    ) -> Deferred[BatchOutcome]: ...


@attrs.frozen
class DeliverySettings:
    """How hard the delivery loop works.

    ``concurrency`` caps the messages in flight (claimed, not yet settled); ``batch_size`` caps one claim;
    ``lease_seconds`` is the lease a claim takes (extended while a delivery runs); ``poll_interval`` is
    the wait when nothing is due; ``hold_seconds`` is how long a held message is kept (Postal: 7 days);
    ``drain_timeout`` bounds how long shutdown waits for deliveries before releasing their leases.
    ``return_path`` gives each message its own VERP envelope sender (`mtad.bounces.return_path`), so its
    bounces find it; None sends with the message's own ``mail_from``.
    """

    concurrency: int = 200
    batch_size: int = 100
    lease_seconds: float = 600.0
    poll_interval: float = 1.0
    retry: RetryPolicy = DEFAULT_POLICY
    hold_seconds: float = 7 * 86400.0
    default_pool: str = "default"
    drain_timeout: float = 30.0
    return_path: ReturnPath | None = None

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        for name in ("concurrency", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("lease_seconds", "poll_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("hold_seconds", "drain_timeout"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("; ".join(problems))


def internal_error_outcome(messages: Sequence[OutgoingMessage], failure: Failure) -> BatchOutcome:
    """A SoftFail for each message, for when the deliverer itself raised."""
    error = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
    result = DeliveryResult(
        "SoftFail",
        None,
        "4.3.0",
        "",
        f"Internal error while delivering: {error}",
        False,
        0.0,
        None,
        None,
    )
    return BatchOutcome(tuple(RecipientResult(m, r, result) for m in messages for r in m.recipients))


def _unsigned(messages: Sequence[ClaimedMessage]) -> list[OutgoingMessage]:
    return [OutgoingMessage(str(m.id), m.mail_from, (m.rcpt_to,), m.body) for m in messages]


async def _call(sign: BodySigner, server_id: int, message_id: int, body: bytes) -> bytes:
    return await sign(server_id, message_id, body)


def new_log_id() -> str:
    """An id for one delivery attempt's log lines, in the form of Postal's (eight capitals and digits)."""
    return "".join(secrets.choice(_LOG_ID_ALPHABET) for _ in range(8))


_LOG_ID_ALPHABET = string.ascii_uppercase + string.digits


def recipient_domain(rcpt_to: str) -> str:
    """The domain part of an address, lower-cased (RFC 5321 §2.4: domains are case-insensitive)."""
    _, at, domain = rcpt_to.rpartition("@")
    return domain.strip().lower().rstrip(".") if at else ""


def retry_wording(seconds: float) -> str:
    """A delay as Postal words it in delivery details: "5 minutes", "45 seconds", "7.2 hours"."""
    whole = int(seconds + 0.5)
    if whole < 120:
        return "1 second" if whole == 1 else f"{whole} seconds"
    minutes = int(seconds / 60 + 0.5)
    if minutes < 120:
        return f"{minutes} minutes"
    return f"{round(seconds / 3600, 1):g} hours"


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def suppressed_details(rcpt_to: str, suppression: Suppression) -> str:
    """A suppressed message's delivery details: which entry, why, since and until when (Postal's words
    for its hold, "Recipient (x) is on the suppression list (reason: ...)", with the rest added)."""
    reason = " ".join((suppression.reason or "").split())
    why = f"source: {suppression.source.value}" + (f", reason: {reason}" if reason else "")
    until = "until removed" if suppression.expires_at is None else f"until {_utc(suppression.expires_at)}"
    return (
        f"Recipient ({rcpt_to}) is on the suppression list ({why}) since {_utc(suppression.created_at)} "
        f"{until}; the message was not sent."
    )


def _sentence(text: str, more: str) -> str:
    """Postal's way of appending to delivery details: end the first sentence, then add the second."""
    text = text.strip()
    if not text:
        return more
    return f"{text} {more}" if text.endswith(".") else f"{text}. {more}"


#: Signs a message body for a server: ``(server_id, message_id, body) -> signed body``.
BodySigner = Callable[[int, int, bytes], Awaitable[bytes]]


class DeliveryService(Service):
    """Claims due outgoing messages, delivers them per (pool, domain) group and settles every lease.

    ``owner`` names this process in the leases it takes (shown by the queue for debugging).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        queue: RedisQueue,
        deliverer: BatchDeliverer,
        pools: Mapping[str, IPPool],
        settings: DeliverySettings,
        owner: str,
        sign: BodySigner | None = None,
        suppressions: SuppressionCheck | None = None,
    ) -> None:
        if settings.default_pool not in pools:
            raise ValueError(
                f"default IP pool {settings.default_pool!r} is not among the pools {sorted(pools)}"
            )
        self._clock = clock
        self._queue = queue
        self._deliverer = deliverer
        self._pools = dict(pools)
        self._sign = sign
        self._suppressions = suppressions
        self.settings = settings
        self.owner = owner
        #: Claimed messages not yet settled, by id.
        self._leases: dict[int, ClaimedMessage] = {}
        #: Every running group task (delivery or hold), so shutdown can wait for or abandon them.
        self._tasks: set[Deferred[None]] = set()
        self._loop: Deferred[None] | None = None
        self._sleeping: Deferred[None] | None = None
        self._slot_freed: Deferred[None] | None = None
        #: When the loop waits for free slots, it claims again once this many are free: one claim per
        #: settled message would cost a claim script per message under full load.
        self._refill = max(1, min(settings.batch_size, settings.concurrency) // 10)
        self._redis_down = False
        self._lookup_failing = False
        self._abandoned = False
        self._warned_pools: set[str] = set()

    @property
    def in_flight(self) -> int:
        """Messages claimed by this process and not yet settled."""
        return len(self._leases)

    # -- service ------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._abandoned = False
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self.log.failure("delivery loop stopped unexpectedly", f))

    def stopService(self) -> Deferred[None]:
        """Stop claiming and let the deliveries in flight finish; fires when every claim is settled.

        After ``drain_timeout`` seconds the deliveries still running are cancelled and their messages
        released, so another process can take them at once rather than after their lease expires.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._wake()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            await loop  # a claim in progress finishes and its messages are released
        if not self._tasks:
            return
        self.log.info(
            "waiting up to {timeout}s for {count} deliveries in flight",
            timeout=self.settings.drain_timeout,
            count=self.in_flight,
        )
        abandon = self._clock.callLater(self.settings.drain_timeout, self._abandon)
        try:
            await DeferredList(list(self._tasks), consumeErrors=True)
        finally:
            if abandon.active():
                abandon.cancel()

    def _abandon(self) -> None:
        self._abandoned = True
        self.log.warn(
            "deliveries did not finish within {timeout}s; releasing {count} messages",
            timeout=self.settings.drain_timeout,
            count=self.in_flight,
        )
        for task in list(self._tasks):
            task.cancel()

    def _wake(self) -> None:
        """Interrupt the loop's wait (for the poll interval or a free slot)."""
        for waiting in (self._sleeping, self._slot_freed):
            if waiting is not None and not waiting.called:
                waiting.cancel()

    # -- the loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        settings = self.settings
        while self.running:
            free = settings.concurrency - self.in_flight
            if free <= 0:
                await self._wait_for_slot()
                continue
            limit = min(settings.batch_size, free)
            try:
                claimed = await self._queue.claim(
                    self._clock.seconds(), limit, settings.lease_seconds, self.owner
                )
            except RedisUnavailable as e:
                if not self._redis_down:
                    self.log.warn("cannot claim messages: {error}; retrying", error=str(e))
                    self._redis_down = True
                await self._sleep(settings.poll_interval)
                continue
            except Exception:
                self.log.failure("claiming messages failed")
                await self._sleep(settings.poll_interval)
                continue
            if self._redis_down:
                self.log.info("claiming messages again")
                self._redis_down = False
            if not self.running:
                await self._release(claimed, "shutting down")
                return
            self._dispatch(claimed)
            if len(claimed) < limit:
                await self._sleep(settings.poll_interval)

    async def _sleep(self, seconds: float) -> None:
        if not self.running:
            return
        self._sleeping = deferLater(self._clock, seconds)
        try:
            await self._sleeping
        except CancelledError:
            pass
        finally:
            self._sleeping = None

    async def _wait_for_slot(self) -> None:
        self._slot_freed = Deferred()
        try:
            await self._slot_freed
        except CancelledError:
            pass
        finally:
            self._slot_freed = None

    def _settled(self, message: ClaimedMessage) -> None:
        self._leases.pop(message.id, None)
        waiting = self._slot_freed
        free = self.settings.concurrency - self.in_flight
        if waiting is not None and not waiting.called and (free >= self._refill or not self._leases):
            waiting.callback(None)

    # -- dispatch -----------------------------------------------------------------------------------

    def _dispatch(self, claimed: Sequence[ClaimedMessage]) -> None:
        groups: dict[tuple[str, str], list[ClaimedMessage]] = {}
        held: list[ClaimedMessage] = []
        for message in claimed:
            self._leases[message.id] = message
            if message.fields.get(HOLD_REASON_FIELD, "").strip():
                held.append(message)
            else:
                key = (self._pool_name(message.pool), recipient_domain(message.rcpt_to))
                groups.setdefault(key, []).append(message)
        if held:
            self._track(self._hold(held), held)
        if self._suppressions is not None and groups:
            self._track(self._screen(groups), [m for messages in groups.values() for m in messages])
            return
        for (pool_name, domain), messages in groups.items():
            self._track(self._deliver(self._pools[pool_name], domain, messages), messages)

    def _pool_name(self, name: str) -> str:
        if not name:
            return self.settings.default_pool
        if name not in self._pools:
            if name not in self._warned_pools:
                self._warned_pools.add(name)
                self.log.warn(
                    "unknown IP pool {pool}; using {default}", pool=name, default=self.settings.default_pool
                )
            return self.settings.default_pool
        return name

    def _track(self, work: _Work, messages: Sequence[ClaimedMessage]) -> None:
        task: Deferred[None] = Deferred.fromCoroutine(work)
        self._tasks.add(task)

        def done(result: Any) -> None:
            self._tasks.discard(task)
            for message in messages:  # anything a bug left unsettled stops counting as in flight
                if message.id in self._leases:
                    self._settled(message)

        task.addErrback(lambda f: self.log.failure("delivery task failed", f))
        task.addBoth(done)

    # -- delivering ---------------------------------------------------------------------------------

    async def _deliver(self, pool: IPPool, domain: str, messages: list[ClaimedMessage]) -> None:
        if not domain:
            await self._settle_each(messages, self._no_domain)
            return
        extender = LoopingCall(lambda: Deferred.fromCoroutine(self._extend_leases(messages)))
        extender.clock = self._clock
        extender.start(self.settings.lease_seconds / 2, now=False).addErrback(
            lambda f: self.log.failure("extending leases failed", f)
        )
        try:
            outgoing = await self._outgoing(messages)
            outcome = await self._deliverer.deliver(domain, outgoing, pool)
        except Exception:
            if self._abandoned:  # cancelled by stopService after drain_timeout
                await self._release(messages, "shutting down")
                return
            failure = Failure()  # type: ignore[no-untyped-call]
            self.log.failure(
                "delivering {count} messages to {domain} via pool {pool} failed",
                failure,
                count=len(messages),
                domain=domain,
                pool=pool.name,
            )
            # Counted as a soft failure like any other, so a message that trips a bug every time is
            # retried on the schedule and finally fails, instead of spinning at once forever.
            outcome = internal_error_outcome(_unsigned(messages), failure)
        finally:
            if extender.running:
                extender.stop()
        await self._settle_outcome(domain, messages, outcome)

    async def _outgoing(self, messages: Sequence[ClaimedMessage]) -> list[OutgoingMessage]:
        """The messages as the deliverer takes them, bodies DKIM-signed when there is a signer.

        A body shared by several recipients is signed once; the distinct bodies are signed concurrently,
        so a signer working in threads uses both cores.
        """
        sign = self._sign
        return_path = self.settings.return_path
        if return_path is not None:
            messages = [
                attrs.evolve(m, mail_from=return_path.envelope_sender(m.server_id, m.id, m.mail_from))
                for m in messages
            ]
        if sign is None:
            return _unsigned(messages)
        firsts: dict[tuple[int, int], ClaimedMessage] = {}
        for m in messages:
            firsts.setdefault((id(m.body), m.server_id), m)
        keys = list(firsts)
        try:
            bodies = await gatherResults(
                [Deferred.fromCoroutine(_call(sign, m.server_id, m.id, m.body)) for m in firsts.values()],
                consumeErrors=True,
            )
        except FirstError as e:
            raise e.subFailure.value from None  # type: ignore[union-attr,misc]
        signed = dict(zip(keys, bodies, strict=True))
        return [
            OutgoingMessage(str(m.id), m.mail_from, (m.rcpt_to,), signed[(id(m.body), m.server_id)])
            for m in messages
        ]

    async def _settle_outcome(
        self, domain: str, messages: list[ClaimedMessage], outcome: BatchOutcome
    ) -> None:
        by_id = {str(m.id): m for m in messages}
        results: dict[int, DeliveryResult] = {}
        for rr in outcome.results:
            message = by_id.get(rr.message.id)
            if message is not None:
                results.setdefault(message.id, rr.result)
        throttled = [by_id[m.id] for m in outcome.throttled if m.id in by_id]
        throttled = [m for m in throttled if m.id not in results]
        done = {m.id for m in throttled} | results.keys()
        missing = [m for m in messages if m.id not in done]
        if throttled:
            self.log.info(
                "no connection slot for {domain}: {count} messages wait {retry_in}s",
                domain=domain,
                count=len(throttled),
                retry_in=outcome.retry_in,
            )
        if missing:
            self.log.warn(
                "the deliverer gave no result for {count} messages to {domain}; releasing them",
                count=len(missing),
                domain=domain,
            )
        delay = max(outcome.retry_in, self.settings.poll_interval)
        await self._all(
            [
                *(self._settle_one(m, self._result(m, results[m.id])) for m in messages if m.id in results),
                *(self._settle_one(m, self._throttle(m, delay)) for m in throttled),
                *(self._settle_one(m, self._release_one(m)) for m in missing),
            ]
        )

    async def _settle_each(
        self, messages: Iterable[ClaimedMessage], settle: Callable[[ClaimedMessage], _Work]
    ) -> None:
        await self._all([self._settle_one(m, settle(m)) for m in messages])

    async def _all(self, coroutines: Sequence[_Work]) -> None:
        """Run settlements concurrently (they pipeline on the Redis connection) and wait for all."""
        tasks: list[Deferred[None]] = [Deferred.fromCoroutine(c) for c in coroutines]
        if tasks:
            await DeferredList(tasks, consumeErrors=True)

    async def _settle_one(self, message: ClaimedMessage, settle: _Work) -> None:
        """Await one settlement; on any error (or shutdown) give the message back to the queue."""
        try:
            await settle
        except Exception:
            if self._abandoned:
                await self._release_quietly(message)
                return
            self.log.failure("settling message {message_id} failed; releasing it", message_id=message.id)
            await self._release_quietly(message)
        finally:
            self._settled(message)

    async def _result(self, message: ClaimedMessage, result: DeliveryResult) -> None:
        now = self._clock.seconds()
        attempt = message.attempts + 1
        self.log.info(
            "delivered {message_id} to {rcpt_to} via {mx} from {source_ip}: {status}",
            message_id=message.id,
            rcpt_to=message.rcpt_to,
            mx=result.mx,
            source_ip=result.source_ip,
            status=result.status,
        )
        if result.status == "SoftFail":
            delay = backoff(attempt, self.settings.retry, result.output)
            if delay is not None:
                details = _sentence(result.details, f"Will retry in {retry_wording(delay)}.")
                event = self._event(message, MessageStatus.SOFT_FAIL, now, result, details)
                ok = await self._queue.retry(message.id, message.lease_token, now + delay, event)
                self._check(ok, message, "retry")
                return
            event = self._event(
                message, MessageStatus.HARD_FAIL, now, result, max_attempts_details(self.settings.retry)
            )
        else:
            status = MessageStatus.SENT if result.status == "Sent" else MessageStatus.HARD_FAIL
            event = self._event(message, status, now, result, result.details)
        ok = await self._queue.ack(message.id, message.lease_token, event)
        self._check(ok, message, "ack")

    async def _no_domain(self, message: ClaimedMessage) -> None:
        now = self._clock.seconds()
        details = f"Recipient address {message.rcpt_to!r} has no domain"
        event = self._event(message, MessageStatus.HARD_FAIL, now, None, details)
        self._check(await self._queue.ack(message.id, message.lease_token, event), message, "ack")

    async def _throttle(self, message: ClaimedMessage, delay: float) -> None:
        # No connection slot was free: due again in ``delay`` seconds, no attempt counted, no event.
        due_at = self._clock.seconds() + delay
        ok = await self._queue.release(message.id, message.lease_token, due_at)
        self._check(ok, message, "reschedule")

    # -- suppressed recipients ----------------------------------------------------------------------

    async def _screen(self, groups: Mapping[tuple[str, str], list[ClaimedMessage]]) -> None:
        """Finish the messages to suppressed recipients, and deliver the others group by group at the
        same time; one lookup for the whole claimed batch."""
        messages = [m for group in groups.values() for m in group]
        try:
            found = await self._find_suppressed(messages)
        except CancelledError:  # abandoned by stopService while the lookup ran
            await self._release(messages, "shutting down")
            return
        work: list[_Work] = [
            self._settle_one(m, self._suppress(m, found[m.id])) for m in messages if m.id in found
        ]
        for (pool_name, domain), group in groups.items():
            rest = [m for m in group if m.id not in found]
            if rest:
                work.append(self._deliver(self._pools[pool_name], domain, rest))
        try:
            await self._all(work)
        except CancelledError:
            pass  # each delivery released its messages (`_deliver`)

    async def _find_suppressed(self, messages: Sequence[ClaimedMessage]) -> Mapping[int, Suppression]:
        """The suppressed among ``messages``; none when the lookup fails.

        A database that does not answer must not stop all mail: the batch goes out unchecked (as it
        would have before there was a list) rather than waiting or failing. The first failure of an
        outage is logged, and its end; the batches between are not, one by one.
        """
        assert self._suppressions is not None
        try:
            found = await self._suppressions.suppressed(messages)
        except CancelledError:
            raise
        except Exception:
            if not self._lookup_failing:
                self._lookup_failing = True
                self.log.failure(
                    "looking up suppressed recipients failed; delivering unchecked until it works again"
                )
            return {}
        if self._lookup_failing:
            self._lookup_failing = False
            self.log.info("looking up suppressed recipients works again")
        claimed = {m.id for m in messages}
        return {message_id: s for message_id, s in found.items() if message_id in claimed}

    async def _suppress(self, message: ClaimedMessage, suppression: Suppression) -> None:
        now = self._clock.seconds()
        details = suppressed_details(message.rcpt_to, suppression)
        self.log.info(
            "not sending {message_id} to {rcpt_to}: suppressed ({source}) since {since}",
            message_id=message.id,
            rcpt_to=message.rcpt_to,
            source=suppression.source.value,
            since=_utc(suppression.created_at),
        )
        event = self._event(message, MessageStatus.HARD_FAIL, now, None, details)
        notice = MessageSuppressed(
            message_id=message.id,
            server_id=message.server_id,
            rcpt_to=message.rcpt_to,
            source=suppression.source.value,
            reason=suppression.reason,
            timestamp=now,
            suppressed_at=suppression.created_at,
            expires_at=suppression.expires_at,
            details=details,
            token=event.token,
            scope=event.scope,
            mail_from=event.mail_from,
            subject=event.subject,
            header_message_id=event.header_message_id,
            tag=event.tag,
            message_timestamp=event.message_timestamp,
        )
        ok = await self._queue.ack(message.id, message.lease_token, event, also=notice)
        self._check(ok, message, "ack")

    # -- holding ------------------------------------------------------------------------------------

    async def _hold(self, messages: list[ClaimedMessage]) -> None:
        await self._settle_each(messages, self._hold_one)

    async def _hold_one(self, message: ClaimedMessage) -> None:
        now = self._clock.seconds()
        reason = message.fields[HOLD_REASON_FIELD].strip()
        self.log.info(
            "holding {message_id} to {rcpt_to}: {reason}",
            message_id=message.id,
            rcpt_to=message.rcpt_to,
            reason=reason,
        )
        event = self._event(
            message, MessageStatus.HELD, now, None, reason, hold_expiry=now + self.settings.hold_seconds
        )
        self._check(await self._queue.hold(message.id, message.lease_token, now, event), message, "hold")

    # -- leases -------------------------------------------------------------------------------------

    async def _extend_leases(self, messages: Sequence[ClaimedMessage]) -> None:
        deadline = self._clock.seconds() + self.settings.lease_seconds
        live = [m for m in messages if m.id in self._leases]
        try:
            replies = await DeferredList(
                [self._queue.extend_lease(m.id, m.lease_token, deadline) for m in live],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
        except Exception:
            self.log.failure("extending {count} leases failed", count=len(live))
            return
        for message, (_, ok) in zip(live, replies, strict=True):
            self._check(bool(ok), message, "extend lease of")

    async def _release(self, messages: Sequence[ClaimedMessage], why: str) -> None:
        if messages:
            self.log.info("releasing {count} messages: {why}", count=len(messages), why=why)
        await self._all([self._release_quietly_and_settle(m) for m in messages])

    async def _release_quietly_and_settle(self, message: ClaimedMessage) -> None:
        try:
            await self._release_quietly(message)
        finally:
            self._settled(message)

    async def _release_one(self, message: ClaimedMessage) -> None:
        self._check(await self._queue.release(message.id, message.lease_token), message, "release")

    async def _release_quietly(self, message: ClaimedMessage) -> None:
        """Release a lease; if even that fails the lease expires and the message comes back anyway."""
        try:
            ok = await self._queue.release(message.id, message.lease_token)
        except Exception as e:
            self.log.warn(
                "could not release {message_id} ({error}); it returns when its lease expires",
                message_id=message.id,
                error=str(e),
            )
            return
        self._check(ok, message, "release")

    def _check(self, ok: bool, message: ClaimedMessage, action: str) -> None:
        if not ok:
            self.log.info(
                "could not {action} {message_id}: its lease expired and another worker may have it",
                action=action,
                message_id=message.id,
            )

    # -- events -------------------------------------------------------------------------------------

    def _event(
        self,
        message: ClaimedMessage,
        status: MessageStatus,
        now: float,
        result: DeliveryResult | None,
        details: str,
        hold_expiry: float | None = None,
    ) -> MessageDelivery:
        """The ``message.delivery`` event of this attempt: the delivery row, and the message for webhooks."""
        return delivery_event(
            message,
            status=status.value,
            timestamp=now,
            code=result.code if result is not None else None,
            output=(result.output or None) if result is not None else None,
            details=details,
            sent_with_ssl=result.sent_with_ssl if result is not None else False,
            # Postal gives every delivery attempt a log id; its clients expect a string.
            log_id=new_log_id(),
            time=result.time if result is not None else None,
            hold_expiry=hold_expiry,
            enhanced_code=(result.enhanced or None) if result is not None else None,
            mx=result.mx if result is not None else None,
            source_ip=result.source_ip if result is not None else None,
        )

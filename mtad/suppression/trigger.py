"""`SuppressionTrigger`: the event stream's ``suppression`` consumer group, adding addresses to the list.

It reads every event and acts on three kinds (`mtad.suppression.policy` decides):

- ``message.delivery``: a ``HardFail`` whose reply says the mailbox does not exist suppresses at once
  (``HardBounce``); ``SoftFail`` events are counted per (server, recipient) and a ``Sent`` resets the
  count; ``soft_fail_threshold`` of them in a row suppress (``SoftFailures``);
- ``message.bounced``: a hard bounce saying the mailbox does not exist (``HardBounce``);
- ``message.complaint``: a spam complaint (``Complaint``).

A ``Sent`` also takes its recipient off the list, as Postal does after every successful delivery, when
the entry says the mailbox does not work (`policy.CLEARED_BY_DELIVERY`: hard bounces, soft failures) and
is not newer than the delivery (`mtad.store.suppressions.remove_delivered`). Times, not stream order,
decide between a ``Sent`` and a suppression of the same batch too: a bounce can reach the stream before
the ``Sent`` of the message it is about, and must not be undone by it.

The count lives in Redis, where every process's trigger sees it: a set per recipient of the stream ids
of its soft failures (`QueueKeys.soft_failures`), so an event handled twice (at least once, DESIGN.md
invariant 2) is counted once, and a ``Sent`` deletes it. The set expires ``soft_fail_window`` seconds
after the last soft failure, so a few failures months apart never add up to a run. The Redis work of a
batch is done first (every recipient's commands in stream order, recipients concurrently), then the
batch's removals and suppressions are written in one transaction, and only then are the counts of the
recipients suppressed deleted; crashing between any two steps and handling the batch again gives the
same list.

Each suppression is dated by its event (``timestamp``), not by when the trigger ran, so a backlog
handled late expires when it would have, and handling an event again changes nothing
(`mtad.store.suppressions.add_suppression`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.config import SuppressionConfig
from mtad.events.schema import MessageBounced, MessageDelivery, Received, SpamComplaint
from mtad.queue.client import RedisClient
from mtad.queue.keys import QueueKeys
from mtad.store.suppressions import (
    Delivered,
    Suppression,
    SuppressionSource,
    add_suppressions,
    normalize_address,
    remove_delivered,
)
from mtad.suppression import policy
from mtad.suppression.lookup import UnitOfWork

#: The consumer group of the suppression triggers.
GROUP = "suppression"

#: Seconds a recipient's run of soft failures is remembered after its last one.
DEFAULT_SOFT_FAIL_WINDOW = 7 * 86400.0

_Key = tuple[int, str]


@attrs.define
class _Run:
    """What a batch did to one recipient's soft-failure count, in stream order."""

    #: A ``Sent`` came in this batch: the count starts again.
    reset: bool = False
    #: The soft failures after the last ``Sent`` of the batch: (stream id, event).
    failures: list[tuple[str, MessageDelivery]] = attrs.Factory(list)


@attrs.frozen
class _Changes:
    """What a batch does to the list, written in one transaction (`_write`)."""

    #: The latest ``Sent`` of each recipient that had one.
    delivered: list[Delivered]
    #: The suppressions, each recipient's in stream order.
    suppressions: list[Suppression]


def _write(conn: Connection, changes: _Changes) -> tuple[list[Suppression], list[Suppression]]:
    """Remove, then add (a suppression that survived the batch's own filter is newer than its delivery);
    the rows removed and the rows added."""
    removed = remove_delivered(conn, changes.delivered, policy.CLEARED_BY_DELIVERY)
    return removed, add_suppressions(conn, changes.suppressions)


def _disproved(suppression: Suppression, delivered: Delivered | None) -> bool:
    """Whether a delivery of the batch, at the same time or later, shows the entry's mailbox works."""
    return (
        delivered is not None
        and suppression.source in policy.CLEARED_BY_DELIVERY
        and suppression.created_at <= delivered.at
    )


class SuppressionTrigger:
    """The ``suppression`` group's `~mtad.events.consumer.EventHandler` (see the module docstring)."""

    log = Logger()
    group = GROUP

    def __init__(
        self,
        database: UnitOfWork,
        redis: RedisClient,
        keys: QueueKeys,
        clock: IReactorTime,
        settings: SuppressionConfig,
        soft_fail_window: float = DEFAULT_SOFT_FAIL_WINDOW,
    ) -> None:
        self._database = database
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self.settings = settings
        self.soft_fail_window = soft_fail_window

    def take(self, events: Sequence[Received]) -> int:
        return len(events)

    async def handle(self, events: Sequence[Received]) -> None:
        found: dict[_Key, list[Suppression]] = {}
        runs: dict[_Key, _Run] = {}
        delivered: dict[_Key, Delivered] = {}
        for received in events:
            event = received.event
            if isinstance(event, MessageDelivery):
                self._delivery(received.id, event, found, runs, delivered)
            elif isinstance(event, MessageBounced):
                if policy.bounce_suppresses(event.hard, event.category):
                    self._found(
                        found,
                        event.server_id,
                        event.rcpt_to,
                        SuppressionSource.HARD_BOUNCE,
                        event.timestamp,
                        policy.bounce_reason(event.status, event.diagnostic),
                        event.message_id,
                    )
            elif isinstance(event, SpamComplaint):
                self._found(
                    found,
                    event.server_id,
                    event.rcpt_to,
                    SuppressionSource.COMPLAINT,
                    event.timestamp,
                    policy.complaint_reason(event.feedback_type),
                    event.message_id,
                )
        counted = await self._count(runs)
        for key, (count, last) in counted.items():
            if count >= self.settings.soft_fail_threshold:
                self._found(
                    found,
                    key[0],
                    key[1],
                    SuppressionSource.SOFT_FAILURES,
                    last.timestamp,
                    policy.soft_failures_reason(count, last),
                    last.message_id,
                )
        new = [s for key, listed in found.items() for s in listed if not _disproved(s, delivered.get(key))]
        if not new and not delivered:
            return
        changes = _Changes(list(delivered.values()), new)
        removed, added = await self._database.run(_write, changes)
        for s in removed:
            self.log.info(
                "removed {address} from the suppression list of server {server_id} ({source}): "
                "a message was delivered to it",
                address=s.address,
                server_id=s.server_id,
                source=s.source.value,
            )
        for s in added:
            self.log.info(
                "suppressed {address} for server {server_id} ({source}): {reason}",
                address=s.address,
                server_id=s.server_id,
                source=s.source.value,
                reason=s.reason,
            )
        # Only now, with the suppressions committed: their runs are over.
        done = {(s.server_id, s.address) for s in new if s.source is SuppressionSource.SOFT_FAILURES}
        if done:
            await self._redis.execute("DEL", *(self._keys.soft_failures(*k) for k in sorted(done)))

    def _delivery(
        self,
        stream_id: str,
        event: MessageDelivery,
        found: dict[_Key, list[Suppression]],
        runs: dict[_Key, _Run],
        delivered: dict[_Key, Delivered],
    ) -> None:
        if not policy.is_outgoing(event):
            return
        assert event.server_id is not None and event.rcpt_to is not None
        key = (event.server_id, normalize_address(event.rcpt_to))
        reason = policy.hard_bounce_reason(event)
        if reason is not None:
            self._found(
                found,
                key[0],
                key[1],
                SuppressionSource.HARD_BOUNCE,
                event.timestamp,
                reason,
                event.message_id,
            )
        elif policy.ends_soft_failures(event):
            runs[key] = _Run(reset=True)
            last = delivered.get(key)
            if last is None or event.timestamp >= last.at:
                delivered[key] = Delivered(key[0], key[1], event.timestamp, event.message_id)
        elif policy.counts_as_soft_failure(event):
            runs.setdefault(key, _Run()).failures.append((stream_id, event))

    def _found(
        self,
        found: dict[_Key, list[Suppression]],
        server_id: int,
        address: str,
        source: SuppressionSource,
        at: float,
        reason: str,
        message_id: int | None,
    ) -> None:
        """Note a suppression for the batch, after the recipient's earlier ones (all are added, in order,
        so one that never expires is not replaced by a later one that does)."""
        address = normalize_address(address)
        if not address:
            return
        found.setdefault((server_id, address), []).append(
            Suppression(
                id=0,
                server_id=server_id,
                address=address,
                source=source,
                reason=reason,
                message_id=message_id,
                created_at=at,
                expires_at=policy.expires_at(self.settings, source, at),
            )
        )

    async def _count(self, runs: dict[_Key, _Run]) -> dict[_Key, tuple[int, MessageDelivery]]:
        """Apply the batch's runs to the counts in Redis; each recipient with new soft failures, with
        its count now and its last failure."""
        keys = list(runs)
        try:
            results = await gatherResults(
                [Deferred.fromCoroutine(self._count_one(k, runs[k])) for k in keys], consumeErrors=True
            )
        except FirstError as e:
            # The error itself, so the consumer sees an outage (Redis unreachable) for what it is.
            raise e.subFailure.value from None  # type: ignore[misc]
        counted: dict[_Key, tuple[int, MessageDelivery]] = {}
        for key, count in zip(keys, results, strict=True):
            failures = runs[key].failures
            if failures:
                counted[key] = (count, failures[-1][1])
        return counted

    async def _count_one(self, key: _Key, run: _Run) -> int:
        redis_key = self._keys.soft_failures(*key)
        if run.reset:
            await self._redis.execute("DEL", redis_key)
        if not run.failures:
            return 0
        await self._redis.execute("SADD", redis_key, *(stream_id for stream_id, _ in run.failures))
        await self._redis.execute("PEXPIRE", redis_key, int(self.soft_fail_window * 1000))
        count: Any = await self._redis.execute("SCARD", redis_key)
        return int(count)

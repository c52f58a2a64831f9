"""Held messages: the ``HoldCancelled`` event, and the sweep that expires holds after ``delivery.hold_days``.

A message is held (development-mode server, held credential) until an operator releases it, cancels it,
or the hold expires. Postal expires holds with a scheduled job (``ExpireHeldMessagesJob``) that calls
``Message#cancel_hold``, the same method as the "cancel hold" button, so an expired hold and a cancelled one
look alike in history: a ``HoldCancelled`` delivery with the details Postal gives both (``HOLD_CANCELLED``).

Here the held set in Redis is scored by the time each message was held, so `HoldExpiry` cancels the
messages held longer than ``hold_seconds`` ago, each with a ``message.delivery`` event the recorder turns
into that delivery row. Several mtad processes may run the sweep: each message is cancelled once.
"""

from __future__ import annotations

import functools

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.events.schema import MessageDelivery, delivery_event
from mtad.queue.redis_queue import HeldMessage, RedisQueue
from mtad.store.messages import MessageStatus
from mtad.sweeps import PeriodicSweep

#: Postal's details for a cancelled or expired hold (``Postal::MessageDB::Message#cancel_hold``).
HOLD_CANCELLED = "The hold on this message has been removed without action."


def hold_cancelled_event(message: HeldMessage, now: float, details: str = HOLD_CANCELLED) -> MessageDelivery:
    """The ``message.delivery`` event of a cancelled hold, of the same class as the delivery service's."""
    return delivery_event(message, status=MessageStatus.HOLD_CANCELLED.value, timestamp=now, details=details)


class HoldExpiry(PeriodicSweep):
    """Every ``interval`` seconds, cancels the messages held longer than ``hold_seconds`` (HoldCancelled).

    Each sweep works in batches of at most ``batch`` messages (one read and one script call each) until
    a batch comes back short, so a backlog after downtime clears in one sweep without one huge script
    holding up Redis. The first sweep runs at start. A failed sweep (Redis restarting) is logged and the
    next one tries again.
    """

    log = Logger()
    task = "hold expiry"

    def __init__(
        self,
        clock: IReactorTime,
        queue: RedisQueue,
        hold_seconds: float,
        interval: float = 60.0,
        batch: int = 500,
    ) -> None:
        if hold_seconds < 0:
            raise ValueError(f"hold_seconds must not be negative, got {hold_seconds!r}")
        super().__init__(clock, interval, batch)
        self._queue = queue
        self.hold_seconds = hold_seconds

    async def sweep(self) -> int:
        """Cancel every message held for longer than ``hold_seconds``; return how many were cancelled."""
        total = 0
        while True:
            now = self._clock.seconds()
            expired = await self._queue.expire_held(
                now - self.hold_seconds, self.batch, functools.partial(hold_cancelled_event, now=now)
            )
            total += len(expired)
            if len(expired) < self.batch or self._stopping:
                break
        if total:
            self.log.info(
                "cancelled {count} held messages whose hold expired (held over {days:g} days)",
                count=total,
                days=self.hold_seconds / 86400,
            )
        return total

"""`RateProtection`: suspends a server whose bounce or complaint rate passes the configured threshold.

A server that mails bought lists or is compromised ruins its IP addresses' reputation for every other
server within hours. The ``protection`` consumer group counts, per server in a rolling window
(``[limits] rate_window_hours``, in Redis so that every process adds to one count), the messages it sent
(``Sent`` deliveries), the bounces that came back and the spam complaints; when one rate over the window
reaches its threshold, with at least ``rate_min_sent`` messages sent (a handful of sends says nothing),
the server is suspended with a reason saying which rate, how high, over how many messages, and a
``server.suspended`` event (`ServerSuspended`) is appended. It stays suspended until an operator lifts it
(``mtad set-server --unsuspend``). Off unless a threshold is set.

Events arrive at least once: a batch handled again (its consumer died before acknowledging) is counted
again. The thresholds are rates over hundreds of messages, which one batch counted twice moves little;
so the counts are not made idempotent, which would cost a write per event. The event is appended before
the suspension is written, so a crash between the two gives the event twice rather than a suspension
without one.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.events.recorder import UnitOfWork
from mtad.events.schema import (
    MessageBounced,
    MessageDelivery,
    Received,
    ServerSuspended,
    SpamComplaint,
    server_fields,
)
from mtad.limits.window import BUCKETS
from mtad.queue.client import RedisClient
from mtad.queue.events import StreamAppender
from mtad.queue.keys import RATE_COUNT, QueueKeys
from mtad.store.servers import find_server, suspend_server

#: The consumer group of the rate protection.
GROUP = "protection"
KINDS = ("sent", "bounced", "complained")


@attrs.frozen
class ProtectionSettings:
    """Thresholds in percent of messages sent (0: that check is off) over ``window`` seconds, applied once
    ``min_sent`` messages were sent in it."""

    bounce_rate: float = 0.0
    complaint_rate: float = 0.0
    window: int = 86400
    min_sent: int = 100

    @property
    def enabled(self) -> bool:
        return self.bounce_rate > 0 or self.complaint_rate > 0


@attrs.frozen
class Tripped:
    kind: str
    rate: float
    threshold: float
    sent: int


def tripped(settings: ProtectionSettings, sent: int, bounced: int, complained: int) -> Tripped | None:
    """Which threshold the window's counts reach, if any (bounces first)."""
    if sent < settings.min_sent or sent == 0:
        return None
    for kind, count, threshold in (
        ("bounce_rate", bounced, settings.bounce_rate),
        ("complaint_rate", complained, settings.complaint_rate),
    ):
        if threshold > 0 and count * 100 >= threshold * sent:
            return Tripped(kind, count * 100 / sent, threshold, sent)
    return None


class RateProtection:
    """The ``protection`` group's `~mtad.events.consumer.EventHandler`."""

    group = GROUP
    log = Logger()

    def __init__(
        self,
        client: RedisClient,
        keys: QueueKeys,
        database: UnitOfWork,
        clock: IReactorTime,
        settings: ProtectionSettings,
    ) -> None:
        self._client = client
        self._keys = keys
        self._events = StreamAppender(client, keys)
        self._database = database
        self._clock = clock
        self.settings = settings

    def take(self, events: Sequence[Received]) -> int:
        return len(events)

    async def handle(self, events: Sequence[Received]) -> None:
        counts: dict[int, list[int]] = {}
        for received in events:
            event = received.event
            if isinstance(event, MessageDelivery):
                if event.status != "Sent" or not event.server_id or event.scope == "incoming":
                    continue
                counts.setdefault(event.server_id, [0, 0, 0])[0] += 1
            elif isinstance(event, MessageBounced):
                counts.setdefault(event.server_id, [0, 0, 0])[1] += 1
            elif isinstance(event, SpamComplaint):
                counts.setdefault(event.server_id, [0, 0, 0])[2] += 1
        now = self._clock.seconds()
        for server_id, added in sorted(counts.items()):
            sent, bounced, complained = await self._count(server_id, added, now)
            found = tripped(self.settings, sent, bounced, complained)
            if found is not None:
                await self._suspend(server_id, found, now)

    async def _count(self, server_id: int, added: list[int], now: float) -> list[int]:
        window = self.settings.window
        keys = [self._keys.rates(server_id, kind) for kind in KINDS]
        args: list[str | bytes | int | float] = [repr(float(now)), window, repr(max(1.0, window / BUCKETS))]
        reply = await self._client.run_script(RATE_COUNT, keys, [*args, *added])
        return [int(v) for v in reply]

    async def _suspend(self, server_id: int, found: Tripped, now: float) -> None:
        server = await self._database.run(find_server, server_id)
        if server is None or server.suspended:
            return
        what = "bounce" if found.kind == "bounce_rate" else "spam complaint"
        reason = (
            f"Suspended automatically: {what} rate {found.rate:.1f}% of the {found.sent} messages sent "
            f"in the last {self.settings.window / 3600:g} h reached the threshold of {found.threshold:g}%"
        )
        event = ServerSuspended(
            **server_fields(server),
            kind=found.kind,
            rate=round(found.rate, 3),
            threshold=found.threshold,
            volume=found.sent,
            window=self.settings.window,
            reason=reason,
            timestamp=now,
        )
        await self._events.append(event)
        await self._database.run(suspend_server, server_id, reason, now)
        self.log.warn("server {server} suspended: {reason}", server=server.full_permalink, reason=reason)

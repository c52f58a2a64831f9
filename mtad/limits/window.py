"""`SendWindow`: a server's send-limit window in Redis, counted by every mtad process at once.

A server with ``send_limit`` may send that many messages (one per recipient, as Postal counts) in any
``send_limit_period`` seconds (an hour when unset, Postal's fixed window). The window is 60 buckets of a
sixtieth of the period in one hash per server (`mtad.queue.keys.SEND_RESERVE`): counting and checking
is one script call, atomic across processes, so two processes can never both take the last place; and a
message leaves the window at most a sixtieth of the period early.

Only messages that will be sent are counted: one that does not fit is held (or refused) uncounted, and
counted when `release` lets it go. At 90 % of the limit the script appends ``SendLimitApproaching``, at
the limit (or when a message does not fit) ``SendLimitExceeded``, each at most once per
``notice_seconds`` (an hour, as Postal sends them), in the same step as the count.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from mtad.events.schema import SendLimitApproaching, SendLimitExceeded, json_tail, server_fields
from mtad.queue.client import RedisClient
from mtad.queue.keys import SEND_RELEASE, SEND_RESERVE, QueueKeys
from mtad.store.servers import Server

#: Postal's window: "a rolling 60 minute window".
DEFAULT_PERIOD = 3600
#: Buckets per window: the window's resolution.
BUCKETS = 60
#: Postal sends each notice at most once an hour.
NOTICE_SECONDS = 3600


def period_of(server: Server) -> int:
    """The server's window in seconds."""
    return server.send_limit_period or DEFAULT_PERIOD


def bucket_seconds(period: float) -> float:
    return max(1.0, period / BUCKETS)


@attrs.frozen
class Reservation:
    """Whether the messages fit (and so were counted), and the window's volume after the call."""

    fits: bool
    volume: int


class SendWindow:
    """The send-limit windows of every server, over one Redis client."""

    def __init__(
        self, client: RedisClient, keys: QueueKeys | None = None, notice_seconds: int = NOTICE_SECONDS
    ) -> None:
        if notice_seconds < 1:
            raise ValueError(f"notice_seconds must be at least 1, got {notice_seconds!r}")
        self.client = client
        self.keys = keys if keys is not None else QueueKeys()
        self.notice_seconds = notice_seconds

    def reserve(self, server: Server, count: int, now: float) -> Deferred[Reservation]:
        """Count ``count`` messages of ``server`` at ``now`` if they fit under its limit (which it must
        have); fires with the `Reservation`."""
        if server.send_limit is None:
            raise ValueError(f"server {server.full_permalink} has no send limit")
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count!r}")
        period = period_of(server)
        fields = server_fields(server)
        approaching = SendLimitApproaching(
            **fields, volume=0, limit=server.send_limit, period=period, timestamp=now
        )
        exceeded = SendLimitExceeded(
            **fields,
            volume=0,
            limit=server.send_limit,
            period=period,
            action=server.send_limit_action.value,
            timestamp=now,
        )
        keys = [
            self.keys.send_window(server.id),
            self.keys.send_notice(server.id, "approaching"),
            self.keys.send_notice(server.id, "exceeded"),
            self.keys.events,
        ]
        args: list[str | bytes | int | float] = [
            repr(float(now)),
            count,
            server.send_limit,
            period,
            repr(bucket_seconds(period)),
            self.notice_seconds,
            json_tail(approaching, "volume"),
            json_tail(exceeded, "volume"),
        ]
        d = self.client.run_script(SEND_RESERVE, keys, args)
        return d.addCallback(lambda reply: Reservation(fits=bool(reply[0]), volume=int(reply[1])))

    def release(
        self, server_id: int, limit: int | None, period: int, now: float, batch: int
    ) -> Deferred[tuple[int, int]]:
        """Let the oldest of the server's limit-held messages go, as many as its window has room for (all,
        ``batch`` at a time, when it has no limit now), counting them; fires with (released, still held)."""
        keys = [
            *self.keys.queue_keys(),
            self.keys.send_window(server_id),
            self.keys.limit_held(server_id),
            self.keys.limit_held_servers,
        ]
        args: list[str | bytes | int | float] = [
            self.keys.prefix,
            repr(float(now)),
            "" if limit is None else limit,
            period,
            repr(bucket_seconds(period)),
            server_id,
            batch,
        ]
        d = self.client.run_script(SEND_RELEASE, keys, args)
        return d.addCallback(lambda reply: (int(reply[0]), int(reply[1])))

    def servers_holding(self) -> Deferred[list[int]]:
        """The servers with messages held by their send limit."""
        d = self.client.execute("SMEMBERS", self.keys.limit_held_servers)
        return d.addCallback(lambda ids: sorted(int(i) for i in ids))

    def volume(self, server: Server, now: float) -> Deferred[int]:
        """The messages counted in ``server``'s window now (for the operator; not atomic with anything)."""
        period = period_of(server)
        first = int((now - period) // bucket_seconds(period)) + 1

        def total(flat: list[bytes]) -> int:
            pairs = zip(flat[::2], flat[1::2], strict=True)
            return sum(int(n) for bucket, n in pairs if int(bucket) >= first)

        return self.client.execute("HGETALL", self.keys.send_window(server.id)).addCallback(total)

"""Connection-slot limiter in Redis, shared by every mtad process (DESIGN.md invariant 6).

A slot is a member of a ZSET per limited thing ("connections from source IP x", "connections from x to
MX host y") scored by its expiry. A process that crashes keeps its slots only until they expire; live
connections renew theirs. Taking slots in several keys is all-or-none in one script, so two processes
racing for the last slots can never each hold half of what they need.
"""

from __future__ import annotations

import math
import secrets

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mtad.queue.client import RedisClient
from mtad.queue.keys import AUTH_FAILURE_ADD, LIMIT_ACQUIRE, LIMIT_RELEASE, LIMIT_RENEW, QueueKeys


def _ttl_ms(ttl: float) -> int:
    # The ZSET itself expires a little after its last slot would, so idle keys do not pile up.
    return math.ceil(ttl * 1000) + 1000


class ConnectionLimiter:
    """Counting semaphores keyed by string, with expiring slots.

    Implements the ``mtad.outbound.pools.ConnectionLimiter`` protocol.
    """

    def __init__(self, client: RedisClient, keys: QueueKeys | None = None) -> None:
        self.client = client
        self.keys = keys if keys is not None else QueueKeys()

    def acquire(self, keys: list[tuple[str, int]], slot_id: str, now: float, ttl: float) -> Deferred[bool]:
        """Take ``slot_id`` in every ``(key, limit)`` or in none; fires True when taken.

        Expired slots are removed first. A slot ``slot_id`` already holds in a key counts as taken there
        (so acquiring again is a renewal, not a second slot).
        """
        redis_keys = [self.keys.limit(key) for key, _ in keys]
        args: list[str | bytes | int | float] = [
            repr(float(now)),
            repr(float(now + ttl)),
            _ttl_ms(ttl),
            slot_id,
            *(limit for _, limit in keys),
        ]
        d = self.client.run_script(LIMIT_ACQUIRE, redis_keys, args)
        return d.addCallback(bool)

    def renew(self, keys: list[str], slot_id: str, now: float, ttl: float) -> Deferred[None]:
        """Push the expiry of the slots ``slot_id`` still holds to ``now + ttl`` (lost slots stay lost)."""
        redis_keys = [self.keys.limit(key) for key in keys]
        args: list[str | bytes | int | float] = [repr(float(now + ttl)), _ttl_ms(ttl), slot_id]
        d = self.client.run_script(LIMIT_RENEW, redis_keys, args)
        return d.addCallback(lambda _: None)

    def release(self, keys: list[str], slot_id: str) -> Deferred[None]:
        """Give the slots back."""
        redis_keys = [self.keys.limit(key) for key in keys]
        d = self.client.run_script(LIMIT_RELEASE, redis_keys, [slot_id])
        return d.addCallback(lambda _: None)

    def count(self, key: str, now: float) -> Deferred[int]:
        """Slots currently held in ``key`` (unexpired at ``now``), for metrics and tests."""
        d = self.client.execute("ZCOUNT", self.keys.limit(key), f"({float(now)!r}", "+inf")
        return d.addCallback(int)


class AuthFailureCounter:
    """Failed SMTP AUTH attempts per client IP in a sliding window, counted in Redis.

    Shared by every mtad process (DESIGN.md invariant 6): a guesser spreading attempts over several
    processes or machines behind one address still gets ``max_failures`` per ``window``, not that many
    per process. Implements ``mtad.smtp.server_protocol.AuthLimiter``.
    """

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        max_failures: int = 5,
        window: float = 300.0,
        keys: QueueKeys | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.keys = keys if keys is not None else QueueKeys()

    def is_blocked(self, client_ip: str) -> Deferred[bool]:
        """Whether ``client_ip`` has ``max_failures`` failures within the window."""
        now = self.clock.seconds()
        d = self.client.execute(
            "ZCOUNT", self.keys.auth_failures(client_ip), f"({now - self.window!r}", "+inf"
        )
        return d.addCallback(lambda count: int(count) >= self.max_failures)

    def add_failure(self, client_ip: str) -> Deferred[None]:
        now = self.clock.seconds()
        args: list[str | bytes | int | float] = [
            repr(now),
            repr(now - self.window),
            f"{now!r}:{secrets.token_hex(4)}",
            _ttl_ms(self.window),
        ]
        key = self.keys.auth_failures(client_ip)
        d = self.client.run_script(AUTH_FAILURE_ADD, [key], args)
        return d.addCallback(lambda _: None)

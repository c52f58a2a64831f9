"""IP pools, source addresses and the connection-slot limiter they are shaped by.

A pool is a named set of source addresses; each address has its own EHLO name because receivers check
that the HELO name resolves back to the connecting IP (RFC 5321 §4.1.4 lets them log it; most spam
filters score a mismatch). Outbound connections bind to the chosen address.

Concurrency limits live in Redis (many mtad processes, one truth — DESIGN invariant 6): the deliverer only
sees the :class:`ConnectionLimiter` protocol, implemented for real in ``mtad.queue.limits``.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred


@attrs.frozen
class SourceAddress:
    """One local address outbound SMTP connections bind to, and the name it says in EHLO."""

    ip: str
    helo_hostname: str

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version


@attrs.frozen
class IPPool:
    """A named set of source addresses (Postal's ``ip_pools`` with its ``ip_addresses``)."""

    name: str
    addresses: tuple[SourceAddress, ...]


@attrs.frozen
class ConnectionLimits:
    """Maximum simultaneous connections per source IP and per (source IP, destination MX host).

    ``slot_ttl`` bounds how long a crashed process keeps slots; live sessions renew theirs every
    ``slot_ttl / 3``.
    """

    per_source_ip: int = 50
    per_source_ip_mx: int = 5
    slot_ttl: float = 300.0


class ConnectionLimiter(Protocol):
    """Counting semaphores keyed by string, with leases, shared by every mtad process.

    ``acquire`` takes a slot in every ``(key, limit)`` or in none (all-or-none) and fires True when it
    did; slots expire ``ttl`` seconds after ``now`` unless renewed.
    """

    def acquire(
        self, keys: list[tuple[str, int]], slot_id: str, now: float, ttl: float
    ) -> Deferred[bool]: ...

    def renew(self, keys: list[str], slot_id: str, now: float, ttl: float) -> Deferred[None]: ...

    def release(self, keys: list[str], slot_id: str) -> Deferred[None]: ...


def source_ip_key(source_ip: str) -> str:
    """Limiter key counting connections from one source IP."""
    return f"conn:ip:{source_ip}"


def source_ip_mx_key(source_ip: str, mx_host: str) -> str:
    """Limiter key counting connections from one source IP to one destination MX host."""
    return f"conn:ipmx:{source_ip}:{mx_host.lower().rstrip('.')}"


def slot_keys(source: SourceAddress, mx_host: str, limits: ConnectionLimits) -> list[tuple[str, int]]:
    """The (key, limit) pairs one connection from ``source`` to ``mx_host`` must hold."""
    return [
        (source_ip_key(source.ip), limits.per_source_ip),
        (source_ip_mx_key(source.ip, mx_host), limits.per_source_ip_mx),
    ]


def source_address_order(
    pool: IPPool, rng: random.Random, destination_version: int | None = None
) -> list[SourceAddress]:
    """The pool's addresses in the order to try them: a random permutation, so load spreads evenly.

    With ``destination_version`` (4 or 6) only addresses of that IP version are returned, since a socket
    cannot bind an IPv4 source to reach an IPv6 destination.
    """
    addresses = [a for a in pool.addresses if destination_version is None or a.version == destination_version]
    rng.shuffle(addresses)
    return addresses


def pool_for_versions(pool: IPPool) -> Sequence[int]:
    """The IP versions a pool can send from (decides whether AAAA records are worth trying)."""
    return sorted({a.version for a in pool.addresses})

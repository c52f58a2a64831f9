"""IP pool values and source-address choice."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from mtad.outbound.pools import (
    ConnectionLimits,
    IPPool,
    SourceAddress,
    slot_keys,
    source_address_order,
)

POOL = IPPool(
    "p",
    (
        SourceAddress("127.0.0.10", "a.test"),
        SourceAddress("127.0.0.11", "b.test"),
        SourceAddress("::1", "c.test"),
    ),
)


class PoolTests(SynchronousTestCase):
    """Choosing source addresses and naming limiter keys."""

    def test_order_filters_version(self) -> None:
        """Only addresses of the destination's IP version are offered."""
        self.assertEqual([a.ip for a in source_address_order(POOL, random.Random(1), 6)], ["::1"])
        self.assertEqual(
            sorted(a.ip for a in source_address_order(POOL, random.Random(1), 4)),
            ["127.0.0.10", "127.0.0.11"],
        )

    def test_order_spreads(self) -> None:
        """Different random states start with different addresses (load spreads across the pool)."""
        firsts = {source_address_order(POOL, random.Random(s), 4)[0].ip for s in range(20)}
        self.assertEqual(firsts, {"127.0.0.10", "127.0.0.11"})

    def test_slot_keys(self) -> None:
        """A connection needs a slot per source IP and per (source IP, MX host), with their limits."""
        keys = slot_keys(
            POOL.addresses[0], "MX1.Example.test.", ConnectionLimits(per_source_ip=7, per_source_ip_mx=2)
        )
        self.assertEqual(keys, [("conn:ip:127.0.0.10", 7), ("conn:ipmx:127.0.0.10:mx1.example.test", 2)])

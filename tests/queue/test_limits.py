"""The connection-slot limiter against a real Redis."""

from __future__ import annotations

from twisted.internet.task import Clock

from mtad.queue.limits import AuthFailureCounter, ConnectionLimiter
from tests.redis_server import RedisTestCase

NOW = 1_700_000_000.0


class LimiterTests(RedisTestCase):
    limiter: ConnectionLimiter

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.limiter = ConnectionLimiter(self.redis, self.keys)

    async def test_limit_enforced_and_release_frees(self) -> None:
        """Only ``limit`` slots can be held at once; releasing one lets the next caller in."""
        keys = [("ip:1", 2)]
        self.assertTrue(await self.limiter.acquire(keys, "s1", NOW, 60))
        self.assertTrue(await self.limiter.acquire(keys, "s2", NOW, 60))
        self.assertFalse(await self.limiter.acquire(keys, "s3", NOW, 60))
        await self.limiter.release(["ip:1"], "s1")
        self.assertTrue(await self.limiter.acquire(keys, "s3", NOW, 60))
        self.assertEqual(await self.limiter.count("ip:1", NOW), 2)

    async def test_all_or_none(self) -> None:
        """When one key is full, no slot is taken in the others either."""
        self.assertTrue(await self.limiter.acquire([("ipmx:1:mx", 1)], "busy", NOW, 60))
        taken = await self.limiter.acquire([("ip:1", 5), ("ipmx:1:mx", 1)], "s2", NOW, 60)
        self.assertFalse(taken)
        self.assertEqual(await self.limiter.count("ip:1", NOW), 0)
        self.assertTrue(await self.limiter.acquire([("ip:1", 5), ("ipmx:1:other", 1)], "s2", NOW, 60))
        self.assertEqual(await self.limiter.count("ip:1", NOW), 1)

    async def test_same_slot_counts_once(self) -> None:
        """Acquiring again with a slot id already held does not take a second slot."""
        keys = [("ip:1", 1)]
        self.assertTrue(await self.limiter.acquire(keys, "s1", NOW, 60))
        self.assertTrue(await self.limiter.acquire(keys, "s1", NOW + 1, 60))
        self.assertEqual(await self.limiter.count("ip:1", NOW + 1), 1)

    async def test_expired_slots_are_reclaimed(self) -> None:
        """A crashed holder's slot expires after its ttl and the limit frees up."""
        keys = [("ip:1", 1)]
        self.assertTrue(await self.limiter.acquire(keys, "crashed", NOW, 30))
        self.assertFalse(await self.limiter.acquire(keys, "s2", NOW + 29, 30))
        self.assertTrue(await self.limiter.acquire(keys, "s2", NOW + 30, 30))

    async def test_renew_extends_expiry(self) -> None:
        """A renewed slot outlives its first expiry; a released slot is not brought back by renew."""
        keys = [("ip:1", 1)]
        self.assertTrue(await self.limiter.acquire(keys, "s1", NOW, 30))
        await self.limiter.renew(["ip:1"], "s1", NOW + 20, 30)
        self.assertFalse(await self.limiter.acquire(keys, "s2", NOW + 45, 30))
        await self.limiter.release(["ip:1"], "s1")
        await self.limiter.renew(["ip:1"], "s1", NOW + 46, 30)
        self.assertEqual(await self.limiter.count("ip:1", NOW + 46), 0)

    async def test_keys_expire_in_redis(self) -> None:
        """Limiter ZSETs carry a TTL so idle keys do not accumulate."""
        await self.limiter.acquire([("ip:1", 1)], "s1", NOW, 30)
        ttl = await self.redis.execute("PTTL", self.keys.limit("ip:1"))
        self.assertGreater(ttl, 29_000)
        self.assertLessEqual(ttl, 31_000)


class AuthFailureCounterTests(RedisTestCase):
    async def test_processes_share_the_count_and_window_slides(self) -> None:
        """Failures counted by two processes add up per IP; they are forgotten after the window."""
        clock = Clock()
        clock.advance(NOW)
        first = AuthFailureCounter(self.redis, clock, max_failures=3, window=60, keys=self.keys)
        second = AuthFailureCounter(self.redis, clock, max_failures=3, window=60, keys=self.keys)
        await first.add_failure("192.0.2.1")
        clock.advance(10)
        await second.add_failure("192.0.2.1")
        self.assertFalse(await first.is_blocked("192.0.2.1"))
        await first.add_failure("192.0.2.1")
        self.assertTrue(await second.is_blocked("192.0.2.1"))
        self.assertFalse(await second.is_blocked("192.0.2.2"))
        clock.advance(51)  # the first failure is now older than the window
        self.assertFalse(await first.is_blocked("192.0.2.1"))
        ttl = await self.redis.execute("PTTL", self.keys.auth_failures("192.0.2.1"))
        self.assertGreater(ttl, 0)

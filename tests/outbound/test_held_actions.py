"""Releasing and cancelling held messages (mtad.outbound.held_actions) against the test Redis."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mtad.events.recorder import parse_delivery
from mtad.outbound.held_actions import (
    HeldAction,
    HeldActionFailed,
    HeldOutcome,
    act_on_held,
    cancel_one,
    release_one,
)
from mtad.outbound.holds import HOLD_CANCELLED
from mtad.queue.model import QueueError
from mtad.queue.redis_queue import RedisQueue
from tests.outbound.hold_support import hold_message, stream_events
from tests.redis_server import RedisTestCase

NOW = 1_700_000_000.0


class HeldActionTests(RedisTestCase):
    queue: RedisQueue

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)

    async def state(self, message_id: int) -> str | None:
        return (await self.queue.message_fields(message_id)).get("state")

    async def test_release_one(self) -> None:
        """release_one makes a held message due without its hold reason; then it is not held any more."""
        message_id = await hold_message(self.queue, NOW, "a@example.com")
        self.assertTrue(await release_one(self.queue, message_id, NOW + 5))
        fields = await self.queue.message_fields(message_id)
        self.assertEqual((fields["state"], float(fields["due_at"])), ("due", NOW + 5))
        self.assertNotIn("hold_reason", fields)
        self.assertFalse(await release_one(self.queue, message_id, NOW + 5))

    async def test_cancel_one(self) -> None:
        """cancel_one deletes a held message with a HoldCancelled event carrying Postal's details."""
        message_id = await hold_message(self.queue, NOW, "a@example.com")
        self.assertTrue(await cancel_one(self.queue, message_id, NOW + 5))
        self.assertEqual(await self.queue.message_fields(message_id), {})
        attempt = parse_delivery((await stream_events(self.redis, self.keys))[-1])
        self.assertEqual(
            (attempt.message_id, attempt.status, attempt.details, attempt.timestamp),
            (message_id, "HoldCancelled", HOLD_CANCELLED, NOW + 5),
        )
        self.assertFalse(await cancel_one(self.queue, message_id, NOW + 5))

    async def test_server_scope(self) -> None:
        """With a server id, another server's held message is not held to either action, and untouched."""
        message_id = await hold_message(self.queue, NOW, "a@example.com", server_id=7)
        self.assertFalse(await release_one(self.queue, message_id, NOW, server_id=8))
        self.assertFalse(await cancel_one(self.queue, message_id, NOW, server_id=8))
        self.assertEqual(await self.state(message_id), "held")
        self.assertTrue(await release_one(self.queue, message_id, NOW, server_id=7))

    async def test_act_on_many(self) -> None:
        """act_on_held acts on each id once, in order, whatever the concurrency, and reports the ids that
        were not held."""
        for concurrency in (1, 2, 200):
            a = await hold_message(self.queue, NOW, f"a{concurrency}@example.com")
            b = await hold_message(self.queue, NOW, f"b{concurrency}@example.com")
            c = await hold_message(self.queue, NOW, f"c{concurrency}@example.com", server_id=8)
            outcome = await act_on_held(
                HeldAction.CANCEL, self.queue, [b, 999999, a, b, c], NOW, server_id=7, concurrency=concurrency
            )
            self.assertEqual(outcome, HeldOutcome(done=(b, a), not_held=(999999, c)))
            self.assertEqual(await self.state(c), "held")
        self.assertEqual(await act_on_held(HeldAction.RELEASE, self.queue, [], NOW), HeldOutcome((), ()))

    async def test_queue_failure(self) -> None:
        """A Redis error stops the work with HeldActionFailed carrying Redis's error and what was done."""
        message_id = await hold_message(self.queue, NOW, "a@example.com")
        await self.redis.execute("DEL", self.keys.held)
        await self.redis.execute("SET", self.keys.held, "not a sorted set")
        with self.assertRaises(HeldActionFailed) as raised:
            await act_on_held(HeldAction.RELEASE, self.queue, [message_id], NOW)
        self.assertIsInstance(raised.exception.error, QueueError)
        self.assertEqual(raised.exception.done, ())

    def test_concurrency_must_be_positive(self) -> None:
        """A concurrency below 1 is refused."""
        failure = self.failureResultOf(
            Deferred.fromCoroutine(act_on_held(HeldAction.RELEASE, self.queue, [1], NOW, concurrency=0)),
            ValueError,
        )
        self.assertIn("concurrency", str(failure.value))

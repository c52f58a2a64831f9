"""Reading the event stream with consumer groups against a real Redis."""

from __future__ import annotations

from mtad.events.schema import MessageDelivery, to_dict
from mtad.queue.events import EventStream
from mtad.queue.model import NewMessage
from mtad.queue.redis_queue import RedisQueue
from tests.redis_server import RedisTestCase

NOW = 1_700_000_000.0


def message(rcpt: str) -> NewMessage:
    return NewMessage(token="tok", server_id=3, scope="incoming", mail_from="s@x.test", rcpt_to=rcpt)


class EventStreamTests(RedisTestCase):
    queue: RedisQueue

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)

    def stream(self, consumer: str = "c1", group: str = "recorder", claim_idle: float = 60.0) -> EventStream:
        return EventStream(self.redis, group, consumer, self.keys, claim_idle=claim_idle)

    async def test_read_decodes_events_and_ack_removes_them(self) -> None:
        """read returns typed events with decoded JSON data; once acked they are not read again."""
        ids = await self.queue.enqueue(b"x", [message("a@x.test"), message("b@x.test")], NOW)
        stream = self.stream()
        events = await stream.read(10)
        self.assertEqual([e.type for e in events], ["message.queued"] * 2)
        self.assertEqual([e.data["id"] for e in events], ids)
        self.assertEqual(events[0].data["scope"], "incoming")
        self.assertRegex(events[0].id, r"^\d+-\d+$")
        await stream.ack([e.id for e in events])
        self.assertEqual(await stream.read(10), [])
        self.assertEqual(await stream.pending_count(), 0)

    async def test_unacked_events_come_back_to_same_consumer(self) -> None:
        """Events read but not acknowledged are read again by the same consumer (crash mid-batch)."""
        await self.queue.enqueue(b"x", [message("a@x.test")], NOW)
        stream = self.stream()
        first = await stream.read(10)
        again = await self.stream().read(10)
        self.assertEqual([e.id for e in again], [e.id for e in first])

    async def test_count_limits_batch(self) -> None:
        """read returns at most ``count`` events."""
        await self.queue.enqueue(b"x", [message(f"r{i}@x.test") for i in range(5)], NOW)
        stream = self.stream()
        batch = await stream.read(3)
        self.assertEqual(len(batch), 3)
        await stream.ack([e.id for e in batch])
        self.assertEqual(len(await stream.read(3)), 2)

    async def test_abandoned_events_taken_over(self) -> None:
        """Another consumer's events idle over claim_idle are claimed by a live consumer."""
        await self.queue.enqueue(b"x", [message("a@x.test")], NOW)
        dead = await self.stream("dead").read(10)
        patient = self.stream("patient", claim_idle=3600)
        self.assertEqual(await patient.read(10), [])
        eager = self.stream("eager", claim_idle=0)
        taken = await eager.read(10)
        self.assertEqual([e.id for e in taken], [e.id for e in dead])
        await eager.ack([e.id for e in taken])
        self.assertEqual(await eager.pending_count(), 0)

    async def test_groups_are_independent(self) -> None:
        """Each consumer group sees every event, whatever the others acknowledged."""
        await self.queue.enqueue(b"x", [message("a@x.test")], NOW)
        recorder = self.stream(group="recorder")
        webhooks = self.stream(group="webhooks")
        events = await recorder.read(10)
        await recorder.ack([e.id for e in events])
        self.assertEqual(len(await webhooks.read(10)), 1)

    async def test_settle_events_follow_queued(self) -> None:
        """Events from ack come after the queued event, in stream order."""
        (mid,) = await self.queue.enqueue(b"x", [message("a@x.test")], NOW)
        (claimed,) = await self.queue.claim(NOW, 1, 60, "w")
        sent = MessageDelivery(message_id=mid, attempt=1, status="Sent", timestamp=NOW)
        await self.queue.ack(mid, claimed.lease_token, sent)
        events = await self.stream().read(10)
        self.assertEqual([e.type for e in events], ["message.queued", "message.delivery"])
        self.assertEqual(events[1].data, to_dict(sent))

    async def test_ensure_group_is_idempotent(self) -> None:
        """Creating the group twice is fine (BUSYGROUP is not an error)."""
        stream = self.stream()
        await stream.ensure_group()
        await stream.ensure_group()
        self.assertEqual(await stream.read(10), [])

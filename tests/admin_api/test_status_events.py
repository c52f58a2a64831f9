"""``/status``'s ``events`` section: the stream's length against its alarm bound, each consumer group's
backlog, parked events; through the real `mtad.status.StatusReporter` on a real Redis stream and SQLite.

The stream is trimmed only behind every consumer group, so a stuck group makes it grow: the alarm is how an
operator sees that before Redis runs out of memory.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import sqlalchemy as sa
from treq.testing import StubTreq
from twisted.internet.task import Clock

from admin_api.status import StatusApp
from mtad.queue.events import EventStream, StreamMaintenance
from mtad.queue.model import NewMessage
from mtad.queue.redis_queue import RedisQueue
from mtad.status import StatusReporter
from mtad.store.db import make_engine
from tests.admin_api.support import settled
from tests.redis_server import RedisTestCase, connect
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0


class StatusEventsTests(RedisTestCase):
    queue: RedisQueue
    clock: Clock
    database: SynchronousDatabase

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.clock = Clock()
        self.clock.advance(NOW)
        engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(engine.dispose)
        self.database = SynchronousDatabase(engine)

    async def ping(self) -> None:
        await self.database.run(lambda conn: conn.execute(sa.text("SELECT 1")))

    def reporter(self, alarm_length: int = 1_000_000, queue: RedisQueue | None = None) -> StatusReporter:
        queue = queue if queue is not None else self.queue
        return StatusReporter(
            self.clock,
            queue,
            self.ping,
            [],
            embedded_redis=False,
            events=StreamMaintenance(queue.client, self.keys),
            events_alarm_length=alarm_length,
        )

    async def accept(self, count: int) -> None:
        messages = [NewMessage(f"t{i}", 3, "incoming", "s@x.test", f"r{i}@x.test") for i in range(count)]
        await self.queue.enqueue(b"x", messages, NOW)

    def stream(self, group: str, consumer: str) -> EventStream:
        return EventStream(self.redis, group, consumer, self.keys)

    async def events_section(self, **options: Any) -> Any:
        return (await self.reporter(**options).report())["events"]

    async def test_groups_backlog_and_parked(self) -> None:
        """The section gives the stream's length, each group's consumers, pending count and last entry
        given, and how many events are parked."""
        await self.accept(5)
        first = self.stream("recorder", "r1")
        batch = await first.read(2)
        await first.ack([batch[0].id])
        second = await self.stream("recorder", "r2").read(1)
        webhooks = self.stream("webhooks", "w1")
        everything = await webhooks.read(10)
        await webhooks.ack([e.id for e in everything[:-1]])
        self.assertTrue(await webhooks.park(everything[-1], "test: cannot handle it"))
        self.assertEqual(
            await self.events_section(alarm_length=5),
            {
                "length": 5,
                "alarm_length": 5,
                "alarm": False,
                "parked": 1,
                "groups": {
                    "recorder": {"consumers": 2, "pending": 2, "last_delivered_id": second[0].id},
                    "webhooks": {"consumers": 1, "pending": 0, "last_delivered_id": everything[-1].id},
                },
            },
        )

    async def test_alarm_above_the_bound(self) -> None:
        """The alarm is raised once the stream holds more events than events.stream_alarm_length, not at
        the bound itself."""
        await self.accept(3)
        self.assertFalse((await self.events_section(alarm_length=3))["alarm"])
        await self.accept(1)
        section = await self.events_section(alarm_length=3)
        self.assertEqual((section["length"], section["alarm"]), (4, True))

    async def test_group_that_never_read(self) -> None:
        """A group that exists but never read shows with nothing pending and last entry 0-0."""
        await self.accept(2)
        await self.stream("recorder", "r1").ensure_group()
        section = await self.events_section()
        self.assertEqual(
            section["groups"], {"recorder": {"consumers": 0, "pending": 0, "last_delivered_id": "0-0"}}
        )

    async def test_no_stream_yet(self) -> None:
        """Before any event is written, the section reports an empty stream without groups."""
        self.assertEqual(
            await self.events_section(alarm_length=10),
            {"length": 0, "alarm_length": 10, "alarm": False, "parked": 0, "groups": {}},
        )

    async def test_without_events_probe(self) -> None:
        """A reporter given no stream reports events as null."""
        reporter = StatusReporter(self.clock, self.queue, self.ping, [], embedded_redis=False)
        self.assertIsNone((await reporter.report())["events"])

    async def test_stream_probe_error(self) -> None:
        """An error reading the stream is reported in the section, and Redis still counts as reachable."""
        await self.redis.execute("SET", self.keys.events, "not a stream")
        report = await self.reporter().report()
        self.assertTrue(report["redis"]["reachable"])
        self.assertIn("WRONGTYPE", report["events"]["error"])

    async def test_redis_unreachable(self) -> None:
        """With Redis gone the stream is not probed: events is null beside the Redis error."""
        client = await connect()
        await client.disconnect()
        report = await self.reporter(queue=RedisQueue(client, self.keys)).report()
        self.assertFalse(report["redis"]["reachable"])
        self.assertIsNone(report["events"])

    async def test_status_endpoint(self) -> None:
        """GET /status serves the section as JSON; an alarm is not an outage, so the answer stays 200."""
        await self.accept(3)
        await self.stream("recorder", "r1").read(10)
        stub: Any = StubTreq(StatusApp(self.reporter(alarm_length=2)).app.resource())
        response = await settled(stub.flush, stub.request("GET", "http://status.mtad.test/status"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = json.loads(await settled(stub.flush, response.content()))
        events = body["events"]
        self.assertEqual((events["length"], events["alarm_length"], events["alarm"]), (3, 2, True))
        self.assertEqual(events["groups"]["recorder"]["pending"], 3)

    async def test_webhook_queue_and_bounce_inbox_depth(self) -> None:
        """The webhook queue's and the bounce inbox's depth on /status, from real Redis."""
        from mtad.bounces.inbox import BounceInbox
        from mtad.webhooks.queue import NewRequest, WebhookQueue

        webhooks = WebhookQueue(self.redis, self.keys)
        inbox = BounceInbox(self.redis, self.clock, self.keys)
        reporter = StatusReporter(
            self.clock,
            self.queue,
            self.ping,
            [],
            embedded_redis=False,
            webhooks=webhooks.depth,
            bounces=inbox.pending,
        )
        before = await reporter.report()
        self.assertEqual(before["webhooks"], {"waiting": 0, "sending": 0})
        self.assertEqual(before["bounces"], {"pending": 0})
        request = NewRequest(
            uuid="u1",
            server_id=1,
            webhook_id=1,
            url="http://h.test/",
            event="MessageSent",
            body=b"{}",
            created_at=NOW,
        )
        await webhooks.add([request, attrs.evolve(request, uuid="u2")], NOW)
        await webhooks.claim(NOW, 1, 60.0)
        await inbox.put(
            mail_from="", rcpt_to=["b@rp.test"], data=b"x", received_with_ssl=False, client_ip="127.0.0.1"
        )
        after = await reporter.report()
        self.assertEqual(after["webhooks"], {"waiting": 1, "sending": 1})
        self.assertEqual(after["bounces"], {"pending": 1})

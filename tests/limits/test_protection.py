"""Automatic suspension on bounce and complaint rates, against a real Redis and SQLite, on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from mtad.app import CONSUMER_GROUPS, MtadService
from mtad.config import parse_config
from mtad.events.schema import (
    MessageBounced,
    MessageDelivery,
    Received,
    ServerSuspended,
    SpamComplaint,
    decode_entry,
)
from mtad.limits.protection import GROUP, ProtectionSettings, RateProtection, tripped
from mtad.queue.events import parse_entry
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from tests.redis_server import RedisTestCase
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0


class ProtectionTests(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        with self.engine.begin() as conn:
            os_.create_organization(conn, "Acme", NOW)
            self.server = ss.create_server(conn, "acme", "Main", NOW)
            self.other = ss.create_server(conn, "acme", "Other", NOW)
        self.ids = iter(range(1, 1_000_000))

    def protection(self, **settings: Any) -> RateProtection:
        values = {"bounce_rate": 5.0, "complaint_rate": 0.5, "window": 3600, "min_sent": 100, **settings}
        return RateProtection(self.redis, self.keys, self.database, self.clock, ProtectionSettings(**values))

    def received(self, event: Any) -> Received:
        return Received(id=f"{next(self.ids)}-0", event=event)

    def sent(self, n: int, server_id: int | None = None) -> list[Received]:
        return [
            self.received(
                MessageDelivery(
                    message_id=next(self.ids),
                    attempt=1,
                    status="Sent",
                    timestamp=self.clock.seconds(),
                    server_id=server_id or self.server.id,
                    scope="outgoing",
                )
            )
            for _ in range(n)
        ]

    def bounced(self, n: int) -> list[Received]:
        return [
            self.received(
                MessageBounced(
                    message_id=next(self.ids),
                    server_id=self.server.id,
                    rcpt_to="x@example.com",
                    bounce_id=next(self.ids),
                    hard=True,
                    category="bad_mailbox",
                    timestamp=self.clock.seconds(),
                )
            )
            for _ in range(n)
        ]

    def complaints(self, n: int) -> list[Received]:
        return [
            self.received(
                SpamComplaint(
                    message_id=next(self.ids),
                    server_id=self.server.id,
                    rcpt_to="x@example.com",
                    feedback_type="abuse",
                    timestamp=self.clock.seconds(),
                )
            )
            for _ in range(n)
        ]

    def current(self, server: ss.Server) -> ss.Server:
        with self.engine.begin() as conn:
            return ss.get_server(conn, server.id)

    async def suspensions(self) -> list[ServerSuspended]:
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        events = [decode_entry(e).event for e in (parse_entry(raw) for raw in entries) if e is not None]
        return [e for e in events if isinstance(e, ServerSuspended)]

    def test_thresholds(self) -> None:
        settings = ProtectionSettings(bounce_rate=5.0, complaint_rate=0.5, min_sent=100)
        self.assertIsNone(tripped(settings, 99, 99, 99))  # too few sent to judge
        self.assertIsNone(tripped(settings, 200, 9, 0))
        self.assertEqual(tripped(settings, 200, 10, 0).kind, "bounce_rate")  # type: ignore[union-attr]
        self.assertEqual(tripped(settings, 200, 0, 1).kind, "complaint_rate")  # type: ignore[union-attr]
        self.assertIsNone(tripped(ProtectionSettings(), 1000, 1000, 1000))  # off

    async def test_bounce_rate_suspends_once(self) -> None:
        """5 % bounces of 200 sent suspend the server with a reason and one event; its neighbour, and
        the server below the threshold before, are untouched."""
        protection = self.protection()
        await protection.handle([*self.sent(200), *self.sent(300, self.other.id), *self.bounced(9)])
        self.assertFalse(self.current(self.server).suspended)
        await protection.handle(self.bounced(1))
        server = self.current(self.server)
        self.assertTrue(server.suspended)
        assert server.suspension_reason is not None
        self.assertIn("bounce rate 5.0% of the 200 messages sent in the last 1 h", server.suspension_reason)
        self.assertFalse(self.current(self.other).suspended)
        (event,) = await self.suspensions()
        self.assertEqual((event.kind, event.volume, event.server_uuid), ("bounce_rate", 200, server.uuid))
        self.assertEqual(event.reason, server.suspension_reason)
        await protection.handle(self.bounced(5))
        self.assertEqual(len(await self.suspensions()), 1)

    async def test_complaint_rate(self) -> None:
        protection = self.protection()
        await protection.handle([*self.sent(400), *self.complaints(2)])
        server = self.current(self.server)
        self.assertTrue(server.suspended)
        self.assertIn("spam complaint rate 0.5%", server.suspension_reason or "")

    async def test_old_sends_leave_the_window(self) -> None:
        """Sends older than the window no longer count: bounces an hour later find fewer than
        ``min_sent`` messages sent in the window, and nothing is judged."""
        protection = self.protection()
        await protection.handle(self.sent(200))
        self.clock.advance(3700)
        await protection.handle(self.bounced(50))
        self.assertFalse(self.current(self.server).suspended)

    async def test_two_processes_share_the_count(self) -> None:
        await self.protection().handle(self.sent(100))
        await self.protection().handle(self.bounced(5))
        self.assertTrue(self.current(self.server).suspended)

    def test_group_only_when_enabled(self) -> None:
        """The daemon reads (and trims behind) the protection group only when a threshold is set."""
        off = MtadService(parse_config({}), Clock(), exit_on_failure=False)
        self.assertEqual(off._consumer_groups(parse_config({})), CONSUMER_GROUPS)
        on = parse_config({"limits": {"bounce_rate_threshold": 5}})
        self.assertEqual(off._consumer_groups(on), (*CONSUMER_GROUPS, GROUP))

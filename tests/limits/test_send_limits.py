"""Send limits against a real Redis and SQLite, time on a Clock: the shared rolling window, its notices,
holding or refusing what is over the limit, and releasing held messages when there is room again."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock

from mtad.accept import Acceptor
from mtad.events.schema import SendLimitApproaching, SendLimitExceeded, decode_entry
from mtad.limits.release import SendLimitRelease
from mtad.limits.window import SendWindow
from mtad.queue.events import parse_entry
from mtad.queue.redis_queue import RedisQueue
from mtad.store import credentials as cs
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.servers import SendLimitAction, Server
from mtad.submission.answers import HoldReason, Permit, Queued, Refusal, Refused, Submitter
from mtad.submission.policy import SubmissionPolicy
from tests.redis_server import RedisTestCase, connect
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0
MESSAGE = b"From: App <app@example.test>\r\nSubject: hi\r\n\r\nbody\r\n"


class SendLimitTestCase(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = RedisQueue(self.redis, self.keys)
        self.window = SendWindow(self.redis, self.keys)
        self.transaction(os_.create_organization, "Acme", NOW)
        made = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.server: Server = self.transaction(ss.set_send_limit, made.id, 10, 600, SendLimitAction.HOLD, NOW)

    def transaction(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)

    async def notices(self) -> list[Any]:
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        events = [decode_entry(e).event for e in (parse_entry(raw) for raw in entries) if e is not None]
        return [e for e in events if isinstance(e, SendLimitApproaching | SendLimitExceeded)]


class WindowTests(SendLimitTestCase):
    async def test_counts_up_to_the_limit_across_processes(self) -> None:
        """Two processes (two connections) share one count: together they fit the limit exactly, and
        what does not fit is not counted."""
        other = await connect()
        self.addCleanup(other.disconnect)
        second = SendWindow(other, self.keys)
        answers = []
        for n in range(6):
            window = self.window if n % 2 else second
            answers.append(await window.reserve(self.server, 2, NOW + n))
        self.assertEqual([(a.fits, a.volume) for a in answers][:5], [(True, v) for v in (2, 4, 6, 8, 10)])
        self.assertEqual((answers[5].fits, answers[5].volume), (False, 10))
        self.assertEqual(await self.window.volume(self.server, NOW + 6), 10)
        # A message with more recipients than the room left does not fit, though one would.
        self.transaction(ss.set_send_limit, self.server.id, 11, 600, SendLimitAction.HOLD, NOW)
        bigger = attrs.evolve(self.server, send_limit=11)
        self.assertFalse((await self.window.reserve(bigger, 2, NOW + 7)).fits)
        self.assertTrue((await self.window.reserve(bigger, 1, NOW + 7)).fits)

    async def test_window_rolls(self) -> None:
        """Messages leave the window once ``period`` has passed (to a sixtieth of it), not all at once."""
        for at in (NOW, NOW + 300):
            self.assertTrue((await self.window.reserve(self.server, 5, at)).fits)
        self.assertFalse((await self.window.reserve(self.server, 1, NOW + 599)).fits)
        # The first five left with their bucket (10 s wide); the second five are still in.
        answer = await self.window.reserve(self.server, 1, NOW + 610)
        self.assertEqual((answer.fits, answer.volume), (True, 6))
        self.assertEqual(await self.window.volume(self.server, NOW + 910), 1)

    async def test_notices_once_per_interval(self) -> None:
        """At 90 % a SendLimitApproaching, at the limit a SendLimitExceeded, each at most once an hour,
        with Postal's volume and limit and the server's names."""
        for n in range(9):
            await self.window.reserve(self.server, 1, NOW + n)
        (approaching,) = await self.notices()
        self.assertIsInstance(approaching, SendLimitApproaching)
        self.assertEqual((approaching.volume, approaching.limit, approaching.period), (9, 10, 600))
        self.assertEqual(approaching.server_uuid, self.server.uuid)
        self.assertEqual(approaching.organization_permalink, "acme")
        await self.window.reserve(self.server, 1, NOW + 9)  # the tenth: the limit is reached
        for n in range(3):
            self.assertFalse((await self.window.reserve(self.server, 1, NOW + 10 + n)).fits)
        notices = await self.notices()
        self.assertEqual([type(e) for e in notices], [SendLimitApproaching, SendLimitExceeded])
        exceeded = notices[1]
        self.assertEqual((exceeded.volume, exceeded.limit, exceeded.action), (10, 10, "Hold"))
        # An hour on (Redis TTLs are real time: expire the notice keys as the hour would).
        for kind in ("approaching", "exceeded"):
            await self.redis.execute("DEL", self.keys.send_notice(self.server.id, kind))
        self.assertFalse((await self.window.reserve(self.server, 1, NOW + 20)).fits)
        self.assertEqual(len(await self.notices()), 3)
        ttl = await self.redis.execute("TTL", self.keys.send_notice(self.server.id, "exceeded"))
        self.assertGreater(ttl, 3500)


class PolicyTestCase(SendLimitTestCase):
    """With a submission policy that applies send limits."""

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.acceptor = Acceptor(self.queue, self.clock, default_pool="main", timeout=5.0)

        async def anything(server: Server, domain: str) -> bool:
            return True

        self.policy = SubmissionPolicy(
            self.clock, self.database, self.acceptor, sending_domain_check=anything, send_window=self.window
        )
        made = self.transaction(cs.create_credential, self.server.id, cs.CredentialType.API, NOW)
        self.credential = made.credential

    async def submit(self, server: Server, rcpts: int) -> Queued | Refused:
        permit = await self.policy.may_send_message(Submitter(self.credential, server), MESSAGE)
        assert isinstance(permit, Permit)
        rcpt_to = [f"r{n}@example.com" for n in range(rcpts)]
        return await self.policy.submit(permit, "app@example.test", rcpt_to, MESSAGE, received_with_ssl=False)


class PolicyTests(PolicyTestCase):
    async def test_over_the_limit_is_held(self) -> None:
        """Within the limit nothing is held; the message that does not fit is queued held with Postal's
        reason and marked as the limit's hold, and is not counted."""
        first = await self.submit(self.server, 8)
        assert isinstance(first, Queued)
        self.assertIsNone(first.hold)
        over = await self.submit(self.server, 3)
        assert isinstance(over, Queued)
        self.assertIs(over.hold, HoldReason.SEND_LIMIT)
        fields = [await self.queue.message_fields(m.id) for m in over.messages]
        self.assertEqual(
            {f["hold_reason"] for f in fields}, {"Message held because send limit (10) has been reached."}
        )
        self.assertEqual({f["limit_hold"] for f in fields}, {str(self.server.id)})
        self.assertEqual(await self.window.volume(self.server, NOW), 8)

    async def test_over_the_limit_refused(self) -> None:
        """With the Refuse action the message that does not fit is refused, nothing queued."""
        refusing = attrs.evolve(self.server, send_limit_action=SendLimitAction.REFUSE)
        self.assertIsInstance(await self.submit(refusing, 10), Queued)
        stats = await self.queue.stats(NOW)
        result = await self.submit(refusing, 1)
        assert isinstance(result, Refused)
        self.assertIs(result.reason, Refusal.SEND_LIMIT_EXCEEDED)
        self.assertEqual((await self.queue.stats(NOW)).due_now, stats.due_now)

    async def test_held_for_another_reason_not_counted(self) -> None:
        """A development-mode server's messages are held anyway: they do not count against its limit."""
        development = attrs.evolve(self.server, mode=ss.ServerMode.DEVELOPMENT)
        result = await self.submit(development, 20)
        assert isinstance(result, Queued)
        self.assertIs(result.hold, HoldReason.DEVELOPMENT_MODE)
        self.assertEqual(await self.window.volume(self.server, NOW), 0)

    async def test_no_limit_no_count(self) -> None:
        unlimited = attrs.evolve(self.server, send_limit=None)
        result = await self.submit(unlimited, 50)
        assert isinstance(result, Queued)
        self.assertIsNone(result.hold)
        self.assertEqual(await self.redis.execute("EXISTS", self.keys.send_window(self.server.id)), 0)


class ReleaseTests(PolicyTestCase):
    """The policy holds; the delivery service moves held messages to the held set (here by hand, as it
    does: claim, then HOLD); the release sweep lets them go."""

    async def hold_claimed(self) -> list[int]:
        claimed = await self.queue.claim(self.clock.seconds(), 100, 300, "worker")
        held = []
        for message in claimed:
            if message.fields.get("hold_reason"):
                self.assertTrue(await self.queue.hold(message.id, message.lease_token, self.clock.seconds()))
                held.append(message.id)
            else:
                self.assertTrue(await self.queue.ack(message.id, message.lease_token))
        return held

    def sweep(self, server: Server | None = None) -> SendLimitRelease:
        current = server or self.server

        async def lookup(server_id: int) -> Server | None:
            return current if server_id == current.id else None

        return SendLimitRelease(self.clock, self.window, lookup, interval=10, batch=2)

    async def due(self) -> list[int]:
        return sorted(int(i) for i in await self.redis.execute("ZRANGE", self.keys.due, 0, -1))

    async def test_released_as_the_window_rolls(self) -> None:
        """Held messages go, oldest first, as many as fit, and are counted; the rest wait."""
        await self.submit(self.server, 10)
        over = await self.submit(self.server, 3)
        assert isinstance(over, Queued)
        self.clock.advance(1)
        later = await self.submit(self.server, 2)
        assert isinstance(later, Queued)
        held = await self.hold_claimed()
        self.assertEqual(held, [m.id for m in (*over.messages, *later.messages)])
        self.assertEqual(await self.window.servers_holding(), [self.server.id])
        sweep = self.sweep()
        self.assertEqual(await sweep.sweep(), 0)  # the window is full
        # 300 s later the window still holds all ten; at 600 s they have left it: ten fit again.
        self.clock.advance(300)
        self.assertEqual(await sweep.sweep(), 0)
        self.clock.advance(310)
        self.assertEqual(await sweep.sweep(), 5)
        self.assertEqual(await self.due(), held)
        self.assertEqual(await self.window.volume(self.server, self.clock.seconds()), 5)
        fields = await self.queue.message_fields(held[0])
        self.assertEqual(fields["state"], "due")
        self.assertNotIn("hold_reason", fields)
        self.assertNotIn("limit_hold", fields)
        self.assertEqual(await self.window.servers_holding(), [])

    async def test_partial_room_and_stale_entries(self) -> None:
        """With room for two, two go; one released by hand meanwhile is dropped, not counted."""
        await self.submit(self.server, 10)
        over = await self.submit(self.server, 4)
        assert isinstance(over, Queued)
        held = await self.hold_claimed()
        self.assertTrue(await self.queue.release_held(held[0], self.clock.seconds()))
        await self.redis.execute("DEL", self.keys.send_window(self.server.id))
        await self.window.reserve(self.server, 8, self.clock.seconds())
        self.assertEqual(await self.sweep().sweep(), 2)
        self.assertEqual(await self.due(), held[:3])
        self.assertEqual(await self.window.volume(self.server, self.clock.seconds()), 10)
        self.assertEqual(await self.window.servers_holding(), [self.server.id])

    async def test_limit_removed_releases_all_and_suspended_none(self) -> None:
        await self.submit(self.server, 10)
        await self.submit(self.server, 5)
        held = await self.hold_claimed()
        suspended = attrs.evolve(self.server, suspended=True)
        self.assertEqual(await self.sweep(suspended).sweep(), 0)
        unlimited = attrs.evolve(self.server, send_limit=None)
        self.assertEqual(await self.sweep(unlimited).sweep(), 5)  # in batches of two
        self.assertEqual(await self.due(), held)

    async def test_cancelled_hold_leaves_the_index(self) -> None:
        """A limit-held message cancelled by the operator is gone; the sweep drops its entry."""
        await self.submit(self.server, 10)
        await self.submit(self.server, 1)
        (held,) = await self.hold_claimed()
        self.assertTrue(await self.queue.cancel_held(held))
        self.clock.advance(700)
        self.assertEqual(await self.sweep().sweep(), 0)
        self.assertEqual(await self.window.servers_holding(), [])

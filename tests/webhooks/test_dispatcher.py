"""The dispatcher's lease: derived from the sender's timeout, and never outlived by a POST in a live process.

Real Redis and SQLite; time is a `task.Clock`; the second test POSTs with the real `WebhookSender` to a
real receiver on 127.0.0.1 (I/O on the reactor trial runs).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from mtad.store import organizations, servers
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.webhooks import add_webhook, list_webhook_requests
from mtad.webhooks.dispatcher import SETTLE_MARGIN, DispatchSettings, WebhookDispatcher, lease_for
from mtad.webhooks.queue import NewRequest, WebhookQueue
from mtad.webhooks.sender import SenderSettings, WebhookSender, guarded_agent
from tests.outbound.support import until
from tests.redis_server import RedisTestCase, real_reactor
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url
from tests.webhooks.support import LOOPBACK, FixedResolver, Receiver
from tests.webhooks.test_sender import signer

NOW = 1_700_000_000.0


@attrs.frozen
class Outcome:
    ok: bool = True
    status_code: int = 200
    body_excerpt: str = "ok"
    duration: float = 0.01
    error: str | None = None


class NeverAnsweringSender:
    """A sender whose POSTs never finish: the requests stay leased, as a crashed process leaves them."""

    per_receiver = 4

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.posts: list[str] = []

    def post(self, url: str, body: bytes, *, start_by: float | None = None) -> Deferred[Outcome]:
        self.posts.append(url)
        return Deferred()


class DispatcherTestCase(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = WebhookQueue(self.redis, self.keys)

    def webhook(self, url: str) -> tuple[int, int]:
        with self.engine.begin() as conn:
            organizations.create_organization(conn, "Acme", NOW)
            server = servers.create_server(conn, "acme", "Main", NOW)
            hook = add_webhook(conn, server.id, "all", url, NOW)
        return server.id, hook.id

    async def queue_requests(self, url: str, count: int) -> list[str]:
        server_id, webhook_id = self.webhook(url)
        uuids = [f"uuid-{n}" for n in range(count)]
        requests = [
            NewRequest(u, server_id, webhook_id, url, "MessageSent", f'{{"n":{n}}}'.encode(), NOW)
            for n, u in enumerate(uuids)
        ]
        await self.queue.add(requests, self.clock.seconds())
        return uuids


class LeaseTests(DispatcherTestCase):
    def test_lease_follows_the_timeout(self) -> None:
        """The lease is two timeouts and the margin (Postal's 5 s: 15 s), whatever the timeout; a lease
        set in the settings wins."""
        self.assertEqual(SETTLE_MARGIN, 5.0)
        for timeout, lease in [(5.0, 15.0), (1.0, 7.0), (30.0, 65.0)]:
            self.assertEqual(lease_for(timeout), lease)
            dispatcher = WebhookDispatcher(
                self.clock, self.queue, self.database, NeverAnsweringSender(timeout), DispatchSettings()
            )
            self.assertEqual(dispatcher.lease_seconds, lease)
            self.assertEqual(dispatcher.start_within, timeout)
        dispatcher = WebhookDispatcher(
            self.clock,
            self.queue,
            self.database,
            NeverAnsweringSender(5.0),
            DispatchSettings(lease_seconds=60.0),
        )
        self.assertEqual((dispatcher.lease_seconds, dispatcher.start_within), (60.0, 50.0))

    async def test_a_dead_dispatchers_requests_are_claimable_after_the_derived_lease(self) -> None:
        """A dispatcher that claimed requests and died (its POSTs never finish) leaves them to another
        once 2 × timeout + margin have passed since the claim, not two minutes."""
        await self.queue_requests("https://hooks.example.com/a", 3)
        dead = WebhookDispatcher(
            self.clock, self.queue, self.database, NeverAnsweringSender(2.0), DispatchSettings()
        )
        self.assertEqual(await dead.run_once(), 3)
        claimed_at = self.clock.seconds()
        self.assertEqual(await self.queue.claim(claimed_at + 8.9, 10, 1.0), [])
        again = await self.queue.claim(claimed_at + 9.1, 10, 1.0)
        self.assertEqual(sorted(r.uuid for r in again), ["uuid-0", "uuid-1", "uuid-2"])


class WaitingForASlotTests(DispatcherTestCase):
    def setUp(self) -> Deferred[None]:
        self.reactor: Any = real_reactor()
        return super().setUp()

    async def test_request_waiting_past_its_window_is_given_back_untried(self) -> None:
        """With one slot per receiver and the slot held by a slow request, a second request that has no
        slot when its start window is over (the lease less the attempt and margin) is not POSTed later,
        when another process may own it, but given back at once: due again, attempts unchanged, nothing
        logged. The slow one is unaffected."""
        receiver = Receiver()
        port = receiver.listen(self.reactor)
        self.addCleanup(receiver.close, self.reactor)
        receiver.hold = True
        url = f"http://127.0.0.1:{port}/hook"
        await self.queue_requests(url, 2)
        agent = guarded_agent(self.reactor, FixedResolver({}), LOOPBACK)
        real = WebhookSender(agent, self.clock, signer(), SenderSettings(timeout=5.0, per_url_concurrency=1))

        class SharedSender:
            """The sender's one slot is shared with someone else (another dispatcher over the same
            sender): this dispatcher's claim allows two, so the second waits for the slot."""

            timeout = real.timeout
            per_receiver = 2
            post = real.post

        sender = SharedSender()
        # A lease of 12 s: the window to start is 12 - 5 - 5 = 2 s, shorter than the slow one's 5 s.
        dispatcher = WebhookDispatcher(
            self.clock, self.queue, self.database, sender, DispatchSettings(lease_seconds=12.0)
        )
        self.assertEqual(await dispatcher.run_once(), 2)
        await until(self.reactor, lambda: len(receiver.held) == 1)
        self.assertEqual(await self.queue.depth(), {"waiting": 0, "sending": 2})
        self.clock.advance(2.0)
        await until(self.reactor, lambda: dispatcher.given_back == 1)
        await until(self.reactor, lambda: len(dispatcher._in_flight) == 1)
        self.assertEqual(await self.queue.depth(), {"waiting": 1, "sending": 1})
        (back,) = await self.queue.claim(self.clock.seconds(), 10, 1.0)
        self.assertEqual(back.attempts, 0)
        self.assertEqual(len(receiver.received), 1)
        self.assertNotEqual(back.body, receiver.received[0].body)
        with self.engine.begin() as conn:
            self.assertEqual(list_webhook_requests(conn, back.server_id), [])
        receiver.release()
        await until(self.reactor, lambda: not dispatcher._in_flight)
        self.assertEqual(dispatcher.sent, 1)
        self.assertEqual(await self.queue.depth(), {"waiting": 0, "sending": 1})  # ``back``, claimed above


class ReceiverFairnessTests(DispatcherTestCase):
    """Requests are due per receiver: a slow receiver, or one with a backlog, never holds up another's."""

    async def add(self, url: str, count: int, at: float, tag: str) -> None:
        requests = [NewRequest(f"{tag}-{n}", 1, 1, url, "MessageSent", b"{}", at) for n in range(count)]
        await self.queue.add(requests, at)

    async def test_claim_takes_each_receiver_up_to_its_room(self) -> None:
        """An older backlog of 20 for one receiver and 3 newer for another: a claim of 10 with room for
        4 at each takes 4 and 3; with the first receiver's 4 in flight, only the other's; the legacy set
        (requests queued before receivers were kept) is claimed too."""
        await self.add("https://slow.example/hook", 20, NOW, "slow")
        await self.add("https://fast.example:8443/x", 3, NOW + 1, "fast")
        self.clock.advance(2)
        claimed = await self.queue.claim(self.clock.seconds(), 10, 30.0, per_receiver=4)
        taken = sorted((r.receiver, r.uuid.partition("-")[0]) for r in claimed)
        self.assertEqual(
            taken, [("https://fast.example:8443", "fast")] * 3 + [("https://slow.example:443", "slow")] * 4
        )
        more = await self.queue.claim(
            self.clock.seconds(), 10, 30.0, per_receiver=4, in_flight={"https://slow.example:443": 4}
        )
        self.assertEqual(more, [])
        await self.add("https://fast.example:8443/x", 1, self.clock.seconds(), "late")
        more = await self.queue.claim(
            self.clock.seconds(), 10, 30.0, per_receiver=4, in_flight={"https://slow.example:443": 4}
        )
        self.assertEqual([r.uuid for r in more], ["late-0"])
        self.assertEqual(await self.queue.depth(), {"waiting": 16, "sending": 8})
        # A request queued by an older mtad: no receiver, in the one due set.
        await self.redis.execute(
            "HSET",
            self.keys.webhook("old"),
            "uuid",
            "old",
            "server_id",
            1,
            "webhook_id",
            1,
            "url",
            "https://slow.example/hook",
            "event",
            "MessageSent",
            "body",
            "{}",
            "created_at",
            repr(NOW),
            "attempts",
            0,
        )
        await self.redis.execute("ZADD", self.keys.webhooks_due, NOW, "old")
        more = await self.queue.claim(
            self.clock.seconds(), 10, 30.0, per_receiver=4, in_flight={"https://slow.example:443": 4}
        )
        self.assertEqual([(r.uuid, r.receiver) for r in more], [("old", "")])

    async def test_slow_receiver_does_not_delay_another(self) -> None:
        """A receiver that never answers, with 30 requests due before another receiver's 3: the other's
        are POSTed at once, while the slow one holds only its per-receiver share of the places."""
        slow, fast = Receiver(), Receiver()
        slow.hold = True
        ports = [r.listen(self.reactor) for r in (slow, fast)]
        for r in (slow, fast):
            self.addCleanup(r.close, self.reactor)
        await self.add(f"http://127.0.0.1:{ports[0]}/slow", 30, NOW, "slow")
        await self.add(f"http://127.0.0.1:{ports[1]}/fast", 3, NOW + 1, "fast")
        self.clock.advance(2)
        agent = guarded_agent(self.reactor, FixedResolver({}), LOOPBACK)
        sender = WebhookSender(
            agent, self.clock, signer(), SenderSettings(timeout=5.0, per_url_concurrency=2)
        )
        dispatcher = WebhookDispatcher(
            self.clock, self.queue, self.database, sender, DispatchSettings(concurrency=10, batch_size=10)
        )
        for _ in range(500):  # the dispatcher's loop, on the real reactor
            await dispatcher.run_once()
            if len(fast.received) == 3:
                break
            await deferLater(self.reactor, 0.01)
        self.assertEqual(len(fast.received), 3)
        await until(self.reactor, lambda: len(slow.held) == 2)
        self.assertEqual(await dispatcher.run_once(), 0)  # the slow receiver has no more room
        self.assertEqual(len(slow.held), 2)
        slow.release()
        await until(self.reactor, lambda: len(slow.received) == 2)

    def setUp(self) -> Any:
        self.reactor: Any = real_reactor()
        return super().setUp()


class ManualSender:
    """A sender whose POSTs finish when the test says so."""

    timeout = 5.0
    per_receiver = 4

    def __init__(self) -> None:
        self.pending: list[Deferred[Outcome]] = []

    def post(self, url: str, body: bytes, *, start_by: float | None = None) -> Deferred[Outcome]:
        d: Deferred[Outcome] = Deferred()
        self.pending.append(d)
        return d


class WakeTests(DispatcherTestCase):
    async def test_a_finished_request_makes_room_at_once(self) -> None:
        """With a receiver's share in flight the loop waits; a request finishing wakes it to claim the
        next one then, not a poll interval later (one receiver's backlog would go at 4 per interval)."""
        await self.queue_requests("https://hooks.example.com/a", 10)
        sender = ManualSender()
        dispatcher = WebhookDispatcher(
            self.clock, self.queue, self.database, sender, DispatchSettings(poll_interval=60.0)
        )
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        await until(real_reactor(), lambda: len(sender.pending) == 4)
        for n in range(6):
            sender.pending[n].callback(Outcome())
            await until(real_reactor(), lambda n=n: len(sender.pending) == 5 + n)  # type: ignore[misc]
        self.assertEqual(self.clock.seconds(), NOW)  # no poll interval passed
        for d in sender.pending[6:]:
            d.callback(Outcome())
        await until(real_reactor(), lambda: not dispatcher._in_flight)
        self.assertEqual(dispatcher.sent, 10)

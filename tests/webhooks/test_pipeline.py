"""Events to webhook requests to POSTs: payloads, the trigger handler, the Redis request queue and the
dispatcher's retry schedule and request log. Real Redis and SQLite; the clock is a `task.Clock`; the HTTP
side is a recording sender (the real sender has its own tests against real receivers)."""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock

from mtad.events.schema import MessageDelivery, MessageQueued, Received
from mtad.store import organizations, servers
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.webhooks import add_webhook, find_webhook, list_webhook_requests
from mtad.webhooks.dispatcher import POSTAL_RETRY_DELAYS, DispatchSettings, WebhookDispatcher
from mtad.webhooks.payloads import truncate, webhook_event_for
from mtad.webhooks.queue import WebhookQueue
from mtad.webhooks.trigger import WebhookTrigger
from tests.redis_server import RedisTestCase
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0


def sent(server_id: int, status: str = "Sent", **changes: Any) -> MessageDelivery:
    values: dict[str, Any] = {
        "message_id": 17,
        "attempt": 1,
        "status": status,
        "timestamp": NOW + 5,
        "details": "Message for a@example.com accepted by mx.example.com (127.0.0.2)",
        "code": 250,
        "output": "250 2.0.0 OK",
        "sent_with_ssl": True,
        "time": 0.25,
        "server_id": server_id,
        "token": "AbCdEf123456",
        "scope": "outgoing",
        "mail_from": "app@example.org",
        "rcpt_to": "a@example.com",
        "subject": "Grüße 👋",
        "header_message_id": "m1@example.org",
        "tag": "welcome",
        "message_timestamp": NOW,
    }
    values.update(changes)
    return MessageDelivery(**values)


class PayloadTests(RedisTestCase):
    async def test_sent_payload_is_postals(self) -> None:
        """A Sent delivery fires MessageSent with Postal's delivery and message hashes, field for field."""
        fired = webhook_event_for(sent(3))
        assert fired is not None
        self.assertEqual((fired.server_id, fired.event), (3, "MessageSent"))
        self.assertEqual(
            fired.payload,
            {
                "message": {
                    "id": 17,
                    "token": "AbCdEf123456",
                    "direction": "outgoing",
                    "message_id": "m1@example.org",
                    "to": "a@example.com",
                    "from": "app@example.org",
                    "subject": "Grüße 👋",
                    "timestamp": NOW,
                    "spam_status": "NotChecked",
                    "tag": "welcome",
                },
                "status": "Sent",
                "details": "Message for a@example.com accepted by mx.example.com (127.0.0.2)",
                "output": "250 2.0.0 OK",
                "sent_with_ssl": True,
                "timestamp": NOW + 5,
                "time": 0.25,
            },
        )

    async def test_status_to_event(self) -> None:
        """SoftFail, HardFail and Held fire Postal's events; HoldCancelled and queued events fire none."""
        names = {
            s: getattr(webhook_event_for(sent(3, s)), "event", None)
            for s in ("SoftFail", "HardFail", "Held", "HoldCancelled")
        }
        self.assertEqual(
            names,
            {
                "SoftFail": "MessageDelayed",
                "HardFail": "MessageDeliveryFailed",
                "Held": "MessageHeld",
                "HoldCancelled": None,
            },
        )
        queued = MessageQueued(
            id=1,
            token="t",
            server_id=3,
            scope="outgoing",
            mail_from="a@b",
            rcpt_to="c@d",
            size=1,
            timestamp=NOW,
        )
        self.assertIsNone(webhook_event_for(queued))

    async def test_output_truncated_as_ruby_does(self) -> None:
        """Output over 512 characters is cut to 512, the last three being dots (Ruby's truncate)."""
        self.assertEqual(truncate("x" * 512), "x" * 512)
        self.assertEqual(truncate("x" * 600), "x" * 509 + "...")


@attrs.frozen
class Outcome:
    ok: bool
    status_code: int
    body_excerpt: str = ""
    duration: float = 0.01
    error: str | None = None


class RecordingSender:
    timeout = 5.0
    per_receiver = 4

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        self.answers: list[Outcome] = []

    def post(self, url: str, body: bytes, *, start_by: float | None = None) -> Deferred[Outcome]:
        self.posts.append((url, body))
        return succeed(self.answers.pop(0) if self.answers else Outcome(True, 200, "ok"))


class PipelineTests(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        with self.engine.begin() as conn:
            organizations.create_organization(conn, "Acme", NOW)
            self.server = servers.create_server(conn, "acme", "Main", NOW)
            self.all = add_webhook(conn, self.server.id, "all", "https://hooks.example.com/all", NOW)
            self.held = add_webhook(
                conn, self.server.id, "held", "https://hooks.example.com/held", NOW, events=["MessageHeld"]
            )
            add_webhook(conn, self.server.id, "off", "https://hooks.example.com/off", NOW, enabled=False)
        self.queue = WebhookQueue(self.redis, self.keys)
        self.trigger = WebhookTrigger(self.database, self.queue, self.clock)
        self.sender = RecordingSender()
        self.dispatcher = WebhookDispatcher(
            self.clock, self.queue, self.database, self.sender, DispatchSettings()
        )

    async def dispatch(self) -> int:
        """`WebhookDispatcher.run_once`, then wait until the attempts it started are settled in Redis: the
        lease (15 s with the recording sender's 5 s timeout) is shorter than the clock moves between
        calls, so an attempt still settling would be claimed again."""
        claimed = await self.dispatcher.run_once()
        await DeferredList(list(self.dispatcher._in_flight), consumeErrors=True)
        return claimed

    def batch(self) -> list[Received]:
        sid = self.server.id
        queued = MessageQueued(
            id=17,
            token="t",
            server_id=sid,
            scope="outgoing",
            mail_from="a@b",
            rcpt_to="c@d",
            size=1,
            timestamp=NOW,
        )
        return [Received("1-0", queued), Received("1-1", sent(sid)), Received("1-2", sent(sid, "Held"))]

    async def test_one_request_per_matching_enabled_webhook_once(self) -> None:
        """Sent goes to the all-events webhook, Held to both; the disabled webhook gets nothing; handling
        the batch again (at least once) queues nothing more, and each POST's envelope carries its uuid."""
        await self.trigger.handle(self.batch())
        await self.trigger.handle(self.batch())
        self.assertEqual(await self.dispatch(), 3)
        urls = sorted(url for url, _ in self.sender.posts)
        self.assertEqual(urls, sorted([self.all.url, self.all.url, self.held.url]))
        bodies = [json.loads(body) for _, body in self.sender.posts]
        self.assertEqual(sorted(b["event"] for b in bodies), ["MessageHeld", "MessageHeld", "MessageSent"])
        self.assertEqual([list(b) for b in bodies], [["event", "timestamp", "payload", "uuid"]] * 3)
        self.assertEqual(len({b["uuid"] for b in bodies}), 3)
        await self.trigger.handle(self.batch())
        self.assertEqual(await self.dispatch(), 0)

    async def test_success_logged_and_forgotten(self) -> None:
        """A 2xx answer is logged (status, response, will_retry false), the webhook's last use set, and
        the request leaves Redis."""
        await self.trigger.handle(self.batch()[:2])
        await self.dispatch()
        with self.engine.begin() as conn:
            (row,) = list_webhook_requests(conn, self.server.id)
            webhook = find_webhook(conn, id=self.all.id)
        self.assertEqual((row.status_code, row.attempt, row.will_retry, row.response), (200, 1, False, "ok"))
        assert webhook is not None
        self.assertEqual(webhook.last_used_at, NOW)
        self.assertEqual(await self.queue.depth(), {"waiting": 0, "sending": 0})

    async def test_failures_retried_on_postals_schedule_then_given_up(self) -> None:
        """Failures are retried 2, 3, 6, 10 and 15 minutes later, every attempt logged; after the sixth
        the request is given up (last row will_retry false) and leaves Redis."""
        await self.trigger.handle(self.batch()[:2])
        self.sender.answers = [Outcome(False, 500, "boom")] * 6
        self.assertEqual(await self.dispatch(), 1)
        for delay in POSTAL_RETRY_DELAYS:
            self.clock.advance(delay - 1)
            self.assertEqual(await self.dispatch(), 0)
            self.clock.advance(1)
            self.assertEqual(await self.dispatch(), 1)
        with self.engine.begin() as conn:
            rows = sorted(list_webhook_requests(conn, self.server.id), key=lambda r: r.attempt)
        self.assertEqual([r.attempt for r in rows], [1, 2, 3, 4, 5, 6])
        self.assertEqual([r.will_retry for r in rows], [True] * 5 + [False])
        self.assertEqual(len({r.uuid for r in rows}), 1)
        self.assertEqual(await self.queue.depth(), {"waiting": 0, "sending": 0})

    async def test_receiver_down_for_an_hour(self) -> None:
        """A receiver down for an hour gets the event when it is back: the request waits in Redis (a new
        dispatcher, as after a restart, finds it) on a schedule spanning the hour. Postal's default one
        gives up after 36 minutes, so an installation whose receivers may be down longer lengthens
        ``[webhooks] retry_delays``."""
        await self.trigger.handle(self.batch()[:2])
        delays = (*POSTAL_RETRY_DELAYS, 1800.0, 3600.0)

        def dispatcher() -> WebhookDispatcher:
            settings = DispatchSettings(retry_delays=delays)
            return WebhookDispatcher(self.clock, self.queue, self.database, self.sender, settings)

        self.dispatcher = dispatcher()
        self.sender.answers = [Outcome(False, -2, "", error="connection refused")] * 6
        self.assertEqual(await self.dispatch(), 1)
        for n, delay in enumerate(delays[:6]):
            if n == 3:
                self.dispatcher = dispatcher()  # mtad restarted meanwhile
            self.clock.advance(delay)
            self.assertEqual(await self.dispatch(), 1)
        # The seventh attempt, 66 minutes after the first, finds the receiver back.
        with self.engine.begin() as conn:
            rows = sorted(list_webhook_requests(conn, self.server.id), key=lambda r: r.attempt)
        self.assertEqual([r.status_code for r in rows], [-2] * 6 + [200])
        self.assertEqual(len({r.uuid for r in rows}), 1)
        self.assertEqual(await self.queue.depth(), {"waiting": 0, "sending": 0})

    async def test_killed_dispatcher_lease_expires_and_request_is_posted_again(self) -> None:
        """A request claimed by a dispatcher that died before settling is claimed again after its lease."""
        await self.trigger.handle(self.batch()[:2])
        (lost,) = await self.queue.claim(self.clock.seconds(), 10, 120.0)
        self.assertEqual(await self.queue.claim(self.clock.seconds() + 119, 10, 120.0), [])
        (again,) = await self.queue.claim(self.clock.seconds() + 121, 10, 120.0)
        self.assertEqual(again.uuid, lost.uuid)
        self.assertFalse(await self.queue.done(lost))
        self.assertTrue(await self.queue.done(again))

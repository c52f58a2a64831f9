"""The delivery service against a real Redis: claiming, settling, holding, leases, errors and shutdown.

Most tests drive the service's clock with `task.Clock` and answer for the deliverer with a stand-in (the
bookkeeping is under test, not SMTP); Redis is real, so the tests wait for its replies in real time.
The last test runs the real `Deliverer` against sink SMTP servers on 127.0.0.x and a fake DNS server.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from mtad.events.recorder import MESSAGE_DELIVERY, Event, parse_delivery
from mtad.outbound.deliverer import (
    BatchOutcome,
    Deliverer,
    DelivererConfig,
    DeliveryResult,
    RecipientResult,
    Status,
)
from mtad.outbound.delivery import (
    DeliveryService,
    DeliverySettings,
    recipient_domain,
    retry_wording,
)
from mtad.outbound.mx import MXResolver, ResolverConfig
from mtad.outbound.pools import IPPool, SourceAddress
from mtad.outbound.retry import DEFAULT_POLICY, RetryPolicy, backoff
from mtad.queue.client import RedisClient
from mtad.queue.limits import ConnectionLimiter
from mtad.queue.model import NewMessage
from mtad.queue.redis_queue import RedisQueue
from mtad.smtp.client import OutgoingMessage
from mtad.store.messages import MessageStatus
from tests.redis_server import RedisTestCase, redis_url
from tools.fakedns import start_fake_dns
from tools.sink import Sink, SinkBehaviour

reactor: Any = _reactor

NOW = 1_700_000_000.0
BODY = b"From: app@mtad.test\r\nSubject: hello \xf0\x9f\x98\x80\r\n\r\nHello\r\n"
DEFAULT = IPPool("default", (SourceAddress("127.0.0.10", "out10.mtad.test"),))
OTHER = IPPool("other", (SourceAddress("127.0.0.11", "out11.mtad.test"),))
POOLS = {"default": DEFAULT, "other": OTHER}


class Boom(Exception):
    """A deliverer bug."""


def result(
    status: Status,
    code: int | None = 250,
    output: str = "250 2.0.0 Queued as 1234",
    details: str = "Message for a@example.test accepted by mx1.example.test (127.0.0.2)",
) -> DeliveryResult:
    return DeliveryResult(
        status=status,
        code=code,
        enhanced="2.0.0" if code == 250 else "",
        output=output,
        details=details,
        sent_with_ssl=True,
        time=0.25,
        mx="mx1.example.test",
        source_ip="127.0.0.10",
    )


SENT = result("Sent")
HARD = result(
    "HardFail",
    550,
    "550 5.1.1 No such user here",
    "Permanent SMTP delivery error when sending to mx1.example.test (127.0.0.2)",
)
SOFT = result(
    "SoftFail",
    451,
    "451 4.7.1 Greylisted, come back later",
    "Temporary SMTP delivery error when sending to mx1.example.test (127.0.0.2)",
)


def every(outcome: DeliveryResult) -> Callable[[Sequence[OutgoingMessage]], BatchOutcome]:
    """An answer giving every message of a batch the same result."""

    def answer(messages: Sequence[OutgoingMessage]) -> BatchOutcome:
        return BatchOutcome(tuple(RecipientResult(m, r, outcome) for m in messages for r in m.recipients))

    return answer


Answer = Callable[[Sequence[OutgoingMessage]], BatchOutcome]


class FakeDeliverer:
    """Stands in for `Deliverer`: records batches and answers from ``answers`` (one per call), or, when
    they run out, with a Deferred the test fires itself. An answer that is an exception is raised."""

    def __init__(self, *answers: Answer | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, list[OutgoingMessage], IPPool]] = []
        self.pending: list[tuple[Deferred[BatchOutcome], list[OutgoingMessage]]] = []
        self.peak = 0

    def deliver(
        self, domain: str, messages: Sequence[OutgoingMessage], pool: IPPool
    ) -> Deferred[BatchOutcome]:
        self.calls.append((domain, list(messages), pool))
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                return fail(answer)
            return succeed(answer(messages))
        d: Deferred[BatchOutcome] = Deferred()
        self.pending.append((d, list(messages)))
        self.peak = max(self.peak, self.outstanding)
        return d

    @property
    def outstanding(self) -> int:
        return sum(1 for d, _ in self.pending if not d.called)

    def finish(self, outcome: DeliveryResult = SENT) -> None:
        """Answer the oldest batch still waiting."""
        d, messages = next((d, m) for d, m in self.pending if not d.called)
        d.callback(every(outcome)(messages))


async def eventually(probe: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    """Let real I/O (Redis) run until ``probe`` answers True; fail after ``limit`` seconds."""
    waited = 0.0
    while not await probe():
        if waited > limit:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.005, lambda: None)
        waited += 0.005


async def true(predicate: Callable[[], bool]) -> None:
    async def probe() -> bool:
        return predicate()

    await eventually(probe)


class ServiceTestCase(RedisTestCase):
    queue: RedisQueue
    clock: Clock

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.clock = Clock()
        self.clock.advance(NOW)

    def start(
        self,
        deliverer: Any,
        queue: RedisQueue | None = None,
        clock: Any = None,
        sign: Any = None,
        **settings: Any,
    ) -> DeliveryService:
        service = DeliveryService(
            clock if clock is not None else self.clock,
            queue if queue is not None else self.queue,
            deliverer,
            POOLS,
            DeliverySettings(**settings),
            "test-worker",
            sign=sign,
        )
        service.startService()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.stop(service)))
        return service

    async def stop(self, service: DeliveryService) -> None:
        """Stop the service, moving the test clock past the drain timeout until it has stopped."""
        if not service.running:
            return
        d = service.stopService()
        for _ in range(500):
            if d.called:
                break
            self.clock.advance(service.settings.drain_timeout)
            await deferLater(reactor, 0.01, lambda: None)
        await d

    async def enqueue(self, *rcpts: str, pool: str = "default", **fields: str) -> list[int]:
        messages = [
            NewMessage(
                token=f"tok-{rcpt}",
                server_id=7,
                scope="outgoing",
                mail_from="bounces@mtad.test",
                rcpt_to=rcpt,
                pool=pool,
                fields=fields,
            )
            for rcpt in rcpts
        ]
        return await self.queue.enqueue(BODY, messages, NOW)

    async def deliveries(self) -> list[dict[str, Any]]:
        """The data of every ``message.delivery`` event in the stream."""
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        found = []
        for _id, raw in entries:
            values = {raw[i].decode(): raw[i + 1] for i in range(0, len(raw), 2)}
            if values["type"].decode() == MESSAGE_DELIVERY:
                found.append(json.loads(values["data"]))
        return found

    async def wait_for_deliveries(self, count: int) -> list[dict[str, Any]]:
        async def probe() -> bool:
            return len(await self.deliveries()) >= count

        await eventually(probe)
        return await self.deliveries()

    async def score(self, zset: str, message_id: int) -> float | None:
        value = await self.redis.execute("ZSCORE", zset, message_id)
        return None if value is None else float(value)

    async def idle_until(self, when: float) -> None:
        """Wait until the claim loop has gone back to sleep until ``when`` (its last claim is answered)."""
        await true(lambda: any(c.getTime() == when for c in self.clock.getDelayedCalls()))

    async def wait_for_state(self, message_id: int, state: str) -> dict[str, str]:
        async def probe() -> bool:
            return (await self.queue.message_fields(message_id)).get("state") == state

        await eventually(probe)
        return await self.queue.message_fields(message_id)


class SettleTests(ServiceTestCase):
    """Each delivery status leaves the queue in Postal's state with a recorder-ready event."""

    async def test_sent_is_acked_with_event(self) -> None:
        """A Sent result deletes the message and appends a Sent event the recorder can parse, naming the
        message's subject, Message-ID field and tag for webhooks."""
        (mid,) = await self.enqueue(
            "a@Example.TEST", subject="Hello", message_id="m1@mtad.test", tag="welcome"
        )
        deliverer = FakeDeliverer(every(SENT))
        service = self.start(deliverer)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual(await self.queue.message_fields(mid), {})
        self.assertEqual(
            deliverer.calls,
            [
                (
                    "example.test",
                    [OutgoingMessage(str(mid), "bounces@mtad.test", ("a@Example.TEST",), BODY)],
                    DEFAULT,
                )
            ],
        )
        self.assertRegex(data.pop("log_id"), r"^[A-Z0-9]{8}$")
        self.assertEqual(
            data,
            {
                "message_id": mid,
                "attempt": 1,
                "status": "Sent",
                "code": 250,
                "output": "250 2.0.0 Queued as 1234",
                "details": "Message for a@example.test accepted by mx1.example.test (127.0.0.2)",
                "sent_with_ssl": True,
                "time": 0.25,
                "timestamp": NOW,
                "hold_expiry": None,
                "server_id": 7,
                "token": "tok-a@Example.TEST",
                "scope": "outgoing",
                "mail_from": "bounces@mtad.test",
                "rcpt_to": "a@Example.TEST",
                "enhanced_code": "2.0.0",
                "mx": "mx1.example.test",
                "source_ip": "127.0.0.10",
                "subject": "Hello",
                "header_message_id": "m1@mtad.test",
                "tag": "welcome",
                "message_timestamp": NOW,
            },
        )
        attempt = parse_delivery(Event("1-0", MESSAGE_DELIVERY, data))
        self.assertEqual((attempt.status, attempt.attempt, attempt.code), (MessageStatus.SENT, 1, 250))
        await true(lambda: service.in_flight == 0)

    async def test_shared_body_signed_once(self) -> None:
        """Recipients sharing one stored body get one signing call; every copy goes out signed."""
        await self.enqueue("a@example.test", "b@example.test")
        calls: list[tuple[int, int]] = []

        async def sign(server_id: int, message_id: int, body: bytes) -> bytes:
            calls.append((server_id, message_id))
            return b"DKIM-Signature: test\r\n" + body

        deliverer = FakeDeliverer(every(SENT))
        self.start(deliverer, sign=sign)
        await self.wait_for_deliveries(2)
        (_, messages, _) = deliverer.calls[0]
        self.assertEqual({m.body for m in messages}, {b"DKIM-Signature: test\r\n" + BODY})
        self.assertEqual(len(messages), 2)
        self.assertEqual(len(calls), 1)

    async def test_signing_failure_is_a_counted_soft_failure(self) -> None:
        """A signer that fails (database down) leaves the message SoftFail, retried on the schedule."""
        await self.enqueue("a@example.test")

        async def sign(server_id: int, message_id: int, body: bytes) -> bytes:
            raise Boom("database is down")

        self.start(FakeDeliverer(every(SENT)), sign=sign)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual(data["status"], "SoftFail")
        self.assertIn("Boom: database is down", data["details"])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)

    async def test_hard_fail_is_acked(self) -> None:
        """A 5xx result deletes the message with a HardFail event carrying the remote reply."""
        (mid,) = await self.enqueue("a@example.test")
        self.start(FakeDeliverer(every(HARD)))
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual(await self.queue.message_fields(mid), {})
        self.assertEqual(
            (data["status"], data["code"], data["output"]), ("HardFail", 550, "550 5.1.1 No such user here")
        )
        self.assertEqual(
            data["details"], "Permanent SMTP delivery error when sending to mx1.example.test (127.0.0.2)"
        )

    async def test_soft_fail_retried_on_postal_schedule(self) -> None:
        """4xx results retry after 5 min, then 5 × 1.3 min, counting attempts and saying when."""
        (mid,) = await self.enqueue("a@example.test")
        self.start(FakeDeliverer(every(SOFT), every(SOFT)))
        (first,) = await self.wait_for_deliveries(1)
        self.assertEqual(await self.score(self.keys.due, mid), NOW + 300)
        self.assertEqual((await self.queue.message_fields(mid))["attempts"], "1")
        self.assertEqual((first["status"], first["attempt"], first["code"]), ("SoftFail", 1, 451))
        self.assertEqual(
            first["details"],
            "Temporary SMTP delivery error when sending to mx1.example.test (127.0.0.2). "
            "Will retry in 5 minutes.",
        )
        self.clock.advance(300)
        second = (await self.wait_for_deliveries(2))[1]
        self.assertEqual(await self.score(self.keys.due, mid), NOW + 300 + 390)
        self.assertEqual((await self.queue.message_fields(mid))["attempts"], "2")
        self.assertEqual((second["attempt"], second["timestamp"]), (2, NOW + 300))
        self.assertTrue(second["details"].endswith(" Will retry in 7 minutes."))

    async def test_last_attempt_hard_fails(self) -> None:
        """A soft failure on the last allowed attempt hard-fails with Postal's max-attempts details."""
        (mid,) = await self.enqueue("a@example.test")
        await self.redis.execute("HSET", self.keys.message(mid), "attempts", "1")
        self.start(FakeDeliverer(every(SOFT)), retry=RetryPolicy(max_attempts=2))
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual(await self.queue.message_fields(mid), {})
        self.assertEqual((data["status"], data["attempt"]), ("HardFail", 2))
        self.assertEqual(data["details"], "Maximum number of delivery attempts (2) has been reached.")
        self.assertEqual(data["output"], "451 4.7.1 Greylisted, come back later")

    async def test_throttled_rescheduled_without_attempt(self) -> None:
        """A throttled batch comes back after retry_in with no attempt counted and no event."""
        (mid,) = await self.enqueue("a@example.test")

        def throttled(messages: Sequence[OutgoingMessage]) -> BatchOutcome:
            return BatchOutcome((), tuple(messages), 30.0)

        deliverer = FakeDeliverer(throttled, every(SENT))
        service = self.start(deliverer)

        async def rescheduled() -> bool:
            return await self.score(self.keys.due, mid) == NOW + 30

        await eventually(rescheduled)
        await true(lambda: service.in_flight == 0)
        self.assertEqual((await self.queue.message_fields(mid))["attempts"], "0")
        self.assertEqual(await self.deliveries(), [])
        self.clock.advance(29)
        await self.idle_until(NOW + 30)
        self.assertEqual(len(deliverer.calls), 1)
        self.clock.advance(1)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual((data["status"], data["attempt"]), ("Sent", 1))
        self.assertEqual(len(deliverer.calls), 2)

    async def test_hold_reason_holds(self) -> None:
        """A message with a hold reason is held, not delivered, with a Held event and its expiry."""
        (mid,) = await self.enqueue("a@example.test", hold_reason="Server is in development mode.")
        deliverer = FakeDeliverer()
        self.start(deliverer)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual(deliverer.calls, [])
        self.assertEqual(await self.score(self.keys.held, mid), NOW)
        self.assertEqual((await self.queue.message_fields(mid))["state"], "held")
        self.assertEqual(
            (data["status"], data["details"], data["hold_expiry"], data["code"]),
            ("Held", "Server is in development mode.", NOW + 7 * 86400, None),
        )
        attempt = parse_delivery(Event("1-0", MESSAGE_DELIVERY, data))
        self.assertEqual((attempt.status, attempt.hold_expiry), (MessageStatus.HELD, NOW + 7 * 86400))

    async def test_no_recipient_domain_hard_fails(self) -> None:
        """A recipient without a domain hard-fails without bothering the deliverer."""
        (mid,) = await self.enqueue("postmaster")
        deliverer = FakeDeliverer()
        self.start(deliverer)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual((data["status"], deliverer.calls), ("HardFail", []))
        self.assertEqual(await self.queue.message_fields(mid), {})


class LoopTests(ServiceTestCase):
    """The claim loop: grouping, the concurrency cap, leases, and surviving errors."""

    async def test_grouped_by_pool_and_domain(self) -> None:
        """One deliver call per (pool, domain); unknown and empty pools fall back to the default pool."""
        same = await self.enqueue("a@example.test", "b@example.test", "c@other.test")
        (upper,) = await self.enqueue("d@EXAMPLE.test", pool="")
        (unknown,) = await self.enqueue("e@example.test", pool="gone")
        (other,) = await self.enqueue("f@example.test", pool="other")
        deliverer = FakeDeliverer(*[every(SENT)] * 3)
        self.start(deliverer)
        await self.wait_for_deliveries(6)
        calls = sorted(
            (pool.name, domain, sorted(int(m.id) for m in messages))
            for domain, messages, pool in deliverer.calls
        )
        self.assertEqual(
            calls,
            [
                ("default", "example.test", sorted([same[0], same[1], upper, unknown])),
                ("default", "other.test", [same[2]]),
                ("other", "example.test", [other]),
            ],
        )

    async def test_concurrency_limit(self) -> None:
        """No more than ``concurrency`` messages are claimed at once; a freed slot is refilled."""
        ids = await self.enqueue(*(f"u@d{i}.test" for i in range(5)))
        deliverer = FakeDeliverer()
        service = self.start(deliverer, concurrency=2, batch_size=10)
        await true(lambda: len(deliverer.calls) == 2)
        stats = await self.queue.stats(NOW)
        self.assertEqual((stats.leased, stats.due_now, service.in_flight), (2, 3, 2))
        deliverer.finish()
        await true(lambda: len(deliverer.calls) == 3)
        for _ in range(3):
            deliverer.finish()
            await true(lambda: deliverer.outstanding == 2 or len(deliverer.calls) == 5)
        deliverer.finish()
        await self.wait_for_deliveries(5)
        self.assertEqual(deliverer.peak, 2)
        self.assertEqual(sorted(int(m.id) for _, ms, _ in deliverer.calls for m in ms), ids)

    async def test_lease_extended_during_long_delivery(self) -> None:
        """A delivery running past half its lease pushes the lease deadline on."""
        (mid,) = await self.enqueue("a@example.test")
        deliverer = FakeDeliverer()
        self.start(deliverer, lease_seconds=60.0)
        await true(lambda: len(deliverer.calls) == 1)
        self.assertEqual(await self.score(self.keys.leased, mid), NOW + 60)
        self.clock.advance(30)

        async def extended() -> bool:
            return await self.score(self.keys.leased, mid) == NOW + 90

        await eventually(extended)
        deliverer.finish()
        await self.wait_for_deliveries(1)

    async def test_stale_lease_is_not_an_error(self) -> None:
        """When another worker took the message meanwhile, the result is dropped quietly."""
        (mid,) = await self.enqueue("a@example.test")
        deliverer = FakeDeliverer()
        service = self.start(deliverer)
        await true(lambda: len(deliverer.calls) == 1)
        token = (await self.queue.message_fields(mid))["lease_token"]
        self.assertTrue(await self.queue.release(mid, token))
        (stolen,) = await self.queue.claim(NOW, 10, 600.0, "other-worker")
        deliverer.finish()
        await true(lambda: service.in_flight == 0)
        self.assertEqual(await self.deliveries(), [])
        fields = await self.queue.message_fields(mid)
        self.assertEqual((fields["lease_owner"], fields["lease_token"]), ("other-worker", stolen.lease_token))

    async def test_deliverer_exception_is_a_counted_soft_failure(self) -> None:
        """A deliverer error is logged and counted as a SoftFail retried on the schedule (no hot loop)."""
        (mid,) = await self.enqueue("a@example.test")
        deliverer = FakeDeliverer(Boom("bug"), every(SENT))
        service = self.start(deliverer)
        await true(lambda: len(deliverer.calls) == 1)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual((data["status"], data["attempt"]), ("SoftFail", 1))
        self.assertIn("Internal error while delivering: Boom: bug", data["details"])
        fields = await self.wait_for_state(mid, "due")
        self.assertEqual(fields["attempts"], "1")
        delay = backoff(1, DEFAULT_POLICY)
        assert delay is not None
        self.assertEqual(await self.score(self.keys.due, mid), NOW + delay)
        await true(lambda: service.in_flight == 0)
        self.clock.advance(delay)
        (_, data) = await self.wait_for_deliveries(2)
        self.assertEqual((data["status"], data["attempt"]), ("Sent", 2))

    async def test_redis_unavailable_during_claim(self) -> None:
        """With Redis unreachable the loop waits a poll interval and claims again once it is back."""
        (mid,) = await self.enqueue("a@example.test")
        # One pooled connection, fully set up before it is closed: a second one still saying SELECT
        # when the pool shuts would fail in txredisapi with an unhandled error.
        broken = RedisClient.from_url(reactor, await redis_url(), poolsize=1)
        await broken.wait_connected()
        await broken.disconnect()
        queue = RedisQueue(broken, self.keys)
        deliverer = FakeDeliverer(every(SENT))
        service = self.start(deliverer, queue=queue, poll_interval=2.0)
        await deferLater(reactor, 0.02, lambda: None)
        self.clock.advance(2)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(service.running)
        self.assertEqual(deliverer.calls, [])
        queue.client = self.redis
        self.clock.advance(1)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(deliverer.calls, [])
        self.clock.advance(1)
        (data,) = await self.wait_for_deliveries(1)
        self.assertEqual((data["message_id"], data["status"]), (mid, "Sent"))


class ShutdownTests(ServiceTestCase):
    """stopService drains deliveries in flight, and releases what does not finish in time."""

    async def test_stop_waits_for_deliveries_in_flight(self) -> None:
        """Stopping stops claiming and fires only once the running delivery is settled."""
        (mid,) = await self.enqueue("a@example.test")
        deliverer = FakeDeliverer()
        service = self.start(deliverer)
        await true(lambda: len(deliverer.calls) == 1)
        await self.enqueue("b@example.test")
        stopped = service.stopService()
        self.clock.advance(service.settings.drain_timeout - 1)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(stopped.called)
        deliverer.finish()
        await stopped
        (data,) = await self.deliveries()
        self.assertEqual((data["message_id"], data["status"]), (mid, "Sent"))
        self.assertEqual((len(deliverer.calls), service.in_flight), (1, 0))

    async def test_stop_releases_after_drain_timeout(self) -> None:
        """A delivery still running after drain_timeout is cancelled and its message released at once."""
        (mid,) = await self.enqueue("a@example.test")
        deliverer = FakeDeliverer()
        service = self.start(deliverer, drain_timeout=5.0)
        await true(lambda: len(deliverer.calls) == 1)
        stopped = service.stopService()
        await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(stopped.called)
        self.clock.advance(5)
        await stopped
        self.assertTrue(deliverer.pending[0][0].called)
        fields = await self.queue.message_fields(mid)
        self.assertEqual((fields["state"], fields["attempts"], "lease_token" in fields), ("due", "0", False))
        self.assertEqual(await self.score(self.keys.due, mid), NOW)
        self.assertEqual((await self.deliveries(), service.in_flight), ([], 0))

    async def test_stop_before_start(self) -> None:
        """A service that never started stops at once."""
        service = DeliveryService(self.clock, self.queue, FakeDeliverer(), POOLS, DeliverySettings(), "w")
        self.successResultOf(service.stopService())


class SettingsTests(TestCase):
    """Settings and small helpers."""

    def test_bad_settings_name_the_setting(self) -> None:
        """Impossible settings are refused, naming each one."""
        with self.assertRaises(ValueError) as caught:
            DeliverySettings(concurrency=0, poll_interval=0.0)
        self.assertIn("concurrency", str(caught.exception))
        self.assertIn("poll_interval", str(caught.exception))

    def test_default_pool_must_exist(self) -> None:
        """The default pool must be one of the pools given."""
        with self.assertRaises(ValueError):
            DeliveryService(
                Clock(), cast(RedisQueue, None), FakeDeliverer(), {"other": OTHER}, DeliverySettings(), "w"
            )

    def test_retry_wording(self) -> None:
        """Delays read as seconds, whole minutes or hours, as in Postal's details."""
        self.assertEqual(
            [retry_wording(s) for s in (1, 45, 300, 390, 25920)],
            ["1 second", "45 seconds", "5 minutes", "7 minutes", "7.2 hours"],
        )

    def test_recipient_domain(self) -> None:
        """The domain is what follows the last @, lower-cased."""
        self.assertEqual(recipient_domain('"a@b"@Example.TEST'), "example.test")
        self.assertEqual(recipient_domain("postmaster"), "")


class RealDelivererTests(ServiceTestCase):
    """The service with the real deliverer, sink SMTP servers and fake DNS over loopback sockets."""

    async def test_delivers_through_sink(self) -> None:
        """Two messages share one session to the MX; a rejected recipient hard-fails; all are settled."""
        dns = start_fake_dns(
            reactor,
            {"example.test": {"MX": [[10, "mx1.example.test"]]}, "mx1.example.test": {"A": ["127.0.0.2"]}},
            tcp=False,  # answers are small; a TCP listener on the same port number could collide
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        sink = Sink(SinkBehaviour(reject_recipients=frozenset({"nobody@example.test"})))
        listening = sink.listen(reactor, "127.0.0.2", 0)
        self.addCleanup(listening.stopListening)
        resolver = MXResolver(
            reactor, reactor, reactor, ResolverConfig((dns.address,), timeout=3, attempts=1), random.Random(1)
        )
        deliverer = Deliverer(
            reactor,
            reactor,
            resolver,
            ConnectionLimiter(self.redis, self.keys),
            DelivererConfig(port=listening.getHost().port),  # type: ignore[attr-defined]
            random.Random(1),
        )
        ids = await self.enqueue("a@example.test", "b@example.test", "nobody@example.test")
        service = self.start(deliverer, clock=reactor)
        events = await self.wait_for_deliveries(3)
        statuses = {e["message_id"]: (e["status"], e["mx"], e["source_ip"]) for e in events}
        self.assertEqual(
            statuses,
            {
                ids[0]: ("Sent", "mx1.example.test", "127.0.0.10"),
                ids[1]: ("Sent", "mx1.example.test", "127.0.0.10"),
                ids[2]: ("HardFail", "mx1.example.test", "127.0.0.10"),
            },
        )
        self.assertEqual([m.recipients for m in sink.messages], [("a@example.test",), ("b@example.test",)])
        self.assertEqual(len(sink.sessions), 1)
        self.assertEqual(sink.messages[0].data.replace(b"\r\n", b"\n"), BODY.replace(b"\r\n", b"\n"))
        await service.stopService()
        for mid in ids:
            self.assertEqual(await self.queue.message_fields(mid), {})

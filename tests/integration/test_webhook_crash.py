"""Webhooks across crashes: ``kill -9`` of the daemon while webhooks are in flight, and of Redis while they
wait for a retry. Nothing is lost, and what is sent again is the same request (same ``uuid``, same bytes).

The first test runs the real daemon (``twistd -n mtad``) in a child process, as `test_crash` does; the second
runs it in-process (`tests.integration.support.Harness`) and SIGKILLs its embedded Redis, which the daemon's
supervisor restarts from the AOF (``appendfsync always``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mtad.queue.client import RedisClient
from mtad.queue.keys import QueueKeys
from mtad.queue.model import QueueError
from mtad.store.messages import MessageStatus, list_deliveries, list_messages
from mtad.store.webhooks import WebhookRequest, add_webhook, list_webhook_requests
from mtad.webhooks.queue import WebhookQueue
from tests.integration.support import (
    MX_IP,
    ZONE,
    DaemonProcess,
    Harness,
    Installation,
    message,
    smtp_session,
    start_daemon,
    until,
)
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tests.test_accept import closed_port
from tests.webhooks.support import Received, Receiver
from tools.fakedns import start_fake_dns
from tools.sink import Sink

#: Messages relayed in the daemon-kill test.
K = 20
#: Webhook requests the receiver answers (200) before it starts holding them unanswered.
ANSWERED_BEFORE_KILL = 7
#: ``webhooks.timeout`` of the daemon-kill test.
TIMEOUT = 2.0


class HoldingReceiver(Receiver):
    """A `Receiver` that answers its first ``answer_first`` requests and holds every later one, so a test
    can kill the sender with some webhooks delivered and others in flight."""

    def __init__(self, answer_first: int) -> None:
        self.answer_first = answer_first
        self._hold = False
        super().__init__()

    @property
    def hold(self) -> bool:
        return self._hold or len(self.received) > self.answer_first

    @hold.setter
    def hold(self, value: bool) -> None:
        self._hold = value


async def eventually(reactor: Any, check: Callable[[], Awaitable[bool]], limit: float = 20.0) -> None:
    """Poll an asynchronous ``check`` until it holds (fails the test after ``limit`` seconds); a check that
    cannot reach Redis (it is restarting) counts as not holding yet."""
    deadline = time.monotonic() + limit
    while True:
        try:
            if await check():
                return
        except QueueError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.02, lambda: None)


def hooks(received: list[Received], event: str) -> list[tuple[dict[str, Any], Received]]:
    """The requests for ``event``, each with its parsed body."""
    parsed = [(json.loads(r.body), r) for r in received]
    return [(body, r) for body, r in parsed if body["event"] == event]


class WebhookCrashTests(unittest.TestCase):
    timeout = 90

    def assert_at_least_once(
        self, received: list[Received], answered: list[Received], message_ids: set[int]
    ) -> dict[int, str]:
        """Every message's MessageSent webhook was answered 200 at least once; every copy of a request
        (same ``uuid``) is the same bytes; no message has a second request (another ``uuid``).

        Returns each message's request uuid."""
        bodies: dict[str, set[bytes]] = defaultdict(set)
        uuids_of: dict[int, set[str]] = defaultdict(set)
        for body, r in hooks(received, "MessageSent"):
            bodies[body["uuid"]].add(r.body)
            uuids_of[body["payload"]["message"]["id"]].add(body["uuid"])
        self.assertEqual({u: len(b) for u, b in bodies.items() if len(b) != 1}, {})
        self.assertEqual({m: u for m, u in uuids_of.items() if len(u) != 1}, {})
        self.assertEqual(set(uuids_of), message_ids)
        delivered = {body["payload"]["message"]["id"] for body, _ in hooks(answered, "MessageSent")}
        self.assertEqual(delivered, message_ids)
        return {m: next(iter(u)) for m, u in uuids_of.items()}

    def assert_log_unique(self, log: list[WebhookRequest]) -> None:
        """The request log has one row per (uuid, attempt)."""
        pairs = Counter((r.uuid, r.attempt) for r in log)
        self.assertEqual({p: n for p, n in pairs.items() if n > 1}, {})

    # -- 1. the daemon killed while webhooks are produced and sent --

    def set_up_daemon(self) -> None:
        self.reactor: Any = real_reactor()
        self.installation = Installation(fresh_database_url(self, SQLITE))
        # Short: the embedded Redis's unix socket path must fit in 107 bytes.
        self.data_dir = tempfile.mkdtemp(prefix="mtad-whc-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.sink = Sink()
        sink_port = self.sink.listen(self.reactor, MX_IP, 0)
        self.addCleanup(sink_port.stopListening)
        self.dns = start_fake_dns(self.reactor, dict(ZONE))
        self.addCleanup(lambda: ensureDeferred(self.dns.stop()))
        self.receiver = HoldingReceiver(ANSWERED_BEFORE_KILL)
        hook_port = self.receiver.listen(self.reactor)
        self.addCleanup(lambda: ensureDeferred(self.receiver.close(self.reactor)))
        self.installation.query(
            add_webhook, self.installation.server_id, "app", f"http://127.0.0.1:{hook_port}/hook", time.time()
        )
        sink_number = sink_port.getHost().port  # type: ignore[attr-defined]
        self.smtp_port = closed_port()
        self.config_path = Path(self.data_dir) / "mtad.toml"
        self.config_path.write_text(
            f"""
[general]
hostname = "mtad.test"
data_dir = "{self.data_dir}"
[database]
url = "{self.installation.url}"
[[smtp.listeners]]
endpoint = "tcp:{self.smtp_port}:interface=127.0.0.1"
tls = "none"
allow_plaintext_auth = true
[http]
listeners = ["tcp:{closed_port()}:interface=127.0.0.1"]
[dns]
nameservers = ["{self.dns.host}:{self.dns.port}"]
[delivery]
port = {sink_number}
poll_interval = 0.05
[events]
poll_interval = 0.05
[webhooks]
allowed_networks = ["127.0.0.0/8"]
# A short timeout, so the dead daemon's leases (2 x timeout + 5 s: 9 s) expire soon after the restart.
# Held requests time out before the kill and are tried again, often enough never to be given up.
timeout = {TIMEOUT}
retry_delays = [{", ".join(["0.2"] * 40)}]
[[ip_pools]]
name = "default"
[[ip_pools.addresses]]
ip = "127.0.0.1"
hostname = "mta1.test"
"""
        )

    async def start_daemon(self) -> tuple[IProcessTransport, DaemonProcess]:
        """``twistd -n mtad`` in a child process; returns once it answers SMTP."""
        return await start_daemon(self.reactor, self.config_path, self.data_dir, self.smtp_port)

    async def daemon_redis(self) -> RedisClient:
        """A client of the daemon's embedded Redis (which outlives a SIGKILLed daemon)."""
        client = RedisClient.from_url(self.reactor, f"unix://{self.data_dir}/redis.sock?db=0", timeout=5.0)
        await client.wait_connected()
        return client

    def sent_messages(self) -> list[Any]:
        return [
            m
            for m in self.installation.query(list_messages, self.installation.server_id)
            if m.status == MessageStatus.SENT
        ]

    async def test_daemon_killed_mid_webhooks_then_restarted(self) -> None:
        """SIGKILL of the daemon with some webhooks answered and others in flight: after a restart every
        message's MessageSent arrives, a resent request has the same uuid and bytes, and neither the
        deliveries nor the request log has a duplicate row."""
        self.set_up_daemon()
        transport, child = await self.start_daemon()
        try:
            client = await smtp_session(self.reactor, self.smtp_port, "app", self.installation.password)
            for n in range(K):
                code, text = await client.send_message(
                    "app@sender.test", ["alice@example.com"], message(f"crash {n}")
                )
                self.assertEqual(code, 250, text)
            client.transport.loseConnection()  # type: ignore[union-attr]
            redis = await self.daemon_redis()
            try:

                async def in_flight() -> bool:
                    if len(self.receiver.received) <= ANSWERED_BEFORE_KILL or len(self.sent_messages()) != K:
                        return False
                    leased: int = await redis.execute("ZCARD", QueueKeys().webhooks_leased)
                    return leased > 0

                await eventually(self.reactor, in_flight, limit=30)
            finally:
                await redis.disconnect()
        finally:
            transport.signalProcess("KILL")
            await child.ended
        before_kill = list(self.receiver.received)
        # Held requests die with the daemon's connections; from now on the receiver answers everything.
        self.receiver.answer_first = 10**9
        self.receiver.held = []

        # The dead daemon's requests in flight stay leased to it until their lease (derived from the
        # timeout) expires; the restarted daemon then POSTs them again.
        redis = await self.daemon_redis()
        try:
            leased = await redis.execute("ZRANGE", QueueKeys().webhooks_leased, 0, -1)
            self.assertTrue(leased, "no webhook request was in flight at the kill")
        finally:
            await redis.disconnect()

        transport, child = await self.start_daemon()
        try:
            message_ids = {m.id for m in self.installation.query(list_messages, self.installation.server_id)}
            self.assertEqual(len(message_ids), K)

            def all_answered() -> bool:
                after = self.receiver.received[len(before_kill) :]
                answered = before_kill[:ANSWERED_BEFORE_KILL] + after
                return {
                    b["payload"]["message"]["id"] for b, _ in hooks(answered, "MessageSent")
                } == message_ids

            await until(self.reactor, all_answered, limit=30)
            redis = await self.daemon_redis()
            try:
                queue = WebhookQueue(redis)

                async def drained() -> bool:
                    return await queue.depth() == {"waiting": 0, "sending": 0}

                await eventually(self.reactor, drained)
            finally:
                await redis.disconnect()
        finally:
            transport.signalProcess("TERM")
            await child.ended

        received = list(self.receiver.received)
        answered = before_kill[:ANSWERED_BEFORE_KILL] + received[len(before_kill) :]
        uuids = self.assert_at_least_once(received, answered, message_ids)
        for message_id in message_ids:
            statuses = [d.status for d in self.installation.query(list_deliveries, message_id)]
            self.assertEqual(statuses.count(MessageStatus.SENT), 1, (message_id, statuses))
        self.assertEqual(len(self.sink.messages), K)
        log = self.installation.query(
            list_webhook_requests, self.installation.server_id, None, None, None, 1000
        )
        self.assert_log_unique(log)
        succeeded = {r.uuid for r in log if r.status_code == 200}
        self.assertEqual(set(uuids.values()) - succeeded, set())

    # -- 2. Redis killed while webhooks wait for a retry --

    async def test_redis_restarted_while_webhooks_pending_retry(self) -> None:
        """Webhooks waiting for a retry (the receiver answered 500) when Redis is SIGKILLed and restarted
        are all retried and delivered, each logged as attempt 1 (500) and attempt 2 (200)."""
        reactor = real_reactor()
        receiver = Receiver(code=500)
        hook_port = receiver.listen(reactor)
        self.addCleanup(lambda: ensureDeferred(receiver.close(reactor)))
        h = Harness(
            reactor,
            fresh_database_url(self, SQLITE),
            config={
                "webhooks": {"allowed_networks": ["127.0.0.0/8"], "retry_delays": [0.5]},
                "events": {"poll_interval": 0.05},
            },
        )
        self.addCleanup(lambda: ensureDeferred(h.stop()))
        server_id = h.installation.server_id
        h.installation.query(add_webhook, server_id, "app", f"http://127.0.0.1:{hook_port}/hook", time.time())
        service = await h.start()
        assert service.webhook_queue is not None and service.embedded_redis is not None
        queue, redis = service.webhook_queue, service.embedded_redis
        count = 5
        client = await h.session()
        for n in range(count):
            code, text = await client.send_message("app@sender.test", ["alice@example.com"], message(f"r{n}"))
            self.assertEqual(code, 250, text)

        async def all_waiting_retry() -> bool:
            failed = {b["uuid"] for b, _ in hooks(receiver.received, "MessageSent")}
            return len(failed) == count and await queue.depth() == {"waiting": count, "sending": 0}

        await eventually(reactor, all_waiting_retry)
        # Retries that start before Redis is back are held, so none is settled while it is down.
        receiver.hold = True
        old_pid = redis.pid
        redis.kill_hard()
        await until(reactor, lambda: redis.ready and redis.pid not in (None, old_pid), limit=20)
        receiver.code = 200

        async def settled() -> bool:
            if receiver.held:
                receiver.release()
            return await queue.depth() == {"waiting": 0, "sending": 0}

        await eventually(reactor, settled)

        message_ids = {m.id for m in h.installation.query(list_messages, server_id)}
        self.assertEqual(len(message_ids), count)
        uuids = self.assert_at_least_once(receiver.received, receiver.received, message_ids)
        log = h.installation.query(list_webhook_requests, server_id, None, None, None, 1000)
        self.assert_log_unique(log)
        attempts: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for row in log:
            attempts[row.uuid].append((row.attempt, row.status_code))
        self.assertEqual(
            {u: sorted(attempts[u]) for u in uuids.values()},
            {u: [(1, 500), (2, 200)] for u in uuids.values()},
        )

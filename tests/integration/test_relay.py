"""End to end on loopback: SMTP in, the real queue and delivery loop, fake DNS, a sink MX, SQL history."""

from __future__ import annotations

import io
import json
import time
from typing import Any, ClassVar, cast

import dkim
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mtad.mail.dkim_keys import dkim_txt_value
from mtad.mail.verp import decode_return_path
from mtad.store.domains import get_domain_by_name, list_keys
from mtad.store.messages import MessageStatus, find_message, list_deliveries, list_messages
from mtad.store.servers import set_allow_sender
from tests.integration.support import Harness, message, until
from tests.redis_server import real_reactor
from tests.store.support import MYSQL, POSTGRES, SQLITE, fresh_database_url
from tools.sink import SinkBehaviour


class RelayTests(unittest.TestCase):
    """Runs on SQLite; subclasses run the same on PostgreSQL and MariaDB when configured."""

    backend: ClassVar[str] = SQLITE
    timeout = 60

    def harness(self, **kwargs: Any) -> Harness:
        reactor = real_reactor()
        harness = Harness(reactor, fresh_database_url(self, self.backend), **kwargs)
        self.addCleanup(lambda: ensureDeferred(harness.stop()))
        return harness

    def statuses(self, harness: Harness) -> list[MessageStatus]:
        found = harness.installation.query(list_messages, harness.installation.server_id)
        return sorted(m.status for m in found)

    async def test_authenticated_relay_is_delivered_and_recorded(self) -> None:
        """A message relayed with AUTH reaches the MX with a Received header, and SQL records it Sent."""
        h = self.harness()
        await h.start()
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message("Hi 🎉"))
        self.assertEqual(code, 250, text)
        self.assertIn("2.0.0", text)
        (delivered,) = await h.sink.wait_for_messages(1)
        # The envelope sender is the message's VERP return path (bounces name the message they are for).
        assert h.service is not None
        verp = decode_return_path(h.service.verp_secret, delivered.mail_from, ["rp.postal.example.com"])
        assert verp is not None, delivered.mail_from
        self.assertEqual(delivered.recipients, ("alice@example.com",))
        self.assertEqual(delivered.peer_ip, "127.0.0.1")
        self.assertEqual(delivered.helo, "mta1.test")
        self.assertIn(b"\r\nReceived: from client.test", delivered.data.split(b"\r\n\r\n")[0])
        self.assertIn(b"Subject: Hi", delivered.data)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.SENT])
        (row,) = h.installation.query(list_messages, h.installation.server_id)
        self.assertEqual((verp.server_id, verp.message_id), (row.server_id, row.id))
        self.assertEqual(row.mail_from, "app@sender.test")
        self.assertEqual(row.subject, "Hi 🎉")
        self.assertEqual(row.rcpt_to, "alice@example.com")
        (attempt,) = h.installation.query(list_deliveries, row.id)
        self.assertEqual(attempt.status, MessageStatus.SENT)
        self.assertIn("250", attempt.output or "")

    async def test_delivered_mail_is_dkim_signed(self) -> None:
        """Mail from a verified sending domain leaves signed with its active key; the signature verifies."""
        h = self.harness()
        await h.start()
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message("Signed"))
        self.assertEqual(code, 250, text)
        (delivered,) = await h.sink.wait_for_messages(1)
        self.assertTrue(delivered.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"), delivered.data[:80])

        def published() -> dict[bytes, bytes]:
            def load(conn: Any) -> dict[bytes, bytes]:
                domain = get_domain_by_name(conn, "sender.test")
                return {
                    f"{k.selector}._domainkey.sender.test.".encode(): dkim_txt_value(
                        k.algorithm, k.public_key
                    ).encode()
                    for k in list_keys(conn, domain.id)
                }

            return cast(dict[bytes, bytes], h.installation.query(load))

        records = published()
        self.assertTrue(dkim.verify(delivered.data, dnsfunc=lambda name, timeout=5: records[name]))
        self.assertFalse(
            dkim.verify(
                delivered.data.replace(b"Hi Alice", b"Hi Mallory"),
                dnsfunc=lambda name, timeout=5: records[name],
            )
        )

    async def test_one_data_many_recipients_is_one_message_each(self) -> None:
        """Two recipients of one DATA become two messages, both delivered."""
        h = self.harness()
        await h.start()
        client = await h.session()
        code, text = await client.send_message(
            "app@sender.test", ["alice@example.com", "bob@example.com"], message()
        )
        self.assertEqual(code, 250, text)
        delivered = await h.sink.wait_for_messages(1)
        await until(h.reactor, lambda: sum(len(m.recipients) for m in h.sink.messages) == 2)
        self.assertEqual(
            sorted(r for m in h.sink.messages for r in m.recipients), ["alice@example.com", "bob@example.com"]
        )
        self.assertTrue(delivered)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.SENT, MessageStatus.SENT])

    async def test_relay_without_authentication_is_refused(self) -> None:
        """No AUTH and no SMTP-IP credential: the recipient is refused and nothing is queued."""
        h = self.harness()
        service = await h.start()
        client = await h.session(authenticated=False)
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertIn(code, (530, 554))
        self.assertTrue(text.startswith("5.7."), text)
        assert service.queue is not None
        stats = await service.queue.stats(h.reactor.seconds())
        self.assertEqual((stats.due_now, stats.scheduled, stats.leased, stats.held), (0, 0, 0, 0))

    async def test_development_server_holds(self) -> None:
        """A development-mode server's message is Held, never delivered."""
        h = self.harness(development=True)
        service = await h.start()
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.HELD])
        assert service.queue is not None
        stats = await service.queue.stats(h.reactor.seconds())
        self.assertEqual(stats.held, 1)
        self.assertEqual(h.sink.messages, [])

    async def test_null_mx_is_hard_fail(self) -> None:
        """A domain with a null MX (RFC 7505) fails hard with 5.1.10, recorded as a delivery."""
        h = self.harness()
        await h.start()
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["bob@nullmx.test"], message())
        self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.HARD_FAIL])
        (row,) = h.installation.query(list_messages, h.installation.server_id)
        (attempt,) = h.installation.query(list_deliveries, row.id)
        self.assertIn("5.1.10", (attempt.output or "") + (attempt.details or ""))

    async def test_mx_temporary_failure_is_retried_later(self) -> None:
        """An MX answering 451 leaves the message SoftFail and scheduled for a retry, not lost."""
        h = self.harness(sink=SinkBehaviour(fail_stage="rcpt", fail_code=451))
        service = await h.start()
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.SOFT_FAIL])
        assert service.queue is not None
        stats = await service.queue.stats(h.reactor.seconds())
        self.assertEqual((stats.scheduled, stats.leased), (1, 0))

    async def test_status_endpoint(self) -> None:
        """GET /status reports the queue, Redis persistence, the database and the listeners."""
        h = self.harness()
        await h.start()
        agent = Agent(h.reactor)
        response = await agent.request(b"GET", f"http://127.0.0.1:{h.port('http')}/status".encode())
        self.assertEqual(response.code, 200)
        report = json.loads(await readBody(response))
        self.assertTrue(report["redis"]["reachable"])
        self.assertTrue(report["redis"]["embedded"])
        self.assertEqual(report["redis"]["persistence"]["appendfsync"], "always")
        self.assertTrue(report["database"]["reachable"])
        self.assertEqual(report["queue"]["due_now"], 0)
        self.assertEqual({listener["kind"] for listener in report["listeners"]}, {"smtp", "http"})
        self.assertEqual(
            report["signing_workers"], {"processes": 1, "running": 1, "signed": 0, "unavailable": 0}
        )

    async def test_send_api_message_is_delivered(self) -> None:
        """POST /api/v1/send/message with an API key from a verified domain: delivered and recorded."""
        h = self.harness()
        await h.start()
        params = {
            "to": ["alice@example.com"],
            "from": "App <app@sender.test>",
            "subject": "Über API 🎉",
            "plain_body": "Hello from the API.",
        }
        response = await Agent(h.reactor).request(
            b"POST",
            f"http://127.0.0.1:{h.port('http')}/api/v1/send/message".encode(),
            Headers({"X-Server-API-Key": [h.installation.api_key], "Content-Type": ["application/json"]}),
            FileBodyProducer(io.BytesIO(json.dumps(params).encode())),
        )
        self.assertEqual(response.code, 200)
        answer = json.loads(await readBody(response))
        self.assertEqual(answer["status"], "success", answer)
        message_id = answer["data"]["messages"]["alice@example.com"]["id"]
        (delivered,) = await h.sink.wait_for_messages(1)
        self.assertEqual(delivered.recipients, ("alice@example.com",))
        self.assertIn(b"with HTTP", delivered.data)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.SENT])
        row = h.installation.query(find_message, message_id)
        self.assertEqual(row.subject, "Über API 🎉")

    async def test_allow_sender(self) -> None:
        """A server with allow_sender gets mail whose From is outside its domains accepted over SMTP and the
        send API when Sender is one of them; without such a Sender, DATA is refused 530 5.7.1."""
        h = self.harness()
        h.installation.query(set_allow_sender, h.installation.server_id, True, time.time())
        await h.start()
        client = await h.session()
        body = b"From: app@foreign.test\r\nSender: app@sender.test\r\nSubject: via Sender\r\n\r\nHi\r\n"
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], body)
        self.assertEqual(code, 250, text)
        params = {
            "to": ["bob@example.com"],
            "from": "app@foreign.test",
            "sender": "app@sender.test",
            "subject": "via Sender",
            "plain_body": "Hi",
        }
        response = await Agent(h.reactor).request(
            b"POST",
            f"http://127.0.0.1:{h.port('http')}/api/v1/send/message".encode(),
            Headers({"X-Server-API-Key": [h.installation.api_key], "Content-Type": ["application/json"]}),
            FileBodyProducer(io.BytesIO(json.dumps(params).encode())),
        )
        answer = json.loads(await readBody(response))
        self.assertEqual(answer["status"], "success", answer)
        await h.sink.wait_for_messages(2)
        code, text = await client.send_message(
            "app@foreign.test", ["alice@example.com"], b"From: app@foreign.test\r\nSubject: x\r\n\r\nHi\r\n"
        )
        self.assertEqual(code, 530, text)
        self.assertTrue(text.startswith("5.7.1 From/Sender name is not valid"), text)

    async def test_send_api_refuses_unknown_key(self) -> None:
        """An unknown X-Server-API-Key gets Postal's InvalidServerAPIKey error and queues nothing."""
        h = self.harness()
        service = await h.start()
        response = await Agent(h.reactor).request(
            b"POST",
            f"http://127.0.0.1:{h.port('http')}/api/v1/send/message".encode(),
            Headers({"X-Server-API-Key": ["nope"], "Content-Type": ["application/json"]}),
            FileBodyProducer(io.BytesIO(b'{"to": ["a@example.com"]}')),
        )
        answer = json.loads(await readBody(response))
        self.assertEqual((answer["status"], answer["data"]["code"]), ("error", "InvalidServerAPIKey"))
        assert service.queue is not None
        self.assertEqual((await service.queue.stats(h.reactor.seconds())).due_now, 0)

    async def test_redis_restart_gives_451_then_recovers(self) -> None:
        """While Redis is down DATA gets 451 4.3.0 (never 250); after it is back, mail flows again."""
        h = self.harness(config={"redis": {"timeout": 2.0}})
        service = await h.start()
        assert service.embedded_redis is not None
        client = await h.session()
        service.embedded_redis.kill_hard()
        await service.embedded_redis.when_exited()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertEqual(code, 451, text)
        self.assertTrue(text.startswith("4.3.0"), text)
        await service.embedded_redis.when_ready()
        assert service.redis is not None
        await until(h.reactor, lambda: service.redis is not None and service.redis.connected)
        await client.command("RSET")
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertEqual(code, 250, text)
        await h.sink.wait_for_messages(1)
        self.assertEqual(len(h.sink.messages), 1)

    async def test_queue_survives_redis_kill(self) -> None:
        """A queued message survives SIGKILL of Redis (AOF, fsync always): it is still queued after."""
        h = self.harness(sink=SinkBehaviour(fail_stage="rcpt", fail_code=451))
        service = await h.start()
        assert service.embedded_redis is not None and service.queue is not None
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.SOFT_FAIL])
        service.embedded_redis.kill_hard()
        await service.embedded_redis.when_exited()
        await service.embedded_redis.when_ready()
        await until(h.reactor, lambda: service.redis is not None and service.redis.connected)
        stats = await service.queue.stats(h.reactor.seconds())
        self.assertEqual((stats.scheduled, stats.leased), (1, 0))

    async def test_queue_survives_mtad_restart(self) -> None:
        """Stopping mtad with a message awaiting retry loses nothing: after a restart it is still queued."""
        h = self.harness(sink=SinkBehaviour(fail_stage="rcpt", fail_code=451))
        service = await h.start()
        client = await h.session()
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], message())
        self.assertEqual(code, 250, text)
        id_text = text.split()[-1]
        await until(h.reactor, lambda: self.statuses(h) == [MessageStatus.SOFT_FAIL])
        await h.stop_mtad()
        service = await h.start()
        assert service.queue is not None
        stats = await service.queue.stats(h.reactor.seconds())
        self.assertEqual(stats.scheduled, 1)
        row = h.installation.query(find_message, int(id_text))
        self.assertIsNotNone(row)


class RelayPostgresTests(RelayTests):
    backend = POSTGRES


class RelayMySQLTests(RelayTests):
    backend = MYSQL

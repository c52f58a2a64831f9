"""End to end: a message sent through the API, delivered and recorded, is still returned whole by
``messages/message`` (its raw message kept in SQL), on SQLite and, when configured, PostgreSQL and MariaDB."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, ClassVar

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mtad.store.messages import MessageStatus, find_message
from tests.integration.support import Harness, until
from tests.redis_server import real_reactor
from tests.store.support import MYSQL, POSTGRES, SQLITE, fresh_database_url

#: A message over a megabyte (far over MySQL's 64 KiB BLOB), with non-ASCII octets in its body.
RAW = (
    b"From: App <app@sender.test>\r\nTo: alice@example.com\r\nSubject: big\r\n"
    b"Message-ID: <big.1@sender.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße 👋 ".encode() * 8
    + b"\r\n"
    + (b"0123456789abcdef" * 4 + b"\r\n") * 16_000
)


class RawMessageTests(unittest.TestCase):
    backend: ClassVar[str] = SQLITE
    timeout = 60

    async def api(self, h: Harness, action: str, params: dict[str, Any]) -> dict[str, Any]:
        response = await Agent(h.reactor).request(
            b"POST",
            f"http://127.0.0.1:{h.port('http')}/api/v1/{action}".encode(),
            Headers({"X-Server-API-Key": [h.installation.api_key], "Content-Type": ["application/json"]}),
            FileBodyProducer(io.BytesIO(json.dumps(params).encode())),
        )
        answer: dict[str, Any] = json.loads(await readBody(response))
        self.assertEqual(answer["status"], "success", answer)
        return answer

    async def test_large_message_returned_after_delivery(self) -> None:
        """A 1 MB message sent with send/raw is delivered, recorded Sent, and messages/message still
        returns it octet for octet, with its decoded body."""
        h = Harness(real_reactor(), fresh_database_url(self, self.backend))
        self.addCleanup(lambda: ensureDeferred(h.stop()))
        await h.start()
        self.assertGreater(len(RAW), 1_000_000)
        sent = await self.api(
            h,
            "send/raw",
            {
                "mail_from": "app@sender.test",
                "rcpt_to": ["alice@example.com"],
                "data": base64.b64encode(RAW).decode(),
            },
        )
        id = sent["data"]["messages"]["alice@example.com"]["id"]
        (delivered,) = await h.sink.wait_for_messages(1)
        self.assertTrue(delivered.data.endswith(RAW))

        def recorded_sent() -> bool:
            message = h.installation.query(find_message, id)
            return message is not None and message.status is MessageStatus.SENT

        await until(h.reactor, recorded_sent)
        answer = await self.api(
            h, "messages/message", {"id": id, "_expansions": ["raw_message", "plain_body"]}
        )
        self.assertEqual(base64.b64decode(answer["data"]["raw_message"]), RAW)
        self.assertTrue(answer["data"]["plain_body"].startswith("Grüße 👋 "))


class RawMessagePostgresTests(RawMessageTests):
    backend = POSTGRES


class RawMessageMySQLTests(RawMessageTests):
    backend = MYSQL

"""Send limits through the whole daemon: SMTP and the send API refuse what is over a refusing server's
limit (451 4.7.1, ``SendLimitExceeded``); a holding server's excess is held with Postal's reason and goes
out by itself once there is room (here: the limit is lifted, which the release sweep sees at once)."""

from __future__ import annotations

import json
import time
from io import BytesIO
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mtad.store.messages import MessageStatus, list_deliveries, list_messages
from mtad.store.servers import SendLimitAction, set_send_limit
from mtad.store.webhooks import add_webhook
from tests.integration.support import Harness, message, until
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tests.webhooks.support import Receiver


class SendLimitTests(unittest.TestCase):
    timeout = 60

    async def start(self, limit: int, action: SendLimitAction) -> Harness:
        reactor = real_reactor()
        self.receiver = Receiver()
        port = self.receiver.listen(reactor)
        self.addCleanup(lambda: ensureDeferred(self.receiver.close(reactor)))
        h = Harness(
            reactor,
            fresh_database_url(self, SQLITE),
            config={
                "limits": {"release_interval": 0.1},
                "events": {"poll_interval": 0.05},
                "webhooks": {"allowed_networks": ["127.0.0.0/8"]},
            },
        )
        self.addCleanup(lambda: ensureDeferred(h.stop()))
        server_id = h.installation.server_id
        h.installation.query(set_send_limit, server_id, limit, 3600, action, time.time())
        h.installation.query(add_webhook, server_id, "app", f"http://127.0.0.1:{port}/hook", time.time())
        await h.start()
        return h

    def hooks(self, event: str) -> list[dict[str, Any]]:
        bodies = [json.loads(r.body) for r in self.receiver.received]
        return [b["payload"] for b in bodies if b["event"] == event]

    async def api_send(self, h: Harness, to: str) -> dict[str, Any]:
        body = json.dumps(
            {"to": [to], "from": "app@sender.test", "subject": "API", "plain_body": "hello"}
        ).encode()
        response = await Agent(h.reactor).request(
            b"POST",
            f"http://127.0.0.1:{h.port('http')}/api/v1/send/message".encode(),
            Headers(
                {
                    "Content-Type": ["application/json"],
                    "X-Server-API-Key": [h.installation.api_key],
                }
            ),
            FileBodyProducer(BytesIO(body)),
        )
        self.assertEqual(response.code, 200)
        answer: dict[str, Any] = json.loads(await readBody(response))
        return answer

    def statuses(self, h: Harness) -> dict[str, MessageStatus]:
        return {m.rcpt_to: m.status for m in h.installation.query(list_messages, h.installation.server_id)}

    async def test_refused_over_the_limit(self) -> None:
        """Two fit; the third message is refused at the end of DATA with 451 4.7.1 (the client keeps it
        and tries later), and the send API answers SendLimitExceeded; only two reach the MX."""
        h = await self.start(2, SendLimitAction.REFUSE)
        client = await h.session()
        for n in range(2):
            to = f"r{n}@example.com"
            code, text = await client.send_message("app@sender.test", [to], message("Fits", to=to))
            self.assertEqual(code, 250, text)
        code, text = await client.send_message(
            "app@sender.test", ["r2@example.com"], message("Over", to="r2@example.com")
        )
        self.assertEqual(code, 451, text)
        self.assertIn("4.7.1", text)
        answer = await self.api_send(h, "r3@example.com")
        self.assertEqual(answer["status"], "error")
        self.assertEqual(answer["data"]["code"], "SendLimitExceeded")
        await h.sink.wait_for_messages(2)
        await until(h.reactor, lambda: len(self.statuses(h)) == 2)
        self.assertEqual(sorted(self.statuses(h)), ["r0@example.com", "r1@example.com"])
        self.assertEqual(len(h.sink.messages), 2)

    async def test_held_then_released_by_itself(self) -> None:
        """With a limit of one, the second and third messages are accepted and held with Postal's
        reason; lifting the limit releases them without anyone touching them, and they are delivered."""
        h = await self.start(1, SendLimitAction.HOLD)
        client = await h.session()
        for n in range(3):
            to = f"r{n}@example.com"
            code, text = await client.send_message("app@sender.test", [to], message("Limit", to=to))
            self.assertEqual(code, 250, text)
        await h.sink.wait_for_messages(1)
        held = {"r1@example.com": MessageStatus.HELD, "r2@example.com": MessageStatus.HELD}
        await until(h.reactor, lambda: self.statuses(h) == {"r0@example.com": MessageStatus.SENT, **held})
        (message_row,) = [
            m
            for m in h.installation.query(list_messages, h.installation.server_id)
            if m.rcpt_to == "r1@example.com"
        ]
        (delivery,) = h.installation.query(list_deliveries, message_row.id)
        self.assertEqual(delivery.details, "Message held because send limit (1) has been reached.")
        self.assertEqual(len(h.sink.messages), 1)
        # The application is told: the limit is reached (once, though two did not fit), and each hold.
        await until(h.reactor, lambda: len(self.hooks("MessageHeld")) == 2)
        (exceeded,) = self.hooks("SendLimitExceeded")
        self.assertEqual((exceeded["volume"], exceeded["limit"]), (1, 1))
        self.assertEqual(exceeded["server"]["permalink"], "mail")
        self.assertEqual(exceeded["server"]["organization"], "acme")

        h.installation.query(
            set_send_limit, h.installation.server_id, None, None, SendLimitAction.HOLD, time.time()
        )
        await h.sink.wait_for_messages(3)
        await until(h.reactor, lambda: set(self.statuses(h).values()) == {MessageStatus.SENT})

"""``messages/message`` after delivery: bodies from the raw messages kept in SQL, Postal's purged answer
once retention has deleted them. Real Redis (queue, event stream) and SQLite; the clock is a `task.Clock`."""

from __future__ import annotations

import hashlib
from typing import Any

from admin_api.legacy_api import ruby_base64
from mtad.events.consumer import StreamConsumer
from mtad.events.recorder import Recorder
from mtad.events.schema import MessageDelivery
from mtad.queue.events import EventStream
from mtad.store.raw_messages import RawMessageRetention
from tests.admin_api.support import NOW, LegacyAPITestCase
from tests.admin_api.test_legacy_api import MESSAGE, SEND, send_params

DAY = 86400.0
RAW_EXPANSIONS = ["plain_body", "html_body", "attachments", "headers", "raw_message"]


class DeliveredMessageTests(LegacyAPITestCase):
    async def deliver_and_record(self) -> None:
        """Deliver every queued message (Sent), then let the recorder read the stream: the order in which
        a fast delivery and a recorder a moment behind leave things."""
        for claimed in await self.queue.claim(NOW, 100, 60.0, "deliverer"):
            event = MessageDelivery(
                message_id=claimed.id,
                attempt=1,
                status="Sent",
                output="250 2.0.0 OK",
                details="Message for test@example.com accepted",
                timestamp=NOW,
            )
            self.assertTrue(await self.queue.ack(claimed.id, claimed.lease_token, event))
        stream = EventStream(self.redis, "recorder", "recorder-1", keys=self.keys)
        recorder = StreamConsumer(stream, Recorder(self.database, self.clock, self.queue), self.clock)
        while await recorder.run_once():
            pass

    async def message(self, id: int) -> dict[str, Any]:
        envelope = await self.call(MESSAGE, {"id": id, "_expansions": ["status", *RAW_EXPANSIONS]})
        self.assertEqual(envelope["status"], "success", envelope)
        data: dict[str, Any] = envelope["data"]
        return data

    async def test_raw_message_after_delivery(self) -> None:
        """Every recipient of a delivered message gets the accepted message back, bodies, attachments and
        headers included, read from SQL."""
        sent = await self.call(SEND, send_params())
        entries = sent["data"]["messages"]
        raw = await self.body_of(entries["test@example.com"]["id"])
        await self.deliver_and_record()
        self.assertEqual(await self.queued_ids(), [])
        for entry in entries.values():
            data = await self.message(entry["id"])
            self.assertEqual(data["status"]["status"], "Sent")
            self.assertEqual(data["raw_message"], ruby_base64(raw))
            self.assertEqual(data["plain_body"], "plain text\n")
            self.assertEqual(data["html_body"], "<p>html</p>\n")
            self.assertEqual(
                [(a["filename"], a["hash"]) for a in data["attachments"]],
                [(f"test{i}.txt", hashlib.sha1(f"hello world {i}".encode()).hexdigest()) for i in (1, 2)],
            )
            self.assertEqual(data["headers"]["x-test-header-1"], ["111"])
            self.assertEqual(data["headers"]["subject"], ["Test"])

    async def test_purged_after_retention(self) -> None:
        """Once retention has deleted the raw message, the expansions are what Postal answers for a purged
        one; the message itself and its status stay."""
        sent = await self.call(SEND, send_params(cc=None, bcc=None))
        id = sent["data"]["messages"]["test@example.com"]["id"]
        await self.deliver_and_record()
        retention = RawMessageRetention(self.clock, self.database, 30 * DAY, interval=DAY)
        retention.startService()
        self.addCleanup(retention.stopService)
        self.clock.advance(29 * DAY)
        self.assertIsNotNone((await self.message(id))["plain_body"])
        self.clock.advance(2 * DAY)
        data = await self.message(id)
        self.assertEqual(
            data,
            {
                "id": id,
                "token": sent["data"]["messages"]["test@example.com"]["token"],
                "status": {
                    "status": "Sent",
                    "last_delivery_attempt": NOW,
                    "held": False,
                    "hold_expiry": None,
                },
                "plain_body": None,
                "html_body": None,
                "attachments": [],
                "headers": {},
                "raw_message": "DQoNCg==\n",
            },
        )

"""The ``MessageSuppressed`` webhook: mtad's own event, in the shape of Postal's MessageDeliveryFailed."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mtad.events.schema import MessageSuppressed, decode_entry, encode
from mtad.queue.model import Event
from mtad.webhooks.payloads import webhook_event_for

NOW = 1_700_000_000.0


class PayloadTests(SynchronousTestCase):
    def test_payload(self) -> None:
        """A message.suppressed event (as read back from the stream) fires MessageSuppressed for its
        server, with Postal's message object, MessageDeliveryFailed's fields and the list entry."""
        event = MessageSuppressed(
            message_id=12,
            server_id=3,
            rcpt_to="Bob@example.test",
            source="Complaint",
            reason="spam complaint (feedback type abuse)",
            timestamp=NOW + 5,
            suppressed_at=NOW - 10,
            expires_at=None,
            details="Recipient (Bob@example.test) is on the suppression list ...",
            token="tok12",
            scope="outgoing",
            mail_from="app@mtad.test",
            subject="Hi 😀",
            header_message_id="m12@mtad.test",
            tag="news",
            message_timestamp=NOW,
        )
        event_type, data = encode(event)
        read = decode_entry(Event("1-1", event_type, json.loads(data))).event
        self.assertEqual(read, event)
        fired = webhook_event_for(read)
        assert fired is not None
        self.assertEqual((fired.server_id, fired.event), (3, "MessageSuppressed"))
        self.assertEqual(
            fired.payload,
            {
                "message": {
                    "id": 12,
                    "token": "tok12",
                    "direction": "outgoing",
                    "message_id": "m12@mtad.test",
                    "to": "Bob@example.test",
                    "from": "app@mtad.test",
                    "subject": "Hi 😀",
                    "timestamp": NOW,
                    "spam_status": "NotChecked",
                    "tag": "news",
                },
                "status": "HardFail",
                "details": "Recipient (Bob@example.test) is on the suppression list ...",
                "output": "",
                "sent_with_ssl": False,
                "timestamp": NOW + 5,
                "time": None,
                "suppression": {
                    "source": "Complaint",
                    "reason": "spam complaint (feedback type abuse)",
                    "suppressed_at": NOW - 10,
                    "expires_at": None,
                },
            },
        )

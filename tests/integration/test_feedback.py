"""Delivery feedback end to end: real deliveries produce signed webhooks that django-anymail's Postal view,
unmodified, verifies and parses; bounces sent back to the VERP return path mark the message and fire
MessageBounced; a hard-bounced address is suppressed and not mailed again.

The whole daemon runs (embedded Redis, SQLite, the sink MX on 127.0.0.2, fake DNS); the webhook receiver
is a twisted.web server on 127.0.0.1, allowed by ``webhooks.allowed_networks``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from mtad.mail.verp import decode_return_path
from mtad.store.messages import MessageStatus, find_message, list_deliveries, list_messages
from mtad.store.suppressions import find_suppression
from mtad.store.webhooks import add_webhook
from tests.integration.support import Harness, message, until
from tests.integration.test_postal_clients import configure_django
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tests.webhooks.support import Receiver
from tools.sink import SinkBehaviour

RETURN_PATH = "rp.mtad.test"
BAD = "nobody@example.com"


def dsn(verp: str, original_rcpt: str) -> bytes:
    """An RFC 3464 delivery status notification, as a remote MTA sends it to the return path."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\r\n"
        f"To: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {original_rcpt}\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 The email account that you tried to reach does not exist\r\n"
        "\r\n--B--\r\n"
    ).encode()


class FeedbackTests(unittest.TestCase):
    timeout = 90

    async def start(self, **sink: Any) -> tuple[Harness, Receiver]:
        reactor = real_reactor()
        receiver = Receiver()
        port = receiver.listen(reactor)
        self.addCleanup(lambda: ensureDeferred(receiver.close(reactor)))
        h = Harness(
            reactor,
            fresh_database_url(self, SQLITE),
            sink=SinkBehaviour(**sink),
            config={
                "webhooks": {"allowed_networks": ["127.0.0.0/8"], "retry_delays": [0.5]},
                "domains": {"return_path_domain": RETURN_PATH},
                "events": {"poll_interval": 0.05},
                "suppression": {"lookup_cache_seconds": 0},
            },
        )
        self.addCleanup(lambda: ensureDeferred(h.stop()))
        h.installation.query(
            add_webhook, h.installation.server_id, "app", f"http://127.0.0.1:{port}/hook", time.time()
        )
        await h.start()
        return h, receiver

    def anymail(self, h: Harness, received: Any) -> Any:
        """What django-anymail's Postal tracking view makes of one webhook request, as posted."""
        configure_django()
        from anymail.signals import tracking  # type: ignore[import-untyped]
        from anymail.webhooks.postal import PostalTrackingWebhookView  # type: ignore[import-untyped]
        from django.test import RequestFactory  # type: ignore[import-untyped]

        events: list[Any] = []

        def record(sender: Any, event: Any, esp_name: str, **kwargs: Any) -> None:
            events.append(event)

        tracking.connect(record, weak=False)
        try:
            meta = {
                "HTTP_" + name.upper().replace("-", "_"): value
                for name, value in received.headers.items()
                if name.startswith("x-postal-")
            }
            request = RequestFactory().post(
                "/anymail/postal/tracking/", data=received.body, content_type="application/json", **meta
            )
            assert h.service is not None and h.service.webhook_signer is not None
            key = h.service.webhook_signer.public_key_for_anymail()
            response = PostalTrackingWebhookView.as_view(webhook_key=key)(request)
        finally:
            tracking.disconnect(record)
        self.assertEqual(response.status_code, 200)
        (event,) = events
        return event

    def hooks(self, receiver: Receiver, event: str) -> list[Any]:
        return [r for r in receiver.received if json.loads(r.body)["event"] == event]

    async def test_deliveries_reach_anymail_as_signed_webhooks(self) -> None:
        """A delivered message and a rejected one give MessageSent and MessageDeliveryFailed webhooks,
        signed so that anymail verifies them, with the message's id, recipient and the MX's answer."""
        h, receiver = await self.start(reject_recipients=frozenset({BAD}))
        client = await h.session()
        for to in ("alice@example.com", BAD):
            code, text = await client.send_message("app@sender.test", [to], message("Feedback", to=to))
            self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: len(receiver.received) >= 2, limit=30)
        (sent,) = self.hooks(receiver, "MessageSent")
        (failed,) = self.hooks(receiver, "MessageDeliveryFailed")
        messages = {m.rcpt_to: m for m in h.installation.query(list_messages, h.installation.server_id)}

        delivered = self.anymail(h, sent)
        self.assertEqual(delivered.event_type, "delivered")
        self.assertEqual(delivered.recipient, "alice@example.com")
        self.assertEqual(delivered.message_id, messages["alice@example.com"].id)
        self.assertEqual(delivered.event_id, json.loads(sent.body)["uuid"])
        self.assertIn("250", delivered.mta_response)

        rejected = self.anymail(h, failed)
        self.assertIn(rejected.event_type, ("rejected", "bounced", "failed"))
        self.assertEqual(rejected.recipient, BAD)
        self.assertEqual(rejected.message_id, messages[BAD].id)
        self.assertIn("550", rejected.mta_response)

    async def test_jwks_served(self) -> None:
        """The signing key's public half is at /.well-known/jwks.json, as Postal serves it."""
        h, _ = await self.start()
        agent = Agent(h.reactor)
        response = await agent.request(
            b"GET", f"http://127.0.0.1:{h.port('http')}/.well-known/jwks.json".encode()
        )
        self.assertEqual(response.code, 200)
        document = json.loads(await readBody(response))
        assert h.service is not None and h.service.webhook_signer is not None
        self.assertEqual(document, h.service.webhook_signer.jwks())

    async def test_bounce_to_verp_return_path_marks_message_and_fires_webhook(self) -> None:
        """Delivery uses a VERP return path; a DSN sent there by anyone, unauthenticated, marks the message
        Bounced, records the bounce linked to it, and anymail reads the MessageBounced webhook as a bounce."""
        h, receiver = await self.start()
        client = await h.session()
        code, text = await client.send_message(
            "app@sender.test", ["carol@example.com"], message("Bounce me", to="carol@example.com")
        )
        self.assertEqual(code, 250, text)
        (delivered,) = await h.sink.wait_for_messages(1)
        assert h.service is not None
        match = decode_return_path(h.service.verp_secret, delivered.mail_from, [RETURN_PATH])
        assert match is not None, delivered.mail_from
        (original,) = h.installation.query(list_messages, h.installation.server_id)
        self.assertEqual((match.server_id, match.message_id), (h.installation.server_id, original.id))
        self.assertTrue(delivered.mail_from.endswith("@" + RETURN_PATH))

        bouncer = await h.session(authenticated=False)
        code, text = await bouncer.send_message(
            "", [delivered.mail_from], dsn(delivered.mail_from, "carol@example.com")
        )
        self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: bool(self.hooks(receiver, "MessageBounced")), limit=30)
        row = h.installation.query(find_message, original.id)
        self.assertEqual(row.status, MessageStatus.BOUNCED)
        self.assertIn(
            MessageStatus.BOUNCED, [d.status for d in h.installation.query(list_deliveries, original.id)]
        )
        bounces = [m for m in h.installation.query(list_messages, h.installation.server_id) if m.bounce]
        self.assertEqual([b.bounce_for_id for b in bounces], [original.id])

        (hook,) = self.hooks(receiver, "MessageBounced")
        bounced = self.anymail(h, hook)
        self.assertEqual(bounced.event_type, "bounced")
        self.assertEqual(bounced.message_id, original.id)
        self.assertEqual(bounced.recipient, "carol@example.com")

    async def test_unauthenticated_mail_elsewhere_still_refused(self) -> None:
        """Accepting bounces opens nothing else: a stranger's mail to any other domain is refused."""
        h, _ = await self.start()
        stranger = await h.session(authenticated=False)
        await stranger.command("EHLO stranger.test")
        await stranger.command("MAIL FROM:<x@stranger.test>")
        for rcpt in ("alice@example.com", f"a@sub.{RETURN_PATH}", f"a@{RETURN_PATH}.example.com"):
            code, _ = await stranger.command(f"RCPT TO:<{rcpt}>")
            self.assertGreaterEqual(code, 500, rcpt)
        self.assertEqual(h.sink.messages, [])

    async def test_hard_bounced_address_suppressed_and_not_mailed_again(self) -> None:
        """550 5.1.1 at delivery suppresses the address; the next message to it finishes at once without a
        connection to its MX, with a MessageSuppressed webhook."""
        h, receiver = await self.start(reject_recipients=frozenset({BAD}))
        client = await h.session()
        code, text = await client.send_message("app@sender.test", [BAD], message("First", to=BAD))
        self.assertEqual(code, 250, text)
        server_id = h.installation.server_id
        await until(
            h.reactor, lambda: h.installation.query(find_suppression, server_id, BAD) is not None, limit=30
        )
        sessions = len(h.sink.sessions)
        code, text = await client.send_message("app@sender.test", [BAD], message("Second", to=BAD))
        self.assertEqual(code, 250, text)
        await until(h.reactor, lambda: bool(self.hooks(receiver, "MessageSuppressed")), limit=30)
        second = [m for m in h.installation.query(list_messages, server_id) if m.subject == "Second"]
        self.assertEqual([m.status for m in second], [MessageStatus.HARD_FAIL])
        (attempt,) = h.installation.query(list_deliveries, second[0].id)
        self.assertIn("suppress", (attempt.details or "").lower())
        self.assertEqual(len(h.sink.sessions), sessions)

"""Every webhook event mtad can send, as django-anymail's Postal tracking view (unmodified) reads it.

One event of each kind goes the whole way a webhook goes: the ``webhooks`` consumer's handler turns the
stream events into requests in the Redis queue (tracking's ``MessageLinkClicked`` and ``MessageLoaded``
are queued from their builders, as tracking will queue them), the dispatcher claims them and the real
sender POSTs them, signed by mtad's signing key (`mtad.webhooks.signing.WebhookSigner`, made as the daemon
makes it), to a receiver on 127.0.0.1. Each request received, headers and exact body, is then handed to
``anymail.webhooks.postal.PostalTrackingWebhookView`` with ``webhook_key`` set to the key's public half,
and the test checks the `AnymailTrackingEvent` it makes: its type and what it says of the message.

Real Redis, SQLite and loopback HTTP; the trigger's and dispatcher's clock is a `task.Clock`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater

from mtad.events.schema import (
    DomainDNSError,
    MessageBounced,
    MessageDelivery,
    MessageSuppressed,
    Received,
    SendLimitApproaching,
    SendLimitExceeded,
    ServerSuspended,
    SpamComplaint,
    server_fields,
)
from mtad.store import organizations, servers
from mtad.store.db import make_engine
from mtad.store.messages import Message, MessageStatus, Scope
from mtad.store.migrate import upgrade_schema
from mtad.store.webhooks import WEBHOOK_EVENTS, add_webhook, list_webhook_requests
from mtad.webhooks.dispatcher import DispatchSettings, WebhookDispatcher
from mtad.webhooks.payloads import WebhookEvent, envelope, link_clicked, message_loaded, request_uuid
from mtad.webhooks.queue import NewRequest, WebhookQueue
from mtad.webhooks.sender import WebhookSender, guarded_agent
from mtad.webhooks.signing import WebhookSigner
from mtad.webhooks.trigger import WebhookTrigger
from tests.integration.test_postal_clients import configure_django
from tests.outbound.support import until
from tests.redis_server import RedisTestCase, real_reactor
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url
from tests.webhooks.support import LOOPBACK, FixedResolver, Receiver

NOW = 1_700_000_000.0
MESSAGE = {
    "message_id": 42,
    "token": "AbCdEf123456",
    "scope": "outgoing",
    "mail_from": "app@example.org",
    "rcpt_to": "bob@example.com",
    "subject": "Grüße 👋",
    "header_message_id": "m42@example.org",
    "tag": "welcome",
    "message_timestamp": NOW - 120,
}
BOUNCE = {
    "bounce_id": 43,
    "bounce_token": "BoUnCe654321",
    "bounce_mail_from": "",
    "bounce_rcpt_to": "bounces+x@rp.mtad.test",
    "bounce_subject": "Undelivered Mail Returned to Sender",
    "bounce_header_message_id": "dsn43@mx.example.com",
    "bounce_timestamp": NOW - 30,
}


def anymail_events(received: Any, key: str) -> list[Any]:
    """What django-anymail's Postal tracking view makes of one request, as it was received."""
    configure_django()
    from anymail.signals import tracking  # type: ignore[import-untyped]
    from anymail.webhooks.postal import PostalTrackingWebhookView  # type: ignore[import-untyped]
    from django.test import RequestFactory  # type: ignore[import-untyped]

    events: list[Any] = []

    def record(sender: Any, event: Any, esp_name: str, **kwargs: Any) -> None:
        events.append(event)

    meta = {
        "HTTP_" + name.upper().replace("-", "_"): value
        for name, value in received.headers.items()
        if name.startswith("x-postal-")
    }
    request = RequestFactory().post(
        "/anymail/postal/tracking/",
        data=received.body,
        content_type=received.headers["content-type"],
        **meta,
    )
    tracking.connect(record, weak=False)
    try:
        response = PostalTrackingWebhookView.as_view(webhook_key=key)(request)
    finally:
        tracking.disconnect(record)
    assert response.status_code == 200, response.status_code
    return events


class AnymailEventTests(RedisTestCase):
    timeout = 60

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.reactor = real_reactor()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.receiver = Receiver()
        port = self.receiver.listen(self.reactor)
        self.addCleanup(lambda: ensureDeferred(self.receiver.close(self.reactor)))
        with self.engine.begin() as conn:
            organizations.create_organization(conn, "Acme", NOW)
            self.server = servers.create_server(conn, "acme", "Main", NOW)
            self.webhook = add_webhook(
                conn, self.server.id, "app", f"http://receiver.test:{port}/anymail/postal/tracking/", NOW
            )
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = WebhookQueue(self.redis, self.keys)
        # The daemon's key: 2048-bit RSA, made on first start in the data directory.
        self.signer = WebhookSigner.load_or_create(Path(self.mktemp()), rsa_bits=2048)
        agent = guarded_agent(self.reactor, FixedResolver({"receiver.test": ["127.0.0.1"]}), LOOPBACK)
        self.dispatcher = WebhookDispatcher(
            self.clock,
            self.queue,
            self.database,
            WebhookSender(agent, self.clock, self.signer),
            DispatchSettings(),
        )

    def stream_events(self) -> list[Received]:
        """One stream event of each kind that fires a webhook, of the server."""
        sid = self.server.id
        delivery = {**MESSAGE, "server_id": sid, "attempt": 1, "timestamp": NOW - 10, "sent_with_ssl": True}
        statuses = {
            "Sent": ("Message for bob@example.com accepted by mx.example.com (192.0.2.25)", "250 2.0.0 OK"),
            "SoftFail": ("Temporary failure at mx.example.com", "451 4.7.1 Try again later"),
            "HardFail": ("Permanent failure at mx.example.com", "550 5.1.1 No such user"),
            "Held": ("Held by the server's send limit", None),
        }
        events: list[Any] = [
            MessageDelivery(status=status, details=details, output=output, time=0.25, **delivery)
            for status, (details, output) in statuses.items()
        ]
        events += [
            MessageBounced(
                **MESSAGE,
                **BOUNCE,
                server_id=sid,
                hard=True,
                category="bad_mailbox",
                status="5.1.1",
                diagnostic="smtp; 550 5.1.1 No such user",
                remote_mta="mx.example.com",
                timestamp=NOW - 20,
            ),
            SpamComplaint(
                **MESSAGE,
                **BOUNCE,
                server_id=sid,
                feedback_type="abuse",
                user_agent="Yahoo!-Mail-Feedback/2.0",
                timestamp=NOW - 20,
            ),
            MessageSuppressed(
                **MESSAGE,
                server_id=sid,
                source="HardBounce",
                reason="550 5.1.1 No such user",
                details="Recipient bob@example.com is on the suppression list (HardBounce)",
                suppressed_at=NOW - 86400,
                expires_at=NOW + 29 * 86400,
                timestamp=NOW - 10,
            ),
        ]
        fields = server_fields(self.server)
        events += [
            SendLimitApproaching(**fields, volume=91, limit=100, period=3600, timestamp=NOW - 5),
            SendLimitExceeded(**fields, volume=100, limit=100, period=3600, action="Hold", timestamp=NOW - 5),
            DomainDNSError(
                **fields,
                domain="example.org",
                domain_uuid="0d9f8e7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c",
                dns_checked_at=NOW - 60,
                spf_status="Missing",
                spf_error="No SPF record exists for this domain",
                dkim_status="OK",
                mx_status="OK",
                return_path_status="OK",
                timestamp=NOW - 60,
            ),
            ServerSuspended(
                **fields,
                kind="bounce_rate",
                rate=0.125,
                threshold=0.1,
                volume=400,
                window=86400,
                reason="Bounce rate 12.5 % over 10 %",
                timestamp=NOW - 5,
            ),
        ]
        return [Received(f"{int(NOW * 1000)}-{n}", event) for n, event in enumerate(events)]

    def tracked(self) -> list[WebhookEvent]:
        """The tracking events, from the message as the store holds it."""
        message = Message(
            id=42,
            token="AbCdEf123456",
            server_id=self.server.id,
            scope=Scope.OUTGOING,
            rcpt_to="bob@example.com",
            mail_from="app@example.org",
            subject="Grüße 👋",
            message_id="m42@example.org",
            size=1234,
            status=MessageStatus.SENT,
            held=False,
            hold_expiry=None,
            last_delivery_attempt=NOW - 10,
            tag="welcome",
            timestamp=NOW - 120,
        )
        return [
            link_clicked(
                message,
                url="https://example.org/offer?a=1",
                token="Lk3jH8sPq2Zx9Wv1",
                ip_address="192.0.2.7",
                user_agent="Mozilla/5.0 (X11)",
            ),
            message_loaded(message, ip_address="192.0.2.8", user_agent="Mozilla/5.0 (Android)"),
        ]

    async def queue_tracked(self) -> None:
        requests = []
        for n, fired in enumerate(self.tracked()):
            uuid = request_uuid(f"track-{n}", self.webhook.id)
            requests.append(
                NewRequest(
                    uuid=uuid,
                    server_id=fired.server_id,
                    webhook_id=self.webhook.id,
                    url=self.webhook.url,
                    event=fired.event,
                    body=envelope(fired.event, NOW, uuid, fired.payload),
                    created_at=NOW,
                )
            )
        await self.queue.add(requests, NOW)

    async def deliver_everything(self) -> dict[str, Any]:
        """Trigger, queue, dispatch: every request as the receiver got it, by event name."""
        await WebhookTrigger(self.database, self.queue, self.clock).handle(self.stream_events())
        await self.queue_tracked()
        expected = len(WEBHOOK_EVENTS)
        # One receiver: the dispatcher has at most its per-receiver cap in flight there at a time.
        claimed = 0

        async def claim() -> bool:
            nonlocal claimed
            claimed += await self.dispatcher.run_once()
            return claimed == expected

        while not await claim():
            await deferLater(self.reactor, 0.01)
        await until(self.reactor, lambda: len(self.receiver.received) == expected, limit=20)
        await until(self.reactor, lambda: len(self.logged()) == expected, limit=20)
        by_event = {json.loads(r.body)["event"]: r for r in self.receiver.received}
        self.assertEqual(len(by_event), expected)
        return by_event

    def logged(self) -> list[Any]:
        with self.engine.begin() as conn:
            return list_webhook_requests(conn, self.server.id)

    async def test_every_event_verified_and_parsed(self) -> None:
        """Each of mtad's webhook events (every name a webhook can be sent) arrives signed so that anymail
        verifies it with the public key, and anymail gives it the right type: Postal's statuses as
        delivered/deferred/failed/queued, MessageBounced as a bounce of the original message,
        MessageLinkClicked as a click with its URL; the events with no message (DNS, send limits,
        suspension) and MessageLoaded, for which anymail has no Postal mapping, as "unknown" without a
        message or recipient."""
        received = await self.deliver_everything()
        self.assertEqual(set(received), set(WEBHOOK_EVENTS))
        key = self.signer.public_key_for_anymail()
        parsed = {}
        for name, request in received.items():
            self.assertEqual(request.headers["x-postal-signature-kid"], self.signer.kid)
            (parsed[name],) = anymail_events(request, key)
        types = {name: event.event_type for name, event in parsed.items()}
        self.assertEqual(
            types,
            {
                "MessageSent": "delivered",
                "MessageDelayed": "deferred",
                "MessageDeliveryFailed": "failed",
                "MessageHeld": "queued",
                "MessageBounced": "bounced",
                "MessageLinkClicked": "clicked",
                "MessageLoaded": "unknown",
                "DomainDNSError": "unknown",
                "SendLimitApproaching": "unknown",
                "SendLimitExceeded": "unknown",
                # MessageSuppressed carries MessageDeliveryFailed's fields (status HardFail).
                "MessageSuppressed": "failed",
                # anymail takes any payload with a "bounce" key for a bounce; SpamComplaint has one (the
                # feedback report), and anymail's Postal view has no way to say "complained".
                "SpamComplaint": "bounced",
                "ServerSuspended": "unknown",
            },
        )
        for name in (
            "MessageSent",
            "MessageDelayed",
            "MessageDeliveryFailed",
            "MessageHeld",
            "MessageBounced",
            "MessageLinkClicked",
            "MessageLoaded",
            "MessageSuppressed",
            "SpamComplaint",
        ):
            event = parsed[name]
            self.assertEqual(
                (event.message_id, event.recipient, event.tags), (42, "bob@example.com", ["welcome"]), name
            )
        for name in ("DomainDNSError", "SendLimitApproaching", "SendLimitExceeded", "ServerSuspended"):
            event = parsed[name]
            self.assertEqual((event.message_id, event.recipient, event.tags), (None, None, [None]), name)
        for name, event in parsed.items():
            body = json.loads(received[name].body)
            self.assertEqual(event.event_id, body["uuid"], name)
            self.assertEqual(event.timestamp, datetime.fromtimestamp(int(NOW), tz=UTC), name)
            self.assertEqual(event.esp_event, body, name)
        self.assertEqual(parsed["MessageSent"].mta_response, "250 2.0.0 OK")
        self.assertEqual(
            parsed["MessageSent"].description,
            "Message for bob@example.com accepted by mx.example.com (192.0.2.25)",
        )
        self.assertEqual(parsed["MessageDeliveryFailed"].mta_response, "550 5.1.1 No such user")
        self.assertEqual(parsed["MessageBounced"].reject_reason, "bounced")
        self.assertIn("suppression list", parsed["MessageSuppressed"].description)
        clicked = parsed["MessageLinkClicked"]
        self.assertEqual(
            (clicked.click_url, clicked.user_agent), ("https://example.org/offer?a=1", "Mozilla/5.0 (X11)")
        )
        self.assertEqual(parsed["MessageLoaded"].user_agent, "Mozilla/5.0 (Android)")

    async def test_tampered_body_or_other_key_refused(self) -> None:
        """The signature covers the exact body: anymail refuses a request whose body was changed by one
        byte, and one checked against another installation's key."""
        from anymail.exceptions import AnymailWebhookValidationFailure  # type: ignore[import-untyped]

        received = await self.deliver_everything()
        request = received["DomainDNSError"]
        key = self.signer.public_key_for_anymail()
        self.assertEqual(len(anymail_events(request, key)), 1)
        changed = type(request)(
            request.method,
            request.path,
            request.headers,
            request.body.replace(b"example.org", b"example.net"),
        )
        self.assertNotEqual(changed.body, request.body)
        with self.assertRaises(AnymailWebhookValidationFailure):
            anymail_events(changed, key)
        other = WebhookSigner.load_or_create(Path(self.mktemp()), rsa_bits=2048)
        with self.assertRaises(AnymailWebhookValidationFailure):
            anymail_events(request, other.public_key_for_anymail())

"""Server-level and tracking webhooks: Postal's ``SendLimitApproaching``, ``SendLimitExceeded`` and
``DomainDNSError`` payloads (``Server#send_limit_warning``, ``HasDNSChecks#check_dns``), mtad's own
``ServerSuspended``, and Postal's ``MessageLinkClicked`` / ``MessageLoaded``, compared as the exact JSON
bytes POSTed (key order included); and which webhooks the trigger queues them for (real Redis, SQLite)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtad.events.schema import (
    DomainDNSError,
    Received,
    SendLimitApproaching,
    SendLimitExceeded,
    ServerSuspended,
    server_fields,
)
from mtad.store import organizations, servers
from mtad.store.db import make_engine
from mtad.store.messages import Message, MessageStatus, Scope
from mtad.store.migrate import upgrade_schema
from mtad.store.webhooks import WEBHOOK_EVENTS, add_webhook, check_events
from mtad.webhooks.payloads import envelope, link_clicked, message_loaded, webhook_event_for
from mtad.webhooks.queue import WebhookQueue
from mtad.webhooks.trigger import WebhookTrigger
from tests.redis_server import RedisTestCase
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0
SERVER_UUID = "5b0c4a1e-2f7d-4c3a-9e8b-1a2b3c4d5e6f"
DOMAIN_UUID = "0d9f8e7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c"
UUID = "00000000-0000-4000-8000-000000000001"
SERVER = {
    "server_id": 7,
    "server_uuid": SERVER_UUID,
    "server_name": "Main mail",
    "server_permalink": "main-mail",
    "organization_permalink": "acme",
}
#: ``Server#webhook_hash``, as Ruby's JSON writes it: uuid, name, permalink, organization.
SERVER_JSON = (
    '{"uuid":"5b0c4a1e-2f7d-4c3a-9e8b-1a2b3c4d5e6f","name":"Main mail","permalink":"main-mail",'
    '"organization":"acme"}'
)


def body(event: Any, timestamp: float = NOW + 1) -> str:
    """The text POSTed for ``event``'s webhook."""
    fired = webhook_event_for(event)
    assert fired is not None
    return envelope(fired.event, timestamp, UUID, fired.payload).decode("utf-8")


def approaching(**changes: Any) -> SendLimitApproaching:
    values: dict[str, Any] = {**SERVER, "volume": 91, "limit": 100, "period": 3600, "timestamp": NOW}
    values.update(changes)
    return SendLimitApproaching(**values)


def exceeded(**changes: Any) -> SendLimitExceeded:
    values: dict[str, Any] = {
        **SERVER,
        "volume": 100,
        "limit": 100,
        "period": 3600,
        "action": "Refuse",
        "timestamp": NOW,
    }
    values.update(changes)
    return SendLimitExceeded(**values)


def dns_error(**changes: Any) -> DomainDNSError:
    values: dict[str, Any] = {
        **SERVER,
        "domain": "example.com",
        "domain_uuid": DOMAIN_UUID,
        "dns_checked_at": NOW - 0.25,
        "spf_status": "OK",
        "spf_error": None,
        "dkim_status": "Missing",
        "dkim_error": "No TXT records were returned for postal-abc123._domainkey.example.com",
        "mx_status": "Missing",
        "mx_error": "There are no MX records for example.com",
        "return_path_status": "Invalid",
        "return_path_error": "There is a CNAME record at psrp.example.com but it points to x.test which "
        "is incorrect. It should point to rp.mtad.test.",
        "timestamp": NOW,
    }
    values.update(changes)
    return DomainDNSError(**values)


def suspended(**changes: Any) -> ServerSuspended:
    values: dict[str, Any] = {
        **SERVER,
        "kind": "bounce_rate",
        "rate": 0.125,
        "threshold": 0.1,
        "volume": 400,
        "window": 86400,
        "reason": "Bounce rate 12.5 % of 400 messages in 24 hours is over 10 %",
        "timestamp": NOW,
    }
    values.update(changes)
    return ServerSuspended(**values)


def stored_message(**changes: Any) -> Message:
    values: dict[str, Any] = {
        "id": 42,
        "token": "AbCdEf123456",
        "server_id": 7,
        "scope": Scope.OUTGOING,
        "rcpt_to": "bob@example.com",
        "mail_from": "app@example.org",
        "subject": "Grüße 👋",
        "message_id": "m42@example.org",
        "size": 1234,
        "status": MessageStatus.SENT,
        "held": False,
        "hold_expiry": None,
        "last_delivery_attempt": NOW - 60,
        "tag": "welcome",
        "timestamp": NOW - 120,
    }
    values.update(changes)
    return Message(**values)


#: Postal's message object of `stored_message`.
MESSAGE_JSON = (
    '{"id":42,"token":"AbCdEf123456","direction":"outgoing","message_id":"m42@example.org",'
    '"to":"bob@example.com","from":"app@example.org","subject":"Grüße 👋","timestamp":1699999880.0,'
    '"spam_status":"NotChecked","tag":"welcome"}'
)


class SendLimitPayloadTests(SynchronousTestCase):
    def test_approaching_is_postals(self) -> None:
        """SendLimitApproaching's body is Postal's envelope around exactly ``{server, volume, limit}``:
        the server object's four keys in Postal's order, integers for volume and limit."""
        self.assertEqual(
            body(approaching()),
            '{"event":"SendLimitApproaching","timestamp":1700000001.0,"payload":{"server":'
            + SERVER_JSON
            + ',"volume":91,"limit":100},"uuid":"00000000-0000-4000-8000-000000000001"}',
        )
        fired = webhook_event_for(approaching())
        assert fired is not None
        self.assertEqual((fired.server_id, fired.event), (7, "SendLimitApproaching"))

    def test_exceeded_is_postals(self) -> None:
        """SendLimitExceeded has the same shape: the window's period and the Hold/Refuse action, which
        Postal does not send, stay out."""
        self.assertEqual(
            body(exceeded(volume=140)),
            '{"event":"SendLimitExceeded","timestamp":1700000001.0,"payload":{"server":'
            + SERVER_JSON
            + ',"volume":140,"limit":100},"uuid":"00000000-0000-4000-8000-000000000001"}',
        )

    def test_server_object_of_a_stored_server(self) -> None:
        """``server_fields`` of a stored server gives the server object its uuid, name, permalink and the
        organization's permalink."""
        engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(engine.dispose)
        upgrade_schema(engine)
        with engine.begin() as conn:
            org = organizations.create_organization(conn, "Acme Corp", NOW)
            server = servers.create_server(conn, org.permalink, "Main", NOW)
        fired = webhook_event_for(approaching(**server_fields(server)))
        assert fired is not None
        self.assertEqual(fired.server_id, server.id)
        self.assertEqual(
            fired.payload["server"],
            {
                "uuid": server.uuid,
                "name": "Main",
                "permalink": server.permalink,
                "organization": org.permalink,
            },
        )
        self.assertEqual(len(server.uuid), 36)


class DNSErrorPayloadTests(SynchronousTestCase):
    def test_dns_error_is_postals(self) -> None:
        """DomainDNSError: server, domain, the domain's uuid, dns_checked_at as a float, then the four
        records' status and error, in Postal's order."""
        self.assertEqual(
            body(dns_error()),
            '{"event":"DomainDNSError","timestamp":1700000001.0,"payload":{"server":'
            + SERVER_JSON
            + ',"domain":"example.com","uuid":"0d9f8e7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c",'
            '"dns_checked_at":1699999999.75,"spf_status":"OK","spf_error":null,'
            '"dkim_status":"Missing","dkim_error":"No TXT records were returned for '
            'postal-abc123._domainkey.example.com","mx_status":"Missing",'
            '"mx_error":"There are no MX records for example.com","return_path_status":"Invalid",'
            '"return_path_error":"There is a CNAME record at psrp.example.com but it points to x.test '
            'which is incorrect. It should point to rp.mtad.test."},'
            '"uuid":"00000000-0000-4000-8000-000000000001"}',
        )

    def test_never_checked_records_are_null(self) -> None:
        """A record never checked has a null status and error (Ruby's nil), not a missing key."""
        payload = json.loads(body(dns_error(mx_status=None, mx_error=None)))["payload"]
        self.assertEqual((payload["mx_status"], payload["mx_error"]), (None, None))
        self.assertEqual(
            list(payload),
            [
                "server",
                "domain",
                "uuid",
                "dns_checked_at",
                "spf_status",
                "spf_error",
                "dkim_status",
                "dkim_error",
                "mx_status",
                "mx_error",
                "return_path_status",
                "return_path_error",
            ],
        )


class SuspendedPayloadTests(SynchronousTestCase):
    def test_suspended_payload(self) -> None:
        """ServerSuspended (mtad's own) names the server as the send-limit events do, then why."""
        self.assertEqual(
            body(suspended(kind="complaint_rate")),
            '{"event":"ServerSuspended","timestamp":1700000001.0,"payload":{"server":'
            + SERVER_JSON
            + ',"kind":"complaint_rate","reason":"Bounce rate 12.5 % of 400 messages in 24 hours is over '
            '10 %","rate":0.125,"threshold":0.1,"volume":400,"window":86400,"timestamp":1700000000.0},'
            '"uuid":"00000000-0000-4000-8000-000000000001"}',
        )

    def test_every_fired_event_can_be_chosen(self) -> None:
        """Every event a webhook can be sent is a known event name a webhook may choose."""
        fired = {
            getattr(webhook_event_for(e), "event", None)
            for e in (approaching(), exceeded(), dns_error(), suspended())
        }
        self.assertEqual(
            fired, {"SendLimitApproaching", "SendLimitExceeded", "DomainDNSError", "ServerSuspended"}
        )
        self.assertEqual(check_events(sorted(fired)), frozenset(fired))
        self.assertEqual(WEBHOOK_EVENTS[-1], "ServerSuspended")


class TrackingPayloadTests(SynchronousTestCase):
    def test_link_clicked_is_postals(self) -> None:
        """MessageLinkClicked from a stored message: ``{message, url, token, ip_address, user_agent}``."""
        fired = link_clicked(
            stored_message(),
            url="https://example.org/offer?a=1&b=2",
            token="Lk3jH8sPq2Zx9Wv1",
            ip_address="192.0.2.7",
            user_agent="Mozilla/5.0",
        )
        self.assertEqual((fired.server_id, fired.event), (7, "MessageLinkClicked"))
        self.assertEqual(
            envelope(fired.event, NOW + 1, UUID, fired.payload).decode("utf-8"),
            '{"event":"MessageLinkClicked","timestamp":1700000001.0,"payload":{"message":'
            + MESSAGE_JSON
            + ',"url":"https://example.org/offer?a=1&b=2","token":"Lk3jH8sPq2Zx9Wv1",'
            '"ip_address":"192.0.2.7","user_agent":"Mozilla/5.0"},'
            '"uuid":"00000000-0000-4000-8000-000000000001"}',
        )

    def test_message_loaded_is_postals(self) -> None:
        """MessageLoaded: ``{message, ip_address, user_agent}``; a request without a User-Agent gives
        null, as Rack's ``user_agent`` does."""
        fired = message_loaded(stored_message(), ip_address="2001:db8::1", user_agent=None)
        self.assertEqual((fired.server_id, fired.event), (7, "MessageLoaded"))
        self.assertEqual(
            envelope(fired.event, NOW + 1, UUID, fired.payload).decode("utf-8"),
            '{"event":"MessageLoaded","timestamp":1700000001.0,"payload":{"message":'
            + MESSAGE_JSON
            + ',"ip_address":"2001:db8::1","user_agent":null},'
            '"uuid":"00000000-0000-4000-8000-000000000001"}',
        )


class ServerEventTriggerTests(RedisTestCase):
    """The ``webhooks`` group queues server-level events for the webhooks of the server they name."""

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        with self.engine.begin() as conn:
            organizations.create_organization(conn, "Acme", NOW)
            self.server = servers.create_server(conn, "acme", "Main", NOW)
            self.other = servers.create_server(conn, "acme", "Other", NOW)
            self.all = add_webhook(conn, self.server.id, "all", "https://hooks.example.com/all", NOW)
            self.limits = add_webhook(
                conn,
                self.server.id,
                "limits",
                "https://hooks.example.com/limits",
                NOW,
                events=["SendLimitExceeded", "ServerSuspended"],
            )
            self.sent = add_webhook(
                conn, self.server.id, "sent", "https://hooks.example.com/sent", NOW, events=["MessageSent"]
            )
            add_webhook(conn, self.other.id, "other", "https://hooks.example.com/other", NOW)
        self.queue = WebhookQueue(self.redis, self.keys)
        self.trigger = WebhookTrigger(SynchronousDatabase(self.engine), self.queue, self.clock)

    async def queued(self) -> list[tuple[str, str]]:
        claimed = await self.queue.claim(NOW + 10, 100, 60)
        return sorted((r.event, r.url) for r in claimed)

    async def test_server_events_reach_the_servers_webhooks(self) -> None:
        """Each server-level event goes to the server's all-events webhook and to a webhook that chose it
        (mtad lets one choose the send-limit events), never to one that chose other events only, nor to
        another server's; the body is the payload the event makes."""
        fields = server_fields(self.server)
        batch = [
            Received("5-0", approaching(**fields)),
            Received("5-1", exceeded(**fields)),
            Received("5-2", dns_error(**fields)),
            Received("5-3", suspended(**fields)),
        ]
        await self.trigger.handle(batch)
        await self.trigger.handle(batch)  # at least once: nothing queued twice
        self.assertEqual(
            await self.queued(),
            [
                ("DomainDNSError", self.all.url),
                ("SendLimitApproaching", self.all.url),
                ("SendLimitExceeded", self.all.url),
                ("SendLimitExceeded", self.limits.url),
                ("ServerSuspended", self.all.url),
                ("ServerSuspended", self.limits.url),
            ],
        )

    async def test_body_is_the_events_payload(self) -> None:
        """The queued body is the envelope around the event's payload, stamped with the trigger's time."""
        await self.trigger.handle([Received("6-0", dns_error(**server_fields(self.server)))])
        (request,) = await self.queue.claim(NOW + 10, 100, 60)
        sent = json.loads(request.body)
        self.assertEqual(list(sent), ["event", "timestamp", "payload", "uuid"])
        self.assertEqual(
            (sent["event"], sent["timestamp"], sent["uuid"]), ("DomainDNSError", NOW, request.uuid)
        )
        self.assertEqual(sent["payload"]["server"]["uuid"], self.server.uuid)
        self.assertEqual(sent["payload"]["uuid"], DOMAIN_UUID)

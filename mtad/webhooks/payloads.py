"""Postal's webhook events and payloads, made from mtad's typed events (wire-exact).

Postal fires one webhook event per delivery row (``Postal::MessageDB::Delivery#webhook_event``): ``Sent``
→ ``MessageSent``, ``SoftFail`` → ``MessageDelayed`` (every retry), ``HardFail`` →
``MessageDeliveryFailed``, ``Held`` → ``MessageHeld``; other statuses fire nothing. The payload is the
delivery's ``webhook_hash`` around the message's (``Postal::MessageDB::Message#webhook_hash``), and the
body POSTed is the envelope ``{"event", "timestamp", "payload", "uuid"}`` (``WebhookDeliveryService``),
in that key order. Field for field as Postal 3.3 writes them; see ``../shared/reference/postal.md`` §2.3.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from typing import Any

import attrs

from mtad.events.schema import AnyEvent, MessageDelivery

#: Delivery status → Postal's webhook event.
DELIVERY_EVENTS = {
    "Sent": "MessageSent",
    "SoftFail": "MessageDelayed",
    "HardFail": "MessageDeliveryFailed",
    "Held": "MessageHeld",
}

#: Postal's ``output`` is ``output.to_s.scrub.truncate(512)``: Ruby's truncate keeps the result at 512
#: characters, the last three being "...".
OUTPUT_LIMIT = 512

#: Namespace of the uuids of webhook requests (uuid5 of the stream event id and the webhook's id), so that
#: an event handled twice (at least once) gives the same request uuid, which receivers deduplicate on.
REQUEST_NAMESPACE = uuid_module.UUID("8f3b9a0e-5f43-4c8e-9a43-3f8d4e0b2c71")


@attrs.frozen
class WebhookEvent:
    """What one mtad event means to a server's webhooks: Postal's event name and payload."""

    server_id: int
    event: str
    payload: dict[str, Any]


def truncate(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Ruby's ``String#truncate(limit)``: at most ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def message_hash(event: MessageDelivery) -> dict[str, Any]:
    """Postal's message object (``Message#webhook_hash``) for the message a delivery event names.

    ``to``/``from`` are the envelope's; ``message_id`` is the Message-ID field without angle brackets;
    ``spam_status`` is ``NotChecked`` until inbound spam checking sets it (outgoing mail is not checked).
    """
    return {
        "id": event.message_id,
        "token": event.token,
        "direction": event.scope,
        "message_id": event.header_message_id,
        "to": event.rcpt_to,
        "from": event.mail_from,
        "subject": event.subject,
        "timestamp": event.message_timestamp,
        "spam_status": "NotChecked",
        "tag": event.tag,
    }


def webhook_event_for(event: AnyEvent) -> WebhookEvent | None:
    """The webhook event ``event`` fires, or None when it fires none (queued, HoldCancelled, ...)."""
    if isinstance(event, MessageDelivery):
        name = DELIVERY_EVENTS.get(event.status)
        if name is None or event.server_id is None:
            return None
        payload = {
            "message": message_hash(event),
            "status": event.status,
            "details": event.details,
            "output": truncate(event.output or ""),
            "sent_with_ssl": event.sent_with_ssl,
            "timestamp": event.timestamp,
            "time": event.time,
        }
        return WebhookEvent(event.server_id, name, payload)
    return None


def request_uuid(stream_id: str, webhook_id: int) -> str:
    """The request's uuid: the same for the same event and webhook, however often the event is handled."""
    return str(uuid_module.uuid5(REQUEST_NAMESPACE, f"{stream_id}/{webhook_id}"))


def envelope(event: str, timestamp: float, uuid: str, payload: dict[str, Any]) -> bytes:
    """The body POSTed: Postal's envelope, its keys in Postal's order, UTF-8 JSON."""
    body = {"event": event, "timestamp": timestamp, "payload": payload, "uuid": uuid}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

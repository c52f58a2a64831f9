"""Postal's webhook events and payloads, made from mtad's typed events (wire-exact).

Postal fires one webhook event per delivery row (``Postal::MessageDB::Delivery#webhook_event``): ``Sent``
→ ``MessageSent``, ``SoftFail`` → ``MessageDelayed`` (every retry), ``HardFail`` →
``MessageDeliveryFailed``, ``Held`` → ``MessageHeld``; other statuses fire nothing. The payload is the
delivery's ``webhook_hash`` around the message's (``Postal::MessageDB::Message#webhook_hash``), and the
body POSTed is the envelope ``{"event", "timestamp", "payload", "uuid"}`` (``WebhookDeliveryService``),
in that key order. Field for field as Postal 3.3 writes them; see ``../shared/reference/postal.md`` §2.3.

``MessageSuppressed`` is mtad's own (Postal holds a message to a suppressed address, silently, and has
no such event). A suppressed message also fires ``MessageDeliveryFailed`` (its delivery is a
``HardFail``), so Postal clients see it fail; ``MessageSuppressed`` says why, in the same shape, so one
parser reads both: ``{"message": {...}, "status": "HardFail", "details": "Recipient (...) is on the
suppression list ...", "output": "", "sent_with_ssl": false, "timestamp": ..., "time": null,
"suppression": {"source": "HardBounce", "reason": "550 5.1.1 ...", "suppressed_at": ...,
"expires_at": ... or null}}`` (`suppressed_payload`); ``source`` is one of ``HardBounce``,
``SoftFailures``, ``Complaint``, ``Manual``, ``Unsubscribe``; times are Unix seconds, ``expires_at``
null for an entry that never expires.

``MessageBounced`` is Postal's (``Message#bounce!``): ``{"original_message": {...}, "bounce": {...}}``,
the bounce being the report as recorded, an incoming message (`bounced_payload`). ``SpamComplaint`` is
mtad's own (Postal reads no feedback reports): ``{"message": {...}, "feedback_type": "abuse",
"user_agent": ..., "source_ip": ..., "timestamp": ..., "bounce": {...} or null}`` (`complaint_payload`).

Server-level events name the server with Postal's server object (``Server#webhook_hash``): ``{"uuid",
"name", "permalink", "organization"}`` (`server_hash`; ``organization`` is the organization's permalink).

- ``SendLimitApproaching`` / ``SendLimitExceeded`` are Postal's (``Server#send_limit_warning``):
  ``{"server": {...}, "volume": 91, "limit": 100}`` exactly (`send_limit_payload`); the window's length
  and the Hold/Refuse action, which Postal has no words for, stay out. Postal's UI cannot choose them for
  a webhook (they are not in ``WebhookEvent::EVENTS``), so there they reach only all-events webhooks;
  mtad also lets a webhook choose them (``mtad.store.webhooks.WEBHOOK_EVENTS``). Postal's own trigger
  query delivers to any webhook with a matching choice, and a webhook set up as Postal allows (all events,
  or a choice of Postal's selectable events) gets exactly what Postal sends it.
- ``DomainDNSError`` is Postal's (``HasDNSChecks#check_dns(:auto)``, server-owned domains only):
  ``{"server": {...}, "domain": "example.com", "uuid": <domain uuid>, "dns_checked_at": <float>,
  "spf_status", "spf_error", "dkim_status", "dkim_error", "mx_status", "mx_error",
  "return_path_status", "return_path_error"}`` in that order (`dns_error_payload`); statuses are ``OK``,
  ``Missing``, ``Invalid`` or null (never checked), errors a sentence or null.
- ``ServerSuspended`` is mtad's own (Postal never suspends a server by itself): a server's bounce or
  complaint rate passed its threshold, and it sends nothing until an operator lifts the suspension.
  ``{"server": {...}, "kind": "bounce_rate" | "complaint_rate", "reason": "...", "rate": 0.12,
  "threshold": 0.1, "volume": 250, "window": 86400, "timestamp": <float>}`` (`suspended_payload`):
  ``rate`` and ``threshold`` are fractions (0.12 is 12 %) of the ``volume`` messages sent in the last
  ``window`` seconds.

``MessageLinkClicked`` and ``MessageLoaded`` are Postal's (``TrackingMiddleware``,
``Message#create_load``): ``{"message": {...}, "url", "token", "ip_address", "user_agent"}`` (``token``
is the link's) and ``{"message": {...}, "ip_address", "user_agent"}``. Tracking fires them from a stored
message (`link_clicked`, `message_loaded`), not from the event stream.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from typing import Any, Protocol

import attrs

from mtad.events.schema import (
    AnyEvent,
    DomainDNSError,
    MessageBounced,
    MessageDelivery,
    MessageSuppressed,
    SendLimitApproaching,
    SendLimitExceeded,
    ServerSuspended,
    SpamComplaint,
)

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


def message_hash(
    event: MessageDelivery | MessageSuppressed | MessageBounced | SpamComplaint,
) -> dict[str, Any]:
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
    if isinstance(event, MessageSuppressed):
        return WebhookEvent(event.server_id, "MessageSuppressed", suppressed_payload(event))
    if isinstance(event, MessageBounced):
        return WebhookEvent(event.server_id, "MessageBounced", bounced_payload(event))
    if isinstance(event, SpamComplaint):
        return WebhookEvent(event.server_id, "SpamComplaint", complaint_payload(event))
    if isinstance(event, SendLimitApproaching):
        return WebhookEvent(event.server_id, "SendLimitApproaching", send_limit_payload(event))
    if isinstance(event, SendLimitExceeded):
        return WebhookEvent(event.server_id, "SendLimitExceeded", send_limit_payload(event))
    if isinstance(event, DomainDNSError):
        return WebhookEvent(event.server_id, "DomainDNSError", dns_error_payload(event))
    if isinstance(event, ServerSuspended):
        return WebhookEvent(event.server_id, "ServerSuspended", suspended_payload(event))
    return None


def bounce_hash(event: MessageBounced | SpamComplaint) -> dict[str, Any] | None:
    """Postal's message object for the bounce itself (an incoming message, never spam-checked)."""
    if event.bounce_id is None:
        return None
    return {
        "id": event.bounce_id,
        "token": event.bounce_token,
        "direction": "incoming",
        "message_id": event.bounce_header_message_id,
        "to": event.bounce_rcpt_to,
        "from": event.bounce_mail_from,
        "subject": event.bounce_subject,
        "timestamp": event.bounce_timestamp,
        "spam_status": "NotChecked",
        "tag": None,
    }


def bounced_payload(event: MessageBounced) -> dict[str, Any]:
    """``MessageBounced``'s payload, as Postal's ``Message#bounce!`` triggers it."""
    return {"original_message": message_hash(event), "bounce": bounce_hash(event)}


def complaint_payload(event: SpamComplaint) -> dict[str, Any]:
    """``SpamComplaint``'s payload (see the module docstring)."""
    return {
        "message": message_hash(event),
        "feedback_type": event.feedback_type,
        "user_agent": event.user_agent,
        "source_ip": event.source_ip,
        "timestamp": event.timestamp,
        "bounce": bounce_hash(event),
    }


def suppressed_payload(event: MessageSuppressed) -> dict[str, Any]:
    """``MessageSuppressed``'s payload: ``MessageDeliveryFailed``'s fields, and the list entry (see the
    module docstring)."""
    return {
        "message": message_hash(event),
        "status": "HardFail",
        "details": event.details,
        "output": "",
        "sent_with_ssl": False,
        "timestamp": event.timestamp,
        "time": None,
        "suppression": {
            "source": event.source,
            "reason": event.reason,
            "suppressed_at": event.suppressed_at,
            "expires_at": event.expires_at,
        },
    }


def server_hash(
    event: SendLimitApproaching | SendLimitExceeded | DomainDNSError | ServerSuspended,
) -> dict[str, Any]:
    """Postal's server object (``Server#webhook_hash``) for the server a server-level event names."""
    return {
        "uuid": event.server_uuid,
        "name": event.server_name,
        "permalink": event.server_permalink,
        "organization": event.organization_permalink,
    }


def send_limit_payload(event: SendLimitApproaching | SendLimitExceeded) -> dict[str, Any]:
    """``SendLimitApproaching``'s and ``SendLimitExceeded``'s payload, as ``Server#send_limit_warning``
    triggers them: the server, the messages in the window and the limit, nothing else."""
    return {"server": server_hash(event), "volume": event.volume, "limit": event.limit}


def dns_error_payload(event: DomainDNSError) -> dict[str, Any]:
    """``DomainDNSError``'s payload, as ``HasDNSChecks#check_dns`` triggers it (``uuid`` is the
    domain's)."""
    return {
        "server": server_hash(event),
        "domain": event.domain,
        "uuid": event.domain_uuid,
        "dns_checked_at": event.dns_checked_at,
        "spf_status": event.spf_status,
        "spf_error": event.spf_error,
        "dkim_status": event.dkim_status,
        "dkim_error": event.dkim_error,
        "mx_status": event.mx_status,
        "mx_error": event.mx_error,
        "return_path_status": event.return_path_status,
        "return_path_error": event.return_path_error,
    }


def suspended_payload(event: ServerSuspended) -> dict[str, Any]:
    """``ServerSuspended``'s payload (see the module docstring)."""
    return {
        "server": server_hash(event),
        "kind": event.kind,
        "reason": event.reason,
        "rate": event.rate,
        "threshold": event.threshold,
        "volume": event.volume,
        "window": event.window,
        "timestamp": event.timestamp,
    }


class StoredMessage(Protocol):
    """What the tracking events read of a message: ``mtad.store.messages.Message`` has it."""

    @property
    def id(self) -> int: ...
    @property
    def token(self) -> str: ...
    @property
    def server_id(self) -> int: ...
    @property
    def scope(self) -> str: ...
    @property
    def rcpt_to(self) -> str: ...
    @property
    def mail_from(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def tag(self) -> str | None: ...
    @property
    def timestamp(self) -> float: ...


def stored_message_hash(message: StoredMessage) -> dict[str, Any]:
    """Postal's message object for a stored message (the same fields as `message_hash`)."""
    return {
        "id": message.id,
        "token": message.token,
        "direction": str(message.scope),
        "message_id": message.message_id,
        "to": message.rcpt_to,
        "from": message.mail_from,
        "subject": message.subject,
        "timestamp": message.timestamp,
        "spam_status": "NotChecked",
        "tag": message.tag,
    }


def link_clicked(
    message: StoredMessage, *, url: str, token: str, ip_address: str | None, user_agent: str | None
) -> WebhookEvent:
    """``MessageLinkClicked``, as Postal's ``TrackingMiddleware`` triggers it when a recipient follows
    tracked link ``token`` (to ``url``) of ``message``; ``ip_address`` and ``user_agent`` are the
    click's request's."""
    payload = {
        "message": stored_message_hash(message),
        "url": url,
        "token": token,
        "ip_address": ip_address,
        "user_agent": user_agent,
    }
    return WebhookEvent(message.server_id, "MessageLinkClicked", payload)


def message_loaded(message: StoredMessage, *, ip_address: str | None, user_agent: str | None) -> WebhookEvent:
    """``MessageLoaded``, as Postal's ``Message#create_load`` triggers it when ``message``'s tracking
    image is fetched (every load, not only the first)."""
    payload = {"message": stored_message_hash(message), "ip_address": ip_address, "user_agent": user_agent}
    return WebhookEvent(message.server_id, "MessageLoaded", payload)


def request_uuid(stream_id: str, webhook_id: int) -> str:
    """The request's uuid: the same for the same event and webhook, however often the event is handled."""
    return str(uuid_module.uuid5(REQUEST_NAMESPACE, f"{stream_id}/{webhook_id}"))


def envelope(event: str, timestamp: float, uuid: str, payload: dict[str, Any]) -> bytes:
    """The body POSTed: Postal's envelope, its keys in Postal's order, UTF-8 JSON."""
    body = {"event": event, "timestamp": timestamp, "payload": payload, "uuid": uuid}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

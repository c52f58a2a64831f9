"""The event stream's schema: one frozen class per event type, each with one encoding.

Every producer (the accept path's Lua, the delivery service, hold expiry, and later bounce processing and
tracking) writes events only through these classes, and every consumer (recorder, webhooks, suppression,
send limits) reads them only through `decode`; so a field renamed in one place is a type error or a
failing test, never a silently empty column or webhook. ``tests/events/test_schema.py`` holds the Lua
side (``ENQUEUE`` writes the ``message.queued`` JSON itself) to the same decoder.

On the stream an event is two fields: ``type`` (the class's ``TYPE``) and ``data``, a JSON object of the
class's fields (compact, keys sorted, UTF-8 unescaped). Decoding is strict about types (a boolean is not
a number, a number is not a string) and lenient about extra keys (a newer producer may add a field an
older consumer ignores) and about optional fields left out (an older producer's event still decodes).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeAlias, get_args

import attrs

from mtad.outbound.classify import Category
from mtad.queue.model import Event

#: Delivery statuses, as Postal names them (``mtad.store.messages.MessageStatus`` holds the same values;
#: the schema keeps its own list so that producers need not import the store).
DELIVERY_STATUSES = frozenset(
    {"Pending", "Sent", "SoftFail", "HardFail", "Held", "Bounced", "HoldCancelled", "Processed", "Error"}
)
SCOPES = frozenset({"outgoing", "incoming"})
#: Why an address is suppressed (``mtad.store.suppressions.SuppressionSource`` holds the same values).
SUPPRESSION_SOURCES = frozenset({"HardBounce", "SoftFailures", "Complaint", "Manual", "Unsubscribe"})


class BadEvent(ValueError):
    """A stream entry that no version of the schema can read: unknown type, bad JSON, missing or ill-typed
    field. Retrying cannot fix it, so consumers park it (`mtad.events.consumer`) rather than retry."""


def _choices(*values: str) -> dict[str, frozenset[str]]:
    return {"choices": frozenset(values)}


@attrs.frozen(kw_only=True)
class MessageQueued:
    """A message was accepted and stored (one per recipient); written by the ``ENQUEUE`` Lua script.

    ``id`` and ``raw_message_id`` are allocated by the script, which writes them in front of the JSON the
    rest of this class encodes to (`queued_tail`).
    """

    TYPE: ClassVar[str] = "message.queued"

    id: int
    #: None in events written before raw messages were kept.
    raw_message_id: int | None = None
    token: str
    server_id: int
    scope: str = attrs.field(metadata=_choices(*SCOPES))
    mail_from: str
    rcpt_to: str
    size: int
    timestamp: float
    pool: str = ""
    held: bool = False
    subject: str | None = None
    #: The Message-ID field without angle brackets (Postal's ``message_id``).
    message_id: str | None = None
    tag: str | None = None
    received_with_ssl: bool = False
    #: A report that came back to a return path (DSN, complaint, other bounce), recorded as an incoming
    #: message by `mtad.bounces.processor`; ``bounce_for_id`` is the message it was matched to (Postal's
    #: columns of those names).
    bounce: bool = False
    bounce_for_id: int | None = None


@attrs.frozen(kw_only=True)
class MessageDelivery:
    """One delivery attempt's outcome (Sent, SoftFail, HardFail, Held, HoldCancelled, ...).

    Besides what the delivery row needs, it names the message (server, token, envelope, subject, Message-ID
    field, tag) so that webhook consumers can build Postal's message object without reading SQL, where
    the message may not be recorded yet.
    """

    TYPE: ClassVar[str] = "message.delivery"

    message_id: int
    attempt: int
    status: str = attrs.field(metadata=_choices(*DELIVERY_STATUSES))
    timestamp: float
    details: str | None = None
    code: int | None = None
    output: str | None = None
    sent_with_ssl: bool = False
    log_id: str | None = None
    time: float | None = None
    hold_expiry: float | None = None
    server_id: int | None = None
    token: str | None = None
    scope: str | None = attrs.field(default=None, metadata=_choices(*SCOPES))
    mail_from: str | None = None
    rcpt_to: str | None = None
    enhanced_code: str | None = None
    mx: str | None = None
    source_ip: str | None = None
    subject: str | None = None
    #: The message's Message-ID field (``message_id`` is its numeric id).
    header_message_id: str | None = None
    tag: str | None = None
    #: When the message was accepted (Postal's message ``timestamp`` in webhooks).
    message_timestamp: float | None = None


@attrs.frozen(kw_only=True)
class MessageSuppressed:
    """A message was not sent because its recipient is on its server's suppression list.

    Written with the message's ``HardFail`` delivery, in the same step (`mtad.outbound.delivery`).
    ``source``, ``reason``, ``suppressed_at`` and ``expires_at`` (None: never) are the list entry's;
    the envelope fields name the message for webhooks, as in `MessageDelivery`.
    """

    TYPE: ClassVar[str] = "message.suppressed"

    message_id: int
    server_id: int
    rcpt_to: str
    source: str = attrs.field(metadata=_choices(*SUPPRESSION_SOURCES))
    reason: str | None = None
    timestamp: float
    suppressed_at: float | None = None
    expires_at: float | None = None
    #: The delivery's details (what the ``HardFail`` says).
    details: str | None = None
    token: str | None = None
    scope: str | None = attrs.field(default=None, metadata=_choices(*SCOPES))
    mail_from: str | None = None
    subject: str | None = None
    header_message_id: str | None = None
    tag: str | None = None
    message_timestamp: float | None = None


#: What a bounce says of its recipient: the categories of the one rules table.
BOUNCE_CATEGORIES = frozenset(get_args(Category))


@attrs.frozen(kw_only=True)
class _Report:
    """What `MessageBounced` and `SpamComplaint` share: the message a report is about (its envelope
    unprefixed, as in `MessageDelivery`) and the report itself, recorded as an incoming message (its
    envelope prefixed ``bounce_``), so that webhooks can name both without reading SQL."""

    message_id: int
    server_id: int
    rcpt_to: str
    token: str | None = None
    scope: str | None = attrs.field(default=None, metadata=_choices(*SCOPES))
    mail_from: str | None = None
    subject: str | None = None
    header_message_id: str | None = None
    tag: str | None = None
    message_timestamp: float | None = None
    bounce_token: str | None = None
    bounce_mail_from: str | None = None
    bounce_rcpt_to: str | None = None
    bounce_subject: str | None = None
    bounce_header_message_id: str | None = None
    bounce_timestamp: float | None = None


@attrs.frozen(kw_only=True)
class MessageBounced(_Report):
    """A bounce (RFC 3464 DSN or another MTA's failure report) came back for a message we sent.

    Written by `mtad.bounces.processor` with the original's ``Bounced`` delivery and the bounce's own
    ``message.queued`` (``bounce_id``: the bounce recorded as an incoming message), in one step.
    ``hard``: a permanent failure; ``category`` (`mtad.outbound.classify`) says whether it speaks about
    the recipient (``bad_mailbox``) or about us (``policy_block``: a block list, our reputation), so only
    the first may suppress the address. ``status``, ``diagnostic`` and ``remote_mta`` are the DSN's.
    """

    TYPE: ClassVar[str] = "message.bounced"

    bounce_id: int
    hard: bool
    category: str = attrs.field(metadata=_choices(*BOUNCE_CATEGORIES))
    status: str | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    timestamp: float
    #: The SMTP code the diagnostic quotes, the DSN's Action, the classification rule that decided.
    code: int | None = None
    action: str | None = None
    rule: str | None = None


@attrs.frozen(kw_only=True)
class SpamComplaint(_Report):
    """A recipient reported a message we sent as spam: an RFC 5965 ARF feedback report came back.

    ``feedback_type`` is the report's Feedback-Type (``abuse``, ``fraud``, ...; RFC 5965 §7.3).
    ``bounce_id`` is the report recorded as an incoming message.
    """

    TYPE: ClassVar[str] = "message.complaint"

    feedback_type: str
    bounce_id: int | None = None
    timestamp: float
    user_agent: str | None = None
    source_ip: str | None = None


@attrs.frozen(kw_only=True)
class SendLimitApproaching:
    """A server's messages in its send-limit window reached 90 % of the limit (``volume`` of ``limit``
    per ``period`` seconds). At most one per server per ``mtad.limits`` notice interval (an hour)."""

    TYPE: ClassVar[str] = "server.send_limit_approaching"

    server_id: int
    server_uuid: str
    server_name: str
    server_permalink: str
    organization_permalink: str
    volume: int
    limit: int
    period: int
    timestamp: float


@attrs.frozen(kw_only=True)
class SendLimitExceeded:
    """A server's send limit was reached: new messages are held (or refused, per ``action``) until the
    window has room again. At most one per server per notice interval (an hour)."""

    TYPE: ClassVar[str] = "server.send_limit_exceeded"

    server_id: int
    server_uuid: str
    server_name: str
    server_permalink: str
    organization_permalink: str
    volume: int
    limit: int
    period: int
    action: str = attrs.field(metadata=_choices("Hold", "Refuse"))
    timestamp: float


@attrs.frozen(kw_only=True)
class DomainDNSError:
    """The automatic (hourly) DNS check found a server-owned domain's records wrong (Postal fires it from
    ``check_dns(:auto)`` only, for domains a server owns). Statuses ``OK`` | ``Missing`` | ``Invalid``."""

    TYPE: ClassVar[str] = "domain.dns_error"

    server_id: int
    server_uuid: str
    server_name: str
    server_permalink: str
    organization_permalink: str
    domain: str
    domain_uuid: str
    dns_checked_at: float
    spf_status: str | None = None
    spf_error: str | None = None
    dkim_status: str | None = None
    dkim_error: str | None = None
    mx_status: str | None = None
    mx_error: str | None = None
    return_path_status: str | None = None
    return_path_error: str | None = None
    timestamp: float


@attrs.frozen(kw_only=True)
class ServerSuspended:
    """mtad suspended a server by itself: its bounce or complaint rate over ``window`` seconds passed the
    configured threshold (``rate`` of ``volume`` sent, against ``threshold``). ``kind`` says which; the
    server sends nothing until an operator lifts it (``mtad unsuspend-server``)."""

    TYPE: ClassVar[str] = "server.suspended"

    server_id: int
    server_uuid: str
    server_name: str
    server_permalink: str
    organization_permalink: str
    kind: str = attrs.field(metadata=_choices("bounce_rate", "complaint_rate"))
    rate: float
    threshold: float
    volume: int
    window: int
    reason: str
    timestamp: float


class QueuedMessage(Protocol):
    """What `delivery_event` reads of a queued message (the queue's claimed and held messages)."""

    @property
    def id(self) -> int: ...
    @property
    def token(self) -> str: ...
    @property
    def server_id(self) -> int: ...
    @property
    def scope(self) -> str: ...
    @property
    def mail_from(self) -> str: ...
    @property
    def rcpt_to(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def fields(self) -> Mapping[str, str]: ...


def delivery_event(
    message: QueuedMessage, *, status: str, timestamp: float, **attempt: Any
) -> MessageDelivery:
    """The ``message.delivery`` event of ``message``'s next attempt: ``attempt`` holds what the attempt
    itself found (details, code, output, ...); the message's envelope, subject, Message-ID field and tag
    come from the queue, for webhooks."""
    fields = message.fields
    return MessageDelivery(
        message_id=message.id,
        attempt=message.attempts + 1,
        status=status,
        timestamp=timestamp,
        server_id=message.server_id,
        token=message.token,
        scope=message.scope,
        mail_from=message.mail_from,
        rcpt_to=message.rcpt_to,
        subject=fields.get("subject"),
        header_message_id=fields.get("message_id"),
        tag=fields.get("tag"),
        message_timestamp=message.created_at,
        **attempt,
    )


AnyEvent: TypeAlias = (
    MessageQueued
    | MessageDelivery
    | MessageSuppressed
    | MessageBounced
    | SpamComplaint
    | SendLimitApproaching
    | SendLimitExceeded
    | DomainDNSError
    | ServerSuspended
)

EVENT_CLASSES: dict[str, type[AnyEvent]] = {
    cls.TYPE: cls
    for cls in (
        MessageQueued,
        MessageDelivery,
        MessageSuppressed,
        MessageBounced,
        SpamComplaint,
        SendLimitApproaching,
        SendLimitExceeded,
        DomainDNSError,
        ServerSuspended,
    )
}


def server_fields(server: Any) -> dict[str, Any]:
    """The server fields of server-level events, from which webhooks build Postal's server object
    (``Server#webhook_hash``), for ``server`` (a ``mtad.store.servers.Server``) as keyword arguments."""
    return {
        "server_id": server.id,
        "server_uuid": server.uuid,
        "server_name": server.name,
        "server_permalink": server.permalink,
        "organization_permalink": server.organization_permalink,
    }


@attrs.frozen
class Received:
    """A decoded event as a consumer sees it: its stream id (unique, so the key for idempotence) and it."""

    id: str
    event: AnyEvent


@attrs.frozen
class _Field:
    name: str
    kinds: tuple[type, ...]
    optional: bool
    required: bool
    choices: frozenset[str] | None


_FIELDS: dict[type, tuple[_Field, ...]] = {}


def _fields(cls: type[AnyEvent]) -> tuple[_Field, ...]:
    known = _FIELDS.get(cls)
    if known is None:
        known = _FIELDS[cls] = _field_specs(cls)
    return known


def _field_specs(cls: type[AnyEvent]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in attrs.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) or (hint,)
        kinds = tuple(a for a in args if a is not type(None))
        if float in kinds:
            kinds = (*kinds, int)  # JSON writes 5.0 as 5 where the producer is not Python
        fields.append(
            _Field(
                name=f.name,
                kinds=kinds,
                optional=type(None) in args,
                required=f.default is attrs.NOTHING,
                choices=f.metadata.get("choices"),
            )
        )
    return tuple(fields)


def to_dict(event: AnyEvent) -> dict[str, Any]:
    """The event's fields as the JSON object it is encoded to."""
    return attrs.asdict(event, recurse=False)


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def encode(event: AnyEvent) -> tuple[str, str]:
    """``(type, data)`` as the stream entry holds them."""
    return event.TYPE, _json(to_dict(event))


def queued_tail(event: MessageQueued) -> str:
    """``event``'s JSON without its opening brace and without the two ids, as ``ENQUEUE`` takes it.

    The script writes ``{"id":<id>,"raw_message_id":<body id>,`` in front, so the ids it allocates reach
    the stream without a JSON round trip in Lua; the keys that follow are still sorted after those two.
    """
    return json_tail(event, "id", "raw_message_id")


def json_tail(event: AnyEvent, *omit: str) -> str:
    """``event``'s JSON without its opening brace and without the fields ``omit``, for a Lua script that
    writes those fields (values only it knows) in front."""
    data = to_dict(event)
    for name in omit:
        del data[name]
    return _json(data)[1:]


def from_dict(cls: type[AnyEvent], data: Mapping[str, Any]) -> AnyEvent:
    """``cls`` from its JSON object, checked field by field; `BadEvent` naming the field otherwise."""
    values: dict[str, Any] = {}
    for f in _fields(cls):
        if f.name not in data:
            if f.required:
                raise BadEvent(f"{cls.TYPE}: missing field {f.name!r}")
            continue
        value = data[f.name]
        if value is None:
            if not f.optional:
                raise BadEvent(f"{cls.TYPE}: field {f.name!r} must not be null")
        elif not isinstance(value, f.kinds) or (isinstance(value, bool) and bool not in f.kinds):
            raise BadEvent(f"{cls.TYPE}: field {f.name!r} has wrong type {type(value).__name__}")
        elif f.choices is not None and value not in f.choices:
            raise BadEvent(f"{cls.TYPE}: field {f.name!r} has unknown value {value!r}")
        if float in f.kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[f.name] = value
    return cls(**values)


def decode_entry(entry: Event) -> Received:
    """A stream entry as `mtad.queue.events.EventStream` reads it (JSON already parsed), decoded."""
    cls = EVENT_CLASSES.get(entry.type)
    if cls is None:
        raise BadEvent(f"unknown event type {entry.type!r}")
    return Received(entry.id, from_dict(cls, entry.data))

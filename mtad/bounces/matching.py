"""What a message received at the return path is about, and the events that say so.

Three steps, each its own function so that each is tested alone:

1. `candidates`: the addresses that may name our message, without any I/O. Our VERP return paths
   (`mtad.mail.verp`) first, where every bounce must come back: the recipients the message came to, then
   the ARF report's ``Original-Mail-From`` and the quoted original's ``Return-Path`` (a feedback loop
   writes to its own address, but quotes our envelope sender). Failing those, the ``X-Postal-MsgID``
   tokens quoted anywhere in it, Postal's only way (``Message#original_messages``).
2. `find_originals` (SQL, in the database's thread pool): the messages those name. A VERP address whose
   signature checks out but whose message is not recorded *yet* (the recorder lags behind, a fast
   bounce overtakes it) is reported as missing, so that the caller can wait for it.
3. `decide` (pure): the events, written together by `mtad.bounces.inbox.BounceInbox.finish`.

The report is recorded as an incoming message of the original's server, as Postal does (``bounce``
set, status ``Processed``, ``bounce_for_id`` the original), with its raw message. For the original:

- a DSN (or another MTA's failure report) that says delivery *failed*: a ``Bounced`` delivery ("We've
  received a bounce message for this e-mail. See <msg:ID> for details." as Postal writes it, then the
  type, category and DSN status), which makes its status ``Bounced``, and a ``message.bounced`` event
  (Postal's ``MessageBounced`` webhook; the suppression list reads it). Hard or soft comes from the DSN,
  the category from the one rules table (`mtad.outbound.classify`);
- a DSN that says delivery is only *delayed*, or that it succeeded (``delivered``, ``relayed``,
  ``expanded``): linked to the original, nothing marked: the message is not bounced (yet);
- an ARF feedback report (RFC 5965): a ``message.complaint`` event; the original's status stays;
- an auto-reply or out-of-office (RFC 3834), or anything else: recorded, not a bounce, no event;
- a report about a message that is itself a bounce (RFC 3464 §2: no DSN about a DSN), or about nothing
  we can find (an unknown or forged VERP address, unknown tokens): recorded, nothing marked.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import attrs
from sqlalchemy.engine import Connection

from mtad.accept import MessageHeaders
from mtad.events.schema import AnyEvent, MessageBounced, MessageDelivery, MessageQueued, SpamComplaint
from mtad.mail.bounces import BounceRecipient, BounceReport
from mtad.mail.verp import VerpMatch, decode_return_path
from mtad.outbound.classify import Classification, classify_bounce
from mtad.store.messages import (
    Message,
    MessageStatus,
    Scope,
    find_message,
    find_messages_by_tokens,
    last_attempt,
)

#: Postal's words (``Message#bounce!``, ``IncomingMessageProcessor#handle_bounces``).
BOUNCED_DETAILS = "We've received a bounce message for this e-mail. See <msg:{id}> for details."
LINKED_DETAILS = "This has been detected as a bounce message for <msg:{id}>."
UNLINKED_DETAILS = (
    "This message was a bounce but we couldn't link it with any outgoing message "
    "and there was no route for it."
)
#: At most this many ``X-Postal-MsgID`` tokens of one report are looked up (a report is about one
#: message; a long list is a quoted thread or an attack).
MAX_TOKENS = 10
#: Longest diagnostic text an event or a delivery row carries (the whole transcript can be quoted).
MAX_TEXT = 1000
#: DSN actions that report no failure (RFC 3464 §2.3.3).
_NOT_FAILED = frozenset({"delayed", "delivered", "relayed", "expanded"})
_BOUNCE_KINDS = frozenset({"dsn", "unrecognised_bounce", "complaint"})


def clean(text: str | None, limit: int = MAX_TEXT) -> str | None:
    """``text`` fit for SQL and JSON: no NUL (PostgreSQL refuses it), no lone surrogates, at most
    ``limit`` characters; None for None."""
    if text is None:
        return None
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@attrs.frozen
class ReturnPathDomains:
    """The domains our return paths use: ``domains.return_path_domain``, and ``<prefix>.<any domain>``
    (Postal's per-domain return path, whose CNAME points at the first)."""

    domain: str
    prefix: str = "psrp"

    def of(self, address: str) -> Collection[str]:
        """``address``'s domain when it is one of ours (what `decode_return_path` is to accept), else none."""
        domain = address.rpartition("@")[2].strip().lower()
        if domain == self.domain.lower() or (self.prefix and domain.startswith(self.prefix.lower() + ".")):
            return (domain,)
        return ()


@attrs.frozen
class Candidates:
    """What may name the original: valid VERP addresses (first found first, each message once), and the
    ``X-Postal-MsgID`` tokens, looked up only when there is no VERP address at all."""

    verp: tuple[VerpMatch, ...] = ()
    tokens: tuple[str, ...] = ()


def _bare(address: str | None) -> str:
    return (address or "").strip().strip("<>").strip()


def candidates(
    secret: bytes, domains: ReturnPathDomains, rcpt_to: Sequence[str], report: BounceReport
) -> Candidates:
    """The VERP addresses and tokens of a message received at the return path (see the module docstring)."""
    addresses = [_bare(a) for a in rcpt_to]
    if report.complaint is not None:
        addresses.append(_bare(report.complaint.original_mail_from))
    if report.original is not None:
        addresses.append(_bare(report.original.header("return-path")))
    found: dict[int, VerpMatch] = {}
    for address in addresses:
        if not address:
            continue
        match = decode_return_path(secret, address, domains.of(address))
        if match is not None:
            found.setdefault(match.message_id, match)
    if found:
        return Candidates(verp=tuple(found.values()))
    return Candidates(tokens=tuple(report.postal_msgids[:MAX_TOKENS]))


@attrs.frozen
class Original:
    """A message a report is about, and the number of its last recorded delivery attempt."""

    message: Message
    last_attempt: int


#: The statuses of a recorded message whose delivery a bounce may have overtaken: its ``Sent`` attempt is
#: yet to be recorded (the recorder lags, or the delivery's result is still on its way into Redis).
UNDELIVERED = frozenset({MessageStatus.PENDING, MessageStatus.SOFT_FAIL})


def awaits_delivery(message: Message) -> bool:
    """Whether a report about ``message`` may have overtaken its delivery's result: an outgoing message
    (not itself a bounce, which is never delivered) recorded as not delivered yet."""
    return message.scope is Scope.OUTGOING and not message.bounce and message.status in UNDELIVERED


@attrs.frozen
class Lookup:
    """What `find_originals` found: ``how`` is "verp", "postal-msgid" or "none"."""

    originals: tuple[Original, ...] = ()
    #: Valid VERP addresses whose message is not recorded (or not of the server the address says).
    missing: tuple[VerpMatch, ...] = ()
    how: str = "none"

    def awaited(self) -> list[int]:
        """The ids of the messages to wait for before marking anything: not recorded, or not delivered."""
        return [m.message_id for m in self.missing] + [
            o.message.id for o in self.originals if awaits_delivery(o.message)
        ]


def find_originals(conn: Connection, found: Candidates) -> Lookup:
    """The recorded messages ``found`` names (a unit of work for `mtad.store.db.Database.run`)."""
    if found.verp:
        originals: list[Original] = []
        missing: list[VerpMatch] = []
        for match in found.verp:
            message = find_message(conn, match.message_id)
            if message is None or message.server_id != match.server_id:
                missing.append(match)
            else:
                originals.append(Original(message, last_attempt(conn, message.id)))
        return Lookup(tuple(originals), tuple(missing), "verp")
    messages = find_messages_by_tokens(conn, found.tokens)
    if not messages:
        return Lookup()
    return Lookup(tuple(Original(m, last_attempt(conn, m.id)) for m in messages), (), "postal-msgid")


@attrs.frozen
class Received:
    """The message received at the return path, as the inbox kept it and the parser read it."""

    id: int
    token: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    size: int
    received_with_ssl: bool
    received_at: float
    report: BounceReport
    headers: MessageHeaders


@attrs.frozen
class Outcome:
    """The events of one received message, the server it is recorded for, and a line for the log."""

    server_id: int
    events: tuple[AnyEvent, ...]
    summary: str
    #: The originals marked Bounced or complained about.
    marked: tuple[int, ...] = ()


def recipient_for(report: BounceReport, rcpt_to: str) -> BounceRecipient | None:
    """The recipient block of ``report`` about ``rcpt_to``: the one naming that address, else the first
    that failed, else the first; None when the report names none."""
    wanted = rcpt_to.strip().lower()
    for r in report.recipients:
        if wanted and wanted in ((r.original_recipient or "").lower(), (r.final_recipient or "").lower()):
            return r
    return next((r for r in report.recipients if r.action == "failed"), None) or next(
        iter(report.recipients), None
    )


def bounced_details(bounce_id: int, classification: Classification, recipient: BounceRecipient) -> str:
    """The original's ``Bounced`` delivery details: Postal's sentence, then what kind of bounce it is."""
    what = [f"{'Hard' if classification.hard else 'Soft'} bounce ({classification.category})"]
    if recipient.status:
        what.append(f"status {recipient.status}")
    if recipient.remote_mta:
        what.append(f"reported by {recipient.remote_mta}")
    return f"{BOUNCED_DETAILS.format(id=bounce_id)} {', '.join(what)}."


def _server(lookup: Lookup) -> int:
    if lookup.originals:
        return lookup.originals[0].message.server_id
    if lookup.missing:
        return lookup.missing[0].server_id
    return 0  # no server's: the API shows it to nobody, the log and the raw message keep it


def _verp_rcpt(received: Received, domains: ReturnPathDomains, secret: bytes) -> str:
    """The recipient the message is recorded for: the first that is one of our VERP addresses."""
    for address in received.rcpt_to:
        if decode_return_path(secret, _bare(address), domains.of(_bare(address))) is not None:
            return address
    return received.rcpt_to[0] if received.rcpt_to else ""


def decide(
    received: Received,
    lookup: Lookup,
    now: float,
    *,
    secret: bytes,
    domains: ReturnPathDomains,
) -> Outcome:
    """The events for ``received`` given what ``lookup`` found (see the module docstring)."""
    report = received.report
    kind = report.kind
    server_id = _server(lookup)
    rcpt_to = _verp_rcpt(received, domains, secret)
    subject = clean(received.headers.subject, 10_000)
    header_message_id = clean(received.headers.message_id, 10_000)
    bounce_fields: dict[str, Any] = {
        "bounce_id": received.id,
        "bounce_token": received.token,
        "bounce_mail_from": received.mail_from,
        "bounce_rcpt_to": rcpt_to,
        "bounce_subject": subject,
        "bounce_header_message_id": header_message_id,
        "bounce_timestamp": received.received_at,
    }
    notes: list[tuple[MessageStatus, str]] = []
    for_original: list[AnyEvent] = []
    linked: list[int] = []
    marked: list[int] = []
    said: list[str] = []

    for original in lookup.originals:
        message = original.message
        envelope: dict[str, Any] = {
            "message_id": message.id,
            "server_id": message.server_id,
            "rcpt_to": message.rcpt_to,
            "token": message.token,
            "scope": message.scope.value,
            "mail_from": message.mail_from,
            "subject": message.subject,
            "header_message_id": message.message_id,
            "tag": message.tag,
            "message_timestamp": message.timestamp,
        }
        if kind in _BOUNCE_KINDS and message.bounce:
            notes.append(
                (
                    MessageStatus.PROCESSED,
                    f"This is a report about <msg:{message.id}>, which is itself a bounce: "
                    "nothing was marked.",
                )
            )
            said.append(f"about {message.id}, itself a bounce: nothing marked")
        elif kind == "complaint":
            complaint = report.complaint
            feedback = (complaint.feedback_type if complaint else None) or "unknown"
            linked.append(message.id)
            marked.append(message.id)
            notes.append(
                (
                    MessageStatus.PROCESSED,
                    f"This has been detected as a spam complaint ({feedback}) about <msg:{message.id}>.",
                )
            )
            for_original.append(
                SpamComplaint(
                    **envelope,
                    feedback_type=clean(feedback, 100) or "unknown",
                    user_agent=clean(complaint.user_agent if complaint else None),
                    source_ip=clean(complaint.source_ip if complaint else None, 100),
                    timestamp=now,
                    **bounce_fields,
                )
            )
            said.append(f"complaint ({feedback}) about {message.id}")
        elif kind in ("dsn", "unrecognised_bounce"):
            linked.append(message.id)
            recipient = recipient_for(report, message.rcpt_to) or BounceRecipient()
            if recipient.action in _NOT_FAILED:
                notes.append(
                    (
                        MessageStatus.PROCESSED,
                        f"This has been detected as a delivery status notification ({recipient.action}) "
                        f"for <msg:{message.id}>: nothing was marked.",
                    )
                )
                said.append(f"{recipient.action} notice for {message.id}")
                continue
            classification = classify_bounce(recipient)
            marked.append(message.id)
            notes.append((MessageStatus.PROCESSED, LINKED_DETAILS.format(id=message.id)))
            diagnostic = clean(recipient.diagnostic)
            for_original.append(
                MessageDelivery(
                    message_id=message.id,
                    attempt=original.last_attempt + 1,
                    status=MessageStatus.BOUNCED.value,
                    # Never older than the delivery it is about, even if this machine's clock is behind
                    # the sender's: the recorder lets the newer of two attempts set the status.
                    timestamp=max(now, message.last_delivery_attempt or 0.0),
                    details=bounced_details(received.id, classification, recipient),
                    code=recipient.smtp_code,
                    output=diagnostic,
                    enhanced_code=recipient.status,
                    server_id=message.server_id,
                    token=message.token,
                    scope=message.scope.value,
                    mail_from=message.mail_from,
                    rcpt_to=message.rcpt_to,
                    subject=message.subject,
                    header_message_id=message.message_id,
                    tag=message.tag,
                    message_timestamp=message.timestamp,
                )
            )
            for_original.append(
                MessageBounced(
                    **envelope,
                    hard=classification.hard,
                    category=classification.category,
                    status=recipient.status,
                    diagnostic=diagnostic,
                    remote_mta=clean(recipient.remote_mta, 255),
                    timestamp=now,
                    code=recipient.smtp_code,
                    action=recipient.action,
                    rule=classification.rule,
                    **bounce_fields,
                )
            )
            said.append(
                f"{'hard' if classification.hard else 'soft'} bounce ({classification.category}, "
                f"rule {classification.rule}) of {message.id}"
            )
        elif kind == "auto_reply":
            notes.append(
                (
                    MessageStatus.PROCESSED,
                    f"This has been detected as an automatic reply ({report.reason}) to "
                    f"<msg:{message.id}>, not a bounce: nothing was marked.",
                )
            )
            said.append(f"auto-reply to {message.id}")
        else:
            notes.append(
                (
                    MessageStatus.PROCESSED,
                    f"This came to the return path of <msg:{message.id}> but is not a bounce: "
                    "nothing was marked.",
                )
            )
            said.append(f"not a bounce, to the return path of {message.id}")

    if not lookup.originals:
        if kind in _BOUNCE_KINDS:
            notes.append((MessageStatus.HARD_FAIL, UNLINKED_DETAILS))
        elif kind == "auto_reply":
            notes.append(
                (
                    MessageStatus.PROCESSED,
                    f"This has been detected as an automatic reply ({report.reason}), not a bounce.",
                )
            )
        else:
            notes.append((MessageStatus.PROCESSED, "This came to the return path but is not a bounce."))
        missing = ", ".join(str(m.message_id) for m in lookup.missing)
        said.append(f"matched no message{f' (VERP for unrecorded {missing})' if missing else ''}")

    queued = MessageQueued(
        id=received.id,
        raw_message_id=received.id,
        token=received.token,
        server_id=server_id,
        scope="incoming",
        mail_from=received.mail_from,
        rcpt_to=rcpt_to,
        size=received.size,
        timestamp=received.received_at,
        subject=subject,
        message_id=header_message_id,
        received_with_ssl=received.received_with_ssl,
        bounce=kind in _BOUNCE_KINDS,
        bounce_for_id=linked[0] if linked else None,
    )
    own = [
        MessageDelivery(
            message_id=received.id,
            attempt=n,
            status=status.value,
            timestamp=now,
            details=details,
            server_id=server_id,
            token=received.token,
            scope="incoming",
            mail_from=received.mail_from,
            rcpt_to=rcpt_to,
            subject=queued.subject,
            header_message_id=queued.message_id,
            message_timestamp=received.received_at,
        )
        for n, (status, details) in enumerate(notes, 1)
    ]
    summary = f"{kind} ({report.reason}), matched by {lookup.how}: {'; '.join(said)}"
    return Outcome(server_id, (queued, *own, *for_original), summary, tuple(marked))


def unreadable(received: Received, server_id: int, now: float, error: str) -> Outcome:
    """The events for a message that could not be processed however often it was tried: recorded with
    an ``Error`` delivery saying why, so that it is kept (and seen) rather than blocking the inbox."""
    details = clean(f"This message could not be processed as a bounce: {error}")
    queued = MessageQueued(
        id=received.id,
        raw_message_id=received.id,
        token=received.token,
        server_id=server_id,
        scope="incoming",
        mail_from=received.mail_from,
        rcpt_to=received.rcpt_to[0] if received.rcpt_to else "",
        size=received.size,
        timestamp=received.received_at,
        received_with_ssl=received.received_with_ssl,
    )
    delivery = MessageDelivery(
        message_id=received.id,
        attempt=1,
        status=MessageStatus.ERROR.value,
        timestamp=now,
        details=details,
        server_id=server_id,
        token=received.token,
        scope="incoming",
        mail_from=received.mail_from,
        rcpt_to=queued.rcpt_to,
        message_timestamp=received.received_at,
    )
    return Outcome(server_id, (queued, delivery), f"unreadable: {error}")

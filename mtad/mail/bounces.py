"""Reading what comes back to a return path: delivery reports, complaints, auto-replies, other bounces.

`parse_bounce` reads a raw message and says what it is, with the details each kind carries:

- ``dsn``: an RFC 3464 delivery status notification (``multipart/report; report-type=delivery-status``,
  or RFC 6533's ``global-delivery-status``), with a `BounceRecipient` for each per-recipient block;
- ``complaint``: an RFC 5965 ARF feedback report (``report-type=feedback-report``), as the mailbox
  providers' feedback loops send when a user clicks "this is spam";
- ``unrecognised_bounce``: a bounce in some MTA's own format (Exim, qmail, old Yahoo, Exchange, ...),
  whose failed addresses GNU Mailman's detectors (``flufl.bounce``) found, or a message that is a bounce
  only by its sender (MAILER-DAEMON, postmaster, a null return path) and names no address we can read;
- ``auto_reply``: an out-of-office or other automatic answer (RFC 3834), or a read receipt (RFC 8098):
  mail from a working mailbox, never a reason to think an address is bad;
- ``not_a_bounce``: anything else.

Bounces are written by every kind of software, and ours reach us from strangers: the parser never
raises, whatever the input (garbage MIME, 8-bit headers, truncation, nothing at all). Every field it
cannot read is None. The original message's headers (where the report quotes them) give its
Message-ID and ``X-Postal-MsgID``; `BounceReport.postal_msgids` has every token in the raw bounce, the
way Postal links bounces (`mtad.mail.verp.find_postal_msgid_tokens`).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import logging
import re
from collections.abc import Callable, Iterator
from email.message import Message
from functools import partial
from typing import Any, Literal, TypeVar

import attrs
import flufl.bounce._scan
from flufl.bounce import all_failures

from mtad.mail.headers import decode_value, header_section
from mtad.mail.verp import find_postal_msgid_tokens

T = TypeVar("T")
BounceKind = Literal["dsn", "complaint", "unrecognised_bounce", "auto_reply", "not_a_bounce"]
Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

# flufl.bounce logs every detector exception with its traceback: the input is a stranger's mail, and
# we handle the failure (`_flufl_failures`). A library's logger gets a NullHandler, so Python's
# last-resort handler does not print those tracebacks to stderr.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())

#: Only this much of a bounce is parsed: the report comes first, and the rest is the quoted original.
MAX_PARSE = 4 * 1024 * 1024
MAX_DETECT = 256 * 1024
MAX_PARTS = 500
MAX_RECIPIENTS = 1000
MAX_HEADERS = 500

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)

_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d])")
_SMTP_CODE = re.compile(r"\s*([2-5]\d\d)(?![\d])")
_TOKEN = re.compile(r"[a-z0-9]+", re.IGNORECASE)
_ACTIONS: tuple[tuple[str, Action], ...] = (
    ("fail", "failed"),
    ("error", "failed"),  # OpenSMTPD writes "Action: error"
    ("delay", "delayed"),
    ("deliver", "delivered"),
    ("relay", "relayed"),
    ("expand", "expanded"),
)
_DAEMON_LOCAL = re.compile(r"mailer[-_]?daemon|mail[-_]?daemon|postmaster", re.IGNORECASE)
_DAEMON_NAME = re.compile(r"mail delivery (system|subsystem|service)|mailer[-_ ]?daemon", re.IGNORECASE)
_AUTO_REPLY_FIELDS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-auto-reply")
_AUTO_REPLY_SUBJECT = re.compile(
    r"out of (the )?office|auto(matic(ally)?)?[ -]?(reply|replied|response|answer)|autoreply|autosvar"
    r"|abwesenheit|automatische antwort|r[ée]ponse automatique|absence du bureau|respuesta autom[áa]tica"
    r"|fuera de la oficina|risposta automatica|fuori sede|resposta autom[áa]tica|automatisch antwoord"
    r"|afwezig|automatyczna odpowied[źz]|автоматический ответ|自动回复|自動回覆|自動応答"
    r"|vacation (reply|notice)|on vacation|away from (the|my) office",
    re.IGNORECASE,
)
# A reply quoted in a bounce's prose: "550 5.1.1 <a@b>: Recipient address rejected" or "550 User unknown".
_PROSE_REPLY = re.compile(
    r"(?<![\w.\[:/-])([45][0-5]\d):?[ -](?:([45]\.\d{1,3}\.\d{1,3})(?![\d.])\s*)?(?=\S)([^\r\n]*)"
)
_QMAIL_STATUS = re.compile(r"\(#([45]\.\d{1,3}\.\d{1,3})\)")
_INLINE_FIELD = re.compile(rb"^(?:Message-ID|X-Postal-MsgID)[ \t]*:", re.IGNORECASE | re.MULTILINE)


@attrs.frozen
class BounceRecipient:
    """One recipient a bounce reports on: an RFC 3464 §2.3 per-recipient block, or what a detector found.

    Addresses are without the ``rfc822;`` address type and without angle brackets; ``remote_mta`` without
    its ``dns;`` type. ``diagnostic`` is the text of the Diagnostic-Code (for an ``smtp`` one, the remote
    server's reply) and ``diagnostic_type`` its type ("smtp", "X-Postfix", ...); for a bounce in some
    MTA's own format, the SMTP reply quoted in the paragraph after the address, else that paragraph,
    with no type (and ``action`` "failed" or "delayed" as the detector said permanent or temporary).
    """

    final_recipient: str | None = None
    original_recipient: str | None = None
    action: Action | None = None
    status: str | None = None
    diagnostic_type: str | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt_date: str | None = None

    @property
    def address(self) -> str | None:
        """The address we sent to: Original-Recipient (our RCPT TO) when given, else Final-Recipient."""
        return self.original_recipient or self.final_recipient

    @property
    def smtp_code(self) -> int | None:
        """The basic SMTP code the diagnostic starts with ("550 5.1.1 ..." → 550), if it does."""
        match = _SMTP_CODE.match(self.diagnostic or "")
        return int(match.group(1)) if match else None

    @property
    def hard(self) -> bool:
        """A permanent failure: delivery "failed" with a 5.x.x status (RFC 3463 §3.1 class 5).

        Without a status, the diagnostic's code decides, and without either "failed" stands (RFC 3464
        §2.3.3: the reporting MTA gave up; a detector's "permanent" address). A "failed" with a 4.x.x
        status (retries ran out, 4.4.7) is soft: nothing says the address is bad.
        """
        if self.action != "failed":
            return False
        if self.status is not None:
            return self.status.startswith("5.")
        code = self.smtp_code
        return code is None or code >= 500


@attrs.frozen
class OriginalMessage:
    """The headers of the message a report is about, as the report quotes them.

    ``message_id`` is without angle brackets (as Postal stores it); ``postal_msgid`` the message token of
    its ``X-Postal-MsgID`` field. ``headers`` are (name, decoded value) in order, for whoever needs more.
    """

    message_id: str | None = None
    postal_msgid: str | None = None
    subject: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The first value of field ``name`` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


@attrs.frozen
class ComplaintReport:
    """An RFC 5965 §3.1 machine-readable feedback report (the ``message/feedback-report`` part).

    Providers redact freely (AOL and Yahoo often blank the recipient): any field may be None, and then
    the original message's headers (`BounceReport.original`) are what identifies the message.
    """

    feedback_type: str | None = None
    user_agent: str | None = None
    version: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: tuple[str, ...] = ()
    arrival_date: str | None = None
    reporting_mta: str | None = None
    source_ip: str | None = None
    reported_domain: str | None = None
    incidents: int | None = None


@attrs.frozen
class BounceReport:
    """What `parse_bounce` made of a message. ``reason`` says in a few words why it is of its kind."""

    kind: BounceKind
    reason: str
    recipients: tuple[BounceRecipient, ...] = ()
    reporting_mta: str | None = None
    complaint: ComplaintReport | None = None
    original: OriginalMessage | None = None
    postal_msgids: tuple[str, ...] = ()
    subject: str | None = None
    from_address: str | None = None


def parse_bounce(raw: bytes, *, mail_from: str | None = None) -> BounceReport:
    """What ``raw`` is (see the module docstring) and what it reports. Never raises.

    ``mail_from`` is the envelope sender the message came with, when known: an empty one (``<>``, RFC
    5321 §4.5.5) is how DSNs, and also well-behaved auto-responders (RFC 3834 §3.3), are sent.
    """
    try:
        raw = bytes(raw)
        tokens = tuple(find_postal_msgid_tokens(raw))
    except Exception:
        return BounceReport("not_a_bounce", "unreadable input")
    try:
        return attrs.evolve(_parse(raw[:MAX_PARSE], mail_from), postal_msgids=tokens)
    except Exception as e:  # a RecursionError on hostile MIME nesting, a stdlib parser bug
        error = type(e).__name__
    try:  # what the header section alone says (a MAILER-DAEMON sender, an auto-reply)
        found = _parse(header_section(raw[:MAX_PARSE]), mail_from)
        return attrs.evolve(found, reason=f"{found.reason} (body unparseable: {error})", postal_msgids=tokens)
    except Exception:
        return BounceReport("not_a_bounce", f"unparseable: {error}", postal_msgids=tokens)


def _parse(raw: bytes, mail_from: str | None) -> BounceReport:
    message = _PARSER.parsebytes(raw)
    fields = _fields(message)
    subject = _first(fields, "subject")
    from_address, from_name = _from(fields)
    parts = list(_parts(message))

    def report(kind: BounceKind, reason: str, *, original: bool = True, **details: Any) -> BounceReport:
        quoted = _guarded(lambda: _original(parts)) if original else None
        return BounceReport(
            kind, reason, original=quoted, subject=subject, from_address=from_address, **details
        )

    feedback = _find(parts, ("message/feedback-report",))
    if feedback is not None:
        blocks = _guarded(lambda: _blocks(feedback)) or []
        complaint = _complaint(blocks[0] if blocks else {})
        return report("complaint", "RFC 5965 feedback report", complaint=complaint)

    recipients: list[BounceRecipient] = []
    reporting_mta = None
    for part in parts:
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            found, mta = _dsn(_guarded(partial(_blocks, part)) or [])
            recipients += found
            reporting_mta = reporting_mta or mta
    if recipients:
        return report(
            "dsn",
            "RFC 3464 delivery status notification",
            recipients=tuple(recipients[:MAX_RECIPIENTS]),
            reporting_mta=reporting_mta,
        )

    detected = _guarded(lambda: _detected(message if len(raw) <= MAX_DETECT else raw[:MAX_DETECT])) or []
    if detected:
        return report(
            "unrecognised_bounce",
            "bounce addresses found by flufl.bounce",
            recipients=tuple(detected[:MAX_RECIPIENTS]),
        )

    local = (from_address or "").rpartition("@")[0]
    if _DAEMON_LOCAL.fullmatch(local) or _DAEMON_NAME.search(from_name or ""):
        return report("unrecognised_bounce", f"from {from_address or from_name}, no recipients found")

    auto = _auto_reply(fields, subject, parts)
    if auto is not None:
        return report("auto_reply", auto, original=False)

    return_path = _first(fields, "return-path")
    if (mail_from is not None and mail_from.strip() in ("", "<>")) or (
        return_path is not None and return_path.replace(" ", "") == "<>"
    ):
        return report("unrecognised_bounce", "null return path, no recipients found")
    return report("not_a_bounce", "no sign of a bounce", original=False)


def _guarded(step: Callable[[], T]) -> T | None:
    """``step()``, or None if it raised: one unreadable part must not hide the rest of a report."""
    try:
        return step()
    except Exception:
        return None


# -- MIME ------------------------------------------------------------------------------------------------


def _parts(message: Message) -> Iterator[Message]:
    """Every part, depth first, without descending into message/* parts (a quoted message's own
    parts are not the report's). Iterative and bounded, for hostile nesting."""
    stack = [message]
    count = 0
    while stack and count < MAX_PARTS:
        part = stack.pop()
        count += 1
        yield part
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            children = part.get_payload()
            if isinstance(children, list):
                stack.extend(reversed([c for c in children if isinstance(c, Message)]))


def _find(parts: list[Message], types: tuple[str, ...]) -> Message | None:
    return next((p for p in parts if p.get_content_type() in types), None)


Fields = dict[str, list[str]]


def _fields(message: Message) -> Fields:
    """Header fields by lower-case name, values decoded (8-bit as UTF-8, RFC 2047) and unfolded."""
    out: Fields = {}
    for name, value in list(message.raw_items())[:MAX_HEADERS]:
        out.setdefault(str(name).strip().lower(), []).append(_text(value))
    return out


def _text(value: object) -> str:
    if isinstance(value, str):
        return decode_value(value.encode("utf-8", "surrogateescape"))
    return " ".join(str(value).split())


def _first(fields: Fields, name: str) -> str | None:
    values = fields.get(name)
    return values[0].strip() if values and values[0].strip() else None


def _blocks(part: Message) -> list[Fields]:
    """The field blocks of a report part (RFC 3464 §2.1, RFC 5965 §3.1): blank-line separated groups.

    The stdlib parses message/delivery-status into one Message per block and other message/* types
    into one Message (first block as headers, the rest as its body); a part sent with a transfer
    encoding arrives as a string. All three come back as blocks here.
    """
    payload = part.get_payload()
    blocks: list[Fields] = []
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                blocks.append(_fields(sub))
                body = None if sub.is_multipart() else sub.get_payload(decode=True)
                if isinstance(body, bytes) and body.strip():
                    blocks += _split_blocks(body)
    else:
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            blocks = _split_blocks(data)
    return [b for b in blocks if b]


def _split_blocks(data: bytes) -> list[Fields]:
    text = data.replace(b"\r\n", b"\n")
    return [_fields(_HEADER_PARSER.parsebytes(chunk + b"\n")) for chunk in re.split(rb"\n[ \t]*\n", text)]


def _typed(value: str | None) -> tuple[str | None, str | None]:
    """``"rfc822; a@b"`` → ("rfc822", "a@b"): the type prefix of RFC 3464 fields, when there is one."""
    if value is None:
        return None, None
    kind, semicolon, rest = value.partition(";")
    if semicolon and re.fullmatch(r"\s*[A-Za-z0-9][\w.-]*\s*", kind):
        return kind.strip(), rest.strip() or None
    return None, value.strip() or None


def _address(value: str | None) -> str | None:
    address = _typed(value)[1]
    if address is None:
        return None
    address = address.strip().strip("<>").strip()
    return address or None


# -- RFC 3464 --------------------------------------------------------------------------------------------


def _dsn(blocks: list[Fields]) -> tuple[list[BounceRecipient], str | None]:
    recipients = []
    reporting_mta = None
    for block in blocks:
        if not any(k in block for k in ("final-recipient", "original-recipient", "action")):
            reporting_mta = reporting_mta or _mta(_first(block, "reporting-mta"))
            continue
        diagnostic_type, diagnostic = _typed(_first(block, "diagnostic-code"))
        status = _STATUS.search(_first(block, "status") or "")
        recipients.append(
            BounceRecipient(
                final_recipient=_address(_first(block, "final-recipient")),
                original_recipient=_address(_first(block, "original-recipient"))
                or _address(_first(block, "x-actual-recipient")),
                action=_action(_first(block, "action")),
                status=status.group(1) if status else None,
                diagnostic_type=diagnostic_type,
                diagnostic=diagnostic,
                remote_mta=_mta(_first(block, "remote-mta")),
                last_attempt_date=_first(block, "last-attempt-date"),
            )
        )
    return recipients, reporting_mta


def _mta(value: str | None) -> str | None:
    """``"dns; mx.example.net. (the server for ...)"`` → "mx.example.net": the name, not the comment."""
    name = _typed(value)[1]
    words = name.split() if name else []
    return words[0].rstrip(".") or None if words else None


def _action(value: str | None) -> Action | None:
    word = (value or "").strip().lower()
    return next((action for prefix, action in _ACTIONS if word.startswith(prefix)), None)


# -- RFC 5965 --------------------------------------------------------------------------------------------


def _complaint(block: Fields) -> ComplaintReport:
    incidents = _first(block, "incidents")
    return ComplaintReport(
        feedback_type=(_first(block, "feedback-type") or "").lower() or None,
        user_agent=_first(block, "user-agent"),
        version=_first(block, "version"),
        original_mail_from=_address(_first(block, "original-mail-from")),
        original_rcpt_to=tuple(a for v in block.get("original-rcpt-to", []) if (a := _address(v))),
        arrival_date=_first(block, "arrival-date") or _first(block, "received-date"),
        reporting_mta=_mta(_first(block, "reporting-mta")),
        source_ip=_first(block, "source-ip"),
        reported_domain=_first(block, "reported-domain"),
        incidents=int(incidents) if incidents is not None and incidents.isdigit() else None,
    )


# -- the original message --------------------------------------------------------------------------------


def _original(parts: list[Message]) -> OriginalMessage | None:
    """The quoted original: a message/rfc822 or headers-only part (RFC 3462 §2, RFC 6533 §6), or failing
    those a header block quoted inline in the text (Exim's "This is a copy of the message")."""
    for part in parts[1:]:
        kind = part.get_content_type()
        pairs: list[tuple[str, str]] = []
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                pairs = _pairs(payload[0])
        elif kind in ("text/rfc822-headers", "message/global-headers"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                pairs = _pairs(_HEADER_PARSER.parsebytes(data.lstrip()))
        if pairs:
            return _original_from(pairs)
    for part in parts:
        if part.get_content_maintype() == "text" and not part.is_multipart():
            data = part.get_payload(decode=True)
            if isinstance(data, bytes) and (found := _inline(data)) is not None:
                return found
    return None


def _pairs(message: Message) -> list[tuple[str, str]]:
    """A message's header fields as (name, decoded value), in order."""
    return [(str(n).strip(), _text(v)) for n, v in list(message.raw_items())[:MAX_HEADERS]]


def _original_from(pairs: list[tuple[str, str]]) -> OriginalMessage:
    found = OriginalMessage(headers=tuple(pairs))
    message_id = found.header("message-id")
    if message_id is not None:
        # As Postal (and mtad.accept): everything after the last "<", up to the next ">".
        message_id = message_id.rpartition("<")[2].partition(">")[0].strip() or None
    token = _TOKEN.match((found.header("x-postal-msgid") or "").strip())
    return attrs.evolve(
        found,
        message_id=message_id,
        postal_msgid=token.group(0) if token else None,
        subject=found.header("subject"),
    )


def _inline(data: bytes) -> OriginalMessage | None:
    """The header block around the first quoted Message-ID or X-Postal-MsgID field in ``data``."""
    data = data.replace(b"\r\n", b"\n")
    match = _INLINE_FIELD.search(data)
    if match is None:
        return None
    blank = data.rfind(b"\n\n", 0, match.start())
    found = _original_from(_pairs(_HEADER_PARSER.parsebytes(data[blank + 2 if blank >= 0 else 0 :])))
    if found.message_id is None and found.postal_msgid is None:
        # Prose before the fields stopped the header parse: read from the field itself.
        found = _original_from(_pairs(_HEADER_PARSER.parsebytes(data[match.start() :])))
    return found


# -- bounces in other formats, auto-replies --------------------------------------------------------------


def _detected(message: Message | bytes) -> list[BounceRecipient]:
    """Failed addresses found by flufl.bounce's detectors (Mailman's), each with the first SMTP reply
    quoted after the address in the text, if any.

    The detectors read the whole body some fifty times over (a pass per pattern), so they get only the
    first `MAX_DETECT` bytes: the notice comes first, what follows is the quoted original.
    """
    if isinstance(message, bytes):
        message = _PARSER.parsebytes(message)
    parts = list(_parts(message))
    temporary, permanent = _flufl_failures(message)
    text = _plain_text(parts)
    found = []
    for action, addresses in (("failed", permanent), ("delayed", temporary - permanent)):
        for raw_address in sorted(addresses):
            address = raw_address.decode("ascii", "replace")
            status, diagnostic = _quoted_reply(text, address)
            found.append(
                BounceRecipient(
                    final_recipient=address,
                    action=action,  # type: ignore[arg-type]
                    status=status,
                    diagnostic=diagnostic,
                )
            )
    return found


def _flufl_failures(message: Message) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """What flufl.bounce's ``all_failures`` finds, except that a detector that raises is skipped.

    ``all_failures`` re-raises a detector's exception, so the detectors after it never run (its Yale
    detector raises IndexError on any message without a From field, which would hide a qmail bounce).
    So the detectors run here one by one, in flufl's order, as ``all_failures`` runs them; should a
    later flufl.bounce not have that list, ``all_failures`` itself does.
    """
    detectors = getattr(flufl.bounce._scan, "_DETECTORS", None)
    if not detectors:
        try:
            found: tuple[frozenset[bytes], frozenset[bytes]] = all_failures(message)
            return found
        except Exception:
            return frozenset(), frozenset()
    for detector in detectors:
        try:
            temporary, permanent = detector().process(message)
        except Exception:
            continue
        if temporary or permanent:
            return frozenset(temporary), frozenset(permanent)
    return frozenset(), frozenset()


def _plain_text(parts: list[Message]) -> str:
    texts = []
    for part in parts:
        if part.get_content_type() == "text/plain" and not part.is_multipart():
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                texts.append(data[:MAX_PARSE].decode("utf-8", "replace").replace("\r\n", "\n"))
    return "\n".join(texts)


def _quoted_reply(text: str, address: str) -> tuple[str | None, str | None]:
    """(status, diagnostic) from the paragraph that follows the first mention of ``address``: the SMTP
    reply quoted there (Exim, qmail's "Remote host said:"), else the paragraph itself (qmail's own
    "Sorry, no mailbox here by that name. (#5.1.1)", Exim's "Unrouteable address")."""
    at = text.lower().find(address.lower())
    if at < 0:
        return None, None
    rest = text[at + len(address) : at + len(address) + 2000].lstrip(">:")
    paragraph = re.split(r"\n[ \t]*\n", rest.lstrip(" \t\r\n"), maxsplit=1)[0]
    qmail = _QMAIL_STATUS.search(paragraph)
    reply = _PROSE_REPLY.search(paragraph)
    if reply is not None:
        return reply.group(2) or (qmail.group(1) if qmail else None), " ".join(reply.group(0).split())
    words = " ".join(paragraph.split())
    return (qmail.group(1) if qmail else None), words or None


def _auto_reply(fields: Fields, subject: str | None, parts: list[Message]) -> str | None:
    """Why this is an automatic reply (RFC 3834 §5 fields, their common vendor forms, the subjects
    responders write), or None."""
    auto_submitted = _first(fields, "auto-submitted")
    if auto_submitted is not None and auto_submitted.split(";")[0].strip().lower() != "no":
        return f"Auto-Submitted: {auto_submitted}"
    for name in _AUTO_REPLY_FIELDS:
        if name in fields:
            return f"{name} field"
    if (_first(fields, "x-autogenerated") or "").lower() == "reply":
        return "X-Autogenerated: Reply"
    if (_first(fields, "precedence") or "").lower() == "auto_reply":
        return "Precedence: auto_reply"
    if _find(parts, ("message/disposition-notification",)) is not None:
        return "RFC 8098 disposition notification"
    if subject is not None and _AUTO_REPLY_SUBJECT.search(subject):
        return f"subject {subject!r}"
    return None


def _from(fields: Fields) -> tuple[str | None, str | None]:
    """The (address, display name) of the first From field: ``Name <a@b>`` and ``a@b (Name)`` alike."""
    value = _first(fields, "from")
    if value is None:
        return None, None
    name, address = email.utils.parseaddr(value)
    return address or None, name or None

"""Building an RFC 5322 message from fields (the send API's ``send/message``), safely.

Every header line is written here, not by the caller: a value can never start a new header field, whatever
it contains (CR, LF, NUL and other controls become spaces), and non-ASCII text is written as RFC 2047
encoded words (display names, Subject, custom fields) or, in addresses, as A-label domains (RFC 5890) and
raw UTF-8 local parts (RFC 6532, which only an SMTPUTF8 path can carry anyway). ASCII values are folded at
whitespace only (RFC 5322 §2.2.3), so a long ``List-Unsubscribe`` URL in a custom field stays intact.

Bodies are UTF-8 and always 7-bit safe on the wire: quoted-printable or base64, whichever is shorter
(RFC 2045 §6), so every line is short and ends in CRLF, and DKIM signing sees what is delivered.
The MIME tree follows what Postal's clients expect: text/plain and text/html as multipart/alternative,
inside multipart/mixed with the attachments when there are any.
"""

from __future__ import annotations

import datetime
import email.policy
import email.utils
import functools
import re
import uuid
from collections.abc import Sequence
from email.contentmanager import _encode_text  # type: ignore[attr-defined]
from email.header import Header
from email.message import MIMEPart

import attrs

#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998 octets.
FOLD_AT = 78
MAX_LINE_OCTETS = 998

#: RFC 5321 §4.5.3.1.1 and §4.5.3.1.2.
MAX_LOCAL_PART_OCTETS = 64
MAX_DOMAIN_OCTETS = 255

#: Fields this module always writes itself; a custom field of the same name is dropped. ``Content-*``
#: fields are dropped too: at the top level they would change how the MIME tree is read.
OWN_FIELDS = frozenset({"from", "message-id", "date", "mime-version"})
#: Fields written from the message's own parameters when those are given; a custom one is kept otherwise
#: (e.g. ``To: undisclosed-recipients:;`` on a message sent only to Bcc recipients).
FIELDS_FROM_PARAMETERS = frozenset({"to", "cc", "sender", "reply-to", "subject"})

#: Generates the MIME parts: CRLF line ends, and never 8bit, so bodies are quoted-printable or base64.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")

#: C0 controls (but TAB), DEL and the Unicode line and paragraph separators: never allowed in a field.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
#: RFC 5322 §3.6.8: a field name is printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
#: RFC 5322 §3.2.3 atext (plus space between atoms): a display name that needs no quoting.
_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+")
#: What an address must not contain: whitespace, controls and the characters that delimit addresses.
_ADDRESS_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f<>(),;:\\\"]")
_MEDIA_TOKEN = r"[A-Za-z0-9!#$&^_.+\-]+"
_MEDIA_TYPE = re.compile(rf"({_MEDIA_TOKEN})/({_MEDIA_TOKEN})")


@attrs.frozen
class Mailbox:
    """An address with an optional display name, as written in a header field."""

    address: str
    name: str = ""


@attrs.frozen
class Attachment:
    filename: str
    #: ``type/subtype``; anything else, or a multipart or message type, is sent as application/octet-stream.
    content_type: str
    data: bytes = attrs.field(repr=False)


@attrs.frozen
class Draft:
    """What a message is built from: the send API's parameters once parsed and checked."""

    from_: Mailbox
    to: tuple[Mailbox, ...] = ()
    cc: tuple[Mailbox, ...] = ()
    sender: Mailbox | None = None
    reply_to: tuple[Mailbox, ...] = ()
    subject: str | None = None
    plain_body: str | None = None
    html_body: str | None = None
    #: Custom fields in the order given: (name, value).
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()


def clean_text(value: str) -> str:
    """``value`` with lone UTF-16 surrogates (JSON allows ``"\\ud800"``) replaced, so it encodes as UTF-8."""
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def single_line(value: str) -> str:
    """``value`` with every control character (CR and LF above all) replaced by a space.

    This is what makes header injection impossible: nothing in a value can end its field.
    """
    return _CONTROLS.sub(" ", clean_text(value))


def is_field_name(name: str) -> bool:
    return _FIELD_NAME.fullmatch(name) is not None


def strip_name(text: str) -> str:
    """The address in ``Name <address>``, as Postal takes it: after the last ``<``, before the next ``>``,
    without ``(comments)``, stripped."""
    address = text.rpartition("<")[2].partition(">")[0] if "<" in text else text.partition(">")[0]
    return re.sub(r"\(.+?\)", "", address).strip()


def parse_mailbox(text: str) -> Mailbox:
    """``"Name" <a@b>``, ``Name <a@b>`` or ``a@b`` as a `Mailbox` (the address is not checked here)."""
    text = single_line(text).strip()
    name = ""
    if "<" in text:
        name = text[: text.rfind("<")].strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return Mailbox(address=strip_name(text), name=name.strip())


def address_problem(address: str) -> str | None:
    """Why ``address`` cannot be used as a mailbox (RFC 5321 §4.1.2, §4.5.3.1), or None if it can."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "it needs a local part and a domain, as in user@example.com"
    if _ADDRESS_FORBIDDEN.search(address) or "@" in local:
        return 'it contains spaces, control characters or one of < > ( ) , ; : \\ " @'
    if len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        return f"its local part is longer than {MAX_LOCAL_PART_OCTETS} octets"
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        return f"its domain is longer than {MAX_DOMAIN_OCTETS} octets"
    return None


def domain_of(address: str) -> str:
    """The domain of ``address``, lower-cased (domains are case-insensitive, RFC 5321 §2.4)."""
    return address.rpartition("@")[2].strip().lower()


def new_message_id(hostname: str) -> str:
    """A fresh Message-ID (without angle brackets), unique by a random UUID as Postal makes them."""
    return f"{uuid.uuid4()}@{hostname}"


def format_date(timestamp: float) -> str:
    """RFC 5322 §3.3 date-time in UTC: ``Tue, 14 Nov 2023 22:13:20 +0000``."""
    return _format_second(int(timestamp))


@functools.lru_cache(maxsize=4)
def _format_second(second: int) -> str:
    # Every message of a second gets the same text (twice: Date and Received); formatting it is a tenth
    # of composing a message.
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def received_value(client_ip: str, hostname: str, timestamp: float) -> str:
    """The trace field (RFC 5321 §4.4) a message received over the HTTP API gets, Postal's shape:
    ``from api ([192.0.2.1]) by mx.example with HTTP; <date>``."""
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    return f"from api ([{literal}]) by {hostname} with HTTP; {format_date(timestamp)}"


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _fold(first: str, chunks: Sequence[str]) -> str | None:
    """Lines from ``first`` and then ``chunks`` (each starting with whitespace), folded before a chunk
    where a line would pass 78 characters; None if some line still passes 998 octets."""
    lines: list[str] = []
    line = first
    for chunk in chunks:
        if _octets(line) + _octets(chunk) > FOLD_AT and line.strip():
            lines.append(line)
            line = chunk
        else:
            line += chunk
    lines.append(line)
    if any(_octets(line) > MAX_LINE_OCTETS for line in lines):
        return None
    return "\r\n".join(lines)


def _encoded_words(text: str, name: str = "") -> str:
    """``text`` as RFC 2047 encoded words (UTF-8), split on character boundaries, folded with CRLF.

    Lines of 76 characters keep every encoded word, after the folding space, within RFC 2047 §2's 75.
    """
    return Header(text, "utf-8", header_name=name or None).encode(linesep="\r\n", maxlinelen=76)


def unstructured_field(name: str, value: str) -> str:
    """``Name: value`` as one folded field (RFC 5322 §3.2.5 unstructured, RFC 2047 if not ASCII)."""
    value = single_line(value).strip()
    if value.isascii():
        words = re.findall(r"[ \t]*[^ \t]+", value)
        first = f"{name}: {words[0].lstrip()}" if words else f"{name}: "
        folded = _fold(first, words[1:])
        if folded is not None:
            return folded
    return f"{name}: {_encoded_words(value, name)}"


def _phrase(name: str) -> str:
    """A display name as an RFC 5322 phrase: atoms, a quoted string, or RFC 2047 encoded words."""
    if not name.isascii():
        return _encoded_words(name).replace("\r\n", "")
    if _PHRASE.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _addr_spec(address: str) -> str:
    """An address for a header field: the domain as an A-label where IDNA can express it (RFC 5890)."""
    local, _, domain = address.rpartition("@")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # written as UTF-8 (RFC 6532); such a message needs an SMTPUTF8 path in any case
    return f"{local}@{domain}"


def format_mailbox(mailbox: Mailbox) -> str:
    address = _addr_spec(single_line(mailbox.address).strip())
    name = single_line(mailbox.name).strip()
    return f"{_phrase(name)} <{address}>" if name else address


def address_field(name: str, mailboxes: Sequence[Mailbox]) -> str:
    """``To: a@b, "Doe, Jane" <j@d>`` folded between and within mailboxes, never inside an address."""
    text = ", ".join(format_mailbox(m) for m in mailboxes)
    words = re.findall(r"[ \t]*[^ \t]+", text)
    folded = _fold(f"{name}: {words[0].lstrip()}", words[1:]) if words else f"{name}: "
    # An address alone is at most 320 octets, so only a pathological display name can pass 998 octets.
    return folded if folded is not None else f"{name}: {text}"


def _media_type(content_type: str) -> tuple[str, str]:
    match = _MEDIA_TYPE.fullmatch(content_type.partition(";")[0].strip())
    if match is None or match.group(1).lower() in ("multipart", "message"):
        return "application", "octet-stream"
    return match.group(1).lower(), match.group(2).lower()


def _body(draft: Draft) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    plain = clean_text(draft.plain_body) if draft.plain_body and draft.plain_body.strip() else None
    html = clean_text(draft.html_body) if draft.html_body and draft.html_body.strip() else None
    if plain is not None:
        part.set_content(plain, subtype="plain", charset="utf-8")
        if html is not None:
            part.add_alternative(html, subtype="html", charset="utf-8")
    elif html is not None:
        part.set_content(html, subtype="html", charset="utf-8")
    else:
        part.set_content("", subtype="plain", charset="utf-8")
    for attachment in draft.attachments:
        maintype, subtype = _media_type(attachment.content_type)
        part.add_attachment(
            attachment.data,
            maintype=maintype,
            subtype=subtype,
            filename=single_line(attachment.filename).strip() or "attachment",
        )
    return part


def _single_text_part(text: str, subtype: str) -> bytes:
    """What ``MIMEPart.set_content(text, subtype, charset="utf-8").as_bytes()`` writes, without the
    MIMEPart: the same transfer-encoding choice (the stdlib's own heuristic), at a fraction of the cost.

    Building the part through ``email.message`` was a quarter of the send API's CPU time in the HTTP
    benchmark; the common message (one text body, no attachments) takes this path.
    """
    cte: str
    data: str
    cte, data = _encode_text(text, "utf-8", None, _POLICY)
    body = data.replace("\r\n", "\n").replace("\n", "\r\n")
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    return (head + body).encode("ascii")


def _body_bytes(draft: Draft) -> bytes:
    plain = draft.plain_body if draft.plain_body and draft.plain_body.strip() else None
    html = draft.html_body if draft.html_body and draft.html_body.strip() else None
    if not draft.attachments and (plain is None or html is None):
        if plain is not None:
            return _single_text_part(clean_text(plain), "plain")
        if html is not None:
            return _single_text_part(clean_text(html), "html")
    return _body(draft).as_bytes(policy=_POLICY)


def compose(draft: Draft, *, message_id: str, timestamp: float, received: str | None = None) -> bytes:
    """The message for ``draft`` with CRLF line ends, ready to queue.

    ``message_id`` is written in angle brackets; ``timestamp`` gives the Date field; ``received`` (see
    `received_value`) becomes the first field. Bcc recipients are not the business of this function:
    they are never written into the message (RFC 5322 §3.6.3 allows either; Postal omits them).
    """
    given = {
        "to": bool(draft.to),
        "cc": bool(draft.cc),
        "sender": draft.sender is not None,
        "reply-to": bool(draft.reply_to),
        "subject": draft.subject is not None,
    }
    fields: list[str] = []
    if received is not None:
        fields.append(unstructured_field("Received", received))
    fields.append(f"Date: {format_date(timestamp)}")
    fields.append(address_field("From", [draft.from_]))
    if draft.sender is not None:
        fields.append(address_field("Sender", [draft.sender]))
    if draft.reply_to:
        fields.append(address_field("Reply-To", draft.reply_to))
    if draft.to:
        fields.append(address_field("To", draft.to))
    if draft.cc:
        fields.append(address_field("Cc", draft.cc))
    if draft.subject is not None:
        fields.append(unstructured_field("Subject", draft.subject))
    fields.append(f"Message-ID: <{single_line(message_id).strip()}>")
    for name, value in draft.headers:
        lower = name.lower()
        if not is_field_name(name) or lower in OWN_FIELDS or lower.startswith("content-"):
            continue
        if given.get(lower):
            continue
        fields.append(unstructured_field(name, value))
    fields.append("MIME-Version: 1.0")
    head = "".join(f"{field}\r\n" for field in fields).encode("utf-8")
    return head + _body_bytes(draft)

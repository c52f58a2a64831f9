"""Parameters of the legacy (Postal v1) API: where they come from, and their shapes checked field by field.

Postal's API was built on Moonrope, which takes parameters either as a JSON body (``Content-Type:
application/json``) or as a form or query field ``params`` holding JSON; both work here, and so does a
JSON object body sent with another content type (``curl -d '{...}'``), which Postal would silently read as
no parameters at all. Every shape problem is a `ParameterError` whose message names the parameter, the
``parameter-error`` status of Postal's envelope.

Only shapes are checked here. What Postal reports with its own error codes (no recipients, too many
addresses, no content, attachment without name or data) is left to the API, in Postal's order.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from mtad.mail.compose import Mailbox, address_problem, clean_text, is_field_name, parse_mailbox

#: The expansions of ``messages/message``; ``_expansions: true`` asks for all of them.
EXPANSIONS = (
    "status",
    "details",
    "inspection",
    "plain_body",
    "html_body",
    "attachments",
    "headers",
    "raw_message",
    "activity_entries",
)

#: Message ids are 64-bit (``messages.id`` is a BIGINT).
MAX_ID = 2**63

#: The ``messages.tag`` column holds 255 characters.
MAX_TAG_LENGTH = 255

Params = Mapping[str, Any]


class ParameterError(Exception):
    """A parameter is missing or has the wrong shape; the message names it, in Postal's wording where
    Postal has one (``"`id` parameter is required but is missing"``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def missing(name: str) -> ParameterError:
    return ParameterError(f"`{name}` parameter is required but is missing")


def _json_object(text: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ParameterError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ParameterError(f"{where} must be a JSON object")
    return value


def request_params(content_type: str | None, body: bytes, params_field: bytes | None) -> dict[str, Any]:
    """The parameters of one request, as Postal's ``api_params`` finds them.

    ``body`` is the request body (already de-chunked), ``params_field`` the ``params`` form or query
    field if there is one (a form field wins over a query field of the same name).
    """
    if (content_type or "").strip().lower().startswith("application/json"):
        return _json_object(body, "The request body") if body.strip() else {}
    if params_field is not None and params_field.strip():
        return _json_object(params_field, "The `params` parameter")
    if body.lstrip().startswith(b"{"):
        return _json_object(body, "The request body")
    return {}


def is_blank(value: Any) -> bool:
    """Ruby's ``blank?``: None, False, and empty or all-whitespace strings, lists and objects."""
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | dict):
        return not value
    return False


def is_true(value: Any) -> bool:
    """A JSON flag: true, 1, "true" or "1" (Postal would also take 0 and "false" as true: it tests Ruby
    truthiness, where only nil and false are false)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return value is True or (type(value) is int and value == 1)


def optional_text(params: Params, name: str) -> str | None:
    """A string parameter; numbers are taken as their text, as Postal's ``to_s`` would."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ParameterError(f"`{name}` parameter must be a string")


def _entries(params: Params, name: str) -> list[str]:
    """An address list: an array of strings or one string of comma-separated addresses (as Postal splits
    them: on commas followed by any whitespace). Null entries and empty strings are skipped."""
    value = params.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [e for e in re.split(r",\s*", clean_text(value)) if e.strip()]
    if isinstance(value, list):
        entries = []
        for entry in value:
            if entry is None:
                continue
            if not isinstance(entry, str):
                raise ParameterError(f"`{name}` parameter must be an array of strings")
            if entry.strip():
                entries.append(clean_text(entry))
        return entries
    raise ParameterError(f"`{name}` parameter must be an array of strings")


def _checked(mailbox: Mailbox, name: str) -> Mailbox:
    problem = address_problem(mailbox.address)
    if problem is not None:
        raise ParameterError(
            f"`{name}` parameter has an invalid address {json.dumps(mailbox.address)}: {problem}"
        )
    return mailbox


def mailboxes(params: Params, name: str) -> tuple[Mailbox, ...]:
    return tuple(_checked(parse_mailbox(entry), name) for entry in _entries(params, name))


def optional_mailbox(params: Params, name: str) -> Mailbox | None:
    text = optional_text(params, name)
    if text is None or not text.strip():
        return None
    return _checked(parse_mailbox(text), name)


def decode_base64(text: str) -> bytes:
    """Base64 with or without line breaks or padding (RFC 2045 §6.8 lines, or one long line); other
    characters outside the alphabet are an error rather than silently skipped (as Ruby's decode64 does)."""
    compact = re.sub(r"\s+", "", text)
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise ValueError(str(e) or "not valid base64") from None


@attrs.frozen
class AttachmentParam:
    """One attachment as given; ``data`` is None when missing or blank, or when there is no name (Postal
    reports the missing name first)."""

    name: str
    content_type: str
    data: bytes | None = attrs.field(repr=False)


@attrs.frozen
class SendMessageParams:
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    from_: Mailbox | None
    sender: Mailbox | None
    reply_to: tuple[Mailbox, ...]
    subject: str | None
    plain_body: str | None
    html_body: str | None
    tag: str | None
    bounce: bool
    headers: tuple[tuple[str, str], ...]
    attachments: tuple[AttachmentParam, ...]


def _header_value(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int | float):
        return str(value)
    raise ParameterError(f"`headers` parameter: the value of {json.dumps(name)} must be a string")


def _headers(params: Params) -> tuple[tuple[str, str], ...]:
    value = params.get("headers")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ParameterError("`headers` parameter must be an object of field names and values")
    headers = []
    for name, raw in value.items():
        if not is_field_name(name):
            raise ParameterError(
                f"`headers` parameter has an invalid field name {json.dumps(name)}: "
                "a name is printable ASCII without spaces or colons (RFC 5322 §3.6.8)"
            )
        text = _header_value(name, raw)
        if text is not None:
            headers.append((name, text))
    return tuple(headers)


def _attachments(params: Params) -> tuple[AttachmentParam, ...]:
    value = params.get("attachments")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ParameterError("`attachments` parameter must be an array of objects")
    attachments = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            continue  # as Postal: entries that are not objects are ignored
        where = f"`attachments[{index}]`"
        name = optional_text(entry, "name") or ""
        content_type = optional_text(entry, "content_type") or "application/octet-stream"
        raw = entry.get("data")
        if raw is not None and not isinstance(raw, str):
            raise ParameterError(f"{where} parameter: `data` must be a base64 string")
        data: bytes | None = None
        if name.strip() and raw is not None and raw.strip():
            try:
                data = decode_base64(raw)
            except ValueError as e:
                raise ParameterError(f"{where} parameter: `data` is not valid base64: {e}") from None
        attachments.append(AttachmentParam(name=name, content_type=content_type, data=data))
    return tuple(attachments)


def parse_send_message(params: Params) -> SendMessageParams:
    """The parameters of ``send/message``; `ParameterError` names the first one that is malformed."""
    tag = optional_text(params, "tag")
    if tag is not None and len(tag) > MAX_TAG_LENGTH:
        raise ParameterError(f"`tag` parameter must be at most {MAX_TAG_LENGTH} characters")
    return SendMessageParams(
        to=mailboxes(params, "to"),
        cc=mailboxes(params, "cc"),
        bcc=mailboxes(params, "bcc"),
        from_=optional_mailbox(params, "from"),
        sender=optional_mailbox(params, "sender"),
        reply_to=mailboxes(params, "reply_to"),
        subject=optional_text(params, "subject"),
        plain_body=optional_text(params, "plain_body"),
        html_body=optional_text(params, "html_body"),
        tag=tag or None,
        bounce=is_true(params.get("bounce")),
        headers=_headers(params),
        attachments=_attachments(params),
    )


@attrs.frozen
class SendRawParams:
    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes = attrs.field(repr=False)
    bounce: bool


def parse_send_raw(params: Params) -> SendRawParams:
    """The parameters of ``send/raw``, checked in Postal's order (rcpt_to, mail_from, data)."""
    rcpt_to = params.get("rcpt_to")
    if not isinstance(rcpt_to, list):
        raise missing("rcpt_to")
    mail_from = params.get("mail_from")
    if is_blank(mail_from):
        raise missing("mail_from")
    data = params.get("data")
    if is_blank(data):
        raise missing("data")
    if not isinstance(mail_from, str):
        raise ParameterError("`mail_from` parameter must be a string")
    if not isinstance(data, str):
        raise ParameterError("`data` parameter must be a base64 string")
    sender = _checked(Mailbox(address=clean_text(mail_from).strip()), "mail_from").address
    recipients = tuple(
        _checked(Mailbox(address=e.strip()), "rcpt_to").address for e in _entries(params, "rcpt_to")
    )
    try:
        message = decode_base64(data)
    except ValueError as e:
        raise ParameterError(f"`data` parameter is not valid base64: {e}") from None
    return SendRawParams(
        mail_from=sender, rcpt_to=recipients, data=message, bounce=is_true(params.get("bounce"))
    )


def message_id(params: Params) -> tuple[Any, int | None]:
    """``id`` as given (echoed in ``MessageNotFound``) and as a number: a JSON number or a string of
    digits (Postal answers a string with HTTP 500); None when it cannot name a message."""
    value = params.get("id")
    if is_blank(value):
        raise missing("id")
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
    # Message ids are positive 64-bit integers; anything else names no message (and must not reach SQL).
    return value, number if number is not None and 0 < number < MAX_ID else None


def expansions(params: Params) -> frozenset[str]:
    """The expansions asked for, as Postal reads ``_expansions``: ``true`` (all) or an array of names."""
    value = params.get("_expansions")
    if value is True:
        return frozenset(EXPANSIONS)
    if isinstance(value, list):
        return frozenset(e for e in value if isinstance(e, str) and e in EXPANSIONS)
    return frozenset()

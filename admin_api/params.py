"""Parameters of the legacy (Postal v1) API: where they come from, and their shapes checked field by field.

Postal's API was built on Moonrope, which takes parameters either as a JSON body (``Content-Type:
application/json``) or as a form or query field ``params`` holding JSON; both work here, and so does a
JSON object body sent with another content type (``curl -d '{...}'``), which Postal would silently read as
no parameters at all. Every shape problem is a `ParameterError` whose message names the parameter, the
``parameter-error`` status of Postal's envelope.

Plain form and query fields (``to=a@example.org&subject=...``) are parameters too, nested the way Rails
nests them (`nested_params`: ``to[]=a&to[]=b``, ``headers[X-Foo]=bar``, ``attachments[][name]=...``).
Postal's ``api_params`` ignores them (only ``params`` is read from a form, so such a request answers
``NoRecipients``); Rails parses them for every request, and clients send them. As in Rails, a query
field wins over a body field of the same top-level name, and a JSON body gets the query fields too.
Fields are UTF-8 (RFC 3629) after percent-decoding; one that is not is a `ParameterError` naming it,
where Rails answers HTTP 400.

Only shapes are checked here. What Postal reports with its own error codes (no recipients, too many
addresses, no content, attachment without name or data) is left to the API, in Postal's order. Where a
list is expected, a single string is a list of one (a form field given once is a string, so ``to=x`` and
``rcpt_to=x`` work; Postal answers a JSON string ``rcpt_to`` with "required but is missing"), and an
object keyed 0, 1, 2... is a list in that order (``to[0]=a&to[1]=b``, as PHP's ``http_build_query`` and
Node's ``qs`` write lists).
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
import re
from collections.abc import Iterable, Mapping
from email.message import Message
from typing import Any
from urllib.parse import unquote_to_bytes

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

#: How deep form field names may nest (``a[b][c]`` is 3), Rack's ``param_depth_limit``.
MAX_FIELD_DEPTH = 32

#: One form field: its name and value as bytes after percent-decoding; the value None without an ``=``.
Field = tuple[bytes, bytes | None]

Params = Mapping[str, Any]


class ParameterError(Exception):
    """A parameter is missing or has the wrong shape; the message names it, in Postal's wording where
    Postal has one (``"`id` parameter is required but is missing"``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def missing(name: str) -> ParameterError:
    return ParameterError(f"`{name}` parameter is required but is missing")


def _json_object(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ParameterError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ParameterError(f"{where} must be a JSON object")
    return value


def _media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def request_params(content_type: str | None, body: bytes, query: bytes = b"") -> dict[str, Any]:
    """The parameters of one request: Postal's ``api_params``, with Rails's form and query fields.

    ``body`` is the request body (already de-chunked), ``query`` the raw query string (after ``?``).
    A ``params`` field (query or form) holding JSON is all the parameters, as in Postal; without one,
    the form and query fields are.
    """
    query_params = nested_params(form_fields(query)) if query else {}
    if (content_type or "").strip().lower().startswith("application/json"):
        found = _json_object(body, "The request body") if body.strip() else {}
        return {**found, **query_params} if query_params else found
    media = _media_type(content_type)
    json_body = media != "multipart/form-data" and body.lstrip().startswith(b"{")
    body_params: dict[str, Any] = {}
    if json_body:
        pass  # a JSON object sent as a form (``curl -d '{...}'``): read below, unless ``params`` is given
    elif media == "application/x-www-form-urlencoded":
        body_params = nested_params(form_fields(body))
    elif media == "multipart/form-data":
        body_params = nested_params(multipart_fields(content_type or "", body))
    params = {**body_params, **query_params}
    given = params.get("params")
    if not is_blank(given):
        if not isinstance(given, str):
            raise ParameterError("The `params` parameter must be a JSON object as text")
        return _json_object(given, "The `params` parameter")
    if json_body:
        return _json_object(body, "The request body")
    return params


def form_fields(encoded: bytes) -> list[Field]:
    """The fields of ``application/x-www-form-urlencoded`` text (a body or a query string), in order.

    Names and values are percent-decoded to bytes, ``+`` as space; a malformed escape (``100%``) stays
    as it is, as the WHATWG URL standard's form parser leaves it. Text decoding is `nested_params`'s, so
    a bad byte can be reported with its field's name. Empty pieces (``a=1&&b=2``) are skipped.
    """
    fields: list[Field] = []
    for piece in encoded.split(b"&"):
        if not piece:
            continue
        name, equals, value = piece.partition(b"=")
        fields.append(
            (
                unquote_to_bytes(name.replace(b"+", b" ")),
                unquote_to_bytes(value.replace(b"+", b" ")) if equals else None,
            )
        )
    return fields


_MULTIPART_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def multipart_fields(content_type: str, body: bytes) -> list[Field]:
    """The fields of a ``multipart/form-data`` body (RFC 7578), in order; files are fields too.

    Read here rather than taken from Twisted's ``request.args``, which groups values by name (so
    ``attachments[][name]`` and ``attachments[][data]`` could not be paired) and parses only POST.
    """
    head = b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    parsed = _MULTIPART_PARSER.parsebytes(head + body)
    if not parsed.is_multipart():
        raise ParameterError("The request body is not multipart/form-data")
    fields: list[Field] = []
    parts: list[Message] = parsed.get_payload()  # type: ignore[assignment]
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue
        payload = part.get_payload(decode=True)
        value = payload if isinstance(payload, bytes) else b""
        fields.append((name.encode("utf-8", "surrogateescape"), value))
    return fields


def nested_params(fields: Iterable[Field]) -> dict[str, Any]:
    """Form fields as Rails reads them (Rack's ``QueryParser#normalize_params``), decoded as UTF-8.

    ``a=1`` is a string (the last one given wins), ``a[]=1&a[]=2`` a list, ``a[b]=1`` an object, and
    ``a[][b]=1&a[][c]=2&a[][b]=3`` a list of objects, a new one begun when a name repeats. A field that
    contradicts an earlier one (``a=1&a[]=2``) is a `ParameterError` naming it, as is a field that is
    not UTF-8 or nests deeper than `MAX_FIELD_DEPTH`.
    """
    params: dict[str, Any] = {}
    for raw_name, raw_value in fields:
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            shown = raw_name.decode("utf-8", "replace")
            raise ParameterError(
                f"The form field name {json.dumps(shown, ensure_ascii=False)} is not valid UTF-8"
            ) from None
        try:
            value = None if raw_value is None else raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise ParameterError(f"`{name}` parameter is not valid UTF-8") from None
        _nest(params, name, value, 0, name)
    return params


def _shape(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _conflict(field: str, key: str, existing: Any, wanted: str) -> ParameterError:
    return ParameterError(
        f"`{field}` parameter makes `{key}` {wanted}, but an earlier field made it {_shape(existing)}"
    )


def _nest(params: dict[str, Any], name: str, value: str | None, depth: int, field: str) -> Any:
    """Rack's ``_normalize_params``: put ``value`` into ``params`` under the rest of a field's ``name``.

    Returns what the caller stores (``params``, or a one-element list for a trailing ``[]``).
    """
    if depth >= MAX_FIELD_DEPTH:
        raise ParameterError(f"`{field}` parameter nests deeper than {MAX_FIELD_DEPTH} levels")
    if depth == 0:
        start = name.find("[", 1)
        key, after = (name[:start], name[start:]) if start >= 0 else (name, "")
    elif name.startswith("[]"):
        key, after = "[]", name[2:]
    elif name.startswith("[") and (end := name.find("]", 1)) >= 0:
        key, after = name[1:end], name[end + 1 :]
    else:
        key, after = name, ""  # nested but not in brackets (``a[b]c``): Rack takes all of it as the key
    if not key:
        return params
    if after == "":
        if key == "[]" and depth != 0:
            return [value]
        params[key] = value
    elif after == "[":
        params[name] = value
    elif after.startswith("[]"):
        child = after[3:-1] if after[2:3] == "[" and after.endswith("]") else ""
        if not child or "[" in child or "]" in child:
            child = after[2:]
        entries = params.get(key)
        if entries is None:
            entries = params[key] = []
        if not isinstance(entries, list):
            raise _conflict(field, key, entries, "an array")
        if not child:  # ``a[]``
            entries.append(value)
        elif entries and isinstance(entries[-1], dict) and not _has_key(entries[-1], child):
            _nest(entries[-1], child, value, depth + 1, field)
        else:
            entries.append(_nest({}, child, value, depth + 1, field))
    else:
        inner = params.get(key)
        if inner is None:
            inner = params[key] = {}
        if not isinstance(inner, dict):
            raise _conflict(field, key, inner, "an object")
        params[key] = _nest(inner, after, value, depth + 1, field)
    return params


def _has_key(params: dict[str, Any], name: str) -> bool:
    """Rack's ``params_hash_has_key?``: whether ``name`` (``b`` or ``b[c]``) is set in ``params``, which
    decides whether ``a[][b]`` adds to the last object of ``a`` or begins a new one."""
    if "[]" in name:
        return False
    found: Any = params
    for part in re.split(r"[\[\]]+", name):
        if not part:
            continue
        if not isinstance(found, dict) or part not in found:
            return False
        found = found[part]
    return True


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


def _as_list(value: Any) -> Any:
    """``value``, or the list an object keyed 0, 1, 2... stands for (``to[0]=a&to[1]=b``), in key order."""
    if isinstance(value, dict) and value and all(k.isascii() and k.isdigit() for k in value):
        return [value[k] for k in sorted(value, key=int)]
    return value


def _entries(params: Params, name: str) -> list[str]:
    """An address list: an array of strings or one string of comma-separated addresses (as Postal splits
    them: on commas followed by any whitespace). Null entries and empty strings are skipped."""
    value = _as_list(params.get(name))
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
    value = _as_list(params.get("attachments"))
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
    """The parameters of ``send/raw``, checked in Postal's order (rcpt_to, mail_from, data).

    ``rcpt_to`` may be one string of comma-separated addresses as well as an array (Postal wants an
    array, but a form field given once is a string)."""
    rcpt_to = _as_list(params.get("rcpt_to"))
    if not isinstance(rcpt_to, list | str):
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
    """The expansions asked for, as Postal reads ``_expansions``: ``true`` (all) or an array of names;
    from a form also ``"true"`` or ``"1"`` (all) and one name given once (``_expansions=status``)."""
    value = _as_list(params.get("_expansions"))
    if value is True or (isinstance(value, str) and is_true(value)):
        return frozenset(EXPANSIONS)
    if isinstance(value, str):
        value = [value.strip()]
    if isinstance(value, list):
        return frozenset(e for e in value if isinstance(e, str) and e in EXPANSIONS)
    return frozenset()

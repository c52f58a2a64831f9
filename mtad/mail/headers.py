"""Reading a message's header section (RFC 5322 §2.2) without decoding its body."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.default)
_RAW_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def header_section(message: bytes) -> bytes:
    """The header section of ``message`` without its body (RFC 5322 §2.1).

    Only the headers are parsed, so a 25 MB body is never decoded to a string just to read the Subject.
    The SMTP server hands over CRLF line ends; bare LF is accepted for messages from the send API.
    """
    if message.startswith((b"\r\n", b"\n")):
        return b""
    crlf = message.find(b"\r\n\r\n")
    lf = message.find(b"\n\n", 0, None if crlf < 0 else crlf)
    if lf >= 0:
        return message[: lf + 1]
    if crlf >= 0:
        return message[: crlf + 2]
    return message


def header_addresses(message: bytes, name: str) -> list[str]:
    """The addresses in every ``name`` field of ``message`` (empty if there is none)."""
    section = header_section(message)
    try:
        parsed = _HEADER_PARSER.parsebytes(section)
        return [a.addr_spec for value in parsed.get_all(name) or [] for a in value.addresses]
    except Exception:  # the modern parser has raised on hostile input; fall back to the lenient one
        raw = _RAW_HEADER_PARSER.parsebytes(section)
        return [address for _, address in email.utils.getaddresses(raw.get_all(name) or [])]


def from_domain(message: bytes) -> str | None:
    """The domain of the (last) From address, lower-cased: the domain a message is DKIM-signed for."""
    addresses = header_addresses(message, "From")
    if not addresses or "@" not in addresses[-1]:
        return None
    return addresses[-1].rpartition("@")[2].strip().lower() or None

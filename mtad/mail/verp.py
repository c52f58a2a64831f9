"""VERP return paths: an envelope sender per message, so a bounce names the message it is for.

Postal gives every message of a server the same return path (``<server token>@<return path domain>``)
and links a bounce to its message only through the ``X-Postal-MsgID`` header quoted back in the bounce,
which many receiving MTAs strip (postalserver/postal#706, #439). A variable envelope return path
(VERP) carries the message in the address itself, where every bounce must come back.

The local part is ``b.<message id>.<server id>.<tag>``: both ids in base 36, the tag the first 50 bits of
an HMAC-SHA256 over both ids under the installation's secret, in base 32. The address is

- short: at most 40 octets of local part (ids below 2**64), well under RFC 5321 §4.5.3.1.1's 64;
- made of lower-case letters, digits and dots only, so it is a dot-atom (RFC 5322 §3.2.3) that needs no
  quoting, and it survives an MTA that lower-cases (or upper-cases) it: decoding ignores case;
- canonical: one address per message (no leading zeros, no variants), so any change to it misses;
- unforgeable: without the secret, an address for some other message is a 2**-50 guess per try, so
  mail to a made-up address cannot mark somebody else's message as bounced.

The message token is not in the address: it is mixed-case (a lower-casing MTA would destroy it) and
the message id finds it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Collection

import attrs

PREFIX = "b"
TAG_LENGTH = 10  # base-32 characters: 50 bits
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_CONTEXT = b"mtad verp v1\x00"
_ID = r"(?:0|[1-9a-z][0-9a-z]{0,12})"  # 13 base-36 digits hold any id below 2**64
_MAX_ID = 2**64 - 1
_LOCAL = re.compile(rf"{PREFIX}\.({_ID})\.({_ID})\.([a-z2-7]{{{TAG_LENGTH}}})")
_POSTAL_MSGID = re.compile(rb"X-Postal-MsgID:\s*([a-z0-9]+)", re.IGNORECASE)


@attrs.frozen
class VerpMatch:
    """The message a return path address was made for, and which of our domains it came to."""

    server_id: int
    message_id: int
    domain: str


def encode_return_path(secret: bytes, server_id: int, message_id: int, domain: str) -> str:
    """The envelope sender for message ``message_id`` of server ``server_id``, at ``domain``.

    ``domain`` is the return path domain (``dns.return_path_domain``, or ``psrp.<from domain>`` when that
    name's CNAME checks out, as Postal picks it); it is written lower-case.
    """
    if not secret:
        raise ValueError("the VERP secret must not be empty")
    if not (0 <= server_id <= _MAX_ID and 0 <= message_id <= _MAX_ID):
        raise ValueError(f"ids must be in [0, 2**64), got server {server_id} message {message_id}")
    if not domain or "@" in domain or not domain.isascii():
        raise ValueError(f"invalid return path domain {domain!r} (an ASCII name, A-labels for IDNs)")
    message = _base36(message_id)
    server = _base36(server_id)
    return f"{PREFIX}.{message}.{server}.{_tag(secret, message, server)}@{domain.lower()}"


def decode_return_path(secret: bytes, address: str, domains: Collection[str]) -> VerpMatch | None:
    """The message ``address`` was made for by `encode_return_path`, or None.

    None when the domain is not one of ``domains`` (compared without regard to case), when the local
    part is not one we make, and when its tag is wrong (a forgery or a typo). Case is ignored
    throughout: RFC 5321 §2.4 lets a server treat local parts case-insensitively, and some do.
    """
    # ASCII only: str.lower() folds some non-ASCII letters onto ASCII ones (KELVIN SIGN → "k").
    local, at, domain = address.rpartition("@")
    if not at or not secret or not address.isascii():
        return None
    domain = domain.lower()
    if domain not in {d.lower() for d in domains}:
        return None
    match = _LOCAL.fullmatch(local.lower())
    if match is None:
        return None
    message, server, tag = match.groups()
    if not hmac.compare_digest(tag, _tag(secret, message, server)):
        return None
    return VerpMatch(server_id=int(server, 36), message_id=int(message, 36), domain=domain)


def find_postal_msgid_tokens(raw: bytes) -> list[str]:
    """Message tokens quoted in ``raw`` as ``X-Postal-MsgID: <token>``, first seen first, each once.

    Postal's only way to link a bounce (``Postal::MessageDB::Message#original_messages``): the whole raw
    bounce, body included (the quoted original is usually in it), scanned with
    ``/\\X-Postal-MsgID:\\s*([a-z0-9]+)/i``. Case-insensitive, so upper-case letters of a token match too
    and the token is returned as written; ``\\s*`` lets the token follow on a folded line. (In Ruby
    ``\\X`` is any grapheme cluster, so Postal also takes any one character in place of the X; we
    require the field name as it is written.)
    """
    seen: dict[str, None] = {}
    for match in _POSTAL_MSGID.finditer(raw):
        seen.setdefault(match.group(1).decode("ascii"), None)
    return list(seen)


def _base36(n: int) -> str:
    if n == 0:
        return "0"
    digits = []
    while n:
        n, digit = divmod(n, 36)
        digits.append(_DIGITS[digit])
    return "".join(reversed(digits))


def _tag(secret: bytes, message: str, server: str) -> str:
    mac = hmac.new(secret, _CONTEXT + f"{message}.{server}".encode("ascii"), hashlib.sha256).digest()
    return base64.b32encode(mac).decode("ascii").lower()[:TAG_LENGTH]

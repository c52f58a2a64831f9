"""Recipients that need no credential: our return-path domains, where bounces come back.

Every message we send has a return path on ``[domains] return_path_domain`` (VERP, `mtad.mail.verp`), so
DSNs, auto-replies and complaints for it arrive by SMTP from any MTA in the world, unauthenticated. They
are the only mail accepted without a credential until inbound routes exist; they are parsed by a
`BounceSink`, never delivered, so accepting them relays nothing (DESIGN invariant 4 holds).

A recipient is a return-path recipient when its domain, the part after its last ``@``, equals one of the
domains exactly, compared in ASCII lower case: no subdomains, no trailing dot, no address literal, no
Unicode look-alikes (``K`` KELVIN SIGN lower-cases to ``k``; a non-ASCII domain never matches). The
local part is not looked at: whatever it holds (quoted text, ``%`` or ``!`` routes), the message goes to
the sink and nowhere else. Source routes are dropped by the SMTP server before the policy sees an
address (RFC 5321 §4.1.1.3), so ``<@rp.example:user@other.example>`` is a recipient at
``other.example``, and ``user@rp.example@other.example`` is at ``other.example`` too.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol


class BounceSink(Protocol):
    """Takes a message sent to a return-path domain (the real one is ``mtad.bounces.inbox``).

    Returning means the message is stored durably (the SMTP server then answers ``250``); raising means
    it is not, and the sending MTA keeps it and retries (``451 4.3.0``), so nothing is lost.
    """

    async def put(
        self, *, mail_from: str, rcpt_to: Sequence[str], data: bytes, received_with_ssl: bool, client_ip: str
    ) -> None: ...


def normalize_domains(domains: Collection[str]) -> frozenset[str]:
    """The configured return-path domains as compared: ASCII lower case, without a trailing dot.

    Raises ValueError for a domain that could never match (empty or not ASCII).
    """
    normalized = set()
    for domain in domains:
        name = domain.strip().rstrip(".")
        if not name or not name.isascii() or "@" in name:
            raise ValueError(f"not a return-path domain: {domain!r}")
        normalized.add(name.lower())
    return frozenset(normalized)


def is_return_path_address(address: str, domains: frozenset[str]) -> bool:
    """Whether ``address`` is at one of ``domains`` (as `normalize_domains` gives them), exactly."""
    local, at, domain = address.rpartition("@")
    return bool(local and at) and domain.isascii() and domain.lower() in domains

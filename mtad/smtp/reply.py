"""SMTP replies as values, shared by the server and client state machines.

Every reply mtad sends carries an RFC 3463 enhanced status code (RFC 2034 ENHANCEDSTATUSCODES), so a
reply is a (code, enhanced code, text) triple rather than a string.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply:
    """One SMTP reply: a three-digit code, an RFC 3463 enhanced code and human text.

    ``enhanced`` is empty only for replies that RFC 2034 §3 exempts (the 220 greeting and the EHLO
    reply) or for replies received from a peer that sent none.
    """

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def lines(self) -> list[str]:
        """The reply text split into lines, each prefixed with the enhanced code when there is one."""
        parts = self.text.split("\n") if self.text else [""]
        if self.enhanced:
            return [f"{self.enhanced} {p}".rstrip() for p in parts]
        return parts

    def to_bytes(self) -> bytes:
        """Encode for the wire: multi-line replies use ``code-`` continuation lines (RFC 5321 §4.2.1)."""
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{line}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return " ".join([str(self.code), *([self.enhanced] if self.enhanced else []), self.text])

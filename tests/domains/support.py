"""Helpers for domain tests that publish records on tools.fakedns."""

from __future__ import annotations

from typing import Any


def add_record(zone: dict[str, Any], name: str, kind: str, value: Any) -> None:
    """Add one record to a fake DNS zone."""
    entry = zone.setdefault(name.rstrip(".").lower(), {})
    entry.setdefault(kind, []).append(value)

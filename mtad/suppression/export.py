"""How a suppression list is written out, the same by ``mtad export-suppressions`` and
``GET /api/v2/suppressions/export``: JSON lines (one object a line, the API's own fields) or CSV.

A JSON line is `suppression_data`: ``address``, ``source``, ``reason``, ``message_id``, ``created_at``
and ``expires_at`` (Unix seconds; ``expires_at`` null when it never expires). CSV has the same columns
in that order, with a header, times as ISO 8601 UTC (``2024-05-01T12:00:00Z``, empty for never) for
spreadsheets, RFC 4180 quoting and CRLF line ends.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from typing import Any

from mtad.store.suppressions import Suppression

FORMATS = ("jsonl", "csv")
CONTENT_TYPES = {"jsonl": "application/jsonl; charset=utf-8", "csv": "text/csv; charset=utf-8"}
COLUMNS = ("address", "source", "reason", "message_id", "created_at", "expires_at")


def suppression_data(s: Suppression) -> dict[str, Any]:
    """One entry as the API and JSON lines give it."""
    return {
        "address": s.address,
        "source": s.source.value,
        "reason": s.reason,
        "message_id": s.message_id,
        "created_at": s.created_at,
        "expires_at": s.expires_at,
    }


def iso_utc(timestamp: float | None) -> str:
    """``2024-05-01T12:00:00Z``, or empty for None."""
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def json_lines(entries: Iterable[Suppression]) -> str:
    return "".join(json.dumps(suppression_data(s), ensure_ascii=False) + "\n" for s in entries)


def csv_header() -> str:
    return _csv([list(COLUMNS)])


def csv_rows(entries: Iterable[Suppression]) -> str:
    return _csv(
        [
            [
                s.address,
                s.source.value,
                s.reason or "",
                "" if s.message_id is None else str(s.message_id),
                iso_utc(s.created_at),
                iso_utc(s.expires_at),
            ]
            for s in entries
        ]
    )


def _csv(rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerows(rows)
    return out.getvalue()


def chunk(entries: Iterable[Suppression], format: str) -> str:
    """Entries in ``format`` (one of `FORMATS`), without the CSV header."""
    return json_lines(entries) if format == "jsonl" else csv_rows(entries)

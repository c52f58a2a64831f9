"""Values going into and coming out of the Redis queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

#: Message hash fields the queue scripts own; callers may not pass them in ``NewMessage.fields``.
RESERVED_FIELDS = frozenset(
    {
        "id",
        "token",
        "server_id",
        "scope",
        "mail_from",
        "rcpt_to",
        "pool",
        "body",
        "attempts",
        "created_at",
        "due_at",
        "state",
        "lease_token",
        "lease_owner",
        "lease_deadline",
        "held_at",
    }
)


class QueueError(Exception):
    """Redis answered with an error, or an answer made no sense."""


class QueueFull(QueueError):
    """Redis refused a write for lack of memory (``maxmemory``): answer 452 4.3.1 (DESIGN.md invariant 3)."""


class RedisUnavailable(QueueError):
    """Redis is down, unreachable or too slow: the caller should answer "try again later" (451 4.3.0)."""


@attrs.frozen
class NewMessage:
    """One recipient's message, handed to `RedisQueue.enqueue` with the body it shares with its siblings.

    ``fields`` are extra string fields stored in the message hash (e.g. ``message_id``, ``tag``,
    ``bounce``); ``event`` is what the ``message.queued`` event (`mtad.events.schema.MessageQueued`) carries
    beyond the envelope: ``subject``, ``message_id``, ``tag``, ``received_with_ssl`` (other keys are
    ignored). ``due_at`` schedules the first attempt (default: now); ``held``
    keeps the message in the held set (development mode) until `RedisQueue.release_held`.
    """

    token: str
    server_id: int
    scope: str
    mail_from: str
    rcpt_to: str
    pool: str = ""
    fields: Mapping[str, str] = attrs.field(factory=dict)
    event: Mapping[str, Any] = attrs.field(factory=dict)
    due_at: float | None = None
    held: bool = False

    def __attrs_post_init__(self) -> None:
        clash = RESERVED_FIELDS.intersection(self.fields)
        if clash:
            raise ValueError(f"NewMessage.fields may not set reserved fields: {sorted(clash)}")


@attrs.frozen
class ClaimedMessage:
    """A message leased to one delivery worker until ``lease_deadline``.

    ``lease_token`` must be given back to ack/retry/hold/extend/release: once the lease has expired and
    the message has been claimed again, the old token is stale and those calls do nothing.
    """

    id: int
    token: str
    server_id: int
    scope: str
    mail_from: str
    rcpt_to: str
    pool: str
    attempts: int
    created_at: float
    due_at: float
    lease_token: str
    lease_owner: str
    lease_deadline: float
    body: bytes
    #: Every other field of the message hash (the caller's ``NewMessage.fields``).
    fields: Mapping[str, str]


@attrs.frozen
class PinnedBody:
    """A body still pinned in Redis for the archive (`RedisQueue.pinned_before`): what its raw message needs.

    ``id`` is the first message id of its accept (the raw message's id), ``accepted_at`` when it was accepted.
    """

    id: int
    server_id: int
    accepted_at: float
    data: bytes


@attrs.frozen
class QueueStats:
    """Queue depth for ``/status`` and metrics."""

    due_now: int
    scheduled: int
    leased: int
    held: int
    oldest_age_seconds: float | None


@attrs.frozen
class Event:
    """One entry of the event stream: its stream id, its type and its JSON-decoded payload."""

    id: str
    type: str
    data: Mapping[str, Any]

"""The policy's answers: who submits, yes (and held or not), no and why, queued.

The answers are values the ways in translate, never replies: SMTP words a `Refusal` as a reply with an
enhanced status code (RFC 3463), the send API as Postal's error code. Adding a reason is a change here
and one line in each translation.
"""

from __future__ import annotations

import enum

import attrs

from mtad.accept import DEVELOPMENT_MODE_HOLD, AcceptedMessage
from mtad.store.credentials import Credential
from mtad.store.servers import Server


@attrs.frozen
class Submitter:
    """Who submits: a credential and the server it sends for (as read from SQL, possibly cached)."""

    credential: Credential
    server: Server


class Refusal(enum.Enum):
    """Why a submission may not go ahead."""

    #: No credential: an unauthenticated session outside every SMTP-IP network (DESIGN invariant 4).
    NO_CREDENTIAL = "no-credential"
    #: The key or password given matches no credential of the kind asked for.
    UNKNOWN_CREDENTIAL = "unknown-credential"
    #: The credential a session authenticated with (or its server) was deleted since.
    CREDENTIAL_REVOKED = "credential-revoked"
    SERVER_SUSPENDED = "server-suspended"
    #: From (or, where the server allows it, Sender) is not a sending domain of the server.
    FROM_NOT_ALLOWED = "from-not-allowed"
    #: Redis refused the write for lack of memory: nothing was queued, try again later.
    QUEUE_FULL = "queue-full"
    #: Redis did not answer: nothing was queued, try again later.
    QUEUE_UNAVAILABLE = "queue-unavailable"
    #: The server's send limit is reached and it refuses (rather than holds) what is over it: try later.
    SEND_LIMIT_EXCEEDED = "send-limit-exceeded"


class HoldReason(enum.Enum):
    """Why an accepted message is held instead of delivered; the value is Postal's delivery details
    (`hold_details` fills in the limit)."""

    CREDENTIAL = "Credential is configured to hold all messages authenticated by it."
    DEVELOPMENT_MODE = DEVELOPMENT_MODE_HOLD
    #: Postal's words (``OutgoingMessageProcessor``); released when the window has room again.
    SEND_LIMIT = "Message held because send limit ({limit}) has been reached."


def hold_details(reason: HoldReason, server: Server) -> str:
    """The delivery details of a message held for ``reason``."""
    return reason.value.format(limit=server.send_limit)


@attrs.frozen
class Refused:
    """No, and why; ``detail`` is for the log (a queue error's text), never for clients."""

    reason: Refusal
    detail: str = ""


@attrs.frozen
class Permit:
    """Yes: ``submitter`` may send this message now, held for ``hold`` when that is not None.

    Only the policy's checks make one, and `SubmissionPolicy.submit` takes nothing else, so a message
    cannot be queued without having been checked.
    """

    submitter: Submitter
    hold: HoldReason | None


@attrs.frozen
class Queued:
    """The message is durable in Redis (DESIGN invariant 1): one message per recipient."""

    messages: tuple[AcceptedMessage, ...]
    hold: HoldReason | None

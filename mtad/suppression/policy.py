"""When an address is suppressed and for how long: pure decisions over events, no I/O.

Only what the recipient's side said about the recipient counts (`mtad.outbound.classify`): a reply
classified ``bad_mailbox`` says the mailbox does not exist; a reputation or block-list refusal
(``policy_block``) or a refusal of the message's content (``spam_content``) says something about us or
the message, and suppressing a good recipient for it would be wrong (postalserver/postal#1243, #712:
Postal suppresses after any two 5xx). So:

- a ``HardFail`` delivery whose remote reply is ``bad_mailbox`` suppresses (`HardBounce`), as does a
  hard bounce message (``message.bounced``) in that category;
- a ``SoftFail`` delivery *with a remote reply* that is not in `NEVER_SUPPRESS` counts as one soft
  failure in a row (`counts_as_soft_failure`); a ``Sent`` ends the run. A soft failure without a reply
  (connection refused or timed out, DNS trouble, mtad's own errors) says nothing about the address and
  neither counts nor ends a run. ``soft_fail_threshold`` in a row suppress (`SoftFailures`);
- a spam complaint (``message.complaint``) suppresses (`Complaint`);
- a ``Sent`` delivery takes its recipient off the list again when the entry is one of
  `CLEARED_BY_DELIVERY` and not newer than the delivery, as Postal does after every ``Sent``
  (``remove_recipient_from_suppression_list_on_success``). mtad does not send to a listed address, so this
  is for mail that was sent anyway: listed while in flight, or while the lookup was down.

Expiry comes from ``[suppression]`` (`expires_at`): ``expiry_days`` for hard bounces, soft failures and
operators, ``complaint_expiry_days`` and ``unsubscribe_expiry_days`` for those; 0 is never.
"""

from __future__ import annotations

from mtad.config import SuppressionConfig
from mtad.events.schema import MessageDelivery
from mtad.outbound.classify import Category, classify
from mtad.store.suppressions import SuppressionSource

#: Categories that speak about our reputation or the message, not the recipient: they never suppress.
NEVER_SUPPRESS: frozenset[Category] = frozenset({"policy_block", "spam_content"})

#: The category whose hard failures and bounces suppress at once.
BAD_MAILBOX: Category = "bad_mailbox"

#: The sources of entries a successful delivery removes: the ones that say the mailbox does not work,
#: which a ``Sent`` disproves (all of Postal's entries are of these kinds). A complaint, an unsubscribe
#: and an operator's entry say the recipient or the operator does not want the mail; a delivery says
#: nothing about that, so they stay.
CLEARED_BY_DELIVERY: frozenset[SuppressionSource] = frozenset(
    {SuppressionSource.HARD_BOUNCE, SuppressionSource.SOFT_FAILURES}
)

#: At most this much of a remote reply is kept as a suppression's reason.
REASON_LIMIT = 1000

DAY = 86400.0


def expires_at(settings: SuppressionConfig, source: SuppressionSource, at: float) -> float | None:
    """When a suppression from ``source`` made at ``at`` expires (None: never)."""
    if source is SuppressionSource.COMPLAINT:
        days = settings.complaint_expiry_days
    elif source is SuppressionSource.UNSUBSCRIBE:
        days = settings.unsubscribe_expiry_days
    else:
        days = settings.expiry_days
    return None if days == 0 else at + days * DAY


def _reply(event: MessageDelivery) -> str | None:
    """The remote server's reply the event carries, or None when mtad made the result up itself (no
    connection, DNS, an internal error, a suppressed recipient): such results never suppress."""
    if event.code is None and not event.output:
        return None
    return event.output or ""


def is_outgoing(event: MessageDelivery) -> bool:
    """Whether the event is about outgoing mail to a recipient of a server (incoming mail is
    delivered to our own endpoints; suppressing those would be meaningless)."""
    return event.server_id is not None and bool(event.rcpt_to) and event.scope in (None, "outgoing")


def hard_bounce_reason(event: MessageDelivery) -> str | None:
    """The reason to suppress for a ``HardFail`` delivery whose reply says the mailbox does not exist;
    None when it does not suppress."""
    if event.status != "HardFail" or not is_outgoing(event):
        return None
    reply = _reply(event)
    if reply is None:
        return None
    if classify(event.code, event.enhanced_code, reply).category != BAD_MAILBOX:
        return None
    return reply[:REASON_LIMIT]


def counts_as_soft_failure(event: MessageDelivery) -> bool:
    """Whether a delivery is one more soft failure in a row for its recipient."""
    if event.status != "SoftFail" or not is_outgoing(event):
        return False
    reply = _reply(event)
    if reply is None:
        return False
    return classify(event.code, event.enhanced_code, reply).category not in NEVER_SUPPRESS


def ends_soft_failures(event: MessageDelivery) -> bool:
    """Whether a delivery ends its recipient's run of soft failures (it was delivered)."""
    return event.status == "Sent" and is_outgoing(event)


def soft_failures_reason(count: int, event: MessageDelivery) -> str:
    """Words for a suppression after ``count`` soft failures in a row, the last being ``event``."""
    last = (event.output or event.details or "").strip()
    return f"{count} soft failures in a row; the last: {last}"[:REASON_LIMIT]


def bounce_suppresses(hard: bool, category: str) -> bool:
    """Whether a bounce message (``message.bounced``) suppresses its recipient: a hard bounce saying
    the mailbox does not exist."""
    return hard and category == BAD_MAILBOX


def bounce_reason(status: str | None, diagnostic: str | None) -> str:
    """Words for a suppression after a bounce: its DSN status and diagnostic."""
    words = " ".join(p.strip() for p in (status, diagnostic) if p and p.strip())
    return f"bounce: {words}"[:REASON_LIMIT] if words else "bounce"


def complaint_reason(feedback_type: str | None) -> str:
    """Words for a suppression after a spam complaint (ARF ``Feedback-Type``, RFC 5965 §3.1)."""
    kind = (feedback_type or "").strip()
    return f"spam complaint (feedback type {kind})" if kind else "spam complaint"

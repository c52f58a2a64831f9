"""Retry policy for soft-failed deliveries, as pure functions.

The default schedule is Postal's (``retry_later``): the n-th retry waits ``5 min × 1.3^n`` and after 18
attempts the message hard-fails, about 31 hours in all. RFC 5321 §4.5.4.1 asks for at least 30 minutes
between retries and a give-up time of 4–5 days; Postal's shorter first gaps are kept for compatibility
(its users expect them) and every number is configurable.

One deliberate difference: Postal schedules a 19th wake-up 7.2 h after the 18th failure only to hard-fail
it; we hard-fail right after the last allowed attempt.
"""

from __future__ import annotations

import re

import attrs


@attrs.frozen
class RetryPolicy:
    """How long to wait between delivery attempts and when to stop.

    ``base`` is in seconds; attempt ``n`` (0-based count of attempts already made) waits
    ``base × factor^n``; ``hint_slack`` is added to a delay the remote server asked for in its reply.
    """

    base: float = 300.0
    factor: float = 1.3
    max_attempts: int = 18
    hint_slack: float = 10.0
    max_hint: float = 86400.0


DEFAULT_POLICY = RetryPolicy()

_HINT = re.compile(r"\b(\d{1,7})\s*(seconds?|secs?|minutes?|mins?)\b", re.IGNORECASE)


def max_attempts_details(policy: RetryPolicy = DEFAULT_POLICY) -> str:
    """Postal's wording for the hard failure that ends the retries (reference §4.3)."""
    return f"Maximum number of delivery attempts ({policy.max_attempts}) has been reached."


def hinted_delay(output: str, policy: RetryPolicy = DEFAULT_POLICY) -> float | None:
    """The delay a remote server asked for in its reply text ("try again in 120 seconds"), if any.

    Postal honours "N seconds" and "N minutes" in the error text and adds 10 s; so do we, capped at
    ``max_hint`` so a hostile reply cannot park a message for years.
    """
    match = _HINT.search(output)
    if match is None:
        return None
    amount = float(match.group(1))
    if match.group(2).lower().startswith("m"):
        amount *= 60
    return min(amount + policy.hint_slack, policy.max_hint)


def backoff(attempt: int, policy: RetryPolicy = DEFAULT_POLICY, output: str = "") -> float | None:
    """Seconds to wait before the next attempt after ``attempt`` attempts failed softly, or None to give up.

    ``attempt`` counts the attempts made so far (1 after the first failure). ``None`` means the message
    has used all its attempts and must hard-fail with :func:`max_attempts_details`. A delay hinted in
    ``output`` (the remote reply text) overrides the schedule.
    """
    if attempt >= policy.max_attempts:
        return None
    hinted = hinted_delay(output, policy) if output else None
    if hinted is not None:
        return hinted
    return float(policy.base * policy.factor ** max(attempt - 1, 0))

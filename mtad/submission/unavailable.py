"""When something a decision needs does not answer: one exception, one bounded wait.

A submission decision waits on SQL (credentials, servers) and on the sending-domain check. Neither may
hold a client for ever, and neither's failure may look like a refusal: a database outage must never
tell a client its password or its From domain is wrong. So every such wait goes through `bounded`,
which turns a failure or an overlong wait into `PolicyUnavailable` (the ways in answer "try again
later": SMTP ``451 4.3.0`` or ``454 4.7.0``, the API ``TemporaryFailure``), after logging the cause once.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

T = TypeVar("T")


class PolicyUnavailable(Exception):
    """A lookup the decision needs failed or did not answer in time; nothing was decided.

    ``what`` names it for clients, as the API's ``TemporaryFailure`` says: "The database", "The sending
    domain check".
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} did not answer")
        self.what = what


class LookupTimeout(Exception):
    """A lookup outlasted the policy's ``timeout`` (logged as the cause of a `PolicyUnavailable`)."""


async def bounded(
    work: Awaitable[T], clock: IReactorTime, seconds: float, what: str, log: Logger, **fields: Any
) -> T:
    """``work``'s result, or `PolicyUnavailable` when it fails or takes more than ``seconds``.

    The cause is logged here with ``log.failure`` (a `LookupTimeout` for the overlong wait), so callers
    that turn `PolicyUnavailable` into a reply log nothing more. ``fields`` are added to the log event.
    """
    d = Deferred.fromCoroutine(_wait(work))
    d.addTimeout(seconds, clock)
    try:
        try:
            return await d
        except DeferredTimeoutError:
            raise LookupTimeout(f"{what} did not answer within {seconds} s") from None
    except CancelledError:
        raise  # the caller gave up (a client went away): not a failure of the lookup
    except Exception:
        log.failure("submission policy: {what} failed", what=what, **fields)
        raise PolicyUnavailable(what) from None


async def _wait(work: Awaitable[T]) -> T:
    """Any awaitable (a Deferred, a coroutine) as a coroutine, so it can be bounded and cancelled."""
    return await work

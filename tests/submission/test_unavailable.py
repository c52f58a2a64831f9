"""`bounded`: a lookup's result, or PolicyUnavailable (cause logged once) when it fails or takes too long."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from mtad.submission.unavailable import LookupTimeout, PolicyUnavailable, bounded


class BoundedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)

    def run_bounded(self, work: Any, seconds: float = 10.0) -> Deferred[Any]:
        return Deferred.fromCoroutine(bounded(work, self.clock, seconds, "The database", self.log, id=7))

    def test_result(self) -> None:
        """A lookup that answers in time gives its result and logs nothing."""
        self.assertEqual(self.successResultOf(self.run_bounded(succeed(42))), 42)
        self.assertEqual(self.events, [])

    def test_coroutine(self) -> None:
        """A coroutine is bounded like a Deferred."""

        async def lookup() -> str:
            return "found"

        self.assertEqual(self.successResultOf(self.run_bounded(lookup())), "found")

    def test_timeout(self) -> None:
        """No answer within the time is PolicyUnavailable naming the lookup; a LookupTimeout is logged,
        with the caller's fields, and the lookup is cancelled."""
        cancelled: list[object] = []
        pending: Deferred[int] = Deferred(cancelled.append)
        d = self.run_bounded(pending)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, PolicyUnavailable)
        self.assertEqual(failure.value.what, "The database")
        self.assertEqual(cancelled, [pending])
        (event,) = self.events
        self.assertIsInstance(event["log_failure"].value, LookupTimeout)
        self.assertIn("10.0 s", str(event["log_failure"].value))
        self.assertEqual((event["what"], event["id"]), ("The database", 7))

    def test_failure(self) -> None:
        """A failing lookup is PolicyUnavailable; its own error is what is logged."""
        d = self.run_bounded(fail(RuntimeError("gone")))
        self.failureResultOf(d, PolicyUnavailable)
        (event,) = self.events
        self.assertIsInstance(event["log_failure"].value, RuntimeError)

    def test_cancel_is_not_a_failure(self) -> None:
        """A caller that gives up (a client went away) cancels the lookup; nothing is logged."""
        cancelled: list[object] = []
        pending: Deferred[int] = Deferred(cancelled.append)
        d = self.run_bounded(pending)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancelled, [pending])
        self.assertEqual(self.events, [])

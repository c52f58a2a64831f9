"""mtad.caching: the caches in front of the database lookups of the send paths."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtad.caching import CachedLookups


class CachedLookupsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache: CachedLookups[str, bool | None] = CachedLookups(self.clock, 60.0)
        self.pending: list[Deferred[bool | None]] = []

    def lookup(self) -> Deferred[bool | None]:
        d: Deferred[bool | None] = Deferred()
        self.pending.append(d)
        return d

    def get(self, key: str) -> Deferred[bool | None]:
        return Deferred.fromCoroutine(self.cache.get(key, self.lookup))

    def test_concurrent_lookups_share_one_and_the_answer_is_kept(self) -> None:
        """Two gets of one key while it is looked up share the lookup; False is an answer and is kept
        until it expires."""
        first, second = self.get("a"), self.get("a")
        self.assertEqual(len(self.pending), 1)
        self.pending[0].callback(False)
        self.assertIs(self.successResultOf(first), False)
        self.assertIs(self.successResultOf(second), False)
        self.assertIs(self.successResultOf(self.get("a")), False)
        self.assertEqual(len(self.pending), 1)
        self.clock.advance(61)
        self.get("a")
        self.assertEqual(len(self.pending), 2)

    def test_none_and_failures_not_kept(self) -> None:
        """A lookup answering None, or failing, is asked again next time; a failure reaches every waiter."""
        d = self.get("a")
        self.pending[0].callback(None)
        self.assertIsNone(self.successResultOf(d))
        first, second = self.get("a"), self.get("a")
        self.assertEqual(len(self.pending), 2)
        self.pending[1].errback(RuntimeError("database down"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)
        self.get("a")
        self.assertEqual(len(self.pending), 3)

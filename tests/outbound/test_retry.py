"""The retry schedule (Postal's by default) and reply hints."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtad.outbound.retry import RetryPolicy, backoff, hinted_delay, max_attempts_details


class BackoffTests(SynchronousTestCase):
    """backoff() is a pure function of attempt count, policy and reply text."""

    def test_postal_schedule(self) -> None:
        """Gaps are 5 min × 1.3^(n-1): 5, 6.5, 8.45 … 332.7 minutes for attempts 1–17."""
        minutes = [backoff(n) / 60 for n in range(1, 18)]  # type: ignore[operator]
        self.assertAlmostEqual(minutes[0], 5.0)
        self.assertAlmostEqual(minutes[1], 6.5)
        self.assertAlmostEqual(minutes[2], 8.45)
        self.assertAlmostEqual(minutes[16], 332.7, places=1)

    def test_gives_up_after_max_attempts(self) -> None:
        """After the 18th attempt there is no retry, and the wording matches Postal's."""
        self.assertIsNone(backoff(18))
        self.assertIsNotNone(backoff(17))
        self.assertEqual(max_attempts_details(), "Maximum number of delivery attempts (18) has been reached.")

    def test_configurable(self) -> None:
        """Base, factor and maximum come from the policy."""
        policy = RetryPolicy(base=60, factor=2, max_attempts=3)
        self.assertEqual([backoff(n, policy) for n in (1, 2, 3)], [60, 120, None])

    def test_hints(self) -> None:
        """'N seconds' / 'N minutes' in the reply override the schedule, plus 10 s."""
        self.assertEqual(hinted_delay("451 4.7.1 Greylisted, try again in 300 seconds"), 310)
        self.assertEqual(hinted_delay("421 Too many connections, wait 2 minutes"), 130)
        self.assertIsNone(hinted_delay("451 try later"))
        self.assertEqual(backoff(1, output="retry in 30 seconds"), 40)

    def test_hint_capped(self) -> None:
        """A hostile hint cannot park a message beyond max_hint."""
        self.assertEqual(hinted_delay("wait 9999999 minutes"), 86400)

    def test_hint_does_not_extend_attempts(self) -> None:
        """A hint is ignored once the attempts are used up."""
        self.assertIsNone(backoff(18, output="try again in 5 seconds"))

"""Which recipients are at a return-path domain: exact domain, ASCII case-insensitive, nothing else."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtad.submission.return_path import is_return_path_address, normalize_domains

DOMAINS = normalize_domains(["rp.mtad.test", "Bounces.Example.TEST.", "kumo.test"])


class ReturnPathAddressTests(SynchronousTestCase):
    def test_domains_normalized(self) -> None:
        """Configured domains are compared in lower case without a trailing dot."""
        self.assertEqual(DOMAINS, frozenset({"rp.mtad.test", "bounces.example.test", "kumo.test"}))

    def test_bad_domains_refused(self) -> None:
        """A domain that could never match is a configuration error, not a silent no-op."""
        for bad in ("", ".", "bücher.test", "a@b.test"):
            with self.assertRaises(ValueError, msg=bad):
                normalize_domains([bad])

    def test_exact_domain_any_case(self) -> None:
        """Any local part at a return-path domain matches, whatever the domain's ASCII case."""
        for address in (
            "b.1.2.abcdefghij@rp.mtad.test",
            "anything@RP.Mtad.Test",
            "x@bounces.example.test",
            '"quoted @ text"@rp.mtad.test',
            "user%other.test@rp.mtad.test",
        ):
            self.assertTrue(is_return_path_address(address, DOMAINS), address)

    def test_everything_else(self) -> None:
        """Other domains, subdomains, parents, look-alikes, a trailing dot, literals and bare names do
        not match."""
        for address in (
            "user@other.test",
            "user@sub.rp.mtad.test",
            "user@mtad.test",
            "user@rp.mtad.test.",
            "user@rp.mtad.test.other.test",
            "user@rp-mtad.test",
            "user@rp.mtad.test@other.test",
            '"user@rp.mtad.test"@other.test',
            "user@[127.0.0.1]",
            "@rp.mtad.test",
            "rp.mtad.test",
            "postmaster",
            "",
            # U+212A KELVIN SIGN lower-cases to "k": not the same domain.
            "user@\u212aumo.test",
            "user@rp.mtad.tes\u0074\u0307",
        ):
            self.assertFalse(is_return_path_address(address, DOMAINS), address)

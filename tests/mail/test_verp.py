"""VERP return paths: signed per-message envelope senders, and Postal's X-Postal-MsgID fallback."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtad.mail.verp import VerpMatch, decode_return_path, encode_return_path, find_postal_msgid_tokens

SECRET = b"installation secret for tests"
DOMAIN = "rp.mtad.test"
ATEXT = set(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")

ids = st.integers(min_value=0, max_value=2**64 - 1)
domains = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)
# Substitutes: ASCII (printable and not), and non-ASCII letters that lower-case onto ASCII ones.
substitutes = st.one_of(st.characters(max_codepoint=127), st.sampled_from("\u212a\u0130\u017f\u00e9\u2024"))
hypothesis_settings = settings(deadline=None, max_examples=300, database=None)


class EncodeTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """The address is b.<message id>.<server id>.<tag> in base 36, at the lower-cased domain."""
        address = encode_return_path(SECRET, 7, 1295, "RP.Example.TEST")
        local, _, domain = address.partition("@")
        self.assertEqual(domain, "rp.example.test")
        prefix, message, server, tag = local.split(".")
        self.assertEqual((prefix, message, server), ("b", "zz", "7"))
        self.assertEqual(len(tag), 10)

    def test_short_and_atext_only(self) -> None:
        """Even for the largest ids the local part is a lower-case dot-atom well under 64 octets."""
        address = encode_return_path(SECRET, 2**64 - 1, 2**64 - 1, DOMAIN)
        local = address.partition("@")[0]
        self.assertLessEqual(len(local), 40)
        self.assertEqual(local, local.lower())
        for atom in local.split("."):
            self.assertTrue(atom)
            self.assertLessEqual(set(atom), ATEXT)

    def test_tag_depends_on_secret(self) -> None:
        """Another installation's secret gives another tag, and its addresses do not decode here."""
        ours = encode_return_path(SECRET, 1, 2, DOMAIN)
        theirs = encode_return_path(b"another secret", 1, 2, DOMAIN)
        self.assertNotEqual(ours, theirs)
        self.assertIsNone(decode_return_path(SECRET, theirs, [DOMAIN]))

    def test_rejects_bad_arguments(self) -> None:
        """An empty secret, a negative or too large id and a bad domain are errors, not odd addresses."""
        with self.assertRaises(ValueError):
            encode_return_path(b"", 1, 1, DOMAIN)
        with self.assertRaises(ValueError):
            encode_return_path(SECRET, -1, 1, DOMAIN)
        with self.assertRaises(ValueError):
            encode_return_path(SECRET, 1, 2**64, DOMAIN)
        for domain in ("", "a@b.test", "bücher.test"):
            with self.assertRaises(ValueError):
                encode_return_path(SECRET, 1, 1, domain)


class DecodeTests(SynchronousTestCase):
    @hypothesis_settings
    @given(server_id=ids, message_id=ids, domain=domains)
    def test_round_trip(self, server_id: int, message_id: int, domain: str) -> None:
        """Decoding an encoded address gives back its server id, message id and domain."""
        address = encode_return_path(SECRET, server_id, message_id, domain)
        self.assertEqual(
            decode_return_path(SECRET, address, [domain, "other.test"]),
            VerpMatch(server_id=server_id, message_id=message_id, domain=domain),
        )

    @hypothesis_settings
    @given(server_id=ids, message_id=ids)
    def test_case_insensitive(self, server_id: int, message_id: int) -> None:
        """An MTA that upper-cases the address (or the domain list's case) changes nothing."""
        address = encode_return_path(SECRET, server_id, message_id, DOMAIN)
        match = decode_return_path(SECRET, address.upper(), [DOMAIN.upper()])
        self.assertEqual(match, VerpMatch(server_id, message_id, DOMAIN))

    @hypothesis_settings
    @given(server_id=ids, message_id=ids, data=st.data())
    def test_single_substitution_misses(self, server_id: int, message_id: int, data: st.DataObject) -> None:
        """Changing any one character of a valid address (other than its case) decodes to None."""
        address = encode_return_path(SECRET, server_id, message_id, DOMAIN)
        i = data.draw(st.integers(0, len(address) - 1), label="index")
        c = data.draw(
            substitutes.filter(lambda c: c not in (address[i], address[i].upper())), label="character"
        )
        changed = address[:i] + c + address[i + 1 :]
        self.assertIsNone(decode_return_path(SECRET, changed, [DOMAIN]))

    @hypothesis_settings
    @given(server_id=ids, message_id=ids, data=st.data())
    def test_insertion_and_deletion_miss(self, server_id: int, message_id: int, data: st.DataObject) -> None:
        """Adding or removing one character (a leading zero included) decodes to None."""
        address = encode_return_path(SECRET, server_id, message_id, DOMAIN)
        i = data.draw(st.integers(0, len(address) - 1), label="index")
        c = data.draw(substitutes, label="character")
        self.assertIsNone(decode_return_path(SECRET, address[:i] + c + address[i:], [DOMAIN]))
        self.assertIsNone(decode_return_path(SECRET, address[:i] + address[i + 1 :], [DOMAIN]))

    def test_leading_zero_is_not_canonical(self) -> None:
        """An id written with a leading zero is not the address we made, even though it has the same value."""
        address = encode_return_path(SECRET, 5, 9, DOMAIN)
        self.assertIsNone(decode_return_path(SECRET, address.replace("b.9.", "b.09."), [DOMAIN]))

    def test_wrong_domain(self) -> None:
        """A valid local part at a domain that is not ours matches nothing."""
        address = encode_return_path(SECRET, 1, 2, DOMAIN)
        self.assertIsNone(decode_return_path(SECRET, address, ["psrp.customer.test"]))
        self.assertIsNone(decode_return_path(SECRET, address, []))

    def test_malformed(self) -> None:
        """Addresses of other shapes (Postal's server token, no @, quoted, extra atoms) give None."""
        for address in (
            "",
            "@",
            "abcdef@rp.mtad.test",
            "b.1.2@rp.mtad.test",
            "b.1.2.aaaaaaaaaa.x@rp.mtad.test",
            '"b.1.2.aaaaaaaaaa"@rp.mtad.test',
            "b.1.2.aaaaaaaaaa",
            "<" + encode_return_path(SECRET, 1, 2, DOMAIN) + ">",
        ):
            self.assertIsNone(decode_return_path(SECRET, address, [DOMAIN]), address)

    def test_empty_secret(self) -> None:
        """With no secret configured nothing decodes (an empty key would make tags anyone can compute)."""
        address = encode_return_path(SECRET, 1, 2, DOMAIN)
        self.assertIsNone(decode_return_path(b"", address, [DOMAIN]))


class PostalMsgIDTests(SynchronousTestCase):
    def test_finds_tokens_in_quoted_headers_and_body(self) -> None:
        """Every X-Postal-MsgID in the raw bounce is found, in order, each once."""
        raw = (
            b"From: MAILER-DAEMON@mx.test\r\n\r\nSorry.\r\n\r\n"
            b"------ This is a copy of the message\r\n"
            b"X-Postal-MsgID: Ab12Cd34Ef56\r\nSubject: hi\r\n\r\n"
            b"x-postal-msgid:second\r\n"
            b"X-Postal-MsgID: Ab12Cd34Ef56\r\n"
        )
        self.assertEqual(find_postal_msgid_tokens(raw), ["Ab12Cd34Ef56", "second"])

    def test_folded_value(self) -> None:
        """A token on the continuation line of a folded field is found (\\s* crosses the line end)."""
        self.assertEqual(find_postal_msgid_tokens(b"X-Postal-MsgID:\r\n\tTOKEN123\r\n"), ["TOKEN123"])

    def test_token_stops_at_other_characters(self) -> None:
        """The token is the run of letters and digits; punctuation ends it."""
        self.assertEqual(find_postal_msgid_tokens(b"X-Postal-MsgID: abc-def"), ["abc"])

    def test_none(self) -> None:
        """No field, an empty value or 8-bit noise give no tokens."""
        self.assertEqual(find_postal_msgid_tokens(b""), [])
        self.assertEqual(find_postal_msgid_tokens(b"X-Postal-MsgID: \xff\xfe\r\n"), [])
        self.assertEqual(find_postal_msgid_tokens(b"X-Postal-Msg: abc\r\n"), [])

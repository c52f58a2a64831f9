"""Tests for mtad.mail.dkim_keys: key pairs, their DNS records, and that signatures verify against them."""

from __future__ import annotations

import base64

import dkim
from twisted.trial.unittest import SynchronousTestCase

from mtad.mail.dkim_keys import (
    ED25519,
    RSA,
    dkim_record_problem,
    dkim_txt_value,
    ed25519_raw_private_key,
    generate_key,
    parse_tag_list,
    public_key_from_private,
    txt_strings,
)

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: Hello\r\n"
    b"Date: Mon, 30 Nov 2026 09:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHi Bob.\r\n"
)


def verify(message: bytes, record: str) -> bool:
    """Verify ``message`` with dkimpy, answering its DNS lookup with ``record``."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"sel._domainkey.example.com.", name
        return record.encode()

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


class KeyTests(SynchronousTestCase):
    def test_rsa_key_signs_verifiably(self) -> None:
        """An RSA-2048 key signs with dkimpy and verifies against the TXT record we publish for it."""
        pem, public = generate_key(RSA)
        self.assertTrue(pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertEqual(len(base64.b64decode(public)), 294)  # SubjectPublicKeyInfo of a 2048-bit key
        signature = dkim.sign(MESSAGE, b"sel", b"example.com", pem, include_headers=[b"from", b"subject"])
        self.assertTrue(verify(signature + MESSAGE, dkim_txt_value(RSA, public)))
        self.assertFalse(verify(signature + MESSAGE.replace(b"Hi", b"Yo"), dkim_txt_value(RSA, public)))

    def test_ed25519_key_signs_verifiably(self) -> None:
        """An Ed25519 key (RFC 8463) signs with dkimpy and verifies against its ``k=ed25519`` record."""
        pem, public = generate_key(ED25519)
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
        self.assertEqual(len(base64.b64decode(public)), 32)
        signature = dkim.sign(
            MESSAGE,
            b"sel",
            b"example.com",
            ed25519_raw_private_key(pem),
            signature_algorithm=b"ed25519-sha256",
            include_headers=[b"from", b"subject"],
        )
        self.assertIn(b"a=ed25519-sha256", signature)
        self.assertTrue(verify(signature + MESSAGE, dkim_txt_value(ED25519, public)))

    def test_key_size_and_algorithm_checked(self) -> None:
        """RSA sizes outside 1024..4096 bits and unknown algorithms are refused."""
        self.assertRaises(ValueError, generate_key, RSA, 512)
        self.assertRaises(ValueError, generate_key, "dsa")
        self.assertRaises(ValueError, dkim_txt_value, "dsa", "AAAA")
        self.assertRaises(ValueError, ed25519_raw_private_key, generate_key(RSA, 1024)[0])

    def test_public_key_from_private(self) -> None:
        """The public key is recovered from the private PEM; a key of the other algorithm is refused."""
        pem, public = generate_key(ED25519)
        self.assertEqual(public_key_from_private(ED25519, pem), public)
        self.assertRaises(ValueError, public_key_from_private, RSA, pem)


class RecordTests(SynchronousTestCase):
    def test_record_values_as_postal_publishes(self) -> None:
        """RSA records are Postal's ``v=DKIM1; t=s; h=sha256; p=…;``; Ed25519 ones add ``k=ed25519``."""
        self.assertEqual(dkim_txt_value(RSA, "QUJD"), "v=DKIM1; t=s; h=sha256; p=QUJD;")
        self.assertEqual(dkim_txt_value(ED25519, "QUJD"), "v=DKIM1; k=ed25519; t=s; h=sha256; p=QUJD;")

    def test_equivalent_records_accepted(self) -> None:
        """A record with other tag order, spacing, ``k=rsa`` or a split key publishes the same key."""
        for record in (
            "v=DKIM1; t=s; h=sha256; p=QUJDRA==;",
            "v=DKIM1;k=rsa;p=QUJD RA==",
            "p=QUJDRA==; v=DKIM1",
            "k=RSA; p=QUJDRA==",
        ):
            self.assertIsNone(dkim_record_problem(RSA, "QUJDRA==", record), record)

    def test_wrong_records_named(self) -> None:
        """Another key, another algorithm, a revoked or missing key or no tag list are each explained."""
        cases = {
            "v=DKIM1; p=WFla": "not the public key",
            "v=DKIM1; k=ed25519; p=QUJD": "k=ed25519",
            "v=DKIM1; p=": "revoked",
            "v=DKIM1; t=s": "no p=",
            "v=DKIM2; p=QUJD": "v=DKIM2",
            "hello world": "not a DKIM tag list",
            "p=QUJD; p=QUJD": "not a DKIM tag list",
        }
        for record, reason in cases.items():
            self.assertIn(reason, dkim_record_problem(RSA, "QUJD", record) or "", record)

    def test_tag_list(self) -> None:
        """Tag lists are split on ``;`` with whitespace removed from values (RFC 6376 §3.2)."""
        self.assertEqual(parse_tag_list(" v = DKIM1 ;p=AB\r\n CD; "), {"v": "DKIM1", "p": "ABCD"})
        self.assertIsNone(parse_tag_list("v=DKIM1; 1x=y"))

    def test_txt_strings(self) -> None:
        """Values are cut into character-strings of at most 255 octets (RFC 1035 §3.3.14)."""
        value = "x" * 600
        self.assertEqual([len(s) for s in txt_strings(value)], [255, 255, 90])
        self.assertEqual("".join(txt_strings(value)), value)
        self.assertEqual(txt_strings(""), [""])

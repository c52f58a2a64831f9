"""DKIM signing: canonicalization, the signature field, and verification by independent verifiers.

Every signing case is checked by three verifiers that share no code with us: dkimpy (in this process),
Mail::DKIM (perl, its DNS lookup replaced by a table of our keys) and OpenDKIM's ``opendkim-testmsg``.
dkimpy is lenient where the other two are strict, so it is never the only judge. ``opendkim-testmsg``
can only fetch keys from DNS through the C library's resolver, so it runs in private mount and network
namespaces (``unshare``): there ``/etc/resolv.conf`` names 127.0.0.1, a small DNS server in the same
namespace answers from our zone, and no packet can reach a real DNS server.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, cast

import attrs
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mtad.mail.dkim import (
    POSTAL_SIGNED_HEADERS,
    DKIMKey,
    DKIMKeyError,
    DKIMSigner,
    UnsignableMessageError,
    normalize_line_endings,
    relaxed_body,
    relaxed_header,
    split_message,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "mtad.test"
NOW = 1_764_000_000.0  # 2025-11-24: in the past, as verifiers require of t=
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@functools.cache
def rsa_key() -> DKIMKey:
    """A 2048-bit RSA key (the size Postal generates), made once per test process."""
    return DKIMKey(DOMAIN, "rsa2048", _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))


@functools.cache
def ed25519_key() -> DKIMKey:
    return DKIMKey(DOMAIN, "ed", _pem(ed25519.Ed25519PrivateKey.generate()), algorithm="ed25519")


def dns_record(key: DKIMKey) -> str:
    """The TXT record publishing ``key`` (RFC 6376 §3.6.1; RFC 8463 §4 for Ed25519's raw public key)."""
    private = serialization.load_pem_private_key(key.private_key_pem, password=None)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return f"v=DKIM1; k={key.algorithm}; p={base64.b64encode(public).decode()}"


def zone() -> dict[str, str]:
    """TXT records by name for every test key."""
    return {f"{k.selector}._domainkey.{k.domain}": dns_record(k) for k in (rsa_key(), ed25519_key())}


SIMPLE = (
    b"From: Alice Example <alice@mtad.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: Hello\r\n"
    b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@mtad.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"This is a test.\r\n"
)

FOLDED = (
    b"Received: from client.example (client.example [192.0.2.1])\r\n"
    b"\tby mx.mtad.test with ESMTPS; Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b'FROM: "Alice  Example"   <alice@mtad.test>  \r\n'
    b"To: Bob <bob@dest.test>,\r\n"
    b"  Carol <carol@dest.test>, \r\n"
    b"\tDave <dave@dest.test>\r\n"
    b"subject:   A subject\r\n"
    b"  folded\tover \t three\r\n"
    b"   lines   \r\n"
    b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b"Message-Id:<2@mtad.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b' boundary="b1"\r\n'
    b"References: <a@example.com> <b@example.com>\r\n"
    b" <c@example.com>\r\n"
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Plain.\r\n"
    b"--b1--\r\n"
)

EIGHT_BIT = (
    "From: Zoë <zoe@mtad.test>\r\n"
    "To: Jürgen <juergen@dest.test>\r\n"
    "Subject: Grüße aus Köln 🎉\r\n"
    "Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    "Message-ID: <3@mtad.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Schöne Grüße, dein Zoë 🎉\r\n"
    "Ünïcödé\tand\u00a0a no-break space, 日本語のテキスト.\r\n"
).encode()

TRAILING = (
    b"From: alice@mtad.test\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: Trailing whitespace\r\n"
    b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b"\r\n"
    b"Line with trailing spaces   \r\n"
    b"Line with a trailing tab\t\r\n"
    b"  Inner   runs\t\tof blanks  \r\n"
    b"\r\n"
    b"Last line\r\n"
    b"\r\n"
    b"   \r\n"
    b"\t\r\n"
    b"\r\n"
    b"\r\n"
)

# RFC 5322 §3.6 requires only Date and From (strict verifiers insist on both).
MINIMAL = (
    b"From: alice@mtad.test\r\n"
    b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b"\r\n"
    b"No To, Subject, id or MIME fields.\r\n"
)

DUPLICATES = (
    b"Received: from relay2.example by mx.mtad.test; Thu, 27 Nov 2025 10:00:02 +0000\r\n"
    b"Received: from relay1.example by relay2.example; Thu, 27 Nov 2025 10:00:01 +0000\r\n"
    b"Resent-From: second@mtad.test\r\n"
    b"Resent-To: third@dest.test\r\n"
    b"Resent-From: first@mtad.test\r\n"
    b"Resent-To: second@dest.test\r\n"
    b"From: alice@mtad.test\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: Forwarded twice\r\n"
    b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b"\r\n"
    b"Body.\r\n"
)

LONG_LINES = (
    b"From: alice@mtad.test\r\n"
    b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
    b"To: " + b", ".join(b"recipient%d@dest.test" % n for n in range(40)) + b"\r\n"
    b"Subject: " + b"long " * 180 + b"end\r\n"
    b"\r\n" + b"x" * 990 + b"\r\n" + b"word " * 300 + b"\r\n"
)

EMPTY_BODY = b"From: alice@mtad.test\r\nDate: Thu, 27 Nov 2025 10:00:00 +0000\r\nSubject: Nothing\r\n\r\n"

NO_FINAL_CRLF = b"From: alice@mtad.test\r\nDate: Thu, 27 Nov 2025 10:00:00 +0000\r\n\r\nNo line end"

EVERY_POSTAL_FIELD = (
    b"".join(f"{name}: value of {name} <x@mtad.test>\r\n".encode() for name in POSTAL_SIGNED_HEADERS)
    + b"\r\nBody.\r\n"
)


def signature_fields(signed: bytes) -> tuple[list[bytes], bytes]:
    """The DKIM-Signature fields at the top of ``signed`` (each with its CRLF) and the rest."""
    fields = []
    rest = signed
    while match := re.match(rb"DKIM-Signature:.*?\r\n(?![ \t])", rest, re.DOTALL | re.IGNORECASE):
        fields.append(match.group())
        rest = rest[match.end() :]
    return fields, rest


def tags(field: bytes) -> dict[str, str]:
    """The tags of one DKIM-Signature field, whitespace removed, in order."""
    value = re.sub(rb"[ \t\r\n]", b"", field.split(b":", 1)[1]).decode()
    return dict(t.split("=", 1) for t in value.split(";") if t)


class CanonicalizationTests(SynchronousTestCase):
    """The relaxed algorithms of RFC 6376 §3.4, and message splitting."""

    def test_rfc_body_example(self) -> None:
        """RFC 6376 §3.4.5's body example canonicalizes to " C" CRLF "D E" CRLF."""
        self.assertEqual(relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n"), b" C\r\nD E\r\n")

    def test_rfc_header_example(self) -> None:
        """RFC 6376 §3.4.5's header example: "A: X" and "B : Y<TAB><CRLF><TAB>Z  " become "a:X", "b:Y Z"."""
        self.assertEqual(relaxed_header(b"A", b" X"), b"a:X\r\n")
        self.assertEqual(relaxed_header(b"B", b" Y\t\r\n\tZ  "), b"b:Y Z\r\n")

    def test_empty_body(self) -> None:
        """An empty body, or one of only blank lines, is the empty string (erratum 3193), not a CRLF."""
        self.assertEqual(relaxed_body(b""), b"")
        self.assertEqual(relaxed_body(b"\r\n \r\n\t\r\n"), b"")

    def test_final_crlf_added(self) -> None:
        """A body not ending in CRLF gains one; trailing blanks on that last line go."""
        self.assertEqual(relaxed_body(b"text \t"), b"text\r\n")

    def test_trailing_whitespace_lines(self) -> None:
        """Lines of blanks at the end are empty lines, so they go too; inner empty lines stay."""
        self.assertEqual(relaxed_body(b"a\r\n\r\nb  \r\n \r\n\t \r\n"), b"a\r\n\r\nb\r\n")

    def test_eight_bit_untouched(self) -> None:
        """Bytes above 127, including a UTF-8 no-break space, are not whitespace to DKIM."""
        body = "é\u00a0ü  🎉\r\n".encode()
        self.assertEqual(relaxed_body(body), "é\u00a0ü 🎉\r\n".encode())

    def test_line_endings(self) -> None:
        """Bare LF and bare CR become CRLF; CRLF input comes back as the same object."""
        self.assertEqual(normalize_line_endings(b"a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd")
        self.assertIs(normalize_line_endings(SIMPLE), SIMPLE)

    def test_split(self) -> None:
        """The header ends at the first empty line; without one the message is all header."""
        self.assertEqual(split_message(b"A: 1\r\n\r\nbody\r\n\r\nmore"), (b"A: 1", b"body\r\n\r\nmore"))
        self.assertEqual(split_message(b"A: 1\r\n"), (b"A: 1", b""))
        self.assertEqual(split_message(b"\r\nbody"), (b"", b"body"))


class SignatureFieldTests(SynchronousTestCase):
    """The DKIM-Signature field we write: Postal's tags and header list, folded to 78 columns."""

    def setUp(self) -> None:
        self.signer = DKIMSigner()

    def sign_one(self, message: bytes, key: DKIMKey | None = None) -> tuple[bytes, bytes]:
        signed = self.signer.sign(message, [key or rsa_key()], NOW)
        fields, rest = signature_fields(signed)
        self.assertEqual(len(fields), 1)
        return fields[0], rest

    def test_postal_tags(self) -> None:
        """Tags come in Postal's order with rsa-sha256, relaxed/relaxed, our d=, s= and t=."""
        field, _ = self.sign_one(SIMPLE)
        found = tags(field)
        self.assertEqual(list(found), ["v", "a", "c", "d", "s", "t", "bh", "h", "b"])
        self.assertEqual(found["a"], "rsa-sha256")
        self.assertEqual(found["c"], "relaxed/relaxed")
        self.assertEqual((found["d"], found["s"], found["t"]), (DOMAIN, "rsa2048", "1764000000"))
        self.assertEqual(len(base64.b64decode(found["b"])), 256)

    def test_present_fields_only(self) -> None:
        """h= names the present Postal fields, lowercased, in message order; Received is not signed."""
        field, _ = self.sign_one(FOLDED)
        self.assertEqual(
            tags(field)["h"], "from:to:subject:date:message-id:mime-version:content-type:references"
        )
        field, _ = self.sign_one(MINIMAL)
        self.assertEqual(tags(field)["h"], "from:date")

    def test_every_instance_listed(self) -> None:
        """A repeated field is named once per instance."""
        field, _ = self.sign_one(DUPLICATES)
        self.assertEqual(tags(field)["h"], "resent-from:resent-to:resent-from:resent-to:from:to:subject:date")

    def test_custom_header_list(self) -> None:
        """A signer given its own list signs those fields (case-insensitively) and no others."""
        signer = DKIMSigner(headers=["From", "X-Campaign"])
        fields, _ = signature_fields(
            signer.sign(SIMPLE.replace(b"To:", b"X-Campaign: 7\r\nTo:"), [rsa_key()], NOW)
        )
        self.assertEqual(tags(fields[0])["h"], "from:x-campaign")

    def test_body_hash(self) -> None:
        """bh= is the SHA-256 of the relaxed body: here of "Hello Bob," CRLF CRLF "This is a test." CRLF."""
        field, _ = self.sign_one(SIMPLE)
        self.assertEqual(tags(field)["bh"], "it1psgYgbcF3ED1NY5IqqWzcb4ge7diBAoZt7soIZv0=")

    def test_folded_to_78_columns(self) -> None:
        """Every line of the field fits in 78 columns, continuation lines start with a tab, b= spans lines."""
        for message in (SIMPLE, EVERY_POSTAL_FIELD):
            for key in (rsa_key(), ed25519_key()):
                field, _ = self.sign_one(message, key)
                lines = field[:-2].split(b"\r\n")
                self.assertTrue(all(len(line) <= 78 for line in lines), lines)
                self.assertTrue(all(line.startswith(b"\t") for line in lines[1:]), lines)
                # The b= tag is last; its value continues over the lines after the one where it starts.
                start = next(i for i, line in enumerate(lines) if re.search(rb"(^|[\s;])b=", line))
                self.assertGreaterEqual(len(lines) - start, 5 if key.algorithm == "rsa" else 2, lines)

    def test_message_unchanged_below(self) -> None:
        """The signature is prepended; the message itself follows byte for byte."""
        _, rest = self.sign_one(FOLDED)
        self.assertEqual(rest, FOLDED)

    def test_lf_input_normalized(self) -> None:
        """LF-only input comes back with CRLF line ends and the same signature as its CRLF form."""
        signed_lf = self.signer.sign(SIMPLE.replace(b"\r\n", b"\n"), [rsa_key()], NOW)
        self.assertEqual(signed_lf, self.signer.sign(SIMPLE, [rsa_key()], NOW))
        self.assertNotIn(b"\n", signed_lf.replace(b"\r\n", b""))

    def test_one_field_per_key_in_order(self) -> None:
        """Each key adds one field, the first key's on top."""
        fields, rest = signature_fields(self.signer.sign(SIMPLE, [rsa_key(), ed25519_key()], NOW))
        self.assertEqual([tags(f)["a"] for f in fields], ["rsa-sha256", "ed25519-sha256"])
        self.assertEqual(rest, SIMPLE)

    def test_no_keys(self) -> None:
        """Without keys the message is returned unsigned."""
        self.assertEqual(self.signer.sign(SIMPLE, [], NOW), SIMPLE)

    def test_default_time(self) -> None:
        """Without ``now`` the timestamp is the current time."""
        before = int(time.time())
        fields, _ = signature_fields(self.signer.sign(SIMPLE, [rsa_key()]))
        self.assertGreaterEqual(int(tags(fields[0])["t"]), before)

    def test_no_from(self) -> None:
        """A message without From cannot be signed validly, so signing refuses instead of sending a dud."""
        with self.assertRaises(UnsignableMessageError):
            self.signer.sign(b"To: bob@dest.test\r\n\r\nBody\r\n", [rsa_key()], NOW)

    def test_from_required_in_list(self) -> None:
        """A header list without From is a configuration mistake and is refused at once."""
        with self.assertRaises(ValueError):
            DKIMSigner(headers=["to", "subject"])


class KeyTests(SynchronousTestCase):
    """DKIMKey values and loading."""

    def test_bad_pem(self) -> None:
        """An unreadable key fails with an error naming the selector and domain."""
        key = DKIMKey(DOMAIN, "broken", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        with self.assertRaises(DKIMKeyError) as caught:
            DKIMSigner().sign(SIMPLE, [key], NOW)
        self.assertIn("broken._domainkey.mtad.test", str(caught.exception))

    def test_algorithm_mismatch(self) -> None:
        """An Ed25519 key labelled rsa (or the reverse) is refused rather than signed under the wrong a=."""
        with self.assertRaises(DKIMKeyError):
            DKIMSigner().sign(SIMPLE, [attrs.evolve(ed25519_key(), algorithm="rsa")], NOW)
        with self.assertRaises(DKIMKeyError):
            DKIMSigner().sign(SIMPLE, [attrs.evolve(rsa_key(), algorithm="ed25519")], NOW)

    def test_invalid_values(self) -> None:
        """Domains and selectors that would corrupt the tag list, and unknown algorithms, are refused."""
        pem = rsa_key().private_key_pem
        for domain, selector in (
            ("mtad.test; x=1", "s"),
            ("mtad.test", "s 1"),
            ("bücher.test", "s"),
            ("", "s"),
        ):
            with self.assertRaises(ValueError):
                DKIMKey(domain, selector, pem)
        with self.assertRaises(ValueError):
            DKIMKey(DOMAIN, "s", pem, algorithm="dsa")

    def test_repr_hides_key(self) -> None:
        """The private key never shows in a repr, so it cannot reach a log line."""
        self.assertNotIn("PRIVATE", repr(rsa_key()))

    def test_loaded_once(self) -> None:
        """Equal keys share one loaded private key: PEM parsing happens once per key, not per message."""
        signer = DKIMSigner()
        first = signer._private_key(rsa_key())
        self.assertIs(signer._private_key(attrs.evolve(rsa_key())), first)


# Verification by independent verifiers --------------------------------------------------------------


@attrs.frozen
class Verdict:
    """One verifier's result for one signature."""

    algorithm: str
    passed: bool
    detail: str


class VerificationCases:
    """What every verifier must agree on; subclasses say how their verifier checks a signed message."""

    verifier: ClassVar[str]
    ed25519: ClassVar[bool] = True

    def verdicts(self, signed: bytes) -> list[Verdict]:
        raise NotImplementedError

    def assert_signed_verifies(self, message: bytes, keys: Sequence[DKIMKey] | None = None) -> None:
        keys = [rsa_key()] if keys is None else keys
        signed = DKIMSigner().sign(message, keys, NOW)
        verdicts = self.verdicts(signed)
        test = cast(SynchronousTestCase, self)
        test.assertEqual(len(verdicts), len(keys), verdicts)
        for verdict in verdicts:
            test.assertTrue(
                verdict.passed, f"{self.verifier}: {verdict}\n{signed.decode('utf-8', 'replace')}"
            )

    def assert_fails(self, signed: bytes) -> None:
        verdicts = self.verdicts(signed)
        test = cast(SynchronousTestCase, self)
        test.assertTrue(verdicts)
        test.assertFalse(any(v.passed for v in verdicts), verdicts)

    def test_simple(self) -> None:
        """A plain ASCII message verifies."""
        self.assert_signed_verifies(SIMPLE)

    def test_folded_headers(self) -> None:
        """Folded fields, odd spacing, a mixed-case and a blank-less field name verify (relaxed headers)."""
        self.assert_signed_verifies(FOLDED)

    def test_eight_bit(self) -> None:
        """Raw UTF-8 in header fields and body verifies."""
        self.assert_signed_verifies(EIGHT_BIT)

    def test_trailing_whitespace_and_blank_lines(self) -> None:
        """Trailing blanks, inner blank runs and trailing empty or blank lines verify (relaxed body)."""
        self.assert_signed_verifies(TRAILING)

    def test_missing_optional_headers(self) -> None:
        """A message with only From and Date (RFC 5322's minimum) verifies: absent fields are not in h=."""
        self.assert_signed_verifies(MINIMAL)

    def test_duplicate_headers(self) -> None:
        """Repeated fields verify: two Received (unsigned) and two differing Resent- blocks (signed)."""
        self.assert_signed_verifies(DUPLICATES)

    def test_long_lines(self) -> None:
        """A 900-column Subject, a long To list and long body lines verify."""
        self.assert_signed_verifies(LONG_LINES)

    def test_every_postal_field(self) -> None:
        """A message carrying every field of Postal's list verifies with h= folded over several lines."""
        self.assert_signed_verifies(EVERY_POSTAL_FIELD)

    def test_empty_body(self) -> None:
        """A message with an empty body verifies."""
        self.assert_signed_verifies(EMPTY_BODY)

    def test_no_final_crlf(self) -> None:
        """A body without a final line end verifies."""
        self.assert_signed_verifies(NO_FINAL_CRLF)

    def test_lf_input(self) -> None:
        """A message given with LF line ends is sent, and verifies, with CRLF."""
        self.assert_signed_verifies(FOLDED.replace(b"\r\n", b"\n"))

    def test_ed25519(self) -> None:
        """An Ed25519 signature alone verifies (RFC 8463)."""
        if not self.ed25519:
            raise SkipTest(f"{self.verifier} here cannot verify ed25519-sha256")
        self.assert_signed_verifies(EIGHT_BIT, [ed25519_key()])

    def test_dual_signed(self) -> None:
        """RSA and Ed25519 signatures on one message each verify, neither disturbing the other."""
        if self.ed25519:
            self.assert_signed_verifies(FOLDED, [rsa_key(), ed25519_key()])
            return
        signed = DKIMSigner().sign(FOLDED, [rsa_key(), ed25519_key()], NOW)
        verdicts = self.verdicts(signed)
        test = cast(SynchronousTestCase, self)
        test.assertEqual([v.algorithm for v in verdicts], ["rsa-sha256", "ed25519-sha256"])
        test.assertTrue(verdicts[0].passed, verdicts)

    def test_relaxed_survives_whitespace_changes(self) -> None:
        """Changing only blank runs, field-name case and line-end blanks keeps the signature valid."""
        signed = DKIMSigner().sign(SIMPLE, [rsa_key()], NOW)
        changed = (
            signed.replace(b"Hello Bob,", b"Hello  \t Bob,   ")
            .replace(b"Subject: Hello", b"SUBJECT:   Hello  ")
            .replace(b"This is a test.\r\n", b"This is a test.\r\n\r\n\r\n")
        )
        verdicts = self.verdicts(changed)
        test = cast(SynchronousTestCase, self)
        test.assertEqual(len(verdicts), 1)
        test.assertTrue(verdicts[0].passed, verdicts)

    def test_tampered_body_fails(self) -> None:
        """A changed body fails: the verifier really checks."""
        signed = DKIMSigner().sign(SIMPLE, [rsa_key()], NOW)
        self.assert_fails(signed.replace(b"This is a test.", b"This is a tesT."))

    def test_tampered_header_fails(self) -> None:
        """A changed signed field fails."""
        signed = DKIMSigner().sign(SIMPLE, [rsa_key()], NOW)
        self.assert_fails(signed.replace(b"Subject: Hello", b"Subject: Hellp"))

    def test_tampered_ed25519_fails(self) -> None:
        """A changed body fails the Ed25519 signature too."""
        if not self.ed25519:
            raise SkipTest(f"{self.verifier} here cannot verify ed25519-sha256")
        signed = DKIMSigner().sign(SIMPLE, [ed25519_key()], NOW)
        self.assert_fails(signed.replace(b"This is a test.", b"This is a tesT."))


class DkimpyVerificationTests(VerificationCases, SynchronousTestCase):
    """dkimpy, the Python verifier, with a DNS function answering from our zone."""

    verifier = "dkimpy"

    def setUp(self) -> None:
        try:
            import nacl  # noqa: F401
        except ImportError:
            type(self).ed25519 = False

    def verdicts(self, signed: bytes) -> list[Verdict]:
        records = zone()

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            record = records.get(name.decode().rstrip("."))
            return None if record is None else record.encode()

        fields, _ = signature_fields(signed)
        verifier = dkim.DKIM(signed, minkey=1024)
        results = []
        for index, field in enumerate(fields):
            try:
                passed = bool(verifier.verify(idx=index, dnsfunc=dnsfunc))
                detail = ""
            except dkim.DKIMException as e:
                passed, detail = False, str(e)
            results.append(Verdict(tags(field)["a"], passed, detail))
        return results


MAIL_DKIM_SCRIPT = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;

# Our zone instead of DNS: one "name<TAB>record" per line in $ENV{DKIM_TEST_ZONE}.
my %zone = map { my ($n, $r) = split /\t/, $_, 2; (lc $n, $r) } split /\n/, $ENV{DKIM_TEST_ZONE};
{
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($name, $type) = @_;
        my $record = $zone{lc $name};
        if (!defined $record || uc $type ne 'TXT') { $@ = 'NXDOMAIN'; return; }
        $@ = 'NOERROR';
        return Net::DNS::RR->new(name => $name, type => 'TXT', txtdata => [unpack '(a255)*', $record]);
    };
}
binmode STDIN;
local $/;
my $message = <STDIN>;
my $dkim = Mail::DKIM::Verifier->new();
$dkim->PRINT($message);
$dkim->CLOSE;
for my $signature ($dkim->signatures) {
    printf "%s\t%s\t%s\n", $signature->algorithm, $signature->result, $signature->result_detail // '';
}
"""


class MailDKIMVerificationTests(VerificationCases, SynchronousTestCase):
    """Mail::DKIM (perl), strict, with its DNS query function answering from our zone."""

    verifier = "Mail::DKIM"
    version: ClassVar[str | None] = None

    def setUp(self) -> None:
        cls = type(self)
        if cls.version is None:
            probe = subprocess.run(
                ["perl", "-MMail::DKIM::Verifier", "-e", "print $Mail::DKIM::VERSION"],
                capture_output=True,
                check=False,
            )
            if probe.returncode != 0:
                raise SkipTest(
                    "Mail::DKIM is not installed (Debian libmail-dkim-perl; tools/setup installs it as root)"
                )
            cls.version = probe.stdout.decode()
            # Ed25519 came to Mail::DKIM after Debian 12's 1.20230212: ask it whether it has the algorithm.
            has_ed25519 = subprocess.run(
                ["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-e", "1"],
                capture_output=True,
                check=False,
            )
            cls.ed25519 = has_ed25519.returncode == 0

    def verdicts(self, signed: bytes) -> list[Verdict]:
        records = "\n".join(f"{name}\t{record}" for name, record in zone().items())
        done = subprocess.run(
            ["perl", "-e", MAIL_DKIM_SCRIPT],
            input=signed,
            capture_output=True,
            env={**os.environ, "DKIM_TEST_ZONE": records},
            timeout=60,
            check=False,
        )
        cast(SynchronousTestCase, self).assertEqual(done.returncode, 0, done.stderr.decode())
        results = []
        for line in done.stdout.decode().splitlines():
            algorithm, result, detail = line.split("\t", 2)
            results.append(Verdict(algorithm, result == "pass", detail))
        return results


def _loopback_up() -> None:
    """Bring up ``lo`` in a fresh network namespace (SIOCSIFFLAGS), without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def _serve_dns(sock: socket.socket, records: dict[str, str]) -> None:
    """Answer TXT queries from ``records`` (split into 255-byte strings), NXDOMAIN for other names."""
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rdtypes.ANY.TXT
    import dns.rrset

    while True:
        wire, client = sock.recvfrom(4096)
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        record = records.get(question.name.to_text(omit_final_dot=True).lower())
        if record is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            data = record.encode()
            strings = [data[i : i + 255] for i in range(0, len(data), 255)]
            rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
            response.answer.append(dns.rrset.from_rdata(question.name, 60, rdata))
        sock.sendto(response.to_wire(), client)


def sandbox_main(argv: list[str]) -> int:
    """Run inside the private namespaces: serve the zone file ``argv[0]`` on 127.0.0.1:53, run ``argv[1:]``.

    The command inherits stdin, stdout and stderr; its exit status is returned.
    """
    records = json.loads(Path(argv[0]).read_text())
    _loopback_up()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    threading.Thread(target=_serve_dns, args=(sock, records), daemon=True).start()
    return subprocess.run(argv[1:], check=False).returncode


def run_with_private_dns(
    command: Sequence[str], stdin: bytes, records: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` where the only DNS server is ours, serving ``records``, and no network exists."""
    if os.geteuid() == 0:
        unshare = ["unshare", "--mount", "--net"]
    else:
        unshare = ["unshare", "--user", "--map-root-user", "--mount", "--net"]
    with tempfile.TemporaryDirectory(prefix="mtad-dkim-") as tmp:
        zone_file = Path(tmp, "zone.json")
        zone_file.write_text(json.dumps(records))
        resolv = Path(tmp, "resolv.conf")
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
        # unshare makes the new mount namespace private, so the bind mount is invisible outside it.
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        code = (
            "import sys; from tests.mail.test_dkim import sandbox_main; sys.exit(sandbox_main(sys.argv[1:]))"
        )
        return subprocess.run(
            [*unshare, "sh", "-c", script, str(resolv), sys.executable, "-c", code, str(zone_file), *command],
            input=stdin,
            capture_output=True,
            cwd=REPO_ROOT,
            timeout=60,
            check=False,
        )


class OpenDKIMVerificationTests(VerificationCases, SynchronousTestCase):
    """OpenDKIM's opendkim-testmsg (libopendkim, strict), one signature per run, DNS from our zone."""

    verifier = "opendkim-testmsg"
    binary: ClassVar[str | None] = None

    def setUp(self) -> None:
        binary = shutil.which("opendkim-testmsg", path=SBIN_PATH)
        if binary is None:
            raise SkipTest(
                "opendkim-testmsg is not installed (Debian opendkim-tools; tools/setup installs it as root)"
            )
        type(self).binary = binary

    def verdicts(self, signed: bytes) -> list[Verdict]:
        # opendkim-testmsg reports one result for the whole message, so each signature is checked alone:
        # no signature covers another, so removing the others changes nothing it signs.
        fields, rest = signature_fields(signed)
        results = []
        for field in fields:
            done = run_with_private_dns([cast(str, self.binary)], field + rest, zone())
            detail = done.stderr.decode("utf-8", "replace").strip()
            if "unshare" in detail or "mount" in detail:
                cast(SynchronousTestCase, self).fail(f"cannot set up the private DNS namespace: {detail}")
            results.append(Verdict(tags(field)["a"], done.returncode == 0 and not detail, detail))
        return results

"""The webhook signing key: Postal's signature headers, kid and JWK set, verified by django-anymail's view."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from twisted.trial import unittest

from mtad.mail import dkim_keys
from mtad.webhooks.signing import WebhookSigner
from tests.integration.test_postal_clients import configure_django

#: A MessageSent webhook as Postal sends it (envelope and payload of ``Delivery#webhook_hash``).
MESSAGE_SENT = {
    "event": "MessageSent",
    "timestamp": 1712345678.123456,
    "uuid": "0d5a4c3f-1b2e-4c5d-9e8f-7a6b5c4d3e2f",
    "payload": {
        "message": {
            "id": 12345,
            "token": "abcdef123",
            "direction": "outgoing",
            "message_id": "5e9f@mtad.test",
            "to": "rcpt@example.com",
            "from": "app@sender.test",
            "subject": "Héllo 👋",
            "timestamp": 1712345670.5,
            "spam_status": "NotChecked",
            "tag": "welcome",
        },
        "status": "Sent",
        "details": "Message for rcpt@example.com accepted by mx.example.com (192.0.2.1)",
        "output": "250 2.0.0 OK",
        "sent_with_ssl": True,
        "timestamp": 1712345678.1,
        "time": 0.52,
    },
}


def _der_integer(value: int) -> bytes:
    """DER INTEGER (X.690 §8.3), written out here so the kid is not checked against the code's own DER."""
    content = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading 0 keeps it positive
    return b"\x02" + _der_length(len(content)) + content


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


class SignerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "signing.key"
        self.signer = WebhookSigner.load_or_create(self.path, rsa_bits=2048)
        key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.public = key.public_key()

    def test_key_file_created_private_and_reused(self) -> None:
        """The key is created on first use as a 0600 RSA PEM and read back, not replaced, afterwards."""
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertIn(b"BEGIN RSA PRIVATE KEY", self.path.read_bytes())
        self.assertEqual(self.public.key_size, 2048)
        again = WebhookSigner.load_or_create(self.path)
        self.assertEqual(again.kid, self.signer.kid)

    def test_processes_starting_at_once_share_one_key(self) -> None:
        """Four starts on one data directory at once (each past the "is there a key?" check before any
        has written one) all succeed with the same key, the winner's, and leave no temporary file."""
        path = Path(self.mktemp()) / "signing.key"
        starts = 4
        everyone_checked = threading.Barrier(starts, timeout=30)
        real_generate = dkim_keys.generate_key

        def generate_after_all_checked(algorithm: str, rsa_bits: int = 2048) -> tuple[bytes, str]:
            generated = real_generate(algorithm, rsa_bits)
            everyone_checked.wait()
            return generated

        self.patch(dkim_keys, "generate_key", generate_after_all_checked)
        kids: list[str] = []
        errors: list[BaseException] = []

        def start() -> None:
            try:
                kids.append(WebhookSigner.load_or_create(path, rsa_bits=1024).kid)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=start) for _ in range(starts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(kids), starts)
        self.assertEqual(set(kids), {WebhookSigner(path.read_bytes()).kid})
        self.assertEqual(os.listdir(path.parent), [path.name])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_rejects_a_key_that_is_not_rsa(self) -> None:
        """A non-RSA key in the file is refused with a reason rather than producing unverifiable headers."""
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with self.assertRaises(ValueError) as raised:
            WebhookSigner(pem)
        self.assertIn("RSA", str(raised.exception))

    def test_headers_are_sha1_and_sha256_signatures_of_the_exact_body(self) -> None:
        """X-Postal-Signature is RSA-SHA1 and -256 RSA-SHA256 (PKCS#1 v1.5) of the body bytes, base64."""
        body = json.dumps(MESSAGE_SENT).encode()
        headers = self.signer.sign(body)
        self.assertEqual(
            set(headers), {"X-Postal-Signature", "X-Postal-Signature-256", "X-Postal-Signature-KID"}
        )
        self.public.verify(
            base64.b64decode(headers["X-Postal-Signature"], validate=True),
            body,
            padding.PKCS1v15(),
            hashes.SHA1(),
        )
        self.public.verify(
            base64.b64decode(headers["X-Postal-Signature-256"], validate=True),
            body,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        self.assertEqual(headers["X-Postal-Signature-KID"], self.signer.kid)

    def test_kid_is_ruby_jwt_key_digest(self) -> None:
        """The kid is ruby-jwt's default: hex SHA-256 of DER SEQUENCE { INTEGER n, INTEGER e }."""
        numbers = self.public.public_numbers()
        content = _der_integer(numbers.n) + _der_integer(numbers.e)
        sequence = b"\x30" + _der_length(len(content)) + content
        self.assertEqual(self.signer.kid, hashlib.sha256(sequence).hexdigest())

    def test_jwks_document(self) -> None:
        """The JWK set has one RSA key, Postal's members in Postal's order, n and e unpadded base64url."""
        document = self.signer.jwks()
        self.assertEqual(list(document), ["keys"])
        [jwk] = document["keys"]
        self.assertEqual(list(jwk), ["kty", "n", "e", "use", "alg", "kid"])
        self.assertEqual(
            (jwk["kty"], jwk["use"], jwk["alg"], jwk["kid"]), ("RSA", "sig", "RS256", self.signer.kid)
        )
        numbers = self.public.public_numbers()
        self.assertEqual(jwk["e"], "AQAB")
        self.assertNotIn("=", jwk["n"])
        self.assertEqual(_b64url_int(jwk["n"]), numbers.n)
        self.assertEqual(_b64url_int(jwk["e"]), numbers.e)

    def test_anymail_key_is_base64_der_public_key(self) -> None:
        """The anymail key is the one-line base64 DER SubjectPublicKeyInfo of the signing key."""
        der = self.public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.assertEqual(self.signer.public_key_for_anymail(), base64.b64encode(der).decode())


class AnymailVerificationTests(unittest.TestCase):
    """django-anymail's Postal tracking webhook view, unmodified, run in-process on bodies we signed."""

    def setUp(self) -> None:
        configure_django()
        from anymail.signals import tracking  # type: ignore[import-untyped]

        self.signer = WebhookSigner.load_or_create(Path(self.mktemp()) / "signing.key")
        self.events: list[Any] = []

        def record(sender: Any, event: Any, esp_name: str, **kwargs: Any) -> None:
            self.events.append((esp_name, event))

        tracking.connect(record, weak=False)
        self.addCleanup(tracking.disconnect, record)

    def post(self, body: bytes, headers: dict[str, str]) -> Any:
        from anymail.webhooks.postal import PostalTrackingWebhookView  # type: ignore[import-untyped]
        from django.test import RequestFactory  # type: ignore[import-untyped]

        meta = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
        request = RequestFactory().post(
            "/anymail/postal/tracking/", data=body, content_type="application/json", **meta
        )
        view = PostalTrackingWebhookView.as_view(webhook_key=self.signer.public_key_for_anymail())
        return view(request)

    def test_anymail_verifies_and_parses_message_sent(self) -> None:
        """anymail accepts our signature and turns MessageSent into a "delivered" tracking event."""
        from anymail.signals import AnymailTrackingEvent

        body = json.dumps(MESSAGE_SENT).encode()
        response = self.post(body, self.signer.sign(body))
        self.assertEqual(response.status_code, 200)
        [(esp_name, event)] = self.events
        self.assertEqual(esp_name, "Postal")
        self.assertIsInstance(event, AnymailTrackingEvent)
        self.assertEqual(event.event_type, "delivered")
        self.assertEqual(event.message_id, 12345)
        self.assertEqual(event.recipient, "rcpt@example.com")
        self.assertEqual(event.event_id, MESSAGE_SENT["uuid"])
        self.assertEqual(event.mta_response, "250 2.0.0 OK")
        self.assertEqual(event.tags, ["welcome"])

    def test_anymail_refuses_a_tampered_body(self) -> None:
        """A body changed after signing (one byte) fails anymail's signature check; no event is sent."""
        from anymail.exceptions import AnymailWebhookValidationFailure  # type: ignore[import-untyped]

        body = json.dumps(MESSAGE_SENT).encode()
        headers = self.signer.sign(body)
        tampered = body.replace(b'"Sent"', b'"Held"')
        self.assertNotEqual(tampered, body)
        with self.assertRaises(AnymailWebhookValidationFailure):
            self.post(tampered, headers)
        self.assertEqual(self.events, [])

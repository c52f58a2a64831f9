"""The installation's webhook signing key: Postal's three signature headers and its JWK set.

Postal signs every webhook and HTTP-endpoint POST with one installation-wide RSA key
(``lib/postal/signer.rb``, ``lib/postal/http.rb``):

* ``X-Postal-Signature``: base64 of the RSA PKCS#1 v1.5 signature with SHA-1 of the exact body bytes, the
  legacy header that django-anymail and the older client libraries verify;
* ``X-Postal-Signature-256``: the same with SHA-256 (Postal 3.2);
* ``X-Postal-Signature-KID``: the key's JWK ``kid``, so a receiver can pick the key from
  ``/.well-known/jwks.json``.

The ``kid`` is what ruby-jwt 2.8 (Postal's ``JWT::JWK.new(key, use: "sig", alg: "RS256")``) makes by default
(``KidAsKeyDigest``): the hex SHA-256 of the DER ``SEQUENCE { INTEGER n, INTEGER e }``, i.e. of the PKCS#1
``RSAPublicKey``. It is not the RFC 7638 thumbprint. Computing it the same way means an operator who moves
from Postal and points ``signing_key`` at Postal's ``signing.key`` keeps the same ``kid`` and public key,
so receivers that pinned either keep verifying.

Cost (measured on this machine, an AMD EPYC core, 2048-bit key, cryptography 50): one `WebhookSigner.sign`
(two signatures) takes about 1500 µs. OpenSSL releases the GIL while signing, so the sender can sign in a
thread pool and keep the reactor thread free (two threads sign twice as fast on two cores).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mtad.files import create_once
from mtad.mail import dkim_keys

SIGNATURE_HEADER = "X-Postal-Signature"
SIGNATURE_256_HEADER = "X-Postal-Signature-256"
SIGNATURE_KID_HEADER = "X-Postal-Signature-KID"


def load_or_create_pem(path: Path, rsa_bits: int = 2048) -> bytes:
    """The private key PEM in ``path``, a new RSA key generated there (mode 0600) first if there is none.

    Several processes may start at once on one data directory, and all must sign with one key (receivers
    pin its public half): `mtad.files.create_once`.
    """
    return create_once(path, lambda: dkim_keys.generate_key(dkim_keys.RSA, rsa_bits)[0])


def _base64url_uint(value: int) -> str:
    """An unsigned integer as a JWK member (RFC 7518 §6.3.1): big-endian, shortest form, base64url, no
    padding."""
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class WebhookSigner:
    """Signs POST bodies with the installation's RSA key and describes its public half."""

    def __init__(self, private_key_pem: bytes) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the webhook signing key must be an RSA key (Postal's receivers verify RSA)")
        self._key = key
        public = key.public_key()
        numbers = public.public_numbers()
        pkcs1 = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        spki = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        #: ruby-jwt's default kid (see the module docstring).
        self.kid = hashlib.sha256(pkcs1).hexdigest()
        self._spki_base64 = base64.b64encode(spki).decode("ascii")
        # Postal's member order: the key's own members, then the given parameters, then the kid.
        self._jwk = {
            "kty": "RSA",
            "n": _base64url_uint(numbers.n),
            "e": _base64url_uint(numbers.e),
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
        }

    @classmethod
    def load_or_create(cls, path: Path, rsa_bits: int = 2048) -> WebhookSigner:
        """The signer for the key in ``path``, generated there (PEM, mode 0600) on first start.

        2048 bits, not the 1024 of Postal's install script: the public half is also fit for a DKIM record,
        where RFC 8301 §3.2 asks for at least 2048.
        """
        return cls(load_or_create_pem(path, rsa_bits))

    def sign(self, body: bytes) -> dict[str, str]:
        """The three signature headers for ``body``, which must be the exact bytes sent."""
        sha1 = self._key.sign(body, padding.PKCS1v15(), hashes.SHA1())
        sha256 = self._key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        return {
            SIGNATURE_KID_HEADER: self.kid,
            SIGNATURE_HEADER: base64.b64encode(sha1).decode("ascii"),
            SIGNATURE_256_HEADER: base64.b64encode(sha256).decode("ascii"),
        }

    def jwks(self) -> dict[str, Any]:
        """The JWK set served at ``/.well-known/jwks.json`` (RFC 7517 §5), as Postal exports it."""
        return {"keys": [dict(self._jwk)]}

    def public_key_for_anymail(self) -> str:
        """The public key as django-anymail's ``POSTAL_WEBHOOK_KEY`` wants it: the base64 DER
        SubjectPublicKeyInfo on one line, without PEM armour (anymail adds the ``BEGIN PUBLIC KEY`` lines).

        It is the same text as the ``p=`` of a DKIM record, which is where Postal's documentation sends
        users for this value.
        """
        return self._spki_base64

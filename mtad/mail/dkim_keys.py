"""DKIM key pairs for sending domains, and the TXT record that publishes each public key.

RSA keys are 2048 bits by default: Postal's 1024-bit keys are below what RFC 8301 §3.2 recommends (signers
SHOULD use at least 2048 bits) and are rejected by some receivers. Ed25519 keys (RFC 8463) are offered for
dual signing alongside RSA; verifiers that do not know ``ed25519-sha256`` ignore that signature (RFC 6376
§6.1), so they never replace RSA.

Private keys are PEM: PKCS#1 (``BEGIN RSA PRIVATE KEY``) for RSA, which every DKIM library reads, and PKCS#8
(``BEGIN PRIVATE KEY``) for Ed25519, the only PEM form it has. dkimpy wants an Ed25519 private key as the
base64 of its 32 raw bytes: `ed25519_raw_private_key` converts.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mtad.files import create_once

RSA = "rsa"
ED25519 = "ed25519"
ALGORITHMS = (RSA, ED25519)

#: RFC 8301 §3.2: verifiers MUST accept 1024..4096-bit keys; signers SHOULD use at least 2048.
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096


def generate_key(algorithm: str, rsa_bits: int = 2048) -> tuple[bytes, str]:
    """A new key pair: (private key PEM, public key as base64 for the ``p=`` tag of the DNS record).

    RSA: ``p=`` is the DER SubjectPublicKeyInfo (RFC 6376 §3.6.1). Ed25519: the 32 raw public key bytes
    (RFC 8463 §4.2).
    """
    if algorithm == RSA:
        if not MIN_RSA_BITS <= rsa_bits <= MAX_RSA_BITS:
            raise ValueError(f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {rsa_bits}")
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        pem = rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        der = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem, base64.b64encode(der).decode("ascii")
    if algorithm == ED25519:
        ed_key = ed25519.Ed25519PrivateKey.generate()
        pem = ed_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pem, base64.b64encode(raw).decode("ascii")
    raise ValueError(f"unknown DKIM key algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def public_key_from_private(algorithm: str, private_key_pem: bytes) -> str:
    """The base64 ``p=`` value belonging to a private key (to import keys or check stored pairs)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")
    raise ValueError(f"the private key is not an {algorithm} key")


def ed25519_raw_private_key(private_key_pem: bytes) -> bytes:
    """The base64 of an Ed25519 key's 32 raw private bytes: the form dkimpy's ``dkim.sign`` takes."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw)


def dkim_txt_value(algorithm: str, public_key: str) -> str:
    """The TXT record value publishing ``public_key``, as Postal writes it.

    ``v=DKIM1; t=s; h=sha256; p=…;`` for RSA (Postal's exact form: ``t=s`` says the key is not for
    subdomains, ``h=sha256`` rules out SHA-1, RFC 6376 §3.6.1); Ed25519 adds ``k=ed25519`` (RFC 8463 §4.2).
    """
    if algorithm == RSA:
        return f"v=DKIM1; t=s; h=sha256; p={public_key};"
    if algorithm == ED25519:
        return f"v=DKIM1; k=ed25519; t=s; h=sha256; p={public_key};"
    raise ValueError(f"unknown DKIM key algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def parse_tag_list(text: str) -> dict[str, str] | None:
    """An RFC 6376 §3.2 tag list as a dict (whitespace around tags and values removed), or ``None`` if it
    is not one (a tag without ``=``, or a tag given twice)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name in tags:
            return None
        tags[name] = re.sub(r"\s+", "", value)
    return tags


def dkim_record_problem(algorithm: str, public_key: str, record: str) -> str | None:
    """Why the published TXT ``record`` does not publish ``public_key`` for ``algorithm``, or ``None``.

    Equivalent records are accepted (other tag order, extra spaces, no trailing ``;``, ``k=rsa`` spelt out,
    the base64 split by whitespace), unlike Postal's exact string comparison; what matters to a verifier is
    the key type and the key (RFC 6376 §3.6.1).
    """
    tags = parse_tag_list(record)
    if tags is None:
        return "it is not a DKIM tag list (tag=value; ...)"
    if tags.get("v", "DKIM1") != "DKIM1":
        return f"it has v={tags['v']}, not v=DKIM1"
    if tags.get("k", RSA).lower() != algorithm:
        return f"it has k={tags.get('k', RSA)}, not k={algorithm}"
    if "p" not in tags:
        return "it has no p= tag"
    if not tags["p"]:
        return "its p= tag is empty (the key is revoked)"
    if tags["p"] != public_key:
        return "its p= tag is not the public key we have"
    return None


def txt_strings(value: str, size: int = 255) -> list[str]:
    """``value`` cut into the at most 255-octet character-strings a TXT record is made of (RFC 1035 §3.3.14);
    a DKIM record is read back as their concatenation (RFC 6376 §3.6.2.2)."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def load_or_create_key(path: Path, rsa_bits: int = 2048) -> tuple[bytes, str]:
    """The RSA key in ``path`` (private PEM, public base64), generated there (mode 0600) if absent.

    The installation's own key lives in the data directory like the self-signed TLS pair: created on first
    start, kept across restarts, since its public half must stay published in DNS; processes starting at
    once agree on one (`mtad.files.create_once`).
    """
    pem = create_once(path, lambda: generate_key(RSA, rsa_bits)[0])
    return pem, public_key_from_private(RSA, pem)

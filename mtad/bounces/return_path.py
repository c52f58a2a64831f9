"""The envelope sender of outgoing mail: a VERP address per message, under the installation's secret.

`mtad.mail.verp` makes and reads the addresses; this module holds what they need at run time: the secret
(configured, or generated once in the data directory, like the installation's DKIM key) and the return
path domain. Every process that delivers mail or reads bounces must have the same secret, or bounces of
mail one process sent match nothing in another: processes on several machines set ``domains.verp_secret``
or share the data directory's file.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import attrs

from mtad.files import create_once
from mtad.mail.verp import encode_return_path

#: The generated secret's file in ``general.data_dir``.
SECRET_FILE = "verp.secret"
#: Octets of a generated secret (hex-encoded in the file): 256 bits, as much as HMAC-SHA256 can use.
SECRET_BYTES = 32
MIN_SECRET_LENGTH = 16


def verp_secret(configured: str, data_dir: Path) -> bytes:
    """The VERP secret: ``domains.verp_secret`` when set, else the data directory's one
    (`load_or_create_secret`)."""
    if configured:
        return configured.encode("utf-8")
    return load_or_create_secret(data_dir / SECRET_FILE)


def load_or_create_secret(path: Path) -> bytes:
    """The secret in ``path``, generated there (mode 0600) first if there is none.

    Processes starting at once on one data directory agree on one (`mtad.files.create_once`). Raises
    OSError when the file cannot be read or written, ValueError when what it holds is too short to be a
    secret.
    """
    secret = create_once(path, lambda: secrets.token_hex(SECRET_BYTES).encode("ascii") + b"\n").strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"{path} holds {len(secret)} characters, a VERP secret needs {MIN_SECRET_LENGTH}")
    return secret


@attrs.frozen
class ReturnPath:
    """Where bounces of the messages we send go back to: ``b.<message>.<server>.<tag>@<domain>``."""

    secret: bytes = attrs.field(repr=False)
    domain: str

    def envelope_sender(self, server_id: int, message_id: int, mail_from: str) -> str:
        """The MAIL FROM for message ``message_id`` of server ``server_id``, sent by ``mail_from``.

        A null reverse-path stays null: a message sent with ``<>`` (a bounce, an auto-reply) must not be
        answered by any report at all (RFC 5321 §4.5.5; RFC 3464 §2 forbids a DSN about a DSN).
        """
        if mail_from in ("", "<>"):
            return mail_from
        return encode_return_path(self.secret, server_id, message_id, self.domain)

"""Credentials: how applications prove which server they send as.

Three kinds, as in Postal:

- ``API``: a random key sent in the ``X-Server-API-Key`` header. It is shown once, when created, and only
  its SHA-256 is stored. A plain hash (no salt, no slow KDF) is enough because keys are 24 random characters
  (~143 bits): nothing can be guessed from the hash, and a hash lets us find the credential by index.
- ``SMTP``: a random password for SMTP AUTH (RFC 4954), stored the same way. The username is not checked:
  like Postal, any username is accepted and the password alone names the credential, so client libraries
  that insist on some username work. ``mtad make-credential`` suggests ``organization/server`` as username.
- ``SMTP-IP``: an IP address or CIDR network (stored as given, it is not a secret); a client connecting from
  inside it may relay without AUTH. The app loads them all with `find_ip_credentials` and matches in memory.

A credential on ``hold`` is accepted but every message sent with it is held.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import string
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import AlreadyExists, NotFound, StoreError
from mtad.store.servers import Server, find_server
from mtad.store.tables import credentials, servers

SECRET_ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 24
#: Shortest secret an operator may import (e.g. an existing Postal key); generated ones are longer.
MIN_IMPORTED_SECRET_LENGTH = 16

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CredentialType(enum.StrEnum):
    SMTP = "SMTP"
    API = "API"
    SMTP_IP = "SMTP-IP"


@attrs.frozen
class Credential:
    id: int
    server_id: int
    type: CredentialType
    name: str
    #: The network of an SMTP-IP credential (``10.0.0.0/8``); ``None`` for the secret-bearing kinds.
    network: str | None
    hold: bool
    last_used_at: float | None
    created_at: float


@attrs.frozen
class NewCredential:
    """A credential just made, with its secret: the only time the secret exists outside its owner's hands."""

    credential: Credential
    #: The API key or SMTP password; ``None`` for SMTP-IP.
    secret: str | None = attrs.field(repr=False)


_COLUMNS = (
    credentials.c.id,
    credentials.c.server_id,
    credentials.c.type,
    credentials.c.name,
    credentials.c.network,
    credentials.c.hold,
    credentials.c.last_used_at,
    credentials.c.created_at,
)


def _from_row(row: sa.Row[*tuple[Any, ...]]) -> Credential:
    return Credential(
        id=row.id,
        server_id=row.server_id,
        type=CredentialType(row.type),
        name=row.name,
        network=row.network,
        hold=bool(row.hold),
        last_used_at=row.last_used_at,
        created_at=row.created_at,
    )


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_secret() -> str:
    """A fresh API key or SMTP password: 24 random letters and digits (~143 bits), as Postal makes them."""
    return "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def parse_network(key: str) -> IPNetwork:
    """An SMTP-IP key as a network: a bare address is a /32 (or /128); host bits must be zero."""
    try:
        return ipaddress.ip_network(key.strip(), strict=True)
    except ValueError as e:
        raise StoreError(f"invalid SMTP-IP key {key!r}: {e}") from None


def create_credential(
    conn: Connection,
    server_id: int,
    type: CredentialType,
    now: float,
    name: str | None = None,
    key: str | None = None,
    hold: bool = False,
) -> NewCredential:
    """Create a credential for a server.

    SMTP-IP needs ``key`` (the network). For API and SMTP a random secret is made unless ``key`` brings one
    (to import keys from another installation); it is returned once and only its hash is kept.
    """
    type = CredentialType(type)
    if conn.execute(sa.select(servers.c.id).where(servers.c.id == server_id)).first() is None:
        raise NotFound(f"no server with id {server_id}")
    secret: str | None = None
    key_hash: str | None = None
    network: str | None = None
    if type is CredentialType.SMTP_IP:
        if key is None:
            raise StoreError("an SMTP-IP credential needs a key: an IP address or network, e.g. 10.0.0.0/8")
        network = parse_network(key).with_prefixlen
    else:
        if key is not None and len(key) < MIN_IMPORTED_SECRET_LENGTH:
            raise StoreError(f"a {type} key must be at least {MIN_IMPORTED_SECRET_LENGTH} characters")
        secret = key if key is not None else generate_secret()
        key_hash = hash_secret(secret)
        if conn.execute(sa.select(credentials.c.id).where(credentials.c.key_hash == key_hash)).first():
            raise AlreadyExists("a credential with this key already exists")
    name = (name or "").strip() or (network if network is not None else f"{type} credential")
    result = conn.execute(
        credentials.insert().values(
            server_id=server_id,
            type=type.value,
            name=name,
            key_hash=key_hash,
            network=network,
            hold=hold,
            created_at=now,
            updated_at=now,
        )
    )
    (id_,) = result.inserted_primary_key or (None,)
    assert id_ is not None
    credential = Credential(
        id=int(id_),
        server_id=server_id,
        type=type,
        name=name,
        network=network,
        hold=hold,
        last_used_at=None,
        created_at=now,
    )
    return NewCredential(credential=credential, secret=secret)


def find_credential_by_key(conn: Connection, type: CredentialType, key: str) -> Credential | None:
    """The API or SMTP credential whose secret is ``key``, or ``None``.

    The lookup is by SHA-256, so what an attacker could learn from timing is about the hash, not the
    secret; the final comparison is constant-time all the same.
    """
    type = CredentialType(type)
    if type is CredentialType.SMTP_IP:
        raise ValueError("SMTP-IP credentials are matched by address: use find_ip_credentials")
    key_hash = hash_secret(key)
    row = conn.execute(
        sa.select(*_COLUMNS, credentials.c.key_hash).where(
            credentials.c.key_hash == key_hash, credentials.c.type == type.value
        )
    ).one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, key_hash):
        return None
    return _from_row(row)


def find_ip_credentials(conn: Connection) -> list[tuple[IPNetwork, Credential]]:
    """Every SMTP-IP credential with its parsed network, most specific network first.

    The app caches this list and gives a connecting client the first credential whose network contains
    its address; most-specific-first makes a /32 for one host win over a /8 for its network.
    """
    rows = conn.execute(
        sa.select(*_COLUMNS)
        .where(credentials.c.type == CredentialType.SMTP_IP.value)
        .order_by(credentials.c.id)
    )
    found = [(ipaddress.ip_network(row.network), _from_row(row)) for row in rows]
    found.sort(key=lambda pair: (pair[0].version, -pair[0].prefixlen))
    return found


def touch_credential(conn: Connection, id: int, now: float) -> None:
    """Record that credential ``id`` was used at ``now`` (shown to operators as last use)."""
    conn.execute(credentials.update().where(credentials.c.id == id).values(last_used_at=now))


def list_credentials(conn: Connection, server_id: int | None = None) -> list[Credential]:
    query = sa.select(*_COLUMNS).order_by(credentials.c.server_id, credentials.c.id)
    if server_id is not None:
        query = query.where(credentials.c.server_id == server_id)
    return [_from_row(row) for row in conn.execute(query)]


def delete_credential(conn: Connection, id: int) -> None:
    """Remove a credential; clients using it are refused from then on."""
    if conn.execute(credentials.delete().where(credentials.c.id == id)).rowcount == 0:
        raise NotFound(f"no credential with id {id}")


def find_credential(conn: Connection, id: int) -> Credential | None:
    """The credential with ``id`` (any type), or ``None`` once it has been deleted."""
    row = conn.execute(sa.select(*_COLUMNS).where(credentials.c.id == id)).one_or_none()
    return None if row is None else _from_row(row)


def authenticate_smtp_key(
    conn: Connection, key: str, now: float, touch_interval: float = 60.0
) -> tuple[Credential, Server] | None:
    """The SMTP credential whose password is ``key`` and its server, or ``None``; records the use.

    One unit of work for SMTP AUTH (RFC 4954): lookup by hash as in `find_credential_by_key`, the server
    in the same transaction, and ``last_used_at`` moved to ``now`` when it is more than ``touch_interval``
    seconds old, so a client that opens many sessions costs one write per interval, not one per session.
    The caller decides what a suspended server means; the credential is returned all the same.
    """
    credential = find_credential_by_key(conn, CredentialType.SMTP, key)
    if credential is None:
        return None
    server = find_server(conn, credential.server_id)
    if server is None:  # the foreign key rules this out; checked so the type is exact
        return None
    if credential.last_used_at is None or credential.last_used_at < now - touch_interval:
        touch_credential(conn, credential.id, now)
        credential = attrs.evolve(credential, last_used_at=now)
    return credential, server

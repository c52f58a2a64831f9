"""Servers: one sending/receiving configuration within an organization, with its own credentials."""

from __future__ import annotations

import enum
import secrets
import string
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import AlreadyExists, NotFound, StoreError
from mtad.store.organizations import check_permalink, get_organization, make_permalink
from mtad.store.tables import organizations, servers

#: Postal's server tokens: six lowercase letters and digits, used in return paths.
TOKEN_ALPHABET = string.ascii_lowercase + string.digits
TOKEN_LENGTH = 6


class SendLimitAction(enum.StrEnum):
    """What a message over its server's send limit gets."""

    #: Accepted and held until the window has room again, then released (Postal holds them for good).
    HOLD = "Hold"
    #: Refused, to be tried again later: ``451 4.7.1`` at SMTP, an error at the send API.
    REFUSE = "Refuse"


class ServerMode(enum.StrEnum):
    LIVE = "Live"
    #: Outgoing mail is held rather than delivered, for trying an integration safely (as in Postal).
    DEVELOPMENT = "Development"


@attrs.frozen
class Server:
    id: int
    organization_id: int
    organization_permalink: str
    name: str
    permalink: str
    mode: ServerMode
    token: str
    suspended: bool
    suspension_reason: str | None
    #: Outgoing messages allowed per ``send_limit_period`` seconds; ``None`` means no limit.
    send_limit: int | None
    send_limit_period: int | None
    created_at: float
    #: Whether the Sender domain may authenticate a message whose From domain is not (Postal's
    #: ``allow_sender``): From-authentication of the HTTP API and of SMTP both read it.
    allow_sender: bool = False
    #: Names the server to webhook receivers (Postal's ``uuid``).
    uuid: str = ""
    send_limit_action: SendLimitAction = SendLimitAction.HOLD

    @property
    def full_permalink(self) -> str:
        """``organization/server``, the name operators use for a server (as in Postal's URLs)."""
        return f"{self.organization_permalink}/{self.permalink}"


_SELECT = sa.select(
    servers.c.id,
    servers.c.organization_id,
    organizations.c.permalink.label("organization_permalink"),
    servers.c.name,
    servers.c.permalink,
    servers.c.mode,
    servers.c.token,
    servers.c.suspended,
    servers.c.suspension_reason,
    servers.c.send_limit,
    servers.c.send_limit_period,
    servers.c.created_at,
    servers.c.allow_sender,
    servers.c.uuid,
    servers.c.send_limit_action,
).join_from(servers, organizations, servers.c.organization_id == organizations.c.id)


def _from_row(row: sa.Row[*tuple[Any, ...]]) -> Server:
    return Server(
        id=row.id,
        organization_id=row.organization_id,
        organization_permalink=row.organization_permalink,
        name=row.name,
        permalink=row.permalink,
        mode=ServerMode(row.mode),
        token=row.token,
        suspended=bool(row.suspended),
        suspension_reason=row.suspension_reason,
        send_limit=row.send_limit,
        send_limit_period=row.send_limit_period,
        created_at=row.created_at,
        allow_sender=bool(row.allow_sender),
        uuid=row.uuid,
        send_limit_action=SendLimitAction(row.send_limit_action),
    )


def _new_token(conn: Connection) -> str:
    # 36**6 ≈ 2.2 billion tokens: collisions are rare but possible: check (the unique index is the backstop).
    while True:
        token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))
        if conn.execute(sa.select(servers.c.id).where(servers.c.token == token)).first() is None:
            return token


def create_server(
    conn: Connection,
    organization_permalink: str,
    name: str,
    now: float,
    mode: ServerMode = ServerMode.LIVE,
    permalink: str | None = None,
    send_limit: int | None = None,
    send_limit_period: int | None = None,
    allow_sender: bool = False,
) -> Server:
    """Create a server in an organization with a fresh unique token; its permalink must be unused there."""
    organization = get_organization(conn, organization_permalink)
    name = name.strip()
    if not name:
        raise StoreError("a server needs a name")
    permalink = check_permalink(permalink if permalink is not None else make_permalink(name))
    exists = conn.execute(
        sa.select(servers.c.id).where(
            servers.c.organization_id == organization.id, servers.c.permalink == permalink
        )
    ).first()
    if exists is not None:
        raise AlreadyExists(f"server {organization.permalink}/{permalink} already exists")
    result = conn.execute(
        servers.insert().values(
            organization_id=organization.id,
            name=name,
            permalink=permalink,
            mode=ServerMode(mode).value,
            token=_new_token(conn),
            suspended=False,
            send_limit=send_limit,
            send_limit_period=send_limit_period,
            allow_sender=allow_sender,
            created_at=now,
            updated_at=now,
        )
    )
    (id_,) = result.inserted_primary_key or (None,)
    assert id_ is not None
    return get_server(conn, int(id_))


def find_server(conn: Connection, id: int) -> Server | None:
    row = conn.execute(_SELECT.where(servers.c.id == id)).one_or_none()
    return None if row is None else _from_row(row)


def get_server(conn: Connection, id: int) -> Server:
    """The server with ``id``; `NotFound` if there is none."""
    server = find_server(conn, id)
    if server is None:
        raise NotFound(f"no server with id {id}")
    return server


def find_server_by_token(conn: Connection, token: str) -> Server | None:
    """The server whose return-path token is ``token`` (case-insensitive, as local parts often are)."""
    row = conn.execute(_SELECT.where(servers.c.token == token.lower())).one_or_none()
    return None if row is None else _from_row(row)


def find_server_by_name(conn: Connection, name: str) -> Server | None:
    """A server named as operators name them: ``org/server``, a bare server permalink if only one
    organization has it, or the numeric id."""
    if name.isdigit():
        return find_server(conn, int(name))
    if "/" in name:
        organization_permalink, _, permalink = name.partition("/")
        query = _SELECT.where(
            organizations.c.permalink == organization_permalink, servers.c.permalink == permalink
        )
    else:
        query = _SELECT.where(servers.c.permalink == name)
    rows = conn.execute(query).all()
    if len(rows) > 1:
        raise StoreError(f"server name {name!r} is ambiguous; use organization/server")
    return _from_row(rows[0]) if rows else None


def get_server_by_name(conn: Connection, name: str) -> Server:
    """As `find_server_by_name`, but `NotFound` if there is no such server."""
    server = find_server_by_name(conn, name)
    if server is None:
        raise NotFound(f"no server {name!r}")
    return server


def list_servers(conn: Connection, organization_permalink: str | None = None) -> list[Server]:
    query = _SELECT
    if organization_permalink is not None:
        query = query.where(organizations.c.permalink == organization_permalink)
    return [
        _from_row(row) for row in conn.execute(query.order_by(organizations.c.permalink, servers.c.permalink))
    ]


def suspend_server(conn: Connection, id: int, reason: str | None, now: float) -> None:
    """Suspend (``reason`` given) or unsuspend (``None``) a server; a suspended server sends nothing."""
    result = conn.execute(
        servers.update()
        .where(servers.c.id == id)
        .values(suspended=reason is not None, suspension_reason=reason, updated_at=now)
    )
    if result.rowcount == 0:
        raise NotFound(f"no server with id {id}")


def set_allow_sender(conn: Connection, id: int, allow: bool, now: float) -> Server:
    """Let the Sender domain authenticate the server's messages (``allow``) or not; the server as now."""
    result = conn.execute(
        servers.update().where(servers.c.id == id).values(allow_sender=allow, updated_at=now)
    )
    if result.rowcount == 0:
        raise NotFound(f"no server with id {id}")
    return get_server(conn, id)


def set_send_limit(
    conn: Connection,
    id: int,
    limit: int | None,
    period: int | None,
    action: SendLimitAction,
    now: float,
) -> Server:
    """Set a server's send limit: ``limit`` messages per ``period`` seconds (``None``: an hour), what a
    message over it gets; ``limit`` None removes the limit. The server as now."""
    if limit is not None and limit < 1:
        raise StoreError(f"a send limit must be at least 1, got {limit}")
    if period is not None and period < 60:
        raise StoreError(f"a send limit period must be at least 60 seconds, got {period}")
    result = conn.execute(
        servers.update()
        .where(servers.c.id == id)
        .values(
            send_limit=limit,
            send_limit_period=period,
            send_limit_action=SendLimitAction(action).value,
            updated_at=now,
        )
    )
    if result.rowcount == 0:
        raise NotFound(f"no server with id {id}")
    return get_server(conn, id)

"""Organizations: the owners of servers (Postal's top level)."""

from __future__ import annotations

import re
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import AlreadyExists, NotFound, StoreError
from mtad.store.tables import organizations


@attrs.frozen
class Organization:
    id: int
    name: str
    permalink: str
    created_at: float


def make_permalink(name: str) -> str:
    """A URL- and address-safe short name from a display name: ``"Acme Ltd."`` → ``"acme-ltd"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_permalink(permalink: str) -> str:
    """``permalink`` if it is lowercase letters, digits and inner hyphens; `StoreError` otherwise."""
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", permalink) or len(permalink) > 255:
        raise StoreError(f"invalid permalink {permalink!r}: use lowercase letters, digits and hyphens")
    return permalink


def _from_row(row: sa.Row[*tuple[Any, ...]]) -> Organization:
    return Organization(id=row.id, name=row.name, permalink=row.permalink, created_at=row.created_at)


_COLUMNS = (organizations.c.id, organizations.c.name, organizations.c.permalink, organizations.c.created_at)


def create_organization(
    conn: Connection, name: str, now: float, permalink: str | None = None
) -> Organization:
    """Create an organization; the permalink defaults to one made from the name and must be unused."""
    name = name.strip()
    if not name:
        raise StoreError("an organization needs a name")
    permalink = check_permalink(permalink if permalink is not None else make_permalink(name))
    if find_organization(conn, permalink) is not None:
        raise AlreadyExists(f"an organization with permalink {permalink!r} already exists")
    result = conn.execute(
        organizations.insert().values(name=name, permalink=permalink, created_at=now, updated_at=now)
    )
    (id_,) = result.inserted_primary_key or (None,)
    assert id_ is not None
    return Organization(id=int(id_), name=name, permalink=permalink, created_at=now)


def find_organization(conn: Connection, permalink: str) -> Organization | None:
    row = conn.execute(sa.select(*_COLUMNS).where(organizations.c.permalink == permalink)).one_or_none()
    return None if row is None else _from_row(row)


def get_organization(conn: Connection, permalink: str) -> Organization:
    """The organization with ``permalink``; `NotFound` if there is none."""
    organization = find_organization(conn, permalink)
    if organization is None:
        raise NotFound(f"no organization with permalink {permalink!r}")
    return organization


def list_organizations(conn: Connection) -> list[Organization]:
    return [_from_row(row) for row in conn.execute(sa.select(*_COLUMNS).order_by(organizations.c.permalink))]

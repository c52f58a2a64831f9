"""Inbound routing: ``endpoints`` (HTTP, SMTP and address endpoints in one table), ``routes`` (which
incoming addresses a server accepts and what becomes of their mail) and ``route_endpoints``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}


def _auto_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("encoding", sa.String(16), nullable=True),
        sa.Column("format", sa.String(16), nullable=True),
        sa.Column("strip_replies", sa.Boolean(), nullable=True),
        sa.Column("include_attachments", sa.Boolean(), nullable=True),
        sa.Column("timeout", sa.Integer(), nullable=True),
        sa.Column("hostname", sa.String(253), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("tls_mode", sa.String(16), nullable=True),
        sa.Column("address", sa.String(320), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_id"], ["servers.id"], name="fk_endpoints_server_id_servers", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_endpoints"),
        sa.UniqueConstraint("uuid", name="uq_endpoints_uuid"),
        sa.UniqueConstraint("server_id", "name", name="uq_endpoints_server_id_name"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "routes",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("domain_id", sa.BigInteger(), nullable=True),
        sa.Column("domain", sa.String(253), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("spam_mode", sa.String(16), nullable=False),
        sa.Column("token", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_id"], ["servers.id"], name="fk_routes_server_id_servers", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["domain_id"], ["domains.id"], name="fk_routes_domain_id_domains", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_routes"),
        sa.UniqueConstraint("uuid", name="uq_routes_uuid"),
        sa.UniqueConstraint("token", name="uq_routes_token"),
        sa.UniqueConstraint("domain", "name", name="uq_routes_domain_name"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_routes_server_id", "routes", ["server_id"])
    op.create_index("ix_routes_domain_id", "routes", ["domain_id"])
    op.create_table(
        "route_endpoints",
        sa.Column("route_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("endpoint_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["route_id"], ["routes.id"], name="fk_route_endpoints_route_id_routes", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["endpoints.id"],
            name="fk_route_endpoints_endpoint_id_endpoints",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("route_id", "endpoint_id", name="pk_route_endpoints"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_route_endpoints_endpoint_id", "route_endpoints", ["endpoint_id"])


def downgrade() -> None:
    op.drop_table("route_endpoints")
    op.drop_table("routes")
    op.drop_table("endpoints")

"""Initial schema: organizations, servers, credentials, messages, deliveries.

Revision ID: 0001
Revises:
Create Date: 2025-11-24

Types are spelt out here rather than imported from ``mtad.store.tables``: a migration describes the schema
as it was when written, and must not change when the models do.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}


def _auto_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _long_text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("permalink", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_organizations"),
        sa.UniqueConstraint("permalink", name="uq_organizations_permalink"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "servers",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("permalink", sa.String(255), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("token", sa.String(16), nullable=False),
        sa.Column("suspended", sa.Boolean(), nullable=False),
        sa.Column("suspension_reason", sa.Text(), nullable=True),
        sa.Column("send_limit", sa.Integer(), nullable=True),
        sa.Column("send_limit_period", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name="fk_servers_organization_id_organizations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_servers"),
        sa.UniqueConstraint("organization_id", "permalink", name="uq_servers_organization_id_permalink"),
        sa.UniqueConstraint("token", name="uq_servers_token"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "credentials",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=True),
        sa.Column("network", sa.String(64), nullable=True),
        sa.Column("hold", sa.Boolean(), nullable=False),
        sa.Column("last_used_at", sa.Double(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name="fk_credentials_server_id_servers"),
        sa.PrimaryKeyConstraint("id", name="pk_credentials"),
        sa.UniqueConstraint("key_hash", name="uq_credentials_key_hash"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_credentials_server_id", "credentials", ["server_id"])
    op.create_table(
        "messages",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("rcpt_to", sa.String(320), nullable=False),
        sa.Column("mail_from", sa.String(320), nullable=False),
        sa.Column("subject", _long_text(), nullable=True),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("hold_expiry", sa.Double(), nullable=True),
        sa.Column("last_delivery_attempt", sa.Double(), nullable=True),
        sa.Column("tag", sa.String(255), nullable=True),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_messages_token", "messages", ["token"])
    op.create_index("ix_messages_server_id_timestamp", "messages", ["server_id", "timestamp"])
    op.create_table(
        "deliveries",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("code", sa.Integer(), nullable=True),
        sa.Column("output", _long_text(), nullable=True),
        sa.Column("details", _long_text(), nullable=True),
        sa.Column("sent_with_ssl", sa.Boolean(), nullable=False),
        sa.Column("log_id", sa.String(64), nullable=True),
        sa.Column("time", sa.Double(), nullable=True),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("event_id", name="uq_deliveries_event_id"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_deliveries_message_id", "deliveries", ["message_id"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("messages")
    op.drop_table("credentials")
    op.drop_table("servers")
    op.drop_table("organizations")

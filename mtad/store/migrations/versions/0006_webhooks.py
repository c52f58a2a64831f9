"""Webhooks: ``webhooks`` with the ``webhook_events`` chosen for each, and the ``webhook_requests`` log.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0006"
down_revision: str | None = "0005"
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
        "webhooks",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("all_events", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("last_used_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["server_id"], ["servers.id"], name="fk_webhooks_server_id_servers", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhooks"),
        sa.UniqueConstraint("uuid", name="uq_webhooks_uuid"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_webhooks_server_id", "webhooks", ["server_id"])
    op.create_table(
        "webhook_events",
        sa.Column("webhook_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["webhooks.id"], name="fk_webhook_events_webhook_id_webhooks", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("webhook_id", "event", name="pk_webhook_events"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "webhook_requests",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("webhook_id", sa.BigInteger(), nullable=True),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("duration", sa.Double(), nullable=False),
        sa.Column("response", _long_text(), nullable=True),
        sa.Column("payload", _long_text(), nullable=False),
        sa.Column("will_retry", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name="fk_webhook_requests_webhook_id_webhooks",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_requests"),
        sa.UniqueConstraint("uuid", "attempt", name="uq_webhook_requests_uuid_attempt"),
        **TABLE_OPTIONS,
    )
    op.create_index(
        "ix_webhook_requests_server_id_timestamp_id", "webhook_requests", ["server_id", "timestamp", "id"]
    )
    op.create_index(
        "ix_webhook_requests_webhook_id_timestamp_id", "webhook_requests", ["webhook_id", "timestamp", "id"]
    )
    op.create_index("ix_webhook_requests_timestamp_id", "webhook_requests", ["timestamp", "id"])


def downgrade() -> None:
    # Dropping a table drops its indexes; MySQL refuses to drop one a foreign key still needs on its own.
    op.drop_table("webhook_requests")
    op.drop_table("webhook_events")
    op.drop_table("webhooks")

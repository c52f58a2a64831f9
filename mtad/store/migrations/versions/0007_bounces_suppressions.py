"""Bounces and the suppression list: ``messages.bounce`` / ``bounce_for_id`` and ``suppressions``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007"
down_revision: str | None = "0006"
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
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("bounce", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("bounce_for_id", sa.BigInteger(), nullable=True))
    op.create_table(
        "suppressions",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("reason", _long_text(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["server_id"], ["servers.id"], name="fk_suppressions_server_id_servers", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_suppressions"),
        sa.UniqueConstraint("server_id", "address", name="uq_suppressions_server_id_address"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_suppressions_server_id_created_at", "suppressions", ["server_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_suppressions_server_id_created_at", table_name="suppressions")
    op.drop_table("suppressions")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("bounce_for_id")
        batch.drop_column("bounce")

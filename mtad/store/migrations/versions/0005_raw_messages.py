"""Raw messages kept under retention: ``raw_messages`` and their ``raw_message_parts``, and
``messages.raw_message_id`` pointing each message at its raw message.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}


def upgrade() -> None:
    op.create_table(
        "raw_messages",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=False),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_raw_messages"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_raw_messages_timestamp_id", "raw_messages", ["timestamp", "id"])
    op.create_table(
        "raw_message_parts",
        sa.Column("raw_message_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("part", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column(
            "data",
            sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("raw_message_id", "part", name="pk_raw_message_parts"),
        **TABLE_OPTIONS,
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("raw_message_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("raw_message_id")
    op.drop_table("raw_message_parts")
    op.drop_index("ix_raw_messages_timestamp_id", table_name="raw_messages")
    op.drop_table("raw_messages")

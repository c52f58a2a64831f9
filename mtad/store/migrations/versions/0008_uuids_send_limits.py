"""Server and domain ``uuid`` (Postal's webhooks name them by it: ``DomainDNSError``, ``SendLimit*``) and
``servers.send_limit_action``: what a message over the server's send limit gets (``Hold``, the default
and Postal's behaviour, or ``Refuse``: 451 4.7.1 at SMTP, an error at the API).

Existing rows get a fresh uuid each.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def _fill_uuids(table: str) -> None:
    conn = op.get_bind()
    ids = conn.execute(sa.text(f"SELECT id FROM {table}")).scalars().all()
    for row_id in ids:
        conn.execute(
            sa.text(f"UPDATE {table} SET uuid = :uuid WHERE id = :id"),
            {"uuid": str(uuid.uuid4()), "id": row_id},
        )


def upgrade() -> None:
    for table in ("servers", "domains"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("uuid", sa.String(36), nullable=True))
        _fill_uuids(table)
        with op.batch_alter_table(table) as batch:
            batch.alter_column("uuid", existing_type=sa.String(36), nullable=False)
            batch.create_unique_constraint(f"uq_{table}_uuid", ["uuid"])
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("send_limit_action", sa.String(16), nullable=False, server_default="Hold"))


def downgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("send_limit_action")
    for table in ("servers", "domains"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_uuid", type_="unique")
            batch.drop_column("uuid")

"""Sending domains and their DKIM keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
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
        "domains",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("server_id", sa.BigInteger(), nullable=True),
        sa.Column("organization_id", sa.BigInteger(), nullable=True),
        sa.Column("verification_token", sa.String(64), nullable=False),
        sa.Column("verified_at", sa.Double(), nullable=True),
        sa.Column("use_for_any", sa.Boolean(), nullable=False),
        sa.Column("spf_status", sa.String(16), nullable=True),
        sa.Column("spf_error", sa.Text(), nullable=True),
        sa.Column("dkim_status", sa.String(16), nullable=True),
        sa.Column("dkim_error", sa.Text(), nullable=True),
        sa.Column("mx_status", sa.String(16), nullable=True),
        sa.Column("mx_error", sa.Text(), nullable=True),
        sa.Column("return_path_status", sa.String(16), nullable=True),
        sa.Column("return_path_error", sa.Text(), nullable=True),
        sa.Column("dns_checked_at", sa.Double(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.CheckConstraint("(server_id IS NULL) <> (organization_id IS NULL)", name="ck_domains_one_owner"),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name="fk_domains_server_id_servers"),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name="fk_domains_organization_id_organizations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_domains"),
        sa.UniqueConstraint("server_id", "name", name="uq_domains_server_id_name"),
        sa.UniqueConstraint("organization_id", "name", name="uq_domains_organization_id_name"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_domains_name", "domains", ["name"])
    op.create_table(
        "domain_keys",
        sa.Column("id", _auto_id(), autoincrement=True, nullable=False),
        sa.Column("domain_id", sa.BigInteger(), nullable=False),
        sa.Column("selector", sa.String(63), nullable=False),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("private_key_pem", sa.Text(), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("dns_status", sa.String(16), nullable=True),
        sa.Column("dns_error", sa.Text(), nullable=True),
        sa.Column("activated_at", sa.Double(), nullable=True),
        sa.Column("retired_at", sa.Double(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], name="fk_domain_keys_domain_id_domains"),
        sa.PrimaryKeyConstraint("id", name="pk_domain_keys"),
        sa.UniqueConstraint("domain_id", "selector", name="uq_domain_keys_domain_id_selector"),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("domain_keys")
    op.drop_index("ix_domains_name", table_name="domains")
    op.drop_table("domains")

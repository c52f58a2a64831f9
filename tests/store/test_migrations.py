"""Tests for mtad.store.migrate and the agreement of migrations with mtad.store.tables."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mtad.store.migrate import (
    downgrade_schema,
    head_revision,
    schema_problem,
    schema_revision,
    upgrade_schema,
)
from mtad.store.servers import find_server, set_allow_sender
from mtad.store.tables import metadata
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase


class MigrationTests(DatabaseTestCase):
    migrate = False

    def test_fresh_database_needs_initializing(self) -> None:
        """An empty database has no revision and the daemon is told to run `mtad initialize`."""
        with self.engine.connect() as conn:
            self.assertIsNone(schema_revision(conn))
            self.assertIn("mtad initialize", schema_problem(conn) or "")

    def test_upgrade_reaches_head(self) -> None:
        """Upgrading creates every table and leaves the database at the head revision, usable as is."""
        self.assertEqual(upgrade_schema(self.engine), head_revision())
        tables = set(sa.inspect(self.engine).get_table_names())
        self.assertTrue(set(metadata.tables) <= tables)
        with self.engine.connect() as conn:
            self.assertIsNone(schema_problem(conn))

    def test_upgrade_twice_is_harmless(self) -> None:
        """Running the upgrade on an up-to-date database changes nothing and does not fail."""
        upgrade_schema(self.engine)
        self.assertEqual(upgrade_schema(self.engine), head_revision())

    def test_models_match_migrations(self) -> None:
        """Alembic autogenerate finds no difference between tables.py and the migrated database."""
        upgrade_schema(self.engine)
        with self.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            self.assertEqual(compare_metadata(context, metadata), [])

    def test_downgrade_to_base_removes_tables(self) -> None:
        """Every migration can be undone: downgrading to base leaves only Alembic's version table."""
        upgrade_schema(self.engine)
        downgrade_schema(self.engine, "base")
        self.assertEqual(set(sa.inspect(self.engine).get_table_names()) & set(metadata.tables), set())

    def test_allow_sender_added_off(self) -> None:
        """Migration 0004 gives servers made before it allow_sender off; they can then turn it on, and
        downgrading removes the column again."""
        upgrade_schema(self.engine, "0003")
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO organizations (id, name, permalink, created_at, updated_at) "
                    "VALUES (1, 'Acme', 'acme', 0, 0)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO servers (id, organization_id, name, permalink, mode, token, suspended, "
                    "created_at, updated_at) VALUES (1, 1, 'Main', 'main', 'Live', 'abcdef', :no, 0, 0)"
                ),
                {"no": False},
            )
        upgrade_schema(self.engine)
        with self.engine.begin() as conn:
            server = find_server(conn, 1)
            assert server is not None
            self.assertFalse(server.allow_sender)
            self.assertTrue(set_allow_sender(conn, 1, True, 1.0).allow_sender)
        downgrade_schema(self.engine, "0003")
        columns = {c["name"] for c in sa.inspect(self.engine).get_columns("servers")}
        self.assertNotIn("allow_sender", columns)
        self.assertIn("send_limit", columns)


class MigrationPostgresTests(MigrationTests):
    backend = POSTGRES


class MigrationMySQLTests(MigrationTests):
    backend = MYSQL

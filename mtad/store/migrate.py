"""Schema migrations, run from code: ``mtad initialize`` / ``mtad upgrade`` and the daemon's start-up check.

Alembic is configured here rather than in an alembic.ini so that an installed mtad needs nothing but its
package: the script directory ships as package data and the caller's engine (with its SQLite pragmas and
MySQL charset) is handed to ``env.py`` through ``Config.attributes``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for our script directory, bound to ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision the code expects the database to be at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def schema_revision(conn: Connection) -> str | None:
    """The revision the database is at, or ``None`` for a database never initialized."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade_schema(engine: Engine, revision: str = "head") -> str:
    """Create or upgrade the schema to ``revision``, each migration in a transaction; return the result."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    with engine.connect() as conn:
        current = schema_revision(conn)
    assert current is not None
    return current


def downgrade_schema(engine: Engine, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base`` drops everything); for tests and rollbacks."""
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), revision)


def schema_problem(conn: Connection) -> str | None:
    """Why the daemon cannot use this database yet, as one line for the operator, or ``None`` if it can."""
    current = schema_revision(conn)
    head = head_revision()
    if current is None:
        return "the database is not initialized; run `mtad initialize`"
    if current != head:
        return f"the database schema is at revision {current}, this mtad needs {head}; run `mtad upgrade`"
    return None

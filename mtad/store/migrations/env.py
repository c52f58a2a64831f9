"""Alembic environment: always online, on the connection mtad hands over in ``config.attributes``.

mtad runs Alembic from code (``mtad.store.migrate``), so there is no alembic.ini and no URL here: the caller
owns the engine and its settings (SQLite pragmas, MySQL charset).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from mtad.store.tables import metadata

connection: Connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

"""Test databases: a fresh, empty database per test on SQLite, and on PostgreSQL and MySQL/MariaDB when
``MTAD_TEST_POSTGRES_URL`` / ``MTAD_TEST_MYSQL_URL`` name a server to create them on.

Each test gets its own uniquely named database, dropped afterwards, so parallel trial jobs never clash.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema

T = TypeVar("T")

SQLITE = "sqlite"
POSTGRES = "postgresql"
MYSQL = "mysql"

SERVER_URL_VARIABLES = {POSTGRES: "MTAD_TEST_POSTGRES_URL", MYSQL: "MTAD_TEST_MYSQL_URL"}


def fresh_database_url(test: SynchronousTestCase, backend: str) -> str:
    """The URL of a new empty database on ``backend``, removed when ``test`` ends; skip if not configured."""
    if backend == SQLITE:
        return f"sqlite:///{os.path.abspath(test.mktemp())}.sqlite3"
    variable = SERVER_URL_VARIABLES[backend]
    server_url = os.environ.get(variable)
    if not server_url:
        raise SkipTest(f"set {variable} to run against {backend}")
    name = f"mtad_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(server_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if backend == MYSQL:
            conn.execute(sa.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
        else:
            conn.execute(sa.text(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"))

    def drop() -> None:
        with admin.connect() as conn:
            if backend == MYSQL:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    test.addCleanup(drop)
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


class DatabaseTestCase(TestCase):
    """Gives each test ``self.engine``: a fresh database of ``backend``, migrated to the latest schema.

    Subclasses run on SQLite; a subclass of one that sets ``backend`` runs the same tests on another backend.
    """

    backend: ClassVar[str] = SQLITE
    engine: Engine
    url: str

    def setUp(self) -> None:
        super().setUp()
        self.url = fresh_database_url(self, self.backend)
        self.engine = make_engine(self.url)
        self.addCleanup(self.engine.dispose)
        if self.migrate:
            upgrade_schema(self.engine)

    #: Whether setUp brings the schema to head (migration tests start from nothing).
    migrate: ClassVar[bool] = True

    def transaction(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a unit of work the way `Database.run` does, in one transaction, on this thread."""
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)


class SynchronousDatabase:
    """`Database.run` without the thread pool, for tests driven by `task.Clock` alone.

    The SQL is real; only the hop to a worker thread is skipped.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        conn: Connection
        try:
            with self.engine.begin() as conn:
                result = fn(conn, *args, **kwargs)
        except Exception:
            return fail()
        return succeed(result)

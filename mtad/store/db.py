"""The database: an SQLAlchemy engine and the dedicated thread pool all SQL runs in.

The reactor thread never blocks (DESIGN.md, invariant 3), so every unit of work is a synchronous function
taking a ``Connection``, run in a thread of our own pool inside one transaction, and handed back to the
reactor as a Deferred. The pool is ours rather than the reactor's so that slow SQL cannot starve DNS lookups
or other users of the reactor pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")

#: Milliseconds a SQLite writer waits for another's lock before giving up with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 10_000


class StoreError(Exception):
    """A request the store cannot fulfil; the message is meant for the operator as it stands."""


class NotFound(StoreError):
    """The named object does not exist."""


class AlreadyExists(StoreError):
    """An object with the same unique name already exists."""


class FieldError(StoreError):
    """An input is wrong; ``field`` names it (``url``, ``events[2]``), and so does the message: the API
    answers it as a JSON error naming the field, the CLI prints the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # WAL lets readers run while one writer writes; busy_timeout makes writers wait for each other instead of
    # failing at once; SQLite leaves foreign keys off unless asked on every connection.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def make_engine(url: str | sa.URL) -> Engine:
    """An engine for ``url`` with the settings each supported backend needs.

    - SQLite: WAL, busy timeout, foreign keys on.
    - MySQL/MariaDB: ``charset=utf8mb4`` (4-byte UTF-8, emoji), unless the URL names a charset; connections
      are pinged before use since MySQL closes idle ones after ``wait_timeout``.
    - PostgreSQL: as given (psycopg2 speaks UTF-8 with a UTF-8 database).
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend in ("mysql", "mariadb"):
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        kwargs.update(pool_pre_ping=True, pool_recycle=3600)
    elif backend == "postgresql":
        kwargs.update(pool_pre_ping=True)
    engine = sa.create_engine(parsed, **kwargs)
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _on_sqlite_connect)
    return engine


class Database(Service):
    """An engine plus the thread pool that runs units of work against it, as a Twisted service.

    ``run`` may be called before the service starts: work queues in the pool until then. SQLite allows one
    writer at a time, so its pool has one thread; other backends get ``pool_size`` threads (and as many
    connections).
    """

    log = Logger()

    def __init__(self, engine: Engine, reactor: IReactorFromThreads, pool_size: int = 4) -> None:
        self.engine = engine
        self._reactor = reactor
        if engine.dialect.name == "sqlite":
            pool_size = 1
        self._pool = ThreadPool(minthreads=0, maxthreads=pool_size, name="mtad-sql")

    @classmethod
    def from_url(cls, url: str, reactor: IReactorFromThreads, pool_size: int = 4) -> Database:
        return cls(make_engine(url), reactor, pool_size)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._pool.start()

    def stopService(self) -> None:
        # ThreadPool.stop waits for running work to finish, so no transaction is cut off half-way.
        super().stopService()  # type: ignore[no-untyped-call]
        self._pool.stop()
        self.engine.dispose()

    def run(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Run ``fn(connection, *args, **kwargs)`` in a transaction in the pool; commit if it returns.

        An exception rolls the transaction back and fails the Deferred with it.
        """
        return deferToThreadPool(self._reactor, self._pool, self._transaction, fn, *args, **kwargs)

    def _transaction(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)


#: PostgreSQL SQLSTATEs of a transaction rolled back by a deadlock or a serialization conflict.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
#: MySQL/MariaDB's ER_LOCK_DEADLOCK.
_MYSQL_DEADLOCK = 1213


def is_deadlock(error: BaseException) -> bool:
    """True when ``error`` means the database chose this transaction as a deadlock's victim (or, on
    PostgreSQL, a serialization conflict): it was rolled back whole, and running it again is safe and
    will likely succeed."""
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    orig = error.orig
    if getattr(orig, "pgcode", None) in _RETRYABLE_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return len(args) > 0 and args[0] == _MYSQL_DEADLOCK


def insert_ignoring_duplicates(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows``, silently skipping any that collide with an existing primary or unique key.

    This is how at-least-once consumers stay idempotent without a read-then-write race between two of them:
    ``ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL, a no-op ``ON DUPLICATE KEY UPDATE`` on MySQL
    (``INSERT IGNORE`` would also swallow errors that are not duplicates).
    """
    if not rows:
        return
    dialect = conn.dialect.name
    statement: sa.Executable
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        statement = sqlite.insert(table).on_conflict_do_nothing()
    elif dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        statement = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        pk = next(iter(table.primary_key.columns))
        statement = mysql.insert(table).on_duplicate_key_update({pk.name: pk})
    else:
        raise StoreError(f"unsupported database {dialect!r}")
    conn.execute(statement, rows)

"""Tests for mtad.store.db: engine settings and the thread-pool Database service."""

from __future__ import annotations

import threading
from typing import cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtad.store.db import Database, make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.organizations import create_organization, list_organizations
from tests.store.support import fresh_database_url


class MakeEngineTests(SynchronousTestCase):
    def test_mysql_gets_utf8mb4(self) -> None:
        """A MySQL URL without a charset is given utf8mb4, so 4-byte characters survive."""
        engine = make_engine("mysql+pymysql://root@127.0.0.1:3306/test")
        self.assertEqual(engine.url.query["charset"], "utf8mb4")
        engine = make_engine("mysql+pymysql://root@127.0.0.1:3306/test?charset=latin1")
        self.assertEqual(engine.url.query["charset"], "latin1")

    def test_sqlite_pragmas(self) -> None:
        """SQLite connections run in WAL mode with a busy timeout and foreign keys enforced."""
        engine = make_engine(fresh_database_url(self, "sqlite"))
        self.addCleanup(engine.dispose)
        with engine.connect() as conn:
            self.assertEqual(conn.exec_driver_sql("PRAGMA journal_mode").scalar(), "wal")
            self.assertGreater(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one(), 0)
            self.assertEqual(conn.exec_driver_sql("PRAGMA foreign_keys").scalar(), 1)


class DatabaseServiceTests(TestCase):
    def setUp(self) -> None:
        # The real reactor: the pool hands results back through it.
        from twisted.internet import reactor

        self.database = Database.from_url(
            fresh_database_url(self, "sqlite"), cast(IReactorFromThreads, reactor)
        )
        upgrade_schema(self.database.engine)
        self.database.startService()
        self.addCleanup(self.database.stopService)

    def test_run_off_the_reactor_thread(self) -> Deferred[None]:
        """A unit of work runs in a pool thread, not the reactor's, and its result fires the Deferred."""
        return Deferred.fromCoroutine(self._run_off_the_reactor_thread())

    async def _run_off_the_reactor_thread(self) -> None:
        def where(conn: Connection) -> tuple[str, int]:
            return threading.current_thread().name, conn.execute(sa.text("SELECT 1")).scalar_one()

        name, one = await self.database.run(where)
        self.assertNotEqual(name, threading.current_thread().name)
        self.assertEqual(one, 1)

    def test_commit_and_rollback(self) -> Deferred[None]:
        """Work that returns is committed; work that raises is rolled back and fails the Deferred."""
        return Deferred.fromCoroutine(self._commit_and_rollback())

    async def _commit_and_rollback(self) -> None:
        await self.database.run(create_organization, "Kept", 1.0)

        def create_then_fail(conn: Connection) -> None:
            create_organization(conn, "Lost", 2.0)
            raise RuntimeError("boom")

        with self.assertRaises(RuntimeError) as raised:
            await self.database.run(create_then_fail)
        self.assertEqual(str(raised.exception), "boom")
        organizations = await self.database.run(list_organizations)
        self.assertEqual([o.name for o in organizations], ["Kept"])

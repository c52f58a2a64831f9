"""Redis URL parsing and connecting."""

from __future__ import annotations

import os

import txredisapi
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from mtad.queue.client import RedisAddress, RedisClient, parse_redis_url
from mtad.queue.model import QueueError, RedisUnavailable
from tests.redis_server import RedisTestCase, real_reactor
from tests.test_accept import closed_port


class ParseRedisUrlTests(unittest.SynchronousTestCase):
    def test_tcp_with_db(self) -> None:
        """redis://host:port/db gives host, port and database."""
        self.assertEqual(
            parse_redis_url("redis://10.0.0.5:6380/3"), RedisAddress(host="10.0.0.5", port=6380, db=3)
        )

    def test_tcp_defaults(self) -> None:
        """Port defaults to 6379 and database to 0."""
        self.assertEqual(parse_redis_url("redis://redis.internal"), RedisAddress(host="redis.internal"))

    def test_tcp_credentials(self) -> None:
        """User and password (percent-decoded) come from the URL's userinfo."""
        address = parse_redis_url("redis://mtad:p%40ss@h:1/0")
        self.assertEqual((address.username, address.password), ("mtad", "p@ss"))
        self.assertNotIn("p@ss", address.describe())

    def test_unix_socket_with_db(self) -> None:
        """unix:///path?db=N gives the socket path and database."""
        self.assertEqual(
            parse_redis_url("unix:///run/redis/redis.sock?db=2"),
            RedisAddress(path="/run/redis/redis.sock", db=2),
        )

    def test_errors_name_the_problem(self) -> None:
        """Bad scheme, bad database and missing socket path are ValueErrors quoting the URL."""
        for url in ("http://h/0", "redis://h/x", "unix://", "redis://h/-1", "redis:///0"):
            with self.assertRaises(ValueError) as caught:
                parse_redis_url(url)
            self.assertIn(url, str(caught.exception))


class WaitConnectedTests(unittest.TestCase):
    async def test_unreachable_redis_is_redis_unavailable(self) -> None:
        """Waiting for a Redis nobody listens on ends, after the timeout, in RedisUnavailable."""
        client = RedisClient.from_url(real_reactor(), f"redis://127.0.0.1:{closed_port()}/0", timeout=0.3)
        self.addCleanup(client.disconnect)
        with self.assertRaises(RedisUnavailable) as caught:
            await client.wait_connected()
        self.assertIn("could not connect", str(caught.exception))


class ReplyTests(RedisTestCase):
    async def test_large_replies(self) -> None:
        """Replies parse whole and in order: a 2 MB bulk string, a 20,000-element array, nil, integers,
        status and errors, pipelined on one connection; the parser is hiredis (txredisapi's own one is
        quadratic in the size of a reply)."""
        p = self.keys.prefix
        connection = self.redis._live_connection()
        self.assertIsInstance(connection, txredisapi.HiredisProtocol)
        arguments = (b"EVALSHA", b"\x00\r\n" * 3, b"", "SELECT", 7, 1.5)
        self.assertEqual(
            connection._build_command(*arguments[:3]),
            txredisapi.BaseRedisProtocol._build_command(connection, *arguments[:3]),
        )
        self.assertEqual(
            connection._build_command(*arguments),
            txredisapi.BaseRedisProtocol._build_command(connection, *arguments),
        )
        big = os.urandom(2_000_000)
        fields = [f"f{i}".encode() for i in range(10_000)]
        await self.redis.execute("SET", p + "big", big)
        await self.redis.execute("HSET", p + "hash", *[x for f in fields for x in (f, f + b"v")])
        replies = await gatherResults(
            [
                self.redis.execute("GET", p + "big"),
                self.redis.execute("HGETALL", p + "hash"),
                self.redis.execute("GET", p + "missing"),
                self.redis.execute("INCR", p + "n"),
                self.redis.execute("PING"),
            ]
        )
        self.assertEqual(replies[0], big)
        self.assertEqual(
            dict(zip(replies[1][::2], replies[1][1::2], strict=True)), {f: f + b"v" for f in fields}
        )
        self.assertEqual(replies[2:], [None, 1, b"PONG"])
        with self.assertRaises(QueueError) as caught:
            await self.redis.execute("NOSUCHCOMMAND")
        self.assertIn("unknown command", str(caught.exception))

"""A thin, time-bounded Redis client over txredisapi's lazy connection pool.

Why not txredisapi's handler as it is: a lazy pool that has lost its connection parks every command until
a connection comes back, so a dead Redis would hang SMTP sessions forever. Here every command gets a
deadline on the injected clock, and once the pool has been connected, a command issued while no
connection is up fails at once with `RedisUnavailable`: the SMTP server turns that into ``451 4.3.0``
and the client retries later. The pool keeps reconnecting in the background (txredisapi uses
``ClientService`` with backoff), so mtad carries on when Redis is back.

Commands are written to the connection as they are issued and never wait for each other: concurrent
callers share the connection (Redis pipelining), which with ``appendfsync always`` gives group commit,
since Redis fsyncs the AOF once per event-loop turn for every write it processed in that turn.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import hiredis
import txredisapi
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtad.queue.keys import Script
from mtad.queue.model import QueueError, QueueFull, RedisUnavailable


@attrs.frozen
class RedisAddress:
    """Where Redis is: a TCP host and port, or a unix socket path; plus database number and credentials."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The address without credentials, for logs and ``/status``."""
        where = f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}"
        return f"{where} db {self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[user:password@]host[:port][/db]`` or ``unix://[user:password@]/path/to/sock[?db=N]``.

    Raises ValueError naming what is wrong (the config loader reports it under ``redis.url``).
    """
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query = parse_qs(parts.query)

    def db_from(text: str) -> int:
        try:
            db = int(text)
        except ValueError:
            raise ValueError(f"Redis database must be a number, got {text!r} in {url!r}") from None
        if db < 0:
            raise ValueError(f"Redis database must not be negative in {url!r}")
        return db

    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"unix Redis URL needs a socket path: {url!r}")
        db = db_from(query["db"][0]) if "db" in query else 0
        return RedisAddress(path=unquote(parts.path), db=db, username=username, password=password)
    if parts.scheme == "redis":
        if not parts.hostname:
            raise ValueError(f"Redis URL needs a host: {url!r}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"Redis URL has a bad port: {url!r}") from None
        path_db = parts.path.lstrip("/")
        if path_db:
            db = db_from(path_db)
        elif "db" in query:
            db = db_from(query["db"][0])
        else:
            db = 0
        return RedisAddress(host=parts.hostname, port=port, db=db, username=username, password=password)
    raise ValueError(f"Redis URL must start with redis:// or unix://, got {url!r}")


class RedisClient:
    """Commands and scripts with a deadline, over a reconnecting txredisapi pool.

    ``reactor`` provides the endpoint (TCP or UNIX) and the clock for deadlines; ``timeout`` is the
    ``redis.timeout`` setting. Replies come back raw: bulk strings and status replies as ``bytes``,
    integers as ``int`` (no number guessing: ``convertNumbers`` is off), errors as `QueueError`.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        timeout: float = 10.0,
        poolsize: int = 2,
        clock: IReactorTime | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.address = address
        self.timeout = timeout
        factory = txredisapi.RedisFactory(
            address.describe(),
            address.db,
            poolsize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset=None,
            password=address.password,
            convertNumbers=False,
            username=address.username,
        )
        # hiredis (C) parses replies and builds commands; see `_Protocol`.
        factory.protocol = _Protocol
        # Come back quickly after a Redis restart: start at 0.1 s, cap at 2 s between attempts.
        factory.initialDelay = 0.1
        factory.factor = 2.0
        factory.maxDelay = 2.0
        endpoint: Any
        if address.path is not None:
            endpoint = UNIXClientEndpoint(  # type: ignore[no-untyped-call]
                reactor, address.path, timeout=int(max(1, timeout))
            )
        else:
            endpoint = HostnameEndpoint(reactor, address.host or "localhost", address.port, timeout=timeout)
        factory.startConnecting(endpoint)
        self._factory = factory
        self._was_connected = False

    @classmethod
    def from_url(
        cls,
        reactor: Any,
        url: str,
        timeout: float = 10.0,
        poolsize: int = 2,
        clock: IReactorTime | None = None,
    ) -> RedisClient:
        """A client for a ``redis.url``; ``clock`` (default: ``reactor``) times the deadlines."""
        return cls(reactor, parse_redis_url(url), timeout=timeout, poolsize=poolsize, clock=clock)

    @property
    def connected(self) -> bool:
        """Whether at least one pooled connection is up right now."""
        # The pool's queue, not ``factory.size``: the queue is filled first, and holds what commands use.
        return any(conn.connected for conn in self._factory.connectionQueue.pending)

    def execute(self, *args: str | bytes | int | float) -> Deferred[Any]:
        """Send one command; fires with its reply, or fails with `RedisUnavailable` / `QueueError`.

        Plain Deferred callbacks rather than a coroutine, and straight to a live connection rather than
        through txredisapi's pool handler (a generator and a queue hand-off per command): this runs for
        every accepted message, and those layers cost as much as building the command.
        """
        encoded = [_encode(a) for a in args]
        connection = self._live_connection()
        if connection is not None:
            self._was_connected = True
            d: Deferred[Any] = connection.execute_command(*encoded)
        elif self._was_connected or self._factory.stopped:
            return fail(RedisUnavailable(f"not connected to Redis at {self.address.describe()}"))
        else:
            # Never connected yet: txredisapi's handler waits for the first connection (within timeout).
            d = self._factory.handler.execute_command(*encoded)
        timed_out = False

        def on_timeout(result: Any, timeout: float) -> Any:
            nonlocal timed_out
            timed_out = True
            return result

        def failed(failure: Failure) -> Any:
            error = failure.value
            if isinstance(error, txredisapi.ResponseError):
                raise _response_error(error)
            if isinstance(error, txredisapi.ConnectionError):
                raise RedisUnavailable(f"lost connection to Redis at {self.address.describe()}: {error}")
            if isinstance(error, CancelledError) and timed_out:
                raise RedisUnavailable(
                    f"Redis at {self.address.describe()} did not answer within {self.timeout} s"
                )
            return failure

        def replied(reply: Any) -> Any:
            self._was_connected = True
            if isinstance(reply, txredisapi.ResponseError):
                raise _response_error(reply)
            return reply

        d.addTimeout(self.timeout, self._clock, onTimeoutCancel=on_timeout)
        d.addCallbacks(replied, failed)
        return d

    def _live_connection(self) -> Any:
        """The pool's first connected connection, if any (every command goes there: pipelining)."""
        for connection in self._factory.connectionQueue.pending:
            if connection.connected:
                return connection
        return None

    def run_script(
        self, script: Script, keys: list[str], args: list[str | bytes | int | float]
    ) -> Deferred[Any]:
        """EVALSHA, falling back to EVAL when Redis does not know the script (first use, restart, flush)."""

        def unknown_script(failure: Failure) -> Any:
            error = failure.value
            if not isinstance(error, QueueError) or isinstance(error, RedisUnavailable):
                return failure
            if "NOSCRIPT" not in str(error):
                return failure
            return self.execute("EVAL", script.source, len(keys), *keys, *args)

        return self.execute("EVALSHA", script.sha, len(keys), *keys, *args).addErrback(unknown_script)

    def wait_connected(self) -> Deferred[None]:
        """Fires once a connection is up (or fails with `RedisUnavailable` after ``timeout``)."""
        return Deferred.fromCoroutine(self._wait_connected())

    async def _wait_connected(self) -> None:
        deadline = self._clock.seconds() + self.timeout
        queue = self._factory.connectionQueue
        while not self.connected:
            # Connections lost while nobody issued commands are still filed as available: drop them,
            # or peek() would hand one straight back.
            for conn in [c for c in queue.pending if not c.connected]:
                queue.remove(conn)
            d: Deferred[Any] = queue.peek()
            d.addTimeout(max(0.0, deadline - self._clock.seconds()), self._clock)
            try:
                await d
            except (CancelledError, DeferredTimeoutError):  # addTimeout fails with TimeoutError
                raise RedisUnavailable(
                    f"could not connect to Redis at {self.address.describe()} within {self.timeout} s"
                ) from None
            # The queue hands a new connection to peekers before it files it as available; let it finish
            # that in this reactor turn before anyone issues a command.
            await deferLater(self._reactor, 0)
        self._was_connected = True

    def disconnect(self) -> Deferred[None]:
        """Stop reconnecting and close every connection; fires when the pool is empty."""
        return Deferred.fromCoroutine(self._disconnect())

    async def _disconnect(self) -> None:
        await self._factory.disconnect()


class _Protocol(txredisapi.HiredisProtocol):  # type: ignore[misc]
    """txredisapi's protocol with hiredis doing the byte work both ways.

    Replies: txredisapi's own parser copies the rest of its buffer for every element, so a claim of a
    hundred 5 KB messages took milliseconds of the reactor thread; `txredisapi.HiredisProtocol` parses
    with hiredis. Commands: ``hiredis.pack_command`` writes the same bytes as txredisapi's loop, five times
    faster (the enqueue script call has two dozen arguments on every accepted message). `RedisClient`
    passes bytes only; anything else (txredisapi's own AUTH and SELECT) takes txredisapi's path, which
    formats floats its own way.
    """

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        for arg in args:
            if type(arg) is not bytes:
                return super()._build_command(*args, **kwargs)  # type: ignore[no-any-return]
        return hiredis.pack_command(args)  # type: ignore[no-any-return]


def _encode(value: str | bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("booleans are not Redis arguments")
    if isinstance(value, int):
        return str(value).encode("ascii")
    return repr(float(value)).encode("ascii")


def _response_error(error: Exception) -> QueueError:
    # "OOM command not allowed when used memory > 'maxmemory'", also inside a script's error text.
    if "OOM command not allowed" in str(error):
        return QueueFull(f"Redis is out of memory: {error}")
    return QueueError(f"Redis error: {error}")

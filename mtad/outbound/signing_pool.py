"""DKIM signing in worker processes (`mtad.mail.dkim_worker`), so the reactor thread does not pay for it.

Measured on a 2-vCPU machine with the send API and delivery in one process (BENCHMARKS.md): with
signing in a thread pool (the previous design) the send API's p99 at 500 requests/s was 70-130 ms, with
one worker process 30-50 ms. In a thread, signing shares the GIL with the reactor, and every hand-off of
the GIL costs the reactor time; in a process it runs on the other core.

The pool is an accelerator, never a point of failure: when no worker is running, or the worker holding a
job dies, the job fails with `SigningUnavailable` and the caller signs inline, so a message is never
delayed or sent unsigned because of the pool. (The jobs of a worker that dies are then signed inline
together, a reactor stall of up to 0.3-0.6 ms each: rare, and bounded by the delivery concurrency.) A
worker ignores SIGINT and SIGTERM once it runs; one signalled while it starts dies and is restarted.

A worker that leaves a job unanswered for ``job_timeout`` seconds is killed. A worker that exits is
started again after ``restart_delay`` seconds, doubling up to
``max_restart_delay`` while workers keep dying young (a broken interpreter must not fork in a loop).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtad.mail.dkim import DKIMKey, DKIMKeyError, UnsignableMessageError
from mtad.mail.dkim_worker import LENGTH, frame

#: A worker that lived this long before exiting was healthy: the next restart waits the shortest delay.
HEALTHY_SECONDS = 30.0


class SigningUnavailable(Exception):
    """No worker took the job or the worker holding it went away: sign inline instead."""


class SigningFailed(RuntimeError):
    """The worker raised something other than an unsignable message or a bad key (a bug)."""


_ERRORS: dict[str, type[Exception]] = {
    "unsignable": UnsignableMessageError,
    "key": DKIMKeyError,
    "error": SigningFailed,
}


class _Worker(ProcessProtocol):
    """One worker process: frames jobs to its stdin, matches answers from its stdout to their jobs."""

    def __init__(self, pool: SigningPool, started_at: float) -> None:
        self.pool = pool
        self.started_at = started_at
        #: Jobs sent and not answered, oldest first: job id → (when sent, its answer).
        self.pending: dict[int, tuple[float, Deferred[bytes]]] = {}
        self.alive = False
        self.ended: Deferred[None] = Deferred()
        #: Kept from the transport: Twisted clears transport.pid before processEnded, which logs it.
        self.pid: int | None = None
        self._buffer = bytearray()
        self._errors = bytearray()

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)
        self.alive = True

    def submit(self, job_id: int, now: float, keys: tuple[DKIMKey, ...], message: bytes) -> Deferred[bytes]:
        answer: Deferred[bytes] = Deferred()
        self.pending[job_id] = (self.pool.clock.seconds(), answer)
        assert self.transport is not None
        self.transport.write(frame((job_id, now, keys, message)))
        return answer

    def outReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        # One read can hold a hundred answers: consume them by offset and drop them from the buffer once,
        # not shift the rest of the buffer after each.
        offset = 0
        try:
            while len(buffer) - offset >= LENGTH.size:
                (size,) = LENGTH.unpack_from(buffer, offset)
                end = offset + LENGTH.size + size
                if len(buffer) < end:
                    return
                payload = buffer[offset + LENGTH.size : end]
                offset = end
                try:
                    job_id, kind, value = pickle.loads(payload)
                    _, answer = self.pending.pop(job_id)
                except Exception:
                    self.pool.log.failure("signing worker {pid} sent a bad answer; stopping it", pid=self.pid)
                    self.stop("KILL")
                    return
                if kind == "ok":
                    self.pool.signed += 1
                    answer.callback(value)
                else:
                    answer.errback(_ERRORS.get(kind, SigningFailed)(value))
        finally:
            del buffer[:offset]

    def errReceived(self, data: bytes) -> None:
        # A worker writes to stderr only when Python itself fails (an import error, a traceback).
        self._errors += data
        *lines, rest = bytes(self._errors).split(b"\n")
        self._errors = bytearray(rest[-4096:])
        for line in lines:
            if line.strip():
                self.pool.log.warn(
                    "signing worker {pid}: {line}", pid=self.pid, line=line.decode("utf-8", "replace")
                )

    def stop(self, signal: str) -> None:
        """Close stdin (the worker exits when it has answered what it read) or send ``signal``."""
        if self.transport is None or not self.alive:
            return
        if signal == "EOF":
            self.transport.closeStdin()
        else:
            try:
                self.transport.signalProcess(signal)
            except Exception:  # already gone: processEnded follows
                pass

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        pending, self.pending = self.pending, {}
        self.pool.unavailable += len(pending)
        for _, answer in pending.values():
            answer.errback(SigningUnavailable("the signing worker exited"))
        self.pool._ended(self, reason)
        self.ended.callback(None)


class SigningPool(Service):
    """``processes`` signing workers; :meth:`sign` gives each job to the one with the fewest pending."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        processes: int,
        executable: str = sys.executable,
        restart_delay: float = 1.0,
        max_restart_delay: float = 60.0,
        stop_timeout: float = 5.0,
        job_timeout: float = 30.0,
    ) -> None:
        if processes < 1:
            raise ValueError("a signing pool needs at least one process")
        self._reactor = reactor
        self.clock = clock
        self.processes = processes
        self._executable = executable
        self._restart_delay = restart_delay
        self._max_restart_delay = max_restart_delay
        self._stop_timeout = stop_timeout
        self._job_timeout = job_timeout
        self._watchdog = LoopingCall(self._watch)
        self._watchdog.clock = clock
        self._workers: list[_Worker] = []
        self._restarts: list[IDelayedCall] = []
        self._delay = restart_delay
        self._next_job = 0
        #: Messages the workers have signed since start.
        self.signed = 0
        #: Jobs no worker could take or finish since start (each was then signed inline).
        self.unavailable = 0

    @property
    def workers(self) -> Sequence[_Worker]:
        """The worker processes started and not yet ended."""
        return tuple(self._workers)

    def status(self) -> dict[str, int]:
        """For ``/status``: fewer ``running`` than ``processes``, or a growing ``unavailable``, means
        workers are dying (their messages are signed inline, at the reactor thread's cost)."""
        return {
            "processes": self.processes,
            "running": sum(1 for w in self._workers if w.alive),
            "signed": self.signed,
            "unavailable": self.unavailable,
        }

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for _ in range(self.processes):
            self._spawn()
        self._watchdog.start(self._job_timeout / 2, now=False)

    def _watch(self) -> None:
        # A worker that stopped answering (stopped by a signal, stuck in a bug) would hold its jobs, and
        # the deliveries waiting for them, for ever: killed, its jobs are signed inline and it restarts.
        late = self.clock.seconds() - self._job_timeout
        for worker in self._workers:
            oldest = next(iter(worker.pending.values()), None)
            if worker.alive and oldest is not None and oldest[0] <= late:
                self.log.warn(
                    "signing worker {pid} has not answered for {seconds}s; killing it",
                    pid=worker.pid,
                    seconds=self._job_timeout,
                )
                worker.stop("KILL")

    def _spawn(self) -> None:
        if not self.running:
            return
        worker = _Worker(self, self.clock.seconds())
        try:
            self._reactor.spawnProcess(
                worker,
                self._executable,
                # -P: the daemon's working directory (its data directory under systemd) is not put on the
                # worker's import path.
                [self._executable, "-P", "-m", "mtad.mail.dkim_worker"],
                env=None,  # the daemon's own environment: same interpreter, same import path
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            self.log.error(
                "cannot start a signing worker ({error}); trying again in {delay}s",
                error=str(e),
                delay=self._delay,
            )
            self._schedule_restart()
            return
        self._workers.append(worker)
        self.log.info("started signing worker {pid}", pid=worker.pid)

    def _schedule_restart(self) -> None:
        call = self.clock.callLater(self._delay, self._restart)
        self._restarts.append(call)
        self._delay = min(self._delay * 2, self._max_restart_delay)

    def _restart(self) -> None:
        self._restarts = [c for c in self._restarts if c.active()]
        self._spawn()

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if not self.running:
            return
        if self.clock.seconds() - worker.started_at >= HEALTHY_SECONDS:
            self._delay = self._restart_delay
        how = "exited" if isinstance(reason.value, ProcessDone) else f"ended: {reason.getErrorMessage()}"
        self.log.warn(
            "signing worker {pid} {how}; starting another in {delay}s (messages are signed inline meanwhile)",
            pid=worker.pid,
            how=how,
            delay=self._delay,
        )
        self._schedule_restart()

    def sign(self, message: bytes, keys: Sequence[DKIMKey], now: float) -> Deferred[bytes]:
        """``message`` signed as `mtad.mail.dkim.DKIMSigner.sign` signs it, by a worker.

        Fails with `SigningUnavailable` when no worker runs or the worker exits before answering,
        and with the signer's own errors (`UnsignableMessageError`, `DKIMKeyError`) otherwise.
        """
        live = [w for w in self._workers if w.alive]
        if not live:
            self.unavailable += 1
            return fail(SigningUnavailable("no signing worker is running"))
        worker = min(live, key=lambda w: len(w.pending))
        self._next_job += 1
        return worker.submit(self._next_job, now, tuple(keys), message)

    def stopService(self) -> Deferred[Any]:
        """Let every worker answer what it holds and exit; kill those still running after ``stop_timeout``."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._watchdog.running:
            self._watchdog.stop()
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts = []
        workers = list(self._workers)
        for worker in workers:
            worker.stop("EOF")
        if not workers:
            return succeed(None)
        kill = self.clock.callLater(self._stop_timeout, self._kill, workers)
        ended = DeferredList([w.ended for w in workers], consumeErrors=True)

        def stopped(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return ended.addBoth(stopped)

    def _kill(self, workers: Sequence[_Worker]) -> None:
        for worker in workers:
            if worker.alive:
                self.log.warn("signing worker {pid} did not exit; killing it", pid=worker.pid)
                worker.stop("KILL")

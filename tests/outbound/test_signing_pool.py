"""The signing pool with real worker processes: same signatures as inline, errors, deaths, restarts, stop."""

from __future__ import annotations

import stat
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mtad.mail.dkim import DKIMKey, DKIMKeyError, DKIMSigner, UnsignableMessageError
from mtad.mail.dkim_keys import ED25519, RSA, generate_key
from mtad.mail.dkim_worker import frame
from mtad.outbound.signing_pool import SigningPool, SigningUnavailable, _Worker

MESSAGE = (
    b"From: App <app@sender.test>\r\nTo: a@example.com\r\nSubject: hi\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n" + b"Hello there.\r\n" * 300
)
NOW = 1_796_000_000.0


def _key(algorithm: str, selector: str) -> DKIMKey:
    pem, _public = generate_key(algorithm, rsa_bits=1024)
    return DKIMKey(domain="sender.test", selector=selector, private_key_pem=pem, algorithm=algorithm)


def _script(source: str) -> str:
    """An executable Python script standing in for a worker (it ignores the worker's arguments)."""
    path = Path(tempfile.mkdtemp()) / "worker.py"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


RSA_KEY = _key(RSA, "postal-aaaaaa")
ED_KEY = _key(ED25519, "postal-bbbbbb")
SIGNED = DKIMSigner().sign(MESSAGE, (RSA_KEY,), NOW)


class SigningPoolTests(TestCase):
    timeout = 60

    def pool(self, processes: int = 1, **kwargs: Any) -> tuple[SigningPool, Clock]:
        clock = Clock()
        pool = SigningPool(reactor, clock, processes, **kwargs)
        pool.startService()
        self.addCleanup(self.stop, pool, clock)
        return pool, clock

    async def stop(self, pool: SigningPool, clock: Clock) -> None:
        for worker in pool.workers:
            worker.stop("KILL")
        if pool.running:
            await pool.stopService()

    async def test_signatures_are_those_of_the_inline_signer(self) -> None:
        """Many jobs over two workers: each answer is byte for byte what DKIMSigner.sign gives."""
        pool, _ = self.pool(processes=2)
        self.assertEqual(len(pool.workers), 2)
        messages = [MESSAGE.replace(b"hi", b"hi %d" % n) for n in range(40)]
        jobs = [pool.sign(m, (RSA_KEY, ED_KEY), NOW) for m in messages]
        self.assertTrue(all(w.pending for w in pool.workers))  # both took a share
        signed = await gatherResults(jobs)
        inline = DKIMSigner()
        self.assertEqual(signed, [inline.sign(m, (RSA_KEY, ED_KEY), now=NOW) for m in messages])

    async def test_signer_errors_come_back_as_the_signers(self) -> None:
        """No From and a broken key raise what the inline signer raises; the worker goes on serving."""
        pool, _ = self.pool()
        (worker,) = pool.workers
        with self.assertRaises(UnsignableMessageError):
            await pool.sign(b"To: a@example.com\r\n\r\nno sender\r\n", (RSA_KEY,), NOW)
        broken = DKIMKey(domain="sender.test", selector="bad", private_key_pem=b"not a key")
        with self.assertRaises(DKIMKeyError) as caught:
            await pool.sign(MESSAGE, (broken,), NOW)
        self.assertIn("bad._domainkey.sender.test", str(caught.exception))
        self.assertEqual(await pool.sign(MESSAGE, (RSA_KEY,), NOW), SIGNED)
        self.assertEqual(pool.workers, (worker,))

    async def test_workers_outlive_interrupts(self) -> None:
        """Ctrl-C and SIGTERM reach the whole process group; the worker keeps serving until its input ends,
        so the daemon can still sign while it drains its deliveries."""
        pool, _ = self.pool()
        (worker,) = pool.workers
        await pool.sign(MESSAGE, (RSA_KEY,), NOW)  # started: its signal handlers are set
        worker.stop("INT")
        worker.stop("TERM")
        self.assertEqual(await pool.sign(MESSAGE, (RSA_KEY,), NOW), SIGNED)
        self.assertEqual(pool.workers, (worker,))

    async def test_a_dead_worker_fails_its_jobs_and_is_restarted(self) -> None:
        """Jobs held by a killed worker fail with SigningUnavailable (the caller signs inline); with no
        worker left every job does, until the restart delay has passed and a new worker serves."""
        pool, clock = self.pool(restart_delay=1.0)
        (worker,) = pool.workers
        held = [pool.sign(MESSAGE, (RSA_KEY,), NOW) for _ in range(5)]
        worker.stop("KILL")
        await worker.ended
        for job in held:
            with self.assertRaises(SigningUnavailable):
                await job
        self.assertEqual(pool.workers, ())
        with self.assertRaises(SigningUnavailable):
            await pool.sign(MESSAGE, (RSA_KEY,), NOW)
        self.assertEqual(pool.status(), {"processes": 1, "running": 0, "signed": 0, "unavailable": 6})
        clock.advance(0.9)
        self.assertEqual(pool.workers, ())
        clock.advance(0.1)
        (restarted,) = pool.workers
        self.assertIsNot(restarted, worker)
        self.assertEqual(await pool.sign(MESSAGE, (RSA_KEY,), NOW), SIGNED)
        self.assertEqual(pool.status(), {"processes": 1, "running": 1, "signed": 1, "unavailable": 6})

    async def test_workers_dying_young_are_restarted_ever_more_slowly(self) -> None:
        """1 s, then 2 s, then 4 s: a worker that cannot live does not fork in a loop."""
        pool, clock = self.pool(restart_delay=1.0, max_restart_delay=4.0)
        waits = []
        for _ in range(4):
            (worker,) = pool.workers
            worker.stop("KILL")
            await worker.ended
            waited = 0.0
            while not pool.workers:
                clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 4.0])

    async def test_stop_answers_what_was_sent_then_ends_the_workers(self) -> None:
        pool, _ = self.pool(processes=2)
        workers = pool.workers
        jobs = [pool.sign(MESSAGE, (RSA_KEY,), NOW) for _ in range(20)]
        stopped = pool.stopService()
        signed = await gatherResults(jobs)
        await stopped
        self.assertEqual(set(signed), {SIGNED})
        self.assertEqual(pool.workers, ())
        self.assertFalse(any(w.alive for w in workers))
        with self.assertRaises(SigningUnavailable):
            await pool.sign(MESSAGE, (RSA_KEY,), NOW)

    async def test_a_worker_that_ignores_stop_is_killed(self) -> None:
        """A worker still running ``stop_timeout`` seconds after its input closed gets SIGKILL."""
        script = Path(tempfile.mkdtemp()) / "stuck-worker"
        script.write_text("#!/bin/sh\nexec tail -f /dev/null\n")  # never exits by itself
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        pool, clock = self.pool(executable=str(script), stop_timeout=5.0)
        (worker,) = pool.workers
        stopped: Deferred[Any] = pool.stopService()
        clock.advance(4.9)
        self.assertTrue(worker.alive)
        clock.advance(0.1)
        await stopped
        self.assertFalse(worker.alive)

    async def test_a_worker_that_stops_answering_is_killed(self) -> None:
        """A job unanswered for job_timeout seconds: the worker is killed, its jobs fail over to inline
        signing, and a new worker takes its place."""
        script = Path(tempfile.mkdtemp()) / "silent-worker"
        script.write_text("#!/bin/sh\nexec cat > /dev/null\n")  # reads jobs, never answers
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        pool, clock = self.pool(executable=str(script), job_timeout=30.0, restart_delay=1.0)
        (worker,) = pool.workers
        clock.advance(10)
        job = pool.sign(MESSAGE, (RSA_KEY,), NOW)
        clock.advance(15)  # the watchdog looks at 15 s and 30 s: the job is 5 s old, then 20 s
        clock.advance(15)
        self.assertTrue(worker.alive)
        clock.advance(15)  # 35 s old at 45 s
        with self.assertRaises(SigningUnavailable):
            await job
        self.assertFalse(worker.alive)
        clock.advance(1.0)
        self.assertEqual(len(pool.workers), 1)

    async def test_a_worker_that_cannot_start_is_retried(self) -> None:
        """A missing interpreter: jobs fail over to inline signing, and starting is tried again later."""
        python = Path(tempfile.mkdtemp()) / "python"
        pool, clock = self.pool(executable=str(python), restart_delay=1.0)
        self.assertEqual(pool.workers, ())
        self.flushLoggedErrors()
        with self.assertRaises(SigningUnavailable):
            await pool.sign(MESSAGE, (RSA_KEY,), NOW)
        python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        clock.advance(1.0)
        self.assertEqual(len(pool.workers), 1)
        self.assertEqual(await pool.sign(MESSAGE, (RSA_KEY,), NOW), SIGNED)

    async def test_a_worker_dying_mid_answer(self) -> None:
        """Half an answer, then the worker exits: its job fails over to inline signing."""
        pool, _ = self.pool(
            executable=_script("""
                import struct, sys
                sys.stdin.buffer.read(8)
                sys.stdout.buffer.write(struct.pack(">I", 1000) + b"x" * 10)
                sys.stdout.buffer.flush()
                sys.exit(3)
            """)
        )
        with self.assertRaises(SigningUnavailable):
            await pool.sign(MESSAGE, (RSA_KEY,), NOW)

    async def test_a_worker_answering_garbage_is_killed(self) -> None:
        """An answer that does not unpickle: the worker is killed and its jobs fail over."""
        pool, _ = self.pool(
            executable=_script("""
                import struct, sys
                sys.stdin.buffer.read(8)
                sys.stdout.buffer.write(struct.pack(">I", 3) + b"zzz")
                sys.stdout.buffer.flush()
                sys.stdin.buffer.read()  # alive until killed (or its input closes)
            """)
        )
        (worker,) = pool.workers
        with self.assertRaises(SigningUnavailable):
            await pool.sign(MESSAGE, (RSA_KEY,), NOW)
        self.assertFalse(worker.alive)
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    async def test_exit_logged_with_the_pid(self) -> None:
        """The warning about a dead worker names its pid (Twisted forgets it before processEnded)."""
        pool, _ = self.pool()
        (worker,) = pool.workers
        pid = worker.pid
        self.assertIsInstance(pid, int)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        worker.stop("KILL")
        await worker.ended
        (exited,) = [e for e in events if e.get("log_format", "").startswith("signing worker {pid} {how}")]
        self.assertEqual(exited["pid"], pid)

    def test_answers_split_anyhow_and_out_of_order(self) -> None:
        """Answers arrive byte by byte, in another order than the jobs: each reaches its own job."""
        pool = SigningPool(reactor, Clock(), 1)
        worker = _Worker(pool, 0.0)
        got: dict[int, bytes] = {}
        for job_id in (1, 2):
            answer: Deferred[bytes] = Deferred()
            answer.addCallback(lambda value, job_id=job_id: got.setdefault(job_id, value))
            worker.pending[job_id] = (0.0, answer)
        data = frame((2, "ok", b"two")) + frame((1, "ok", b"one"))
        for i in range(len(data)):
            worker.outReceived(data[i : i + 1])
        self.assertEqual(got, {1: b"one", 2: b"two"})
        self.assertEqual((worker.pending, pool.signed), ({}, 2))
        # Many answers and part of the next in one read, the rest of it in the following read.
        for job_id in (3, 4, 5):
            answer = Deferred()
            answer.addCallback(lambda value, job_id=job_id: got.setdefault(job_id, value))
            worker.pending[job_id] = (0.0, answer)
        data = frame((3, "ok", b"three")) + frame((4, "ok", b"four")) + frame((5, "ok", b"five"))
        worker.outReceived(data[:-3])
        self.assertEqual((sorted(got), sorted(worker.pending)), ([1, 2, 3, 4], [5]))
        worker.outReceived(data[-3:])
        self.assertEqual((got[5], worker.pending, pool.signed), (b"five", {}, 5))

    def test_at_least_one_process(self) -> None:
        with self.assertRaises(ValueError):
            SigningPool(reactor, Clock(), 0)

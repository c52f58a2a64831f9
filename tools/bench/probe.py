"""Latency probes for the relay benchmark, sent from their own (higher-priority) process.

``smtp-source`` cannot timestamp individual messages, so the runner samples accept-to-delivery latency
with probes: one message every ``interval`` seconds to ``probe<n>@dest.test`` through the same listener
as the load; the accept time is the receipt of the 250 reply to DATA (RFC 5321 §4.1.1.4: the server has
taken responsibility). The runner's threads share a GIL and a loaded 2-core machine delays them by tens
of milliseconds, which would blur the accept timestamps; this worker therefore runs as its own process,
reniced to -10 when allowed (it uses little CPU: one small SMTP transaction per interval).

Worker protocol: ``python -m tools.bench.probe HOST PORT MODE INTERVAL SIZE`` sends probes until its
stdin closes, then prints ``{"accepted_ns": {n: ns}, "errors": [...]}`` as JSON on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import attrs

Mode = Literal["new", "reuse"]
SENDER = "bench@client.bench.test"
PROBE_PREFIX = "probe"
RECIPIENT_DOMAIN = "dest.test"
REPO_ROOT = Path(__file__).resolve().parents[2]


def probe_message(number: int, size: int) -> bytes:
    """A probe about as large as a bulk message, in ~78-character lines like smtp-source's."""
    line = b"P" * 77 + b"\r\n"
    body = line * max(1, size // len(line))
    head = (
        f"From: <{SENDER}>\r\nTo: <{PROBE_PREFIX}{number}@{RECIPIENT_DOMAIN}>\r\n"
        f"Subject: latency probe {number}\r\nMessage-Id: <probe{number}@client.bench.test>\r\n\r\n"
    ).encode()
    return head + body


@attrs.define
class ProbeSender:
    """Sends probes at a fixed interval until stopped; records when each was accepted (250 to DATA).

    In ``new`` mode each probe has its own connection, in ``reuse`` mode they share one, like the load.
    """

    address: tuple[str, int]
    mode: Mode
    interval: float
    size: int
    accepted_ns: dict[int, int] = attrs.field(factory=dict)
    errors: list[str] = attrs.field(factory=list)
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="probes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _connect(self) -> smtplib.SMTP:
        return smtplib.SMTP(*self.address, local_hostname="probe.bench.test", timeout=60)

    def _run(self) -> None:
        client: smtplib.SMTP | None = None
        number = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self._connect()
                recipient = f"{PROBE_PREFIX}{number}@{RECIPIENT_DOMAIN}"
                client.sendmail(SENDER, [recipient], probe_message(number, self.size))
                self.accepted_ns[number] = time.time_ns()
                if self.mode == "new":
                    client.quit()
                    client = None
            except (OSError, smtplib.SMTPException) as e:
                self.errors.append(f"probe {number}: {e!r}")
                if client is not None:
                    client.close()
                client = None
            number += 1
            # A probe slower than the interval delays the next one; no catch-up bursts afterwards.
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(next_at - time.monotonic())
        if client is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                client.quit()


@attrs.define
class ProbeProcess:
    """Runs :class:`ProbeSender` in a worker process; after :meth:`stop`, its results are here."""

    address: tuple[str, int]
    mode: Mode
    interval: float
    size: int
    accepted_ns: dict[int, int] = attrs.field(factory=dict)
    errors: list[str] = attrs.field(factory=list)
    _process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        host, port = self.address
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.bench.probe",
                host,
                str(port),
                self.mode,
                str(self.interval),
                str(self.size),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        out, _ = process.communicate(b"")
        if process.returncode != 0:
            raise RuntimeError(f"probe worker failed ({process.returncode})")
        result = json.loads(out)
        self.accepted_ns = {int(n): int(ns) for n, ns in result["accepted_ns"].items()}
        self.errors = list(result["errors"])


def main(argv: list[str] | None = None) -> int:
    host, port, mode, interval, size = (argv if argv is not None else sys.argv[1:])[:5]
    if mode not in ("new", "reuse"):
        raise SystemExit(f"unknown mode {mode!r}")
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    sender = ProbeSender((host, int(port)), "new" if mode == "new" else "reuse", float(interval), int(size))
    sender.start()
    sys.stdin.buffer.read()
    sender.stop()
    json.dump({"accepted_ns": sender.accepted_ns, "errors": sender.errors}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

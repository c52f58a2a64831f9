"""Webhook benchmark: signed dispatch throughput per process, and delay from delivery to webhook.

    .venv/bin/python -m tools.bench.webhooks [--runs 3] [--requests 8000] [--rate 200] [--seconds 30]
    .venv/bin/python -m tools.bench.webhooks dispatch --profile     # one part, with cProfile

Two measurements (issue 9's targets: >= 400 requests/s per process with a 2048-bit key, two RSA signatures
each; p99 < 1 s from delivery to webhook at 200 deliveries/s):

**dispatch**: the queue (`mtad.webhooks.queue.WebhookQueue`, on a Redis the runner starts with the
embedded Redis's durable settings, ``appendfsync always``) is filled with N ``MessageSent`` requests for
one webhook; then the real `WebhookDispatcher` with the real `WebhookSender` (guarded Agent, 2048-bit
`WebhookSigner`, signing in the reactor's thread pool as the daemon does, every attempt logged to SQLite)
POSTs them to a receiver on 127.0.0.1, in a process of its own with the daemon's ``[webhooks]`` defaults
(concurrency 50, 4 per receiver, ``[events] poll_interval`` 0.2 s). requests/s = N / (first claim to the
last request settled); the CPU of that process is read with ``getrusage``.

**end-to-end**: one real mtad (``tools.bench.http_send``'s system: send API, DKIM, delivery to a sink)
with a webhook for every event to the receiver; ``tools.bench.open_loop`` sends R messages/s for S
seconds; the delay of each ``MessageSent`` webhook is its receipt time at the receiver minus the payload's
``timestamp`` (when mtad recorded the delivery: the sink's 250 to the message), both on this machine's
``CLOCK_REALTIME``. Printed as p50/p95/p99/max, with the delay from acceptance (the message's
``timestamp``) alongside.

The **receiver** (``python -m tools.bench.webhooks receive``) is a minimal Twisted protocol: it reads a
request head and a ``Content-Length`` body, answers ``200`` and closes (the sender keeps no connection
alive), and appends a JSON line per request (receipt time, event, uuid, timestamps, whether the three
``X-Postal-Signature*`` headers came and, with ``--verify-key``, whether both signatures verify).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuid_module
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from tools.bench import mtad_system
from tools.bench.mtad_system import REPO_ROOT, ManagedProcess, WebhookReceiver, start_webhook_receiver
from tools.bench.relay import percentile

#: The server the dispatch benchmark's requests belong to.
SERVER = "bench/hooks"
TARGET_RATE = 400.0
TARGET_P99_SECONDS = 1.0
SIGNATURE_HEADERS = (b"x-postal-signature", b"x-postal-signature-256", b"x-postal-signature-kid")


# --------------------------------------------------------------------------------------------------------
# The receiver
# --------------------------------------------------------------------------------------------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Verifier:
    """Checks both signatures against the public half of a PEM key file, read when first needed (the
    daemon creates its key at start, after the receiver is up)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._key: Any = None

    def verify(self, body: bytes, sha1: bytes, sha256: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        if self._key is None:
            pem = self._path.read_bytes()
            if b"PRIVATE KEY" in pem:
                self._key = serialization.load_pem_private_key(pem, password=None).public_key()
            else:
                self._key = serialization.load_pem_public_key(pem)
        try:
            self._key.verify(base64.b64decode(sha1), body, padding.PKCS1v15(), hashes.SHA1())
            self._key.verify(base64.b64decode(sha256), body, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return False
        return True


def record(
    received_at: float, headers: dict[bytes, bytes], body: bytes, verifier: _Verifier | None
) -> dict[str, Any]:
    """The JSON line for one request."""
    line: dict[str, Any] = {"t": received_at, "bytes": len(body)}
    line["sig"] = all(headers.get(name) for name in SIGNATURE_HEADERS)
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    payload = data.get("payload") if isinstance(data, dict) else None
    line["event"] = data.get("event")
    line["uuid"] = data.get("uuid")
    line["ts"] = data.get("timestamp")
    if isinstance(payload, dict):
        line["pts"] = payload.get("timestamp")
        message = payload.get("message")
        if isinstance(message, dict):
            line["mts"] = message.get("timestamp")
            line["to"] = message.get("to")
    if verifier is not None:
        line["valid"] = line["sig"] and verifier.verify(
            body, headers[b"x-postal-signature"], headers[b"x-postal-signature-256"]
        )
    return line


def run_receiver(interface: str, port: int, records: Path, verify_key: Path | None) -> None:
    """Serve until SIGTERM; lines are written at least every 0.2 s and on the way out."""
    from twisted.internet import reactor, task
    from twisted.internet.protocol import Factory, Protocol

    out = records.open("a", buffering=1 << 16)
    verifier = _Verifier(verify_key) if verify_key is not None else None

    class Receive(Protocol):
        def __init__(self) -> None:
            self._buffer = bytearray()
            self._headers: dict[bytes, bytes] | None = None
            self._length = 0
            self._done = False

        def dataReceived(self, data: bytes) -> None:
            if self._done:
                return
            self._buffer += data
            if self._headers is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self._buffer[:end]).split(b"\r\n")
                del self._buffer[: end + 4]
                headers = {}
                for line in head[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                self._headers = headers
                try:
                    self._length = int(headers.get(b"content-length", b"0"))
                except ValueError:
                    self._finish(BAD_REQUEST)
                    return
            if len(self._buffer) < self._length:
                return
            line = record(time.time(), self._headers, bytes(self._buffer[: self._length]), verifier)
            out.write(json.dumps(line) + "\n")
            self._finish(RESPONSE)

        def _finish(self, response: bytes) -> None:
            self._done = True
            assert self.transport is not None
            self.transport.write(response)
            self.transport.loseConnection()

    reactor.listenTCP(port, Factory.forProtocol(Receive), backlog=1024, interface=interface)  # type: ignore[attr-defined]
    flusher = task.LoopingCall(out.flush)
    flusher.start(0.2, now=False)
    reactor.addSystemEventTrigger("after", "shutdown", out.close)  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------
# Dispatch throughput
# --------------------------------------------------------------------------------------------------------


def message_sent_body(uuid: str, now: float, n: int) -> bytes:
    """A ``MessageSent`` envelope the size of a real one (~700 bytes)."""
    from mtad.webhooks.payloads import envelope

    payload = {
        "message": {
            "id": n,
            "token": f"tok{n:09d}",
            "direction": "outgoing",
            "message_id": f"{uuid}@mtad.bench.test",
            "to": f"{n}rcpt@dest.test",
            "from": "sender@client.bench.test",
            "subject": f"Benchmark message number {n}",
            "timestamp": now,
            "spam_status": "NotChecked",
            "tag": None,
        },
        "status": "Sent",
        "details": f"Message for {n}rcpt@dest.test accepted by mx.dest.test (127.0.0.3)",
        "output": "250 2.0.0 Ok: queued as 4F2A1B3C9D",
        "sent_with_ssl": False,
        "timestamp": now,
        "time": 0.05,
    }
    return envelope("MessageSent", now, uuid, payload)


async def _dispatch(reactor: Any, options: argparse.Namespace) -> dict[str, Any]:
    """The child's work: fill the queue, then dispatch it all with the daemon's parts; the figures."""
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThreadPool

    from mtad.config import load_config
    from mtad.queue.client import RedisClient
    from mtad.store import servers
    from mtad.store import webhooks as webhook_store
    from mtad.store.db import Database
    from mtad.webhooks.dispatcher import DispatchSettings, WebhookDispatcher
    from mtad.webhooks.guard import parse_networks
    from mtad.webhooks.queue import NewRequest, WebhookQueue
    from mtad.webhooks.sender import SenderSettings, WebhookSender, guarded_agent
    from mtad.webhooks.signing import WebhookSigner

    config = load_config(options.config)
    signer = WebhookSigner.load_or_create(config.data_path / "signing.key", 2048)
    database = Database.from_url(config.database_url, reactor)
    database.startService()

    def ids(conn: Any) -> tuple[int, int]:
        server = servers.get_server_by_name(conn, SERVER)
        return server.id, webhook_store.list_webhooks(conn, server.id)[0].id

    server_id, webhook_id = await database.run(ids)
    client = RedisClient.from_url(reactor, options.redis_url, poolsize=4)
    await client.wait_connected()
    queue = WebhookQueue(client)
    now = time.time()
    count = options.requests
    for start in range(0, count, 200):
        batch = []
        for n in range(start, min(count, start + 200)):
            uuid = str(uuid_module.uuid4())
            batch.append(
                NewRequest(
                    uuid=uuid,
                    server_id=server_id,
                    webhook_id=webhook_id,
                    url=options.url,
                    event="MessageSent",
                    body=message_sent_body(uuid, now, n),
                    created_at=now,
                )
            )
        await queue.add(batch, now)
    signer = _TimedSigner(signer)
    agent = guarded_agent(reactor, reactor.nameResolver, parse_networks([mtad_system.WEBHOOK_NETWORK]))
    sender = WebhookSender(
        agent,
        reactor,
        signer,
        SenderSettings(per_url_concurrency=options.per_url_concurrency),
        in_thread=lambda fn: deferToThreadPool(reactor, reactor.getThreadPool(), fn),
    )
    log: Any = _TimedDatabase(database)
    if options.no_request_log:
        log = _NoRequestLog()
    dispatcher = WebhookDispatcher(
        reactor,
        queue,
        log,
        sender,
        DispatchSettings(concurrency=options.concurrency, poll_interval=options.poll_interval),
    )
    # As the daemon does after start-up (`MtadService(freeze_gc=True)`).
    gc.collect()
    gc.freeze()
    # The reactor thread's CPU time, not wall time: on a shared machine wall time is mostly waiting for a
    # core. The signing threads' CPU is not in it.
    profile = cProfile.Profile(time.thread_time) if options.profile else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    reactor_before = time.thread_time()
    started = time.monotonic()
    if profile is not None:
        profile.enable()
    dispatcher.startService()
    # Requests in flight, sampled every 5 ms: below `concurrency` while requests are due means the
    # dispatcher is idle between claims (it waits `poll_interval` whenever its slots were full).
    samples: list[int] = []
    while dispatcher.sent + dispatcher.failed < count:
        await deferLater(reactor, 0.005)
        samples.append(len(dispatcher._in_flight))
    seconds = time.monotonic() - started
    reactor_cpu = time.thread_time() - reactor_before
    if profile is not None:
        profile.disable()
    after = resource.getrusage(resource.RUSAGE_SELF)
    await dispatcher.stopService()
    depth = await queue.depth()
    await client.disconnect()
    database.stopService()
    result: dict[str, Any] = {
        "requests": count,
        "sent": dispatcher.sent,
        "failed": dispatcher.failed,
        "seconds": seconds,
        "rate": count / seconds,
        "cpu_user": after.ru_utime - before.ru_utime,
        "cpu_system": after.ru_stime - before.ru_stime,
        "queue_after": depth,
        "reactor_cpu": reactor_cpu,
        "sign_cpu": signer.cpu,
        "sql_cpu": getattr(log, "cpu", 0.0),
        "in_flight_mean": sum(samples) / max(1, len(samples)),
        "in_flight_zero": sum(1 for n in samples if n == 0) / max(1, len(samples)),
    }
    if profile is not None:
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        result["profile"] = text.getvalue()
    return result


class _TimedSigner:
    """The signer, adding up the CPU time of the threads it signs in (``time.thread_time``)."""

    def __init__(self, signer: Any) -> None:
        self._signer = signer
        self.cpu = 0.0

    def sign(self, body: bytes) -> dict[str, str]:
        started = time.thread_time()
        try:
            result: dict[str, str] = self._signer.sign(body)
            return result
        finally:
            self.cpu += time.thread_time() - started


class _TimedDatabase:
    """The database, adding up the CPU time of its units of work in its thread."""

    def __init__(self, database: Any) -> None:
        self._database = database
        self.cpu = 0.0

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def timed(conn: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(conn, *args, **kwargs)
            finally:
                self.cpu += time.thread_time() - started

        return self._database.run(timed)


class _NoRequestLog:
    """Diagnosis only (``--no-request-log``): the dispatcher's SQL writes (one transaction per attempt, on
    SQLite's one writer thread) skipped, to see what they cost. Not the daemon's path."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)


def dispatch_child(options: argparse.Namespace) -> int:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    def main(reactor: Any) -> Deferred[None]:
        async def run() -> None:
            result = await _dispatch(reactor, options)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()

        return Deferred.fromCoroutine(run())

    task.react(main)
    return 0


@attrs.frozen
class DispatchResult:
    requests: int
    rate: float
    seconds: float
    #: CPU of the dispatching process (reactor and signing threads), as a share of one core.
    cpu_share: float
    receiver_cpu_share: float
    redis_cpu_share: float
    received: int
    distinct: int
    signed: int
    valid: int
    failed: int
    #: Mean requests in flight, and the share of the time with none in flight (5 ms samples).
    in_flight_mean: float
    in_flight_zero: float
    load_average: float
    #: CPU seconds per request: the reactor thread, signing (thread pool), the SQL unit of work (its
    #: thread; commit included, not the connection's BEGIN).
    reactor_ms: float = 0.0
    sign_ms: float = 0.0
    sql_ms: float = 0.0
    profile: str = ""


def measure_dispatch(options: argparse.Namespace, workdir: Path, profile: bool = False) -> DispatchResult:
    """One dispatch measurement on a fresh Redis, database and receiver in ``workdir`` (wiped first)."""
    mtad_system._reset_state(workdir)
    holder = mtad_system.MtadSystem("webhook dispatch", workdir)
    receiver: WebhookReceiver | None = None
    try:
        redis_url = mtad_system._start_redis(holder)
        data_dir = mtad_system.data_dir(workdir, 0)
        config_path = workdir / "dispatch.toml"
        config_path.write_text(
            mtad_system.to_toml(
                {
                    "general": {"hostname": mtad_system.HOSTNAME, "data_dir": str(data_dir)},
                    "webhooks": {"allowed_networks": [mtad_system.WEBHOOK_NETWORK]},
                }
            )
        )
        mtad_system._run_cli(workdir, config_path, "initialize")
        mtad_system._run_cli(workdir, config_path, "make-organization", SERVER.split("/")[0])
        mtad_system._run_cli(workdir, config_path, "make-server", *SERVER.split("/"))
        # The child creates the key; the receiver reads it at its first request.
        receiver = start_webhook_receiver(workdir, verify_key=data_dir / "signing.key")
        mtad_system.add_webhook(workdir, config_path, SERVER, receiver.url)
        argv = [sys.executable, "-m", "tools.bench.webhooks", "_dispatch", "--config", str(config_path)]
        argv += ["--redis-url", redis_url, "--url", receiver.url, "--requests", str(options.requests)]
        argv += ["--concurrency", str(options.concurrency), "--per-url-concurrency"]
        argv += [str(options.per_url_concurrency), "--poll-interval", f"{options.poll_interval:g}"]
        if profile:
            argv.append("--profile")
        if options.no_request_log:
            argv.append("--no-request-log")
        load_average = os.getloadavg()[0]
        cpu_before = _cpu(receiver.process, holder.redis)
        done = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=mtad_system._twistd_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=600,
            check=False,
        )
        cpu_after = _cpu(receiver.process, holder.redis)
        if done.returncode != 0:
            raise RuntimeError(
                f"dispatcher failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}"
            )
        child = json.loads(done.stdout.decode().strip().splitlines()[-1])
        lines = _wait_for_records(receiver, child["sent"], 10)
        seconds = child["seconds"]
        return DispatchResult(
            requests=child["requests"],
            rate=child["rate"],
            seconds=seconds,
            cpu_share=(child["cpu_user"] + child["cpu_system"]) / seconds,
            receiver_cpu_share=(cpu_after[0] - cpu_before[0]) / seconds,
            redis_cpu_share=(cpu_after[1] - cpu_before[1]) / seconds,
            received=len(lines),
            distinct=len({line.get("uuid") for line in lines}),
            signed=sum(1 for line in lines if line.get("sig")),
            valid=sum(1 for line in lines if line.get("valid")),
            failed=child["failed"],
            in_flight_mean=child["in_flight_mean"],
            in_flight_zero=child["in_flight_zero"],
            load_average=load_average,
            reactor_ms=1000 * child["reactor_cpu"] / child["requests"],
            sign_ms=1000 * child["sign_cpu"] / child["requests"],
            sql_ms=1000 * child["sql_cpu"] / child["requests"],
            profile=child.get("profile", ""),
        )
    finally:
        if receiver is not None:
            receiver.stop()
        holder.stop()


def _cpu(*processes: ManagedProcess | None) -> tuple[float, ...]:
    from tools.bench.http_send import cpu_seconds

    return tuple(cpu_seconds([p.pid]) if p is not None and p.pid is not None else 0.0 for p in processes)


def _wait_for_records(receiver: WebhookReceiver, count: int, timeout: float) -> list[dict[str, Any]]:
    """The receiver's lines once it has written ``count`` of them (or after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = receiver.read()
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def describe_dispatch(run: int, r: DispatchResult) -> str:
    return (
        f"  dispatch run {run}: {r.requests} requests in {r.seconds:.2f} s = {r.rate:.0f}/s; "
        f"received {r.received} ({r.distinct} distinct, {r.signed} with the three signature headers, "
        f"{r.valid} verified), {r.failed} failed; CPU dispatcher {100 * r.cpu_share:.0f} %, "
        f"receiver {100 * r.receiver_cpu_share:.0f} %, Redis {100 * r.redis_cpu_share:.0f} %; in flight "
        f"{r.in_flight_mean:.1f} on average, none {100 * r.in_flight_zero:.0f} % of the time; load average "
        f"{r.load_average:.1f} at start\n"
        f"    CPU per request: {1000 * r.cpu_share * r.seconds / r.requests:.2f} ms in the process, of which "
        f"reactor thread {r.reactor_ms:.2f} ms, signing {r.sign_ms:.2f} ms, SQL request log {r.sql_ms:.2f} ms"
    )


# --------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------


@attrs.frozen
class EndToEndResult:
    rate: float
    seconds: float
    accepted: int
    sent: int
    webhooks: int
    signed: int
    valid: int
    #: Seconds from the delivery (the payload's ``timestamp``) to the receipt of its webhook.
    delays: tuple[float, ...] = attrs.field(repr=False)
    #: Seconds from acceptance (the message's ``timestamp``) to the receipt of its webhook.
    accept_delays: tuple[float, ...] = attrs.field(repr=False)
    request_p99_ms: float
    #: CPU from the start of the load until the last webhook came, as a share of one core over that time.
    mtad_cpu_share: float
    receiver_cpu_share: float
    #: Seconds from the start of the load until the last webhook came.
    wall: float = 0.0
    #: ``MessageSent`` webhooks per second at the receiver, first to last.
    webhook_rate: float = 0.0

    def delay(self, fraction: float) -> float:
        return percentile(self.delays, fraction)


def measure_end_to_end(options: argparse.Namespace, workdir: Path) -> EndToEndResult:
    """One mtad with a webhook, loaded at ``options.rate`` messages/s for ``options.seconds``."""
    from tools.bench import http_send

    system = http_send.start_system(workdir, http_send.choose_sink(options.sink), webhook=True)
    try:
        assert system.webhook_receiver is not None
        body_path = workdir / "body.json"
        body_path.write_bytes(http_send.request_body(options.size))
        before = system.cpu()
        load_started = time.monotonic()
        fixed, _ = http_send.run_open_loop(system, body_path, options.rate, options.seconds, 64)
        accepted = int(fixed["succeeded"])
        system.wait_drained()
        deadline = time.monotonic() + options.webhook_wait
        while True:
            lines = system.webhook_receiver.read()
            sent = [line for line in lines if line.get("event") == "MessageSent"]
            if len(sent) >= accepted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        after = system.cpu()
        wall = time.monotonic() - load_started
        statuses = system.message_statuses()
        return EndToEndResult(
            rate=options.rate,
            seconds=options.seconds,
            accepted=accepted,
            sent=statuses.get("Sent", 0),
            webhooks=len(lines),
            signed=sum(1 for line in lines if line.get("sig")),
            valid=sum(1 for line in lines if line.get("valid")),
            delays=tuple(sorted(line["t"] - line["pts"] for line in sent)),
            accept_delays=tuple(sorted(line["t"] - line["mts"] for line in sent)),
            request_p99_ms=float(fixed["p99_ms"]),
            mtad_cpu_share=(after["mtad"] - before["mtad"]) / wall,
            receiver_cpu_share=(after["webhook"] - before["webhook"]) / wall,
            wall=wall,
            webhook_rate=_rate([line["t"] for line in sent]),
        )
    finally:
        system.stop()


def _rate(times: Sequence[float]) -> float:
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (max(times) - min(times))


def describe_end_to_end(run: int, r: EndToEndResult) -> str:
    def ms(values: Sequence[float], fraction: float) -> str:
        return f"{1000 * percentile(values, fraction):.0f}"

    return (
        f"  end-to-end run {run}: {r.accepted} messages at {r.rate:g}/s, {r.sent} Sent, "
        f"{r.webhooks} webhooks{'' if len(r.delays) >= r.accepted else ' (INCOMPLETE)'} at "
        f"{r.webhook_rate:.0f}/s ({r.signed} signed, {r.valid} verified); "
        f"delivery -> webhook p50 {ms(r.delays, 0.5)} ms "
        f"p95 {ms(r.delays, 0.95)} ms p99 {ms(r.delays, 0.99)} ms max {ms(r.delays, 1.0)} ms; "
        f"accept -> webhook p50 {ms(r.accept_delays, 0.5)} ms p99 {ms(r.accept_delays, 0.99)} ms; "
        f"send API p99 {r.request_p99_ms:.1f} ms; CPU mtad {100 * r.mtad_cpu_share:.0f} %, "
        f"receiver {100 * r.receiver_cpu_share:.0f} % (from the start of the {r.seconds:g} s of load to the "
        f"last webhook, {r.wall:.0f} s)"
    )


# --------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.webhooks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "part", nargs="?", default="all", choices=["all", "dispatch", "end-to-end", "receive", "_dispatch"]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8000, help="dispatch: requests queued and sent")
    parser.add_argument("--concurrency", type=int, default=50, help="dispatch: [webhooks] concurrency")
    parser.add_argument(
        "--per-url-concurrency", type=int, default=4, help="dispatch: [webhooks] per_url_concurrency"
    )
    parser.add_argument("--poll-interval", type=float, default=0.2, help="dispatch: [events] poll_interval")
    parser.add_argument("--profile", action="store_true", help="dispatch: cProfile the first run's process")
    parser.add_argument(
        "--no-request-log",
        action="store_true",
        help="dispatch, diagnosis only: skip the request log's SQL write per attempt (not the daemon's path)",
    )
    parser.add_argument("--rate", type=float, default=200, help="end-to-end: messages/s")
    parser.add_argument("--seconds", type=float, default=30, help="end-to-end: seconds of load")
    parser.add_argument("--size", type=int, default=5120, help="end-to-end: bytes of plain_body")
    parser.add_argument(
        "--webhook-wait", type=float, default=300, help="end-to-end: seconds to wait for the last webhook"
    )
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "python"], default="auto")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="write every measurement and the medians here")
    # The receiver's and the dispatching child's own options.
    parser.add_argument("--interface", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--verify-key", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every run of the chosen parts, printed as they finish; the medians (also printed)."""
    from tools.bench.http_send import machine

    print(
        f"webhook benchmark: {machine()}; {options.runs} runs; dispatch {options.requests} requests "
        f"(concurrency {options.concurrency}, {options.per_url_concurrency} per receiver, poll "
        f"{options.poll_interval:g} s); end-to-end {options.rate:g} messages/s for {options.seconds:g} s; "
        f"work directory {workdir}",
        flush=True,
    )
    dispatches: list[DispatchResult] = []
    ends: list[EndToEndResult] = []
    for number in range(1, options.runs + 1):
        if options.part in ("all", "dispatch"):
            d = measure_dispatch(
                options, workdir / f"dispatch{number}", profile=options.profile and number == 1
            )
            dispatches.append(d)
            print(describe_dispatch(number, d), flush=True)
            if d.profile:
                print(d.profile, flush=True)
        if options.part in ("all", "end-to-end"):
            e = measure_end_to_end(options, workdir / f"e2e{number}")
            ends.append(e)
            print(describe_end_to_end(number, e), flush=True)
    summary: dict[str, Any] = {}
    if dispatches:
        rate = statistics.median(d.rate for d in dispatches)
        summary["dispatch_rate"] = rate
        summary["dispatch_cpu_share"] = statistics.median(d.cpu_share for d in dispatches)
        print(
            f"dispatch, median of {len(dispatches)}: {rate:.0f} requests/s per process (runs: "
            f"{', '.join(f'{d.rate:.0f}' for d in dispatches)}), "
            f"CPU {100 * summary['dispatch_cpu_share']:.0f} %;"
            f" target >= {TARGET_RATE:.0f}/s: {'met' if rate >= TARGET_RATE else 'MISSED'}",
            flush=True,
        )
    if ends:
        for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
            summary[f"delay_{name}_ms"] = statistics.median(1000 * e.delay(fraction) for e in ends)
        p99 = summary["delay_p99_ms"]
        print(
            f"end-to-end at {options.rate:g}/s, medians of {len(ends)}: delivery -> webhook p50 "
            f"{summary['delay_p50_ms']:.0f} ms, p95 {summary['delay_p95_ms']:.0f} ms, p99 {p99:.0f} ms, "
            f"max {summary['delay_max_ms']:.0f} ms; target p99 < {1000 * TARGET_P99_SECONDS:.0f} ms: "
            f"{'met' if p99 < 1000 * TARGET_P99_SECONDS else 'MISSED'}",
            flush=True,
        )
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "dispatch": [attrs.asdict(d) for d in dispatches],
                    "end_to_end": [
                        {
                            **attrs.asdict(e, filter=lambda a, _: a.name not in ("delays", "accept_delays")),
                            "p50": e.delay(0.5),
                            "p95": e.delay(0.95),
                            "p99": e.delay(0.99),
                        }
                        for e in ends
                    ],
                    "medians": summary,
                    "machine": machine(),
                },
                indent=2,
            )
            + "\n"
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.part == "receive":
        run_receiver(options.interface, options.port, options.records, options.verify_key)
        return 0
    if options.part == "_dispatch":
        return dispatch_child(options)
    # Short: a Redis unix socket path must fit in 107 bytes.
    workdir = (options.workdir or Path(tempfile.mkdtemp(prefix="mtad-hooks-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(options, workdir)
    finally:
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

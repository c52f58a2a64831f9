"""Open-loop HTTP load at a fixed rate, with the latency of every request.

A closed-loop tool (wrk, ab) sends the next request only when an earlier one has been answered, so a
slow server slows the load down and the latency of the requests that were never sent is never counted
("coordinated omission"). Here request ``i`` is due at ``start + i / rate`` whatever happened before, and
its latency runs from that due time to the last byte of the answer: a stalled server makes every request
due during the stall late, as a real application's traffic would be.

Requests go over keep-alive HTTP/1.1 connections; a due request takes an idle connection or opens a new
one, up to ``--max-connections`` (past that it waits, and the wait counts in its latency). The generator
checks itself: ``dispatch lag`` is how late it sent requests against their due times, and ``cpu`` its own
CPU time over the run; a lag of more than a few ms, or CPU near 100 %, means the generator, not the
server, is what was measured. When every connection is busy (a server slower than the rate), requests
wait for one: ``connection wait``, part of their latency. Prints one JSON object::

    python -m tools.bench.open_loop --port 8080 --path /api/v1/send/message --body-file body.json \\
        --header 'X-Server-API-Key: KEY' --rate 500 --duration 30 [--host 127.0.0.1]
        [--max-connections 64] [--success-marker '"status": "success"'] [--latencies]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from tools.bench.relay import percentile


def http_request(host: str, port: int, path: str, body: bytes, headers: Sequence[str]) -> bytes:
    """A POST request as sent on a keep-alive HTTP/1.1 connection."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseError(Exception):
    """The answer was not a complete, successful HTTP response."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One response: (status code, body, whether the server keeps the connection open).

    The body is delimited by Content-Length or chunked transfer coding (RFC 9112 §6.3, §7.1): Twisted
    answers chunked whenever a resource finishes after returning ``NOT_DONE_YET``, as Klein's do.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ResponseError(f"bad status line {lines[0]!r}") from None
    length: int | None = None
    chunked = False
    keep_alive = lines[0].startswith("HTTP/1.1")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection":
            keep_alive = value.strip().lower() != "close"
        elif name == "transfer-encoding":
            chunked = value.strip().lower().endswith("chunked")
    if chunked:
        return status, await read_chunked(reader), keep_alive
    if length is None:
        raise ResponseError("neither Content-Length nor chunked")
    return status, await reader.readexactly(length), keep_alive


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, decoded; trailer fields are read and dropped."""
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ResponseError(f"bad chunk size line {size_line!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ResponseError("chunk not followed by CRLF")


@attrs.frozen
class Outcome:
    """One request: when it was due and sent, how long until its answer, and whether that was a success."""

    due: float
    started: float  # when the generator got to the request: its own lateness is started - due
    sent: float  # when the request was written: sent - started is the wait for a free connection
    latency: float  # seconds from due to the end of the answer
    ok: bool
    error: str = ""


@attrs.define
class OpenLoop:
    """Fires ``request`` at ``host:port`` at ``rate`` per second for ``duration`` seconds."""

    host: str
    port: int
    request: bytes
    rate: float
    duration: float
    max_connections: int = 64
    success_marker: bytes = b'"status": "success"'
    timeout: float = 30.0
    outcomes: list[Outcome] = attrs.field(factory=list)
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = attrs.field(factory=list)
    _open: int = 0
    _freed: asyncio.Condition | None = None
    opened: int = 0

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self._freed is not None
        async with self._freed:
            while not self._idle and self._open >= self.max_connections:
                await self._freed.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            connection = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            await self._release(None)
            raise
        self.opened += 1
        return connection

    async def _release(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        assert self._freed is not None
        async with self._freed:
            if connection is None:
                self._open -= 1
            else:
                self._idle.append(connection)
            self._freed.notify()

    async def _one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = await self._connection()
        except OSError as e:
            self._record(due, started, started, ok=False, error=f"{type(e).__name__}: {e}")
            return
        assert connection is not None
        reader, writer = connection
        sent = loop.time()
        try:
            writer.write(self.request)
            status, body, keep_alive = await asyncio.wait_for(read_response(reader), self.timeout)
            ok = status == 200 and self.success_marker in body
            error = "" if ok else f"HTTP {status}: {body[:200]!r}"
            if not keep_alive:
                writer.close()
                connection = None
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ResponseError,
        ) as e:
            ok, error = False, f"{type(e).__name__}: {e}"
            writer.close()
            connection = None
        self._record(due, started, sent, ok=ok, error=error)
        await self._release(connection)

    def _record(self, due: float, started: float, sent: float, *, ok: bool, error: str) -> None:
        latency = asyncio.get_running_loop().time() - due
        self.outcomes.append(
            Outcome(due=due, started=started, sent=sent, latency=latency, ok=ok, error=error)
        )

    async def run(self) -> float:
        """Send every request, wait for every answer; the wall time from the first due time."""
        self._freed = asyncio.Condition()
        loop = asyncio.get_running_loop()
        count = round(self.rate * self.duration)
        start = loop.time() + 0.05
        tasks = []
        for i in range(count):
            due = start + i / self.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._one(due)))
        await asyncio.gather(*tasks)
        for _, writer in self._idle:
            writer.close()
        return loop.time() - start


def summarize(load: OpenLoop, wall: float, cpu: float, latencies: bool = False) -> dict[str, Any]:
    """The run as JSON-ready numbers: latencies of successful requests (ms), errors, self-checks."""
    ok = [o.latency * 1000 for o in load.outcomes if o.ok]
    lags = [(o.started - o.due) * 1000 for o in load.outcomes]
    waits = [(o.sent - o.started) * 1000 for o in load.outcomes]
    errors: dict[str, int] = {}
    for o in load.outcomes:
        if not o.ok:
            kind = o.error.split(":", 1)[0]
            errors[kind] = errors.get(kind, 0) + 1
    first_error = next((o.error for o in load.outcomes if not o.ok), "")
    result: dict[str, Any] = {
        "rate": load.rate,
        "duration": load.duration,
        "requests": len(load.outcomes),
        "succeeded": len(ok),
        "errors": errors,
        "first_error": first_error,
        "wall_seconds": wall,
        "achieved_rate": len(load.outcomes) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(ok, 0.50),
        "p90_ms": percentile(ok, 0.90),
        "p99_ms": percentile(ok, 0.99),
        "p999_ms": percentile(ok, 0.999),
        "max_ms": max(ok, default=float("nan")),
        "dispatch_lag_p99_ms": percentile(lags, 0.99),
        "dispatch_lag_max_ms": max(lags, default=float("nan")),
        "connection_wait_p99_ms": percentile(waits, 0.99),
        "connections_opened": load.opened,
        "cpu_seconds": cpu,
        "cpu_share": cpu / wall if wall > 0 else 0.0,
    }
    if latencies:
        result["latencies_ms"] = ok
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.open_loop", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/v1/send/message")
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--max-connections", type=int, default=64)
    parser.add_argument("--success-marker", default='"status": "success"')
    parser.add_argument("--latencies", action="store_true", help="include every latency in the output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    request = http_request(args.host, args.port, args.path, args.body_file.read_bytes(), args.header)
    load = OpenLoop(
        host=args.host,
        port=args.port,
        request=request,
        rate=args.rate,
        duration=args.duration,
        max_connections=args.max_connections,
        success_marker=args.success_marker.encode(),
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = asyncio.run(load.run())
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    json.dump(summarize(load, wall, cpu, args.latencies), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

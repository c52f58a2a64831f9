# mypy: disable-error-code="no-untyped-call"
"""The HTTP send benchmark's pure parts and its open-loop generator (against a tiny loopback server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from tools.bench import http_send, open_loop
from tools.bench.open_loop import OpenLoop, ResponseError, http_request, read_response
from tools.fakedns import ZoneResolver

ADD_DOMAIN_OUTPUT = """\
domain bench.test added to server bench/api (id 1); publish these DNS records:

; Verification: proves you control bench.test (then `mtad verify-domain`)
bench.test. IN TXT "postal-verification V73LbeNnF1vlATgPVs5hQMccHsMPy0mL"
; SPF: lets us send for bench.test (merge the include into an existing SPF record)
bench.test. IN TXT "v=spf1 a mx include:spf.postal.example.com ~all"
; DKIM: rsa key, selector postal-ta22q7 (active)
postal-ta22q7._domainkey.bench.test. IN TXT "v=DKIM1; t=s; h=sha256; p=MIIBIj" "ANBgkq;"
; Return path: bounces to mail from bench.test come back through this name
psrp.bench.test. IN CNAME rp.postal.example.com.
bench.test. IN MX 10 mx1.postal.example.com.
"""

WRK_OUTPUT = """\
Running 20s test @ http://127.0.0.1:8080/api/v1/send/message
  1 threads and 32 connections
  6000 requests in 20.00s, 2.1MB read
Requests/sec:    300.00
bench requests 6000
bench duration_us 20000000
bench failures 12
bench socket_errors 0
bench status_errors 2
bench p50_us 41500
bench p90_us 90000
bench p99_us 250250
bench max_us 400000
"""


class RequestTests(SynchronousTestCase):
    def test_split_configs_share_redis_and_database(self) -> None:
        """In the split deployment the accepting process does not deliver and both name one Redis and DB."""
        shared = {"redis_url": "unix:///tmp/r.sock?db=0", "database_url": "sqlite:////tmp/m.sqlite3"}
        api = http_send.mtad_config(Path("/tmp/a"), 1, 2, ("127.0.0.1", 53), 25, False, **shared)
        worker = http_send.mtad_config(Path("/tmp/b"), 3, 4, ("127.0.0.1", 53), 25, True, **shared)
        self.assertEqual((api["delivery"]["enabled"], worker["delivery"]["enabled"]), (False, True))
        for config in (api, worker):
            self.assertEqual(config["redis"]["url"], shared["redis_url"])
            self.assertEqual(config["database"]["url"], shared["database_url"])
        single = http_send.mtad_config(Path("/tmp/c"), 1, 2, ("127.0.0.1", 53), 25)
        self.assertEqual((single["redis"]["url"], single["database"]["url"]), ("", ""))

    def test_body(self) -> None:
        """The request is send/message JSON: one recipient, From the bench domain, ``size`` bytes of text."""
        params = json.loads(http_send.request_body(5120))
        self.assertEqual(params["to"], [http_send.RECIPIENT])
        self.assertEqual(params["from"], "Bench <app@bench.test>")
        self.assertEqual(len(params["plain_body"]), 5120)
        self.assertTrue(all(len(line) < 78 for line in params["plain_body"].split("\n")))

    def test_wrk_script_quotes(self) -> None:
        """The Lua script names the body file and key as escaped Lua strings and counts non-successes."""
        script = http_send.wrk_script(Path('/tmp/a "b"/body.json'), 'k\\e"y')
        self.assertIn('io.open("/tmp/a \\"b\\"/body.json", "rb")', script)
        self.assertIn('wrk.headers["X-Server-API-Key"] = "k\\\\e\\"y"', script)
        self.assertIn('string.find(body, \'"status": "success"\', 1, true)', script)

    def test_parse_wrk(self) -> None:
        """The script's ``bench`` lines become the result; failures do not count as throughput."""
        result = http_send.parse_wrk(WRK_OUTPUT)
        self.assertEqual((result.requests, result.failures, result.status_errors), (6000, 12, 2))
        self.assertEqual((result.p50_ms, result.p99_ms, result.max_ms), (41.5, 250.25, 400.0))
        self.assertEqual(result.succeeded, 5988)
        self.assertAlmostEqual(result.rate, 299.4)

    def test_parse_wrk_without_script_output(self) -> None:
        """wrk output without the script's lines (e.g. a Lua error) is an error, not zeros."""
        self.assertRaises(ValueError, http_send.parse_wrk, "Requests/sec: 300.00\n")


class ZoneTests(SynchronousTestCase):
    def test_published_txt(self) -> None:
        """Every TXT record add-domain prints is found, multi-string records as their strings."""
        records = http_send.published_txt(ADD_DOMAIN_OUTPUT)
        self.assertEqual(
            records,
            {
                "bench.test": [
                    ["postal-verification V73LbeNnF1vlATgPVs5hQMccHsMPy0mL"],
                    ["v=spf1 a mx include:spf.postal.example.com ~all"],
                ],
                "postal-ta22q7._domainkey.bench.test": [["v=DKIM1; t=s; h=sha256; p=MIIBIj", "ANBgkq;"]],
            },
        )

    def test_zone_serves_records_and_mx(self) -> None:
        """The fake DNS answers the verification TXT of bench.test and the sink as dest.test's MX."""
        zone = http_send.bench_zone("127.0.0.3", http_send.published_txt(ADD_DOMAIN_OUTPUT))
        resolver = ZoneResolver(zone)
        answers, _, _ = self.successResultOf(resolver.lookupText("bench.test"))
        texts = {b"".join(a.payload.data).decode() for a in answers if a.type == dns.TXT}
        self.assertIn("postal-verification V73LbeNnF1vlATgPVs5hQMccHsMPy0mL", texts)
        answers, _, _ = self.successResultOf(resolver.lookupMailExchange("dest.test"))
        self.assertEqual([str(a.payload.name) for a in answers], ["mx.dest.test"])


class ProfileTests(SynchronousTestCase):
    def test_py_spy_top(self) -> None:
        """Frames are ranked by own samples, with their inclusive share beside."""
        raw = "main;a;b 6\nmain;a 2\nmain;c;b 2\nnot a stack line\n"
        top = http_send.py_spy_top(raw, count=2)
        self.assertEqual(top, [("b", 0.8, 0.8), ("a", 0.2, 0.8)])
        self.assertEqual(http_send.py_spy_top(""), [])


def _read(data: bytes) -> tuple[int, bytes, bool]:
    """The response in ``data``, read as from a connection that then closes."""

    async def read() -> tuple[int, bytes, bool]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_response(reader)

    return asyncio.run(read())


class ResponseTests(SynchronousTestCase):
    def test_content_length(self) -> None:
        """A Content-Length body is read exactly; HTTP/1.1 keeps the connection unless told to close."""
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"
        self.assertEqual(_read(data), (200, b"hello", True))
        data = b"HTTP/1.1 503 No\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        self.assertEqual(_read(data), (503, b"", False))

    def test_chunked(self) -> None:
        """A chunked body (as Twisted sends for Klein's deferred answers) is decoded, trailers dropped."""
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        data += b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\n"
        self.assertEqual(_read(data), (200, b"hello world", True))

    def test_undelimited(self) -> None:
        """A body with neither length nor chunking is refused rather than read to a guessed end."""
        data = b"HTTP/1.1 200 OK\r\n\r\nbody"
        self.assertRaises(ResponseError, _read, data)


async def _serve(answer: bytes) -> tuple[asyncio.Server, int]:
    """A keep-alive HTTP server on loopback answering every request with ``answer`` as JSON."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class OpenLoopTests(SynchronousTestCase):
    def _send(self, answer: bytes, rate: float, duration: float) -> dict[str, object]:
        async def run() -> dict[str, object]:
            server, port = await _serve(answer)
            try:
                request = http_request(
                    "127.0.0.1", port, "/api/v1/send/message", b"{}", ["X-Server-API-Key: k"]
                )
                load = OpenLoop("127.0.0.1", port, request, rate=rate, duration=duration, max_connections=4)
                wall = await load.run()
                return open_loop.summarize(load, wall, cpu=0.0)
            finally:
                server.close()
                await server.wait_closed()

        return asyncio.run(run())

    def test_fixed_rate(self) -> None:
        """Every due request is sent about on time and answered; latencies are reported."""
        summary = self._send(b'{"status": "success"}', rate=200, duration=0.5)
        self.assertEqual((summary["requests"], summary["succeeded"], summary["errors"]), (100, 100, {}))
        self.assertGreater(float(summary["p50_ms"]), 0)  # type: ignore[arg-type]
        self.assertLessEqual(int(summary["connections_opened"]), 4)  # type: ignore[call-overload]
        self.assertGreater(float(summary["wall_seconds"]), 0.49)  # type: ignore[arg-type]
        self.assertGreaterEqual(float(summary["connection_wait_p99_ms"]), 0)  # type: ignore[arg-type]

    def test_error_envelope_is_not_success(self) -> None:
        """An HTTP 200 carrying Postal's error envelope counts as an error, with the answer quoted."""
        summary = self._send(b'{"status": "error", "data": {"code": "InvalidServerAPIKey"}}', 100, 0.1)
        self.assertEqual((summary["requests"], summary["succeeded"]), (10, 0))
        self.assertEqual(summary["errors"], {"HTTP 200": 10})
        self.assertIn("InvalidServerAPIKey", str(summary["first_error"]))

    def test_refused_connections_are_errors(self) -> None:
        """With nothing listening every request is an error; the generator finishes all the same."""

        async def run() -> dict[str, object]:
            server, port = await _serve(b"")
            server.close()
            await server.wait_closed()
            request = http_request("127.0.0.1", port, "/", b"{}", [])
            load = OpenLoop("127.0.0.1", port, request, rate=100, duration=0.1, max_connections=2)
            return open_loop.summarize(load, await load.run(), cpu=0.0)

        summary = asyncio.run(run())
        self.assertEqual((summary["requests"], summary["succeeded"]), (10, 0))
        self.assertEqual(summary["errors"], {"ConnectionRefusedError": 10})

"""A whole mtad on loopback for integration tests: the real `MtadService` with its embedded Redis, a SQL
database, a fake DNS server and a sink SMTP server standing in for the recipient's MX.

Addresses: mtad listens on 127.0.0.1 (ports chosen by the kernel), delivers from 127.0.0.1 to the sink on
127.0.0.2, and resolves ``example.com`` through the fake DNS on 127.0.0.1. Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mtad.app import MtadService
from mtad.config import parse_config
from mtad.store import credentials, domains, organizations, servers
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from tests.outbound.support import until as _until
from tools.fakedns import FakeDNS, start_fake_dns
from tools.sink import Sink, SinkBehaviour

MX_IP = "127.0.0.2"
ZONE: dict[str, Any] = {
    "example.com": {"MX": [[10, "mx.example.com"]]},
    "mx.example.com": {"A": [MX_IP]},
    "nullmx.test": {"MX": [[0, "."]]},
}


class SMTPTestClient(LineReceiver):
    """Speaks SMTP one command at a time and hands back each reply as (code, text of all lines)."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._replies: list[tuple[int, str]] = []
        self._waiting: list[Deferred[tuple[int, str]]] = []
        self.closed: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)
        if len(line) >= 4 and line[3:4] == b"-":
            return
        code = int(line[:3])
        text = "\n".join(raw[4:].decode("utf-8", "replace") for raw in self._lines)
        self._lines = []
        if self._waiting:
            self._waiting.pop(0).callback((code, text))
        else:
            self._replies.append((code, text))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for waiter in self._waiting:
            waiter.errback(reason)
        self._waiting = []
        if not self.closed.called:
            self.closed.callback(None)

    def reply(self) -> Deferred[tuple[int, str]]:
        """The next reply from the server."""
        if self._replies:
            d: Deferred[tuple[int, str]] = Deferred()
            d.callback(self._replies.pop(0))
            return d
        waiter: Deferred[tuple[int, str]] = Deferred()
        self._waiting.append(waiter)
        return waiter

    async def command(self, line: str | bytes) -> tuple[int, str]:
        self.sendLine(line.encode() if isinstance(line, str) else line)
        return await self.reply()

    async def send_message(self, mail_from: str, rcpt_to: list[str], body: bytes) -> tuple[int, str]:
        """MAIL, RCPT…, DATA and the body; the reply to the end of data (or the first refusal)."""
        code, text = await self.command(f"MAIL FROM:<{mail_from}>")
        if code != 250:
            return code, text
        for rcpt in rcpt_to:
            code, text = await self.command(f"RCPT TO:<{rcpt}>")
            if code not in (250, 251):
                return code, text
        code, text = await self.command("DATA")
        if code != 354:
            return code, text
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n"))
        self.transport.write(stuffed + b"\r\n.\r\n")  # type: ignore[union-attr]
        return await self.reply()


async def smtp_session(reactor: Any, port: int, username: str | None, password: str | None) -> SMTPTestClient:
    """A connected, greeted, EHLO'd and (if given credentials) authenticated client."""
    client = SMTPTestClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)  # type: ignore[no-untyped-call]
    code, text = await client.reply()
    assert code == 220, (code, text)
    code, text = await client.command("EHLO client.test")
    assert code == 250, (code, text)
    if username is not None and password is not None:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        code, text = await client.command(f"AUTH PLAIN {token}")
        assert code == 235, (code, text)
    return client


def message(subject: str = "Hello", to: str = "alice@example.com", size: int = 0) -> bytes:
    """A small RFC 5322 message (``size`` pads the body)."""
    body = "Hi Alice.\r\n" + ("x" * 70 + "\r\n") * (size // 72)
    return (
        f"From: app@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time()}@sender.test>\r\n\r\n{body}"
    ).encode()


async def until(reactor: Any, predicate: Callable[[], bool], limit: float = 15.0) -> None:
    """`tests.outbound.support.until` with room for a whole daemon's start, delivery and recording."""
    await _until(reactor, predicate, limit)


#: The ``twistd`` of this virtualenv: the crash tests run the real daemon, ``twistd -n mtad``, in a child.
TWISTD = str(Path(sys.executable).with_name("twistd"))


class DaemonProcess(ProcessProtocol):
    """A child ``twistd -n mtad``: its output (stdout and stderr together) and when and how it ended."""

    def __init__(self) -> None:
        #: Fires with (exit code, signal) when the child has ended.
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)))


async def start_daemon(
    reactor: Any, config_path: Path, data_dir: str, smtp_port: int, limit: float = 30.0
) -> tuple[IProcessTransport, DaemonProcess]:
    """``twistd -n mtad --config config_path`` in a child process (its pid file in ``data_dir``); returns
    once it answers SMTP on ``smtp_port``. Fails the test, with the child's output, if it ends first or
    does not answer within ``limit`` seconds."""
    child = DaemonProcess()
    pidfile = os.path.join(data_dir, "twistd.pid")
    transport: IProcessTransport = reactor.spawnProcess(
        child,
        TWISTD,
        [TWISTD, "-n", "--pidfile", pidfile, "mtad", "--config", str(config_path)],
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + limit
    while True:
        try:
            client = await smtp_session(reactor, smtp_port, None, None)
        except ConnectionRefusedError:
            if child.ended.called or time.monotonic() > deadline:
                if not child.ended.called:
                    transport.signalProcess("KILL")
                    await child.ended
                output = child.output.decode(errors="replace")
                raise AssertionError(f"mtad did not start:\n{output}") from None
            await deferLater(reactor, 0.1, lambda: None)
            continue
        client.transport.loseConnection()  # type: ignore[union-attr]
        return transport, child


class Installation:
    """The database side of a test installation: one organization, one server, one SMTP credential."""

    def __init__(self, url: str, development: bool = False) -> None:
        self.url = url
        engine = make_engine(url)
        try:
            upgrade_schema(engine)
            now = time.time()
            with engine.begin() as conn:
                organizations.create_organization(conn, "Acme", now, permalink="acme")
                mode = servers.ServerMode.DEVELOPMENT if development else servers.ServerMode.LIVE
                server = servers.create_server(conn, "acme", "Mail", now, mode=mode, permalink="mail")
                created = credentials.create_credential(
                    conn, server.id, credentials.CredentialType.SMTP, now, name="app"
                )
                api = credentials.create_credential(conn, server.id, credentials.CredentialType.API, now)
                domain = domains.create_domain(conn, "sender.test", now, server_id=server.id, rsa_bits=1024)
                domains.verify_domain(conn, domain.id, now)
        finally:
            engine.dispose()
        self.server_id = server.id
        assert created.secret is not None and api.secret is not None
        self.password = created.secret
        self.api_key = api.secret

    def query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store function against the database from the test (outside mtad)."""
        engine = make_engine(self.url)
        try:
            with engine.begin() as conn:
                return fn(conn, *args)
        finally:
            engine.dispose()


class Harness:
    """Starts the fake DNS, the sink and mtad; `stop` undoes it all (registered as test cleanups)."""

    def __init__(
        self,
        reactor: Any,
        database_url: str,
        *,
        development: bool = False,
        sink: SinkBehaviour | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.database_url = database_url
        self.installation = Installation(database_url, development=development)
        # Short: the embedded Redis's unix socket path must fit in 107 bytes.
        self.data_dir = tempfile.mkdtemp(prefix="mtad-it-")
        self.sink = Sink(sink)
        self.sink_port: IListeningPort = self.sink.listen(reactor, MX_IP, 0)
        self.dns: FakeDNS = start_fake_dns(reactor, dict(ZONE))
        self.extra = dict(config or {})
        self.service: MtadService | None = None

    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "general": {"hostname": "mtad.test", "data_dir": self.data_dir},
            "database": {"url": self.database_url},
            "smtp": {
                "listeners": [
                    {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none", "allow_plaintext_auth": True}
                ]
            },
            "http": {"listeners": ["tcp:0:interface=127.0.0.1"]},
            "dns": {"nameservers": [f"{self.dns.host}:{self.dns.port}"], "timeout": 2.0},
            "delivery": {"port": self.sink_port.getHost().port, "poll_interval": 0.05},  # type: ignore[attr-defined]
            "ip_pools": [{"name": "default", "addresses": [{"ip": "127.0.0.1", "hostname": "mta1.test"}]}],
        }
        for section, values in self.extra.items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        return data

    async def start(self) -> MtadService:
        self.service = MtadService(parse_config(self.config()), self.reactor, exit_on_failure=False)
        self.service.startService()
        await self.service.when_started()
        return self.service

    async def stop_mtad(self) -> None:
        if self.service is not None and self.service.running:
            await self.service.stopService()

    async def stop(self) -> None:
        await self.stop_mtad()
        await self.dns.stop()
        result = self.sink_port.stopListening()
        if isinstance(result, Deferred):
            await result
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def port(self, kind: str) -> int:
        assert self.service is not None
        for name, port in self.service.ports.items():
            if name.startswith(kind + " "):
                return int(port.getHost().port)  # type: ignore[attr-defined]
        raise KeyError(kind)

    async def session(self, authenticated: bool = True) -> SMTPTestClient:
        password = self.installation.password if authenticated else None
        return await smtp_session(self.reactor, self.port("smtp"), "app" if authenticated else None, password)

"""``kill -9`` after a 250: the real daemon (``twistd -n mtad``) in a child process, killed and restarted."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IProcessTransport
from twisted.trial import unittest

from mtad.queue.embedded import process_alive
from mtad.store.messages import MessageStatus, list_messages
from tests.integration.support import (
    MX_IP,
    ZONE,
    DaemonProcess,
    Installation,
    message,
    smtp_session,
    start_daemon,
    until,
)
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tests.test_accept import closed_port
from tools.fakedns import start_fake_dns
from tools.sink import Sink


class CrashTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.reactor: Any = real_reactor()
        self.installation = Installation(fresh_database_url(self, SQLITE))
        self.data_dir = tempfile.mkdtemp(prefix="mtad-crash-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.sink = Sink()
        sink_port = self.sink.listen(self.reactor, MX_IP, 0)
        self.addCleanup(sink_port.stopListening)
        self.dns = start_fake_dns(self.reactor, dict(ZONE))
        self.addCleanup(lambda: ensureDeferred(self.dns.stop()))
        self.smtp_port = closed_port()
        self.config_path = Path(self.data_dir) / "mtad.toml"
        self.sink_port = sink_port.getHost().port  # type: ignore[attr-defined]

    def write_config(self, delivery: bool) -> None:
        self.config_path.write_text(
            f"""
[general]
hostname = "mtad.test"
data_dir = "{self.data_dir}"
[database]
url = "{self.installation.url}"
[[smtp.listeners]]
endpoint = "tcp:{self.smtp_port}:interface=127.0.0.1"
tls = "none"
allow_plaintext_auth = true
[http]
listeners = ["tcp:{closed_port()}:interface=127.0.0.1"]
[dns]
nameservers = ["{self.dns.host}:{self.dns.port}"]
[delivery]
enabled = {"true" if delivery else "false"}
port = {self.sink_port}
poll_interval = 0.05
[[ip_pools]]
name = "default"
[[ip_pools.addresses]]
ip = "127.0.0.1"
hostname = "mta1.test"
"""
        )

    async def start_daemon(self) -> tuple[IProcessTransport, DaemonProcess]:
        return await start_daemon(self.reactor, self.config_path, self.data_dir, self.smtp_port)

    async def test_kill_9_after_250_then_restart_delivers(self) -> None:
        """A message answered 250 survives SIGKILL of the daemon and is delivered after a restart."""
        self.write_config(delivery=False)
        transport, child = await self.start_daemon()
        try:
            client = await smtp_session(self.reactor, self.smtp_port, "app", self.installation.password)
            code, text = await client.send_message("app@sender.test", ["alice@example.com"], message("crash"))
            self.assertEqual(code, 250, text)
        finally:
            transport.signalProcess("KILL")
            await child.ended
        self.assertEqual(self.sink.messages, [])
        # The embedded Redis outlives its SIGKILLed parent; the next start must stop it, not share its AOF.
        orphan = int((Path(self.data_dir) / "redis.pid").read_text().strip())
        os.kill(orphan, 0)

        self.write_config(delivery=True)
        transport, child = await self.start_daemon()
        try:
            (delivered,) = await self.sink.wait_for_messages(1)
            self.assertIn(b"Subject: crash", delivered.data)
            self.assertEqual(delivered.recipients, ("alice@example.com",))
            server_id = self.installation.server_id

            def sent() -> bool:
                found = self.installation.query(list_messages, server_id)
                return [m.status for m in found] == [MessageStatus.SENT]

            await until(self.reactor, sent)
        finally:
            transport.signalProcess("TERM")
            exit_code, exit_signal = await child.ended
        # twistd re-raises the signal that stopped it, so a clean SIGTERM stop ends "killed by SIGTERM".
        output = child.output.decode(errors="replace")
        self.assertIn((exit_code, exit_signal), [(0, None), (None, signal.SIGTERM)], output)
        self.assertIn("mtad stopped", output)
        self.assertFalse(process_alive(orphan))

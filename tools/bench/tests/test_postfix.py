# mypy: disable-error-code="no-untyped-call"
"""The private Postfix instance: generated configuration, and (when set up) a real relay through it."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tools.bench import relay
from tools.bench.postfix import (
    DEFAULT_CACHE,
    PostfixConfig,
    PostfixInstall,
    PostfixInstance,
    PostfixNotInstalled,
    ensure_port_free,
    find_install,
    main_cf,
    master_cf,
)


def _settings(text: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in text.splitlines())


class ConfigTests(SynchronousTestCase):
    def test_main_cf_redirects_everything(self) -> None:
        """main.cf keeps config, queue and data in the work dir and programs in the unpacked tree."""
        install = PostfixInstall(Path("/cache/postfix"))
        settings = _settings(main_cf(install, Path("/w"), PostfixConfig()))
        self.assertEqual(settings["config_directory"], "/w/etc")
        self.assertEqual(settings["queue_directory"], "/w/queue")
        self.assertEqual(settings["data_directory"], "/w/data")
        self.assertEqual(settings["daemon_directory"], "/cache/postfix/usr/lib/postfix/sbin")
        self.assertEqual(settings["shlib_directory"], "/cache/postfix/usr/lib/postfix")
        self.assertIn("LD_LIBRARY_PATH", settings["import_environment"].split())

    def test_main_cf_relay_only(self) -> None:
        """Mail relays to the bracketed sink (no DNS), only for loopback clients, never locally."""
        config = PostfixConfig(relay=("127.0.0.9", 2526), source_ip="127.0.0.8")
        settings = _settings(main_cf(PostfixInstall(Path("/p")), Path("/w"), config))
        self.assertEqual(settings["relayhost"], "[127.0.0.9]:2526")
        self.assertEqual(settings["smtp_bind_address"], "127.0.0.8")
        self.assertEqual(settings["mynetworks"], "127.0.0.0/8")
        self.assertEqual(settings["smtpd_relay_restrictions"], "permit_mynetworks, reject")
        self.assertEqual(settings["mydestination"], "")
        self.assertTrue(settings["local_transport"].startswith("error:"))

    def test_overrides_win(self) -> None:
        """Overrides replace defaults and add settings."""
        config = PostfixConfig(overrides={"in_flow_delay": "0", "default_process_limit": "200"})
        settings = _settings(main_cf(PostfixInstall(Path("/p")), Path("/w"), config))
        self.assertEqual(settings["in_flow_delay"], "0")
        self.assertEqual(settings["default_process_limit"], "200")

    def test_master_cf(self) -> None:
        """master.cf listens on the configured address, runs nothing chrooted and has no local delivery."""
        text = master_cf(PostfixConfig(listen=("127.0.0.1", 10099)))
        lines = [line.split() for line in text.splitlines()]
        self.assertEqual(lines[0], ["127.0.0.1:10099", "inet", "n", "-", "n", "-", "-", "smtpd"])
        self.assertEqual({line[4] for line in lines}, {"n"})
        self.assertNotIn("local", {line[-1] for line in lines})
        self.assertIn("postlogd", {line[-1] for line in lines})

    def test_find_install_missing(self) -> None:
        """Without the unpacked package, find_install says to run setup-postfix."""
        error = self.assertRaises(PostfixNotInstalled, find_install, Path(self.mktemp()))
        self.assertIn("setup-postfix", str(error))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class PortTests(SynchronousTestCase):
    def test_ensure_port_free(self) -> None:
        """A listening address is reported as in use; a free one passes."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            address = listener.getsockname()
            error = self.assertRaises(RuntimeError, ensure_port_free, address)
            self.assertIn("already in use", str(error))
        ensure_port_free(address)


class RealPostfixTests(SynchronousTestCase):
    """A small real run: needs tools/bench/setup-postfix to have run, and root (Postfix's daemons)."""

    def setUp(self) -> None:
        try:
            self.install = find_install()
        except PostfixNotInstalled as e:
            raise self.skipTest(str(e)) from None
        if os.geteuid() != 0:
            raise self.skipTest("a private Postfix needs root to start")

    def test_relay_both_modes(self) -> None:
        """Postfix relays every message to the sink in both modes; rates, latency and memory are measured."""
        # Postfix's daemons (user postfix) must reach the queue: trial's temp dirs are 0700, so use .cache.
        DEFAULT_CACHE.mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="test-", dir=DEFAULT_CACHE))
        self.addCleanup(shutil.rmtree, workdir, True)
        workdir.chmod(0o755)
        sink_address = ("127.0.0.3", _free_port("127.0.0.3"))
        config = PostfixConfig(listen=("127.0.0.1", _free_port("127.0.0.1")), relay=sink_address)
        postfix = PostfixInstance(self.install, workdir / "postfix", config)
        postfix.start()
        self.addCleanup(postfix.stop)
        self.assertTrue(postfix.process_roots())
        load = relay.Load(messages=60, sessions=4, size=2048, probe_interval=0.01, drain_timeout=20)
        for mode in relay.MODES:
            sink = relay.SmtpSink(self.install, workdir / f"sink-{mode}", sink_address)
            sink.start()
            self.addCleanup(sink.stop)
            m = relay.measure(postfix, self.install, mode, load, sink.dump_dir)
            sink.stop()
            self.assertEqual((m.system, m.mode, m.delivered, m.messages), ("postfix", mode, 60, 60))
            self.assertGreater(m.accepted_per_second, 0)
            self.assertGreater(m.delivered_per_second, 0)
            self.assertGreater(len(m.latencies_ms), 0)
            self.assertGreater(min(m.latencies_ms), -50)
            self.assertGreater(m.peak_pss_kib, 1024)
            self.assertGreaterEqual(m.peak_rss_kib, m.peak_pss_kib)
        self.assertIn("relay=127.0.0.3", (workdir / "postfix" / "maillog").read_text())

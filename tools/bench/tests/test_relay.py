# mypy: disable-error-code="no-untyped-call"
"""Pure parts of the relay benchmark runner: statistics, parsing the sink's dumps, commands, the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tools.bench import probe, relay
from tools.bench.postfix import PostfixInstall


def _measurement(system: str = "postfix", mode: probe.Mode = "new", **changes: object) -> relay.Measurement:
    values: dict[str, object] = {
        "system": system,
        "mode": mode,
        "messages": 100,
        "accept_seconds": 2.0,
        "delivered": 100,
        "duplicates": 0,
        "deliver_seconds": 4.0,
        "latencies_ms": tuple(float(n) for n in range(1, 101)),
        "probe_errors": 0,
        "peak_rss_kib": 10240,
        "peak_pss_kib": 2048,
    }
    values.update(changes)
    return relay.Measurement(**values)  # type: ignore[arg-type]


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self) -> None:
        """p50 and p99 of 1..100 are 50 and 99 (nearest rank, no float rounding up to 100)."""
        values = [float(n) for n in range(100, 0, -1)]
        self.assertEqual(relay.percentile(values, 0.50), 50.0)
        self.assertEqual(relay.percentile(values, 0.99), 99.0)
        self.assertEqual(relay.percentile(values, 1.0), 100.0)

    def test_small_samples(self) -> None:
        """With one sample every percentile is that sample; with none it is NaN."""
        self.assertEqual(relay.percentile([7.0], 0.99), 7.0)
        self.assertEqual(relay.percentile([7.0], 0.0), 7.0)
        nan = relay.percentile([], 0.5)
        self.assertNotEqual(nan, nan)


class MeasurementTests(SynchronousTestCase):
    def test_rates(self) -> None:
        """Accepted/s divides by smtp-source's wall time, delivered/s by the end-to-end time."""
        m = _measurement(delivered=80)
        self.assertEqual(m.accepted_per_second, 50.0)
        self.assertEqual(m.delivered_per_second, 20.0)
        self.assertFalse(m.complete)
        self.assertTrue(_measurement().complete)

    def test_summary_takes_medians(self) -> None:
        """Each column of the summary is the median over the runs, counted problems are summed."""
        runs = [
            _measurement(accept_seconds=1.0, duplicates=1),
            _measurement(accept_seconds=2.0, delivered=99),
            _measurement(accept_seconds=4.0, peak_rss_kib=1024 * 100),
        ]
        summary = relay.summarize(runs)
        self.assertEqual(summary.runs, 3)
        self.assertEqual(summary.accepted_per_second, 50.0)
        self.assertEqual(summary.p50_ms, 50.0)
        self.assertEqual(summary.p99_ms, 99.0)
        self.assertEqual(summary.peak_rss_mib, 10.0)
        self.assertEqual(summary.peak_pss_mib, 2.0)
        self.assertEqual(summary.incomplete_runs, 1)
        self.assertEqual(summary.duplicates, 1)

    def test_report_ratios(self) -> None:
        """The report has one row per system and mode, and mtad/Postfix ratios for matching modes."""
        postfix = relay.summarize([_measurement()])
        mtad = relay.summarize([_measurement("mtad1", accept_seconds=1.0, peak_pss_kib=4096)])
        text = relay.report([postfix, mtad])
        self.assertIn("ratio to postfix", text)
        ratio_line = text.splitlines()[-1].split()
        self.assertEqual(ratio_line[:2], ["mtad1", "new"])
        self.assertEqual(ratio_line[2:], ["2.00", "1.00", "1.00", "1.00", "1.00", "2.00"])
        self.assertEqual(mtad.ratio(postfix)["accepted_per_second"], 2.0)

    def test_report_without_baseline(self) -> None:
        """Without Postfix numbers the report has no ratio section."""
        self.assertNotIn("ratio", relay.report([relay.summarize([_measurement("mtad1")])]))


class DumpTests(SynchronousTestCase):
    def test_read_dumps(self) -> None:
        """Recipients come from smtp-sink's X-Rcpt-Args headers and the time from the file's mtime."""
        directory = Path(self.mktemp())
        directory.mkdir()
        dump = directory / "0a1b2c3d"
        dump.write_bytes(
            b"X-Client-Addr: 127.0.0.2\nX-Client-Proto: ESMTP\nX-Mail-Args: <a@b.test>\n"
            b"X-Rcpt-Args: <17rcpt@dest.test> ORCPT=rfc822;17rcpt@dest.test\n"
            b"X-Rcpt-Args: <probe3@dest.test>\nReceived: from x\n\nX-Rcpt-Args: <body@not.header>\n"
        )
        os.utime(dump, ns=(1_000_000_000, 1_234_567_890_123))
        (directory / "subdir").mkdir()
        self.assertEqual(
            relay.read_dumps(directory),
            [relay.Delivery(("17rcpt@dest.test", "probe3@dest.test", "body@not.header"), 1_234_567_890_123)],
        )
        self.assertEqual(relay.count_dumps(directory), 2)

    def test_tally(self) -> None:
        """Bulk messages count once at their first arrival; probes are keyed by number; copies are counted."""
        result = relay.tally(
            [
                relay.Delivery(("1rcpt@dest.test",), 30),
                relay.Delivery(("1rcpt@dest.test",), 10),
                relay.Delivery(("2rcpt@dest.test", "3rcpt@dest.test"), 20),
                relay.Delivery(("probe7@dest.test",), 25),
                relay.Delivery(("probe7@dest.test",), 15),
                relay.Delivery(("prober@dest.test",), 40),
            ]
        )
        self.assertEqual(
            result.bulk,
            {"1rcpt@dest.test": 10, "2rcpt@dest.test": 20, "3rcpt@dest.test": 20, "prober@dest.test": 40},
        )
        self.assertEqual(result.probes, {7: 15})
        self.assertEqual(result.duplicates, 1)

    def test_probe_message(self) -> None:
        """A probe is about the requested size, addressed to its numbered probe recipient, CRLF lines."""
        message = probe.probe_message(42, 5120)
        self.assertIn(b"To: <probe42@dest.test>\r\n", message)
        self.assertLess(abs(len(message) - 5120), 300)
        self.assertNotIn(b"\n", message.replace(b"\r\n", b""))


class CommandTests(SynchronousTestCase):
    def test_smtp_source_modes(self) -> None:
        """Only reuse mode passes -d (don't disconnect); -N numbers recipients; the target comes last."""
        install = PostfixInstall(Path("/pf"))
        load = relay.Load(messages=20000, sessions=20, size=5120)
        [new] = relay.smtp_source_commands(install, [("127.0.0.1", 10025)], "new", load)
        [reuse] = relay.smtp_source_commands(install, [("127.0.0.1", 10025)], "reuse", load)
        self.assertEqual(new[0], "/pf/usr/sbin/smtp-source")
        self.assertNotIn("-d", new)
        self.assertEqual(reuse, [*new[:-1], "-d", "127.0.0.1:10025"])
        for flag, value in (("-s", "20"), ("-m", "20000"), ("-l", "5120"), ("-t", "rcpt@dest.test")):
            self.assertEqual(new[new.index(flag) + 1], value)
        self.assertIn("-N", new)

    def test_smtp_source_split(self) -> None:
        """Several addresses share messages and sessions exactly, each source with its own recipient."""
        install = PostfixInstall(Path("/pf"))
        load = relay.Load(messages=20001, sessions=5)
        commands = relay.smtp_source_commands(install, [("127.0.0.1", 1), ("127.0.0.1", 2)], "new", load)
        self.assertEqual([c[c.index("-m") + 1] for c in commands], ["10001", "10000"])
        self.assertEqual([c[c.index("-s") + 1] for c in commands], ["3", "2"])
        self.assertEqual([c[c.index("-t") + 1] for c in commands], ["rcpt0@dest.test", "rcpt1@dest.test"])
        self.assertEqual([c[-1] for c in commands], ["127.0.0.1:1", "127.0.0.1:2"])

    def test_parse_args_rejects_unknown(self) -> None:
        """Unknown modes and systems are command-line errors naming the bad value."""
        self.assertRaises(SystemExit, relay.parse_args, ["--modes", "new,bogus"])
        self.assertRaises(SystemExit, relay.parse_args, ["--systems", "exim"])
        args = relay.parse_args(["--runs", "5", "--postfix-set", "in_flow_delay=0"])
        self.assertEqual((args.runs, args.postfix_set), (5, ["in_flow_delay=0"]))


class ProcessTests(SynchronousTestCase):
    def test_process_tree_and_memory(self) -> None:
        """The process tree of this process includes a child it started; our own RSS and PSS are nonzero."""
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdin.close)  # type: ignore[union-attr]
        tree = relay.process_tree([os.getpid()])
        self.assertIn(os.getpid(), tree)
        self.assertIn(child.pid, tree)
        self.assertNotIn(1, tree)
        rss, pss = relay.memory_kib(os.getpid())
        self.assertGreater(rss, 0)
        self.assertGreater(pss, 0)
        self.assertEqual(relay.memory_kib(2**22 + 1), (0, 0))

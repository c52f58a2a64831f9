# mypy: disable-error-code="no-untyped-call"
"""The webhook benchmark: its receiver's records, the ``--webhook`` options, and both measurements run at
tiny size against real parts (Redis, SQLite, a twistd mtad, the receiver process)."""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
from pathlib import Path
from unittest import SkipTest

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from mtad.queue.embedded import EmbeddedRedisError, find_redis_server
from mtad.webhooks.signing import WebhookSigner
from tools.bench import mtad_system, relay, webhooks
from tools.bench.relay import Summary


def _key_file(directory: Path) -> tuple[Path, WebhookSigner]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = directory / "signing.key"
    path.write_bytes(pem)
    return path, WebhookSigner(pem)


def _headers(signature: dict[str, str]) -> dict[bytes, bytes]:
    return {name.lower().encode(): value.encode() for name, value in signature.items()}


class RecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="hooks-"))
        self.key, self.signer = _key_file(self.directory)

    def test_fields_and_valid_signatures(self) -> None:
        body = webhooks.message_sent_body("u-1", 1000.5, 7)
        line = webhooks.record(1001.0, _headers(self.signer.sign(body)), body, webhooks._Verifier(self.key))
        self.assertEqual(
            (line["event"], line["uuid"], line["ts"], line["pts"], line["mts"], line["to"]),
            ("MessageSent", "u-1", 1000.5, 1000.5, 1000.5, "7rcpt@dest.test"),
        )
        self.assertEqual((line["sig"], line["valid"], line["t"]), (True, True, 1001.0))

    def test_signature_of_other_bytes_does_not_verify(self) -> None:
        body = webhooks.message_sent_body("u-1", 1000.5, 7)
        signature = self.signer.sign(body + b" ")
        line = webhooks.record(1001.0, _headers(signature), body, webhooks._Verifier(self.key))
        self.assertEqual((line["sig"], line["valid"]), (True, False))

    def test_missing_header(self) -> None:
        body = webhooks.message_sent_body("u-1", 1000.5, 7)
        headers = _headers(self.signer.sign(body))
        del headers[b"x-postal-signature-kid"]
        line = webhooks.record(1001.0, headers, body, webhooks._Verifier(self.key))
        self.assertEqual((line["sig"], line["valid"]), (False, False))
        self.assertNotIn("valid", webhooks.record(1001.0, headers, body, None))


class OptionTests(SynchronousTestCase):
    def test_process_config_webhook(self) -> None:
        """``webhook`` lets the guard send to loopback; without it nothing changes."""
        kwargs = dict(
            data_dir=Path("/tmp/x"),
            listen=("127.0.0.1", 1),
            http_port=2,
            nameserver=("127.0.0.1", 3),
            sink_port=25,
        )
        plain = mtad_system.process_config(**kwargs)  # type: ignore[arg-type]
        hooked = mtad_system.process_config(**kwargs, webhook=True)  # type: ignore[arg-type]
        self.assertNotIn("webhooks", plain)
        self.assertEqual(hooked.pop("webhooks"), {"allowed_networks": ["127.0.0.0/8"]})
        self.assertEqual(hooked, plain)

    def test_relay_systems(self) -> None:
        systems = ["postfix", "mtad1"]
        self.assertEqual(relay.systems_to_run(systems, "off"), ["postfix", "mtad1"])
        self.assertEqual(relay.systems_to_run(systems, "on"), ["postfix", "mtad1+wh"])
        self.assertEqual(relay.systems_to_run(systems, "both"), ["postfix", "mtad1", "mtad1+wh"])
        self.assertEqual(relay.parse_args(["--webhook"]).webhook, "on")
        self.assertEqual(relay.parse_args([]).webhook, "off")

    def test_relay_webhook_ratio(self) -> None:
        def summary(system: str, rate: float) -> Summary:
            return Summary(system, "new", 3, rate, rate, 100.0, 200.0, 10.0, 10.0, 0, 0, 0)

        text = relay.webhook_report([summary("mtad1", 500.0), summary("mtad1+wh", 450.0)])
        self.assertIn("mtad1+wh", text)
        self.assertIn("0.90", text)
        self.assertEqual(relay.webhook_report([summary("mtad1", 500.0)]), "")


def _options(**overrides: object) -> argparse.Namespace:
    options = webhooks.parse_args([])
    for name, value in overrides.items():
        setattr(options, name, value)
    return options


class ReceiverTests(SynchronousTestCase):
    def test_answers_and_records(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="hooks-"))
        key, signer = _key_file(directory)
        receiver = mtad_system.start_webhook_receiver(directory, verify_key=key)
        self.addCleanup(receiver.stop)
        body = webhooks.message_sent_body("u-2", 1000.0, 1)
        request = urllib.request.Request(receiver.url, body, {**signer.sign(body), "Content-Type": "x"})
        with urllib.request.urlopen(request, timeout=10) as response:
            self.assertEqual((response.status, response.read()), (200, b"ok"))
        lines = webhooks._wait_for_records(receiver, 1, 10)
        self.assertEqual([(r["uuid"], r["sig"], r["valid"]) for r in lines], [("u-2", True, True)])
        self.assertEqual(json.loads(receiver.records.read_text())["bytes"], len(body))


class SmallRunTests(SynchronousTestCase):
    def test_dispatch(self) -> None:
        """Every queued request reaches the receiver once, signed with the 2048-bit key."""
        try:
            find_redis_server()
        except EmbeddedRedisError as e:
            raise SkipTest(f"no redis-server: {e}") from e
        workdir = Path(tempfile.mkdtemp(prefix="hooks-"))
        result = webhooks.measure_dispatch(_options(requests=30), workdir / "d")
        self.assertEqual(
            (result.requests, result.received, result.distinct, result.signed, result.valid, result.failed),
            (30, 30, 30, 30, 30, 0),
        )
        self.assertGreater(result.rate, 0)
        self.assertGreater(result.cpu_share, 0)
        self.assertIn("30 requests", webhooks.describe_dispatch(1, result))

    def test_end_to_end(self) -> None:
        """A real mtad with a webhook: one verified MessageSent per message, delays after delivery."""
        workdir = Path(tempfile.mkdtemp(prefix="hooks-"))
        result = webhooks.measure_end_to_end(_options(rate=10.0, seconds=2.0, sink="python"), workdir / "e")
        self.assertEqual((result.accepted, result.sent, len(result.delays)), (20, 20, 20))
        self.assertEqual((result.signed, result.valid), (result.webhooks, result.webhooks))
        # Receipt follows the delivery it reports (small clock-resolution slack), within the run.
        self.assertGreater(min(result.delays), -0.05)
        self.assertLess(max(result.delays), 60)
        self.assertTrue(all(a >= d - 0.05 for a, d in zip(result.accept_delays, result.delays, strict=True)))
        self.assertIn("p99", webhooks.describe_end_to_end(1, result))

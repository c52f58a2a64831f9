"""Tests for mtad.bounces.return_path: the VERP secret, and the envelope sender deliveries use."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mtad.bounces.return_path import SECRET_FILE, ReturnPath, load_or_create_secret, verp_secret
from mtad.mail.verp import decode_return_path, encode_return_path
from mtad.outbound.deliverer import Deliverer, DelivererConfig
from mtad.outbound.mx import MXResolver, ResolverConfig
from mtad.queue.limits import ConnectionLimiter
from mtad.queue.model import NewMessage
from tests.outbound.test_delivery import BODY, NOW, ServiceTestCase
from tools.fakedns import start_fake_dns
from tools.sink import Sink

SECRET = b"0123456789abcdef-test-secret"


class SecretTests(SynchronousTestCase):
    """Where the VERP secret comes from."""

    def test_configured_secret_wins(self) -> None:
        """A configured ``domains.verp_secret`` is used as is, and nothing is written to data_dir."""
        data_dir = Path(self.mktemp())
        self.assertEqual(verp_secret("a configured secret!", data_dir), b"a configured secret!")
        self.assertFalse((data_dir / SECRET_FILE).exists())

    def test_generated_once_and_kept(self) -> None:
        """Without one, a secret is generated in data_dir (mode 0600) and read back the same every time."""
        data_dir = Path(self.mktemp())
        first = verp_secret("", data_dir)
        self.assertGreaterEqual(len(first), 32)
        self.assertEqual(verp_secret("", data_dir), first)
        mode = stat.S_IMODE(os.stat(data_dir / SECRET_FILE).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(os.listdir(data_dir), [SECRET_FILE])

    def test_another_process_was_first(self) -> None:
        """A secret another process wrote in the meantime is the one used (processes must agree)."""
        path = Path(self.mktemp()) / SECRET_FILE
        path.parent.mkdir()
        path.write_bytes(b"written-by-the-other-process\n")
        self.assertEqual(load_or_create_secret(path), b"written-by-the-other-process")

    def test_short_secret_in_file_refused(self) -> None:
        """A file holding too short a secret is an error, not a weak signature."""
        path = Path(self.mktemp())
        path.write_bytes(b"short\n")
        with self.assertRaises(ValueError):
            load_or_create_secret(path)

    def test_envelope_sender(self) -> None:
        """Each message gets its own signed address; the null reverse-path stays null."""
        rp = ReturnPath(SECRET, "rp.mtad.test")
        sender = rp.envelope_sender(7, 1234, "app@example.test")
        self.assertEqual(sender, encode_return_path(SECRET, 7, 1234, "rp.mtad.test"))
        match = decode_return_path(SECRET, sender, ["rp.mtad.test"])
        assert match is not None
        self.assertEqual((match.server_id, match.message_id), (7, 1234))
        self.assertEqual(rp.envelope_sender(7, 1234, ""), "")
        self.assertNotIn(b"0123", repr(rp).encode())


class DeliveryTests(ServiceTestCase):
    """The delivery service sends with the VERP return path (a real sink sees it)."""

    async def test_sink_sees_verp_mail_from(self) -> None:
        """MAIL FROM is the message's VERP address at the return path domain; ``<>`` stays ``<>``."""
        dns = start_fake_dns(
            reactor,
            {"example.test": {"MX": [[10, "mx1.example.test"]]}, "mx1.example.test": {"A": ["127.0.0.2"]}},
            tcp=False,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(dns.stop()))
        sink = Sink()
        listening = sink.listen(reactor, "127.0.0.2", 0)
        self.addCleanup(listening.stopListening)
        resolver = MXResolver(
            reactor, reactor, reactor, ResolverConfig((dns.address,), timeout=3, attempts=1), random.Random(1)
        )
        deliverer = Deliverer(
            reactor,
            reactor,
            resolver,
            ConnectionLimiter(self.redis, self.keys),
            DelivererConfig(port=listening.getHost().port),  # type: ignore[attr-defined]
            random.Random(1),
        )
        messages = [
            NewMessage(token="t-a", server_id=7, scope="outgoing", mail_from="app@mtad.test", rcpt_to=rcpt)
            for rcpt in ("a@example.test", "b@example.test")
        ]
        ids = await self.queue.enqueue(BODY, messages, NOW)
        null = await self.queue.enqueue(
            BODY,
            [NewMessage(token="t-n", server_id=7, scope="outgoing", mail_from="", rcpt_to="c@example.test")],
            NOW,
        )
        service = self.start(deliverer, clock=reactor, return_path=ReturnPath(SECRET, "RP.mtad.test"))
        events = await self.wait_for_deliveries(3)
        self.assertEqual({e["status"] for e in events}, {"Sent"})
        # The events (and so the history) keep the sender's own address.
        self.assertEqual({e["mail_from"] for e in events}, {"app@mtad.test", ""})
        senders = {m.recipients[0]: m.mail_from for m in sink.messages}
        self.assertEqual(
            senders,
            {
                "a@example.test": encode_return_path(SECRET, 7, ids[0], "rp.mtad.test"),
                "b@example.test": encode_return_path(SECRET, 7, ids[1], "rp.mtad.test"),
                "c@example.test": "",
            },
        )
        self.assertNotEqual(senders["a@example.test"], senders["b@example.test"])
        self.assertEqual(null, [ids[1] + 1])
        await service.stopService()

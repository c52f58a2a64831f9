"""DKIM signing at delivery: which keys sign which message, and when a message goes out unsigned."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dkim
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath

from mtad.mail.dkim import DKIMKey, DKIMSigner, UnsignableMessageError
from mtad.mail.dkim_keys import dkim_txt_value, load_or_create_key
from mtad.outbound.signing import MessageSigner, keys_for
from mtad.outbound.signing_pool import SigningFailed, SigningUnavailable
from mtad.store import domains, organizations, servers
from tests.store.support import DatabaseTestCase, SynchronousDatabase

BODY = (
    b"From: App <app@sender.test>\r\nTo: a@example.com\r\nSubject: hi\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
)


class SigningTests(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        now = time.time()

        def make(conn: Any) -> tuple[int, int]:
            organizations.create_organization(conn, "Acme", now, permalink="acme")
            server = servers.create_server(conn, "acme", "Mail", now, permalink="mail")
            other = servers.create_server(conn, "acme", "Other", now, permalink="other")
            domain = domains.create_domain(conn, "sender.test", now, server_id=server.id, rsa_bits=1024)
            domains.verify_domain(conn, domain.id, now)
            domains.create_domain(conn, "unverified.test", now, server_id=server.id, rsa_bits=1024)
            return server.id, other.id

        self.server_id, self.other_id = self.transaction(make)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(time.time())

    def records(self) -> dict[bytes, bytes]:
        def load(conn: Any) -> dict[bytes, bytes]:
            domain = domains.get_domain_by_name(conn, "sender.test")
            return {
                f"{k.selector}._domainkey.sender.test.".encode(): dkim_txt_value(
                    k.algorithm, k.public_key
                ).encode()
                for k in domains.list_keys(conn, domain.id)
            }

        return self.transaction(load)

    def test_keys_only_for_the_servers_verified_domains(self) -> None:
        """A verified domain of the server has its active key; another server's or an unverified one none."""
        (key,) = self.transaction(keys_for, self.server_id, "sender.test")
        self.assertEqual((key.domain, key.algorithm), ("sender.test", "rsa"))
        self.assertEqual(self.transaction(keys_for, self.other_id, "sender.test"), ())
        self.assertEqual(self.transaction(keys_for, self.server_id, "unverified.test"), ())
        self.assertEqual(self.transaction(keys_for, 999, "sender.test"), ())

    async def test_signed_with_the_from_domain_key(self) -> None:
        """A message from a verified domain is signed so that its published record verifies it."""
        signer = MessageSigner(self.database, self.clock)
        signed = await signer.sign(self.server_id, 1, BODY)
        records = self.records()
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: records[name]))

    async def test_unsigned_without_a_key_or_a_from(self) -> None:
        """No From, or a From domain without a verified key: the body goes out as it was."""
        signer = MessageSigner(self.database, self.clock)
        self.assertEqual(
            await signer.sign(self.server_id, 1, b"To: a@example.com\r\n\r\nx\r\n"),
            b"To: a@example.com\r\n\r\nx\r\n",
        )
        other = BODY.replace(b"sender.test", b"unverified.test")
        self.assertEqual(await signer.sign(self.server_id, 1, other), other)

    async def test_keys_cached(self) -> None:
        """Keys of one (server, domain) are read once per cache period."""
        signer = MessageSigner(self.database, self.clock, cache_seconds=60)
        await signer.sign(self.server_id, 1, BODY)
        await signer.sign(self.server_id, 2, BODY)
        self.assertEqual(self.database.calls, 1)
        self.clock.advance(61)
        await signer.sign(self.server_id, 3, BODY)
        self.assertEqual(self.database.calls, 2)

    async def test_fallback_key_signs_mail_without_a_domain_key(self) -> None:
        """With an installation key, mail from a domain without a key is signed as the return-path domain."""
        path = FilePath(self.mktemp())
        pem, public = load_or_create_key(Path(path.path), rsa_bits=1024)
        self.assertEqual(load_or_create_key(Path(path.path)), (pem, public))  # kept, not regenerated
        fallback = DKIMKey(domain="rp.mtad.test", selector="postal", private_key_pem=pem)
        signer = MessageSigner(self.database, self.clock, fallback=fallback)
        other = BODY.replace(b"sender.test", b"unverified.test")
        signed = await signer.sign(self.server_id, 1, other)
        self.assertIn(b"d=rp.mtad.test;", signed.split(b"\r\n\r\n")[0])
        record = dkim_txt_value("rsa", public).encode()
        records = {b"postal._domainkey.rp.mtad.test.": record}
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: records[name]))
        own = await signer.sign(self.server_id, 2, BODY)
        self.assertIn(b"d=sender.test;", own.split(b"\r\n\r\n")[0])

    async def test_signing_elsewhere(self) -> None:
        """With sign_elsewhere (a worker process), the keys and clock go there and its answer is used."""
        calls: list[tuple[tuple[str, ...], float]] = []
        inline = DKIMSigner()

        async def sign_elsewhere(message: bytes, keys: Sequence[DKIMKey], now: float) -> bytes:
            calls.append((tuple(k.domain for k in keys), now))
            signed: bytes = await deferToThread(inline.sign, message, keys, now)
            return signed

        signer = MessageSigner(self.database, self.clock, sign_elsewhere=sign_elsewhere)
        signed = await signer.sign(self.server_id, 1, BODY)
        records = self.records()
        self.assertEqual(calls, [(("sender.test",), self.clock.seconds())])
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: records[name]))

    async def test_signed_inline_when_no_worker_can(self) -> None:
        """A pool without a running worker (SigningUnavailable) costs the message nothing: signed inline."""
        tried: list[bytes] = []

        async def unavailable(message: bytes, keys: Sequence[DKIMKey], now: float) -> bytes:
            tried.append(message)
            raise SigningUnavailable("no signing worker is running")

        signer = MessageSigner(self.database, self.clock, sign_elsewhere=unavailable)
        signed = await signer.sign(self.server_id, 1, BODY)
        records = self.records()
        self.assertEqual(tried, [BODY])
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: records[name]))

    async def test_signed_inline_when_the_worker_fails(self) -> None:
        """A worker's own failure (not the message's) costs the message nothing: signed inline."""

        async def failing(message: bytes, keys: Sequence[DKIMKey], now: float) -> bytes:
            raise SigningFailed("AttributeError: the worker's code is not the daemon's")

        signer = MessageSigner(self.database, self.clock, sign_elsewhere=failing)
        signed = await signer.sign(self.server_id, 1, BODY)
        records = self.records()
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: records[name]))

    async def test_worker_errors_are_the_signers(self) -> None:
        """An unsignable message reported by a worker goes out unsigned, as it would signed inline."""

        async def unsignable(message: bytes, keys: Sequence[DKIMKey], now: float) -> bytes:
            raise UnsignableMessageError("no From field")

        signer = MessageSigner(self.database, self.clock, sign_elsewhere=unsignable)
        self.assertEqual(await signer.sign(self.server_id, 1, BODY), BODY)

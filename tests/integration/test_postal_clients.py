# mypy: disable-error-code="no-untyped-call"
"""Real Postal clients, unmodified, against mtad's ``/api/v1``: django-anymail's Postal backend and postal-py.

Both clients are blocking (requests, niquests), so each call runs in a thread of the reactor's pool while
the reactor goes on serving mtad. What they send is checked where it lands, at the sink MX: envelope,
headers, bodies, attachments, and the DKIM signature of the From domain, verified by dkimpy and (when
installed) by Mail::DKIM, the strict verifier of ``tests/mail/test_dkim.py``.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import gc
import logging
import os
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any, TypeVar, cast

import dkim
from twisted.internet import tcp
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.trial import unittest

from mtad.mail.dkim_keys import dkim_txt_value
from mtad.mail.verp import decode_return_path
from mtad.store.domains import get_domain_by_name, list_keys
from mtad.store.messages import MessageStatus, list_messages
from tests.integration.support import Harness, until
from tests.mail.test_dkim import MAIL_DKIM_SCRIPT
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tools.sink import SinkMessage

T = TypeVar("T")

PARSER = email.parser.BytesParser(policy=email.policy.default)
#: An attachment with every byte value, so a client's or our base64 handling cannot hide a mistake.
ATTACHMENT = bytes(range(256)) * 4


def configure_django() -> None:
    """Django's settings, once per process: the smallest configuration that sends mail through anymail.

    The API URL and key differ per test, so they are given to ``get_connection`` (anymail takes every
    setting as a keyword there too) rather than to ``ANYMAIL``.
    """
    import django  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    if not settings.configured:
        settings.configure(EMAIL_BACKEND="anymail.backends.postal.EmailBackend", ANYMAIL={})
        django.setup()


def parse(data: bytes) -> EmailMessage:
    message: EmailMessage = PARSER.parsebytes(data)
    return message


def body_text(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    return cast(str, part.get_content()).replace("\r\n", "\n")


def attachments(message: EmailMessage) -> dict[str, tuple[str, bytes]]:
    """Every attachment by file name: its content type and decoded content."""
    found = {}
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found[str(part.get_filename())] = (part.get_content_type(), payload)
    return found


class PostalClientTests(unittest.TestCase):
    """Each test starts a whole mtad on loopback and sends through one client as an application would."""

    timeout = 60

    def harness(self) -> Harness:
        harness = Harness(real_reactor(), fresh_database_url(self, SQLITE))
        self.addCleanup(lambda: ensureDeferred(harness.stop()))
        # Cleanups run last-registered first: this one runs before mtad stops, the clients' close after it.
        self.addCleanup(lambda: ensureDeferred(self.http_connections_closed(harness)))
        return harness

    async def http_connections_closed(self, h: Harness) -> None:
        """Wait until mtad has seen the clients hang up: requests and niquests keep connections alive
        until their session closes, and stopping mtad leaves accepted connections to their peers."""
        if h.service is None or not h.service.running:
            return
        port = h.port("http")

        def open_connections() -> list[Any]:
            return [
                r for r in h.reactor.getReaders() if isinstance(r, tcp.Server) and r.getHost().port == port
            ]

        await until(h.reactor, lambda: not open_connections(), limit=10)

    async def in_thread(self, h: Harness, fn: Callable[[], T]) -> T:
        """Run a blocking client call off the reactor thread, which keeps serving mtad meanwhile."""
        return await deferToThreadPool(h.reactor, h.reactor.getThreadPool(), fn)

    def api_url(self, h: Harness) -> str:
        return f"http://127.0.0.1:{h.port('http')}"

    def dkim_records(self, h: Harness) -> dict[str, str]:
        """The DKIM TXT records of sender.test as they would be published: name (no final dot) → value."""

        def load(conn: Any) -> dict[str, str]:
            domain = get_domain_by_name(conn, "sender.test")
            return {
                f"{k.selector}._domainkey.sender.test": dkim_txt_value(k.algorithm, k.public_key)
                for k in list_keys(conn, domain.id)
            }

        return cast(dict[str, str], h.installation.query(load))

    def assert_dkim_valid(self, h: Harness, delivered: SinkMessage) -> None:
        """The message carries sender.test's signature (made by the daemon's signing worker), and dkimpy
        and Mail::DKIM both pass it."""
        assert h.service is not None and h.service.signing_pool is not None
        self.assertGreater(h.service.signing_pool.signed, 0)
        self.assertTrue(delivered.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"), delivered.data[:80])
        self.assertIn(b"d=sender.test;", delivered.data.split(b"\r\n\r\n")[0])
        records = self.dkim_records(h)

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            record = records.get(name.decode().rstrip("."))
            return None if record is None else record.encode()

        self.assertTrue(dkim.verify(delivered.data, dnsfunc=dnsfunc), "dkimpy")
        probe = subprocess.run(
            ["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            return  # tools/setup installs libmail-dkim-perl as root; tests/mail/test_dkim.py reports the skip
        done = subprocess.run(
            ["perl", "-e", MAIL_DKIM_SCRIPT],
            input=delivered.data,
            capture_output=True,
            env={**os.environ, "DKIM_TEST_ZONE": "\n".join(f"{n}\t{r}" for n, r in records.items())},
            timeout=60,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        verdicts = [line.split("\t") for line in done.stdout.decode().splitlines()]
        self.assertEqual([v[:2] for v in verdicts], [["rsa-sha256", "pass"]], verdicts)

    async def delivered_to(self, h: Harness, count: int) -> dict[str, SinkMessage]:
        """The first ``count`` messages at the sink, by their single envelope recipient."""
        await h.sink.wait_for_messages(count)
        by_recipient = {}
        for delivered in h.sink.messages:
            (recipient,) = delivered.recipients
            by_recipient[recipient] = delivered
        return by_recipient

    def assert_nothing_queued(self, h: Harness) -> None:
        self.assertEqual(h.installation.query(list_messages, h.installation.server_id), [])
        self.assertEqual(h.sink.messages, [])

    # -- django-anymail ----------------------------------------------------------------------------------

    async def test_anymail_message_is_delivered_signed(self) -> None:
        """anymail's Postal backend: text, HTML, Cc, Bcc, Reply-To, a header, a tag and an attachment arrive
        signed, one message per recipient, and anymail reports each recipient queued."""
        configure_django()
        from anymail.message import AnymailMessage  # type: ignore[import-untyped]
        from django.core.mail import get_connection  # type: ignore[import-untyped]

        h = self.harness()
        await h.start()
        url, key = self.api_url(h), h.installation.api_key

        def send() -> Any:
            connection = get_connection(api_url=url, api_key=key)
            message = AnymailMessage(
                subject="Anymail über Postal 🎉",
                body="Plain text from Django.\nSecond line.",
                from_email="Django App <app@sender.test>",
                to=["Alice <alice@example.com>"],
                cc=["carol@example.com"],
                bcc=["bob@example.com"],
                reply_to=["help@sender.test"],
                headers={"X-Order-Id": "1234"},
                tags=["welcome"],
                connection=connection,
            )
            message.attach_alternative("<p>HTML from <b>Django</b></p>", "text/html")
            message.attach("data.bin", ATTACHMENT, "application/octet-stream")
            message.attach("notes.txt", "ünïcode notes\n", "text/plain")
            self.assertEqual(message.send(), 1)
            return message.anymail_status

        status = await self.in_thread(h, send)
        self.assertEqual(status.status, {"queued"})
        self.assertEqual(
            set(status.recipients), {"alice@example.com", "carol@example.com", "bob@example.com"}
        )
        self.assertEqual(len(status.message_id), 3)  # anymail's ids: Postal's message id per recipient

        delivered = await self.delivered_to(h, 3)
        self.assertEqual(set(delivered), {"alice@example.com", "carol@example.com", "bob@example.com"})
        for recipient, sink_message in delivered.items():
            # The envelope sender is the VERP return path of this recipient's message.
            assert h.service is not None
            verp = decode_return_path(
                h.service.verp_secret, sink_message.mail_from, ["rp.postal.example.com"]
            )
            assert verp is not None, sink_message.mail_from
            self.assertEqual(str(verp.message_id), str(status.recipients[recipient].message_id))
            parsed = parse(sink_message.data)
            self.assertEqual(parsed["Subject"], "Anymail über Postal 🎉")
            self.assertEqual(parsed["From"], "Django App <app@sender.test>")
            self.assertEqual(parsed["To"], "Alice <alice@example.com>")
            self.assertEqual(parsed["Cc"], "carol@example.com")
            self.assertIsNone(parsed["Bcc"], recipient)
            self.assertEqual(parsed["Reply-To"], "help@sender.test")
            self.assertEqual(parsed["X-Order-Id"], "1234")
            self.assertEqual(body_text(parsed, "plain").rstrip("\n"), "Plain text from Django.\nSecond line.")
            self.assertIn("<p>HTML from <b>Django</b></p>", body_text(parsed, "html"))
            self.assertEqual(
                attachments(parsed),
                {
                    "data.bin": ("application/octet-stream", ATTACHMENT),
                    "notes.txt": ("text/plain", "ünïcode notes\n".encode()),
                },
            )
            self.assert_dkim_valid(h, sink_message)
        await until(
            h.reactor,
            lambda: (
                sorted(m.status for m in h.installation.query(list_messages, h.installation.server_id))
                == [MessageStatus.SENT] * 3
            ),
        )
        tags = {m.tag for m in h.installation.query(list_messages, h.installation.server_id)}
        self.assertEqual(tags, {"welcome"})

    async def test_anymail_unknown_key_raises_postal_error(self) -> None:
        """anymail raises its API error carrying Postal's InvalidServerAPIKey for a wrong key; nothing is
        queued."""
        configure_django()
        from anymail.exceptions import AnymailAPIError  # type: ignore[import-untyped]
        from django.core.mail import EmailMessage as DjangoEmailMessage  # type: ignore[import-untyped]
        from django.core.mail import get_connection

        h = self.harness()
        await h.start()
        url = self.api_url(h)

        def send() -> tuple[int, str]:
            connection = get_connection(api_url=url, api_key="not-a-key")
            message = DjangoEmailMessage(
                "Hi", "Body", "app@sender.test", ["alice@example.com"], connection=connection
            )
            try:
                message.send()
            except AnymailAPIError as e:
                return e.status_code, str(e)
            finally:
                # The error holds requests' response, which holds its connection open; let both go.
                gc.collect()
            raise AssertionError("anymail raised nothing")

        status_code, error = await self.in_thread(h, send)
        self.assertEqual(status_code, 200)  # Postal answers errors with HTTP 200 and status "error"
        self.assertIn("InvalidServerAPIKey", error)
        self.assertIn("The API token provided in X-Server-API-Key was not valid.", error)
        self.assert_nothing_queued(h)

    # -- postal-py -----------------------------------------------------------------------------------------

    async def test_postal_py_message_is_delivered_signed(self) -> None:
        """postal-py's send_message: the message arrives signed with its attachment, and the client's
        messages/message and messages/deliveries calls parse mtad's answers about it."""
        from postal_py import PostalPyAPI  # type: ignore[import-untyped]
        from postal_py.api.schemas import (  # type: ignore[import-untyped]
            MessageExpansion,
            RequestAttachmentSchema,
            RequestMessageDetailsSchema,
            RequestMessageSchema,
        )

        h = self.harness()
        await h.start()
        client = PostalPyAPI(
            base_url=self.api_url(h), api_key=h.installation.api_key, timeout=30, level=logging.CRITICAL
        )
        self.addCleanup(client.close)
        request = RequestMessageSchema(
            to=["alice@example.com"],
            from_="Py App <app@sender.test>",
            subject="postal-py 🐍",
            plain_body="Plain from postal-py.",
            html_body="<p>HTML from postal-py</p>",
            tag="receipts",
            headers={"X-Campaign": "spring"},
            attachments=[
                RequestAttachmentSchema(
                    name="blob.bin", content_type="application/octet-stream", data=ATTACHMENT
                )
            ],
        )
        response = await self.in_thread(h, lambda: client.send_message(request))
        self.assertEqual(response.status.value, "success")
        message_id = response.data.messages["alice@example.com"].id
        self.assertTrue(response.data.message_id.endswith("@mtad.test"), response.data.message_id)

        delivered = (await self.delivered_to(h, 1))["alice@example.com"]
        parsed = parse(delivered.data)
        self.assertEqual(parsed["Subject"], "postal-py 🐍")
        self.assertEqual(parsed["X-Campaign"], "spring")
        self.assertEqual(parsed["Message-ID"], f"<{response.data.message_id}>")
        self.assertEqual(body_text(parsed, "plain").rstrip("\n"), "Plain from postal-py.")
        self.assertIn("<p>HTML from postal-py</p>", body_text(parsed, "html"))
        self.assertEqual(attachments(parsed), {"blob.bin": ("application/octet-stream", ATTACHMENT)})
        self.assert_dkim_valid(h, delivered)

        await until(
            h.reactor,
            lambda: (
                [m.status for m in h.installation.query(list_messages, h.installation.server_id)]
                == [MessageStatus.SENT]
            ),
        )
        details = await self.in_thread(
            h,
            lambda: client.get_message_details(
                RequestMessageDetailsSchema(id=message_id, expansions={MessageExpansion.status})
            ),
        )
        self.assertEqual((details.data.id, details.data.status.status), (message_id, "Sent"))

    async def sent_with_postal_py(self, h: Harness, client: Any) -> int:
        """Send one message with postal-py and wait until it is recorded Sent; its id."""
        from postal_py.api.schemas import RequestMessageSchema

        request = RequestMessageSchema(
            to=["alice@example.com"], from_="app@sender.test", subject="Hi", plain_body="Body"
        )
        response = await self.in_thread(h, lambda: client.send_message(request))
        await until(
            h.reactor,
            lambda: (
                [m.status for m in h.installation.query(list_messages, h.installation.server_id)]
                == [MessageStatus.SENT]
            ),
        )
        return cast(int, response.data.messages["alice@example.com"].id)

    async def test_postal_py_reads_deliveries(self) -> None:
        """postal-py's get_message_deliveries parses mtad's answer: one Sent attempt with its log id."""
        from postal_py import PostalPyAPI

        h = self.harness()
        await h.start()
        client = PostalPyAPI(
            base_url=self.api_url(h), api_key=h.installation.api_key, timeout=30, level=logging.CRITICAL
        )
        self.addCleanup(client.close)
        message_id = await self.sent_with_postal_py(h, client)
        deliveries = await self.in_thread(h, lambda: client.get_message_deliveries(message_id))
        self.assertEqual([d.status for d in deliveries.data], ["Sent"])

    async def test_postal_py_reads_details(self) -> None:
        """postal-py's get_message_details with the details expansion parses mtad's answer."""
        from postal_py import PostalPyAPI
        from postal_py.api.schemas import MessageExpansion, RequestMessageDetailsSchema

        h = self.harness()
        await h.start()
        client = PostalPyAPI(
            base_url=self.api_url(h), api_key=h.installation.api_key, timeout=30, level=logging.CRITICAL
        )
        self.addCleanup(client.close)
        message_id = await self.sent_with_postal_py(h, client)
        details = await self.in_thread(
            h,
            lambda: client.get_message_details(
                RequestMessageDetailsSchema(id=message_id, expansions={MessageExpansion.details})
            ),
        )
        self.assertEqual(details.data.details.rcpt_to, "alice@example.com")
        self.assertTrue(details.data.details.received_with_ssl)

    async def test_postal_py_send_raw_is_delivered_signed(self) -> None:
        """postal-py's send_raw_message: the raw message reaches each envelope recipient, signed."""
        from postal_py import PostalPyAPI
        from postal_py.api.schemas import RequestRawMessageSchema

        h = self.harness()
        await h.start()
        client = PostalPyAPI(
            base_url=self.api_url(h), api_key=h.installation.api_key, timeout=30, level=logging.CRITICAL
        )
        self.addCleanup(client.close)
        raw = (
            b"From: Raw <app@sender.test>\r\nTo: alice@example.com\r\nSubject: Raw via postal-py\r\n"
            b"Message-ID: <raw-1@sender.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            b"Raw body.\r\n"
        )
        request = RequestRawMessageSchema(
            mail_from="app@sender.test",
            rcpt_to=["alice@example.com", "bob@example.com"],
            data=base64.b64encode(raw).decode(),
        )
        response = await self.in_thread(h, lambda: client.send_raw_message(request))
        self.assertEqual(response.status.value, "success")
        self.assertEqual(set(response.data.messages), {"alice@example.com", "bob@example.com"})
        delivered = await self.delivered_to(h, 2)
        self.assertEqual(set(delivered), {"alice@example.com", "bob@example.com"})
        for sink_message in delivered.values():
            self.assertTrue(sink_message.data.endswith(raw), sink_message.data[-200:])
            self.assert_dkim_valid(h, sink_message)

    async def test_postal_py_unknown_key_raises_its_error(self) -> None:
        """postal-py raises its InvalidServerAPIKey exception for a wrong key, as it does against Postal."""
        from postal_py import PostalPyAPI
        from postal_py.api.exceptions import PostalPyInvalidServerAPIKeyError  # type: ignore[import-untyped]
        from postal_py.api.schemas import RequestMessageSchema

        h = self.harness()
        await h.start()
        client = PostalPyAPI(
            base_url=self.api_url(h), api_key="not-a-key", timeout=30, level=logging.CRITICAL
        )
        self.addCleanup(client.close)
        request = RequestMessageSchema(
            to=["alice@example.com"], from_="app@sender.test", subject="Hi", plain_body="Body"
        )

        def send() -> PostalPyInvalidServerAPIKeyError:
            with self.assertRaises(PostalPyInvalidServerAPIKeyError) as raised:
                client.send_message(request)
            return raised.exception

        error = await self.in_thread(h, send)
        (answer,) = error.args
        self.assertEqual((answer["status"], answer["data"]["code"]), ("error", "InvalidServerAPIKey"))
        self.assert_nothing_queued(h)

"""End to end on loopback: a submission without Date and Message-ID leaves with both, DKIM-signed."""

from __future__ import annotations

import email.policy
import re
from email.message import EmailMessage
from typing import Any, cast

import dkim
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from mtad.mail.dkim_keys import dkim_txt_value
from mtad.mail.headers import header_section, read_fields
from mtad.store.domains import get_domain_by_name, list_keys
from mtad.store.messages import MessageStatus, list_messages
from tests.integration.support import Harness, until
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url


def bare_message() -> bytes:
    """What Python's smtplib ``send_message`` puts after DATA for a bare `EmailMessage`."""
    message = EmailMessage()
    message["From"] = "app@sender.test"
    message["To"] = "alice@example.com"
    message["Subject"] = "No Date, no Message-ID"
    message.set_content("Hi Alice.\n")
    return message.as_bytes(policy=email.policy.SMTP)


class SubmissionFieldsTests(unittest.TestCase):
    timeout = 60

    async def test_smtp_submission_gets_date_and_message_id(self) -> None:
        """An SMTP submission without Date and Message-ID is delivered with both (Message-ID on the
        configured hostname, recorded in SQL), and the DKIM signature covers them and verifies."""
        harness = Harness(real_reactor(), fresh_database_url(self, SQLITE))
        self.addCleanup(lambda: ensureDeferred(harness.stop()))
        await harness.start()
        client = await harness.session()
        sent = bare_message()
        self.assertEqual(read_fields(header_section(sent), (b"date", b"message-id")), {})
        code, text = await client.send_message("app@sender.test", ["alice@example.com"], sent)
        self.assertEqual(code, 250, text)
        (delivered,) = await harness.sink.wait_for_messages(1)

        fields = read_fields(header_section(delivered.data), (b"date", b"message-id", b"dkim-signature"))
        self.assertEqual(len(fields[b"date"]), 1)
        (message_id,) = fields[b"message-id"]
        found = re.fullmatch(rb" <([0-9a-f-]{36}@mtad\.test)>", message_id)
        assert found is not None, message_id
        (signature,) = fields[b"dkim-signature"]
        signed = re.search(rb";\s*h=([^;]*)", signature)
        assert signed is not None
        self.assertTrue(
            {b"date", b"message-id"} <= set(re.sub(rb"\s", b"", signed.group(1)).split(b":")), signature
        )

        def published(conn: Any) -> dict[bytes, bytes]:
            domain = get_domain_by_name(conn, "sender.test")
            return {
                f"{k.selector}._domainkey.sender.test.".encode(): dkim_txt_value(
                    k.algorithm, k.public_key
                ).encode()
                for k in list_keys(conn, domain.id)
            }

        records = cast(dict[bytes, bytes], harness.installation.query(published))
        self.assertTrue(dkim.verify(delivered.data, dnsfunc=lambda name, timeout=5: records[name]))

        def statuses() -> list[MessageStatus]:
            rows = harness.installation.query(list_messages, harness.installation.server_id)
            return [row.status for row in rows]

        await until(harness.reactor, lambda: statuses() == [MessageStatus.SENT])
        (row,) = harness.installation.query(list_messages, harness.installation.server_id)
        self.assertEqual(row.message_id, found.group(1).decode())

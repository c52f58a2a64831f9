"""Form-encoded ``/api/v1`` requests from real curl (``--data-urlencode``) against mtad on loopback."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import os
import shutil
from email.message import EmailMessage
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from mtad.store.messages import find_message
from tests.integration.support import Harness, until
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url

PARSER = email.parser.BytesParser(policy=email.policy.default)
CURL = shutil.which("curl")


class FormParamsTests(unittest.TestCase):
    """One mtad, several requests as a shell script would send them; each checked where it lands."""

    timeout = 60

    if CURL is None:
        skip = "curl is not installed"

    async def curl(self, h: Harness, path: str, *args: str) -> dict[str, Any]:
        """Run curl (no config file, no proxy) against mtad's API; the decoded JSON envelope."""
        assert CURL is not None
        url = f"http://127.0.0.1:{h.port('http')}{path}"
        argv = ["-q", "--silent", "--show-error", "--noproxy", "*", "--max-time", "20"]
        argv += ["-H", f"X-Server-API-Key: {h.installation.api_key}", *args, url]
        out, err, code = await getProcessOutputAndValue(
            CURL, argv, env={"PATH": os.environ.get("PATH", "")}, reactor=h.reactor
        )
        self.assertEqual(code, 0, err)
        envelope: dict[str, Any] = json.loads(out)
        return envelope

    async def test_curl_form_requests(self) -> None:
        """``curl --data-urlencode`` sends send/message (UTF-8 subject, ``to`` given once, a custom header,
        an attachment) and send/raw (its message gains Date and Message-ID); ``-G`` reads the message
        back; a field that is not UTF-8 is a parameter error naming it."""
        h = Harness(real_reactor(), fresh_database_url(self, SQLITE))
        self.addCleanup(lambda: ensureDeferred(h.stop()))
        await h.start()

        attachment = bytes(range(256))
        sent = await self.curl(
            h,
            "/api/v1/send/message",
            "--data-urlencode",
            "to=alice@example.com",
            "--data-urlencode",
            "from=App <app@sender.test>",
            "--data-urlencode",
            "subject=Grüße aus Köln 🎉",
            "--data-urlencode",
            "plain_body=Hallo, schöne Welt.",
            "--data-urlencode",
            "headers[X-Foo]=bär",
            "--data-urlencode",
            "attachments[][name]=bytes.bin",
            "--data-urlencode",
            f"attachments[][data]={base64.b64encode(attachment).decode()}",
        )
        self.assertEqual(sent["status"], "success", sent)
        self.assertEqual(list(sent["data"]["messages"]), ["alice@example.com"])
        (delivered,) = await h.sink.wait_for_messages(1)
        message: EmailMessage = PARSER.parsebytes(delivered.data)
        self.assertEqual(message["Subject"], "Grüße aus Köln 🎉")
        self.assertEqual(message["X-Foo"], "bär")
        (part,) = message.iter_attachments()
        self.assertEqual((part.get_filename(), part.get_payload(decode=True)), ("bytes.bin", attachment))

        bare = b"From: app@sender.test\r\nTo: bob@example.com\r\nSubject: raw\r\n\r\nHi Bob.\r\n"
        raw = await self.curl(
            h,
            "/api/v1/send/raw",
            "--data-urlencode",
            "rcpt_to=bob@example.com",
            "--data-urlencode",
            "mail_from=app@sender.test",
            "--data-urlencode",
            f"data={base64.b64encode(bare).decode()}",
        )
        self.assertEqual(raw["status"], "success", raw)
        id = raw["data"]["messages"]["bob@example.com"]["id"]
        await h.sink.wait_for_messages(2)
        (to_bob,) = [m for m in h.sink.messages if m.recipients == ("bob@example.com",)]
        message = PARSER.parsebytes(to_bob.data)
        self.assertIsNotNone(message["Date"])
        self.assertTrue(str(message["Message-ID"]).endswith("@mtad.test>"), message["Message-ID"])

        await until(h.reactor, lambda: h.installation.query(find_message, id) is not None)
        found = await self.curl(
            h,
            "/api/v1/messages/message",
            "-G",
            "--data-urlencode",
            f"id={id}",
            "--data-urlencode",
            "_expansions[]=details",
        )
        self.assertEqual(found["status"], "success", found)
        self.assertEqual(f"<{found['data']['details']['message_id']}>", message["Message-ID"])

        bad = await self.curl(h, "/api/v1/send/message", "--data", "to=alice@example.com&subject=%C3%28")
        self.assertEqual(bad, {**bad, "status": "parameter-error"})
        self.assertEqual(bad["data"], {"message": "`subject` parameter is not valid UTF-8"})

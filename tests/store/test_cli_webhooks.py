"""The webhook commands of mtad.cli, run in-process on a temporary SQLite database."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mtad.cli import main
from mtad.store import webhooks as ws
from mtad.store.db import make_engine

NOW = 1_700_000_000.0


class WebhookCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config = self.dir / "mtad.toml"
        self.config.write_text(f'[general]\ndata_dir = "{self.dir / "data"}"\n')
        self.mtad("initialize")
        self.mtad("make-organization", "Acme")
        self.mtad("make-server", "acme", "Main")
        self.mtad("make-server", "acme", "Other")

    def mtad(self, *argv: str, status: int = 0) -> str:
        """Run a command; its stdout, or its stderr when it is expected to fail."""
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(
            main(["--config", str(self.config), *argv], stdout=out, stderr=err), status, err.getvalue()
        )
        return out.getvalue() if status == 0 else err.getvalue()

    def add(self, *argv: str) -> tuple[int, str]:
        out = self.mtad("add-webhook", *argv)
        found = re.search(r"^webhook (\d+) .*\nuuid: ([0-9a-f-]{36})\n", out)
        assert found is not None, out
        return int(found.group(1)), found.group(2)

    def listed(self, *argv: str) -> dict[str, list[str]]:
        """list-webhooks as {id: columns}, checking the header."""
        header, *rows = self.mtad("list-webhooks", *argv).splitlines()
        self.assertEqual(
            header.split(), ["ID", "SERVER", "NAME", "ENABLED", "EVENTS", "LAST", "USED", "UUID", "URL"]
        )
        return {row.split()[0]: re.split(r"\s{2,}", row) for row in rows}

    def test_add_list_set_remove(self) -> None:
        """add-webhook prints the id and uuid; list-webhooks shows every setting (for one server or all);
        set-webhook changes only what it is given; remove-webhook deletes it."""
        out = self.mtad("add-webhook", "acme/main", "https://hooks.example.com/a")
        self.assertRegex(
            out, r"^webhook 1 \(hooks\.example\.com\) added to acme/main: https://hooks\.example\.com/a\n"
        )
        self.assertIn("events: all\n", out)
        second, uuid = self.add(
            "acme/main",
            "http://10.0.0.5:8080/b",
            "--name",
            "Bounces",
            "--event",
            "SpamComplaint",
            "MessageBounced",
            "--event",
            "MessageSent",
            "--disabled",
        )
        third, _ = self.add("acme/other", "https://other.example/")
        rows = self.listed()
        self.assertEqual(
            rows[str(second)],
            [
                str(second),
                "acme/main",
                "Bounces",
                "no",
                "MessageSent, MessageBounced, SpamComplaint",
                "never",
                uuid,
                "http://10.0.0.5:8080/b",
            ],
        )
        self.assertEqual(rows["1"][3:5], ["yes", "all"])
        self.assertEqual(list(self.listed("acme/other")), [str(third)])
        out = self.mtad("set-webhook", str(second), "--enable", "--url", "https://new.example/b")
        self.assertIn("events: MessageSent, MessageBounced, SpamComplaint; enabled", out)
        row = self.listed("acme/main")[str(second)]
        self.assertEqual((row[2], row[3], row[7]), ("Bounces", "yes", "https://new.example/b"))
        self.mtad("set-webhook", str(second), "--all-events", "--name", "Everything", "--disable")
        row = self.listed("acme/main")[str(second)]
        self.assertEqual(row[2:5], ["Everything", "no", "all"])
        self.mtad("set-webhook", str(second), "--event", "MessageHeld")
        self.assertEqual(self.listed("acme/main")[str(second)][4], "MessageHeld")
        out = self.mtad("remove-webhook", str(second))
        self.assertIn(f"webhook {second} (Everything) removed", out)
        self.assertEqual(list(self.listed()), ["1", str(third)])

    def test_errors(self) -> None:
        """Unknown events (listing the valid ones), bad URLs, unknown servers and webhooks, and set-webhook
        with nothing to change exit 1 with one line; conflicting options are usage errors."""
        err = self.mtad("add-webhook", "acme/main", "https://a.example/", "--event", "Sent", status=1)
        self.assertRegex(err, r"^mtad: error: `events\[0\]` is 'Sent', not a webhook event; the events are ")
        self.assertIn(", ".join(ws.WEBHOOK_EVENTS), err)
        self.assertEqual(err.count("\n"), 1)
        err = self.mtad("add-webhook", "acme/main", "ftp://a.example/", status=1)
        self.assertIn("`url` must use http or https", err)
        err = self.mtad("add-webhook", "acme/main", "https://me:pw@a.example/", status=1)
        self.assertIn("password", err)
        err = self.mtad("add-webhook", "acme/none", "https://a.example/", status=1)
        self.assertIn("no server 'acme/none'", err)
        self.assertEqual(self.listed(), {})
        webhook, _ = self.add("acme/main", "https://a.example/")
        err = self.mtad("set-webhook", str(webhook), status=1)
        self.assertIn("nothing to change", err)
        err = self.mtad("set-webhook", str(webhook), "--url", "https://a b/", status=1)
        self.assertIn("whitespace", err)
        err = self.mtad("set-webhook", "99", "--enable", status=1)
        self.assertIn("no webhook with id 99", err)
        err = self.mtad("remove-webhook", "99", status=1)
        self.assertIn("no webhook with id 99", err)
        usage = io.StringIO()
        self.patch(sys, "stderr", usage)
        self.assertEqual(self.mtad("set-webhook", str(webhook), "--enable", "--disable", status=2), "")
        self.assertEqual(
            self.mtad("set-webhook", str(webhook), "--all-events", "--event", "MessageSent", status=2), ""
        )
        self.assertEqual(self.mtad("webhook-requests", "--limit", "0", status=2), "")
        self.assertIn("not allowed with argument --enable", usage.getvalue())
        self.assertIn("not a positive integer: '0'", usage.getvalue())

    def test_request_log(self) -> None:
        """webhook-requests lists the log newest first with pseudo codes explained, for a server, a
        webhook or a uuid, and pages with --limit and --before."""
        webhook, _ = self.add("acme/main", "https://a.example/")
        other, _ = self.add("acme/other", "https://b.example/")
        engine = make_engine(f"sqlite:///{self.dir / 'data' / 'mtad.sqlite3'}")
        self.addCleanup(engine.dispose)

        def request(
            uuid: str, attempt: int, server_id: int, webhook_id: int, **kwargs: object
        ) -> ws.WebhookRequest:
            fields: dict[str, object] = {
                "server_id": server_id,
                "webhook_id": webhook_id,
                "uuid": uuid,
                "event": "MessageSent",
                "url": "https://a.example/",
                "attempt": attempt,
                "timestamp": NOW + attempt,
                "status_code": 200,
                "duration": 0.125,
                "response": "OK",
                "payload": "{}",
                "will_retry": False,
                **kwargs,
            }
            return ws.WebhookRequest(**fields)  # type: ignore[arg-type]

        uuid = "5a4d3c2b-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
        with engine.begin() as conn:
            ws.record_webhook_requests(
                conn,
                [
                    request(uuid, 1, 1, webhook, status_code=-1, will_retry=True, error="Timed out after 5s"),
                    request(uuid, 2, 1, webhook, status_code=503, will_retry=True, response="Busy"),
                    request("other-uuid", 3, 2, other, event="MessageBounced"),
                ],
            )
        header, *rows = self.mtad("webhook-requests").splitlines()
        self.assertEqual(
            re.split(r"\s{2,}", header),
            [
                "ID",
                "TIME",
                "SERVER",
                "WEBHOOK",
                "EVENT",
                "ATTEMPT",
                "STATUS",
                "TIME TAKEN",
                "RETRY",
                "UUID",
                "RESULT",
            ],
        )
        self.assertEqual([row.split()[0] for row in rows], ["3", "2", "1"])
        first = re.split(r"\s{2,}", rows[2])
        self.assertEqual(
            first[2:],
            [
                "acme/main",
                str(webhook),
                "MessageSent",
                "1",
                "-1 (timed out)",
                "0.125 s",
                "yes",
                uuid,
                "Timed out after 5s",
            ],
        )
        self.assertTrue(first[1].startswith("2023-11-14 22:13:21"), first)
        self.assertEqual(re.split(r"\s{2,}", rows[1])[-1], "Busy")
        out = self.mtad("webhook-requests", "acme/main", "--limit", "1")
        self.assertEqual([row.split()[0] for row in out.splitlines()[1:-1]], ["2"])
        self.assertEqual(out.splitlines()[-1], "(more: --before 2)")
        out = self.mtad("webhook-requests", "acme/main", "--limit", "1", "--before", "2")
        self.assertEqual([row.split()[0] for row in out.splitlines()[1:]], ["1"])
        out = self.mtad("webhook-requests", "--webhook", str(other))
        self.assertEqual([row.split()[0] for row in out.splitlines()[1:]], ["3"])
        out = self.mtad("webhook-requests", "--uuid", uuid)
        self.assertEqual([row.split()[0] for row in out.splitlines()[1:]], ["2", "1"])
        self.assertEqual(self.mtad("webhook-requests", "acme/other", "--uuid", uuid), "no webhook requests\n")
        self.mtad("remove-webhook", str(webhook))
        out = self.mtad("webhook-requests", "acme/main")
        self.assertEqual([re.split(r"\s{2,}", row)[3] for row in out.splitlines()[1:]], ["-", "-"])

    def test_webhook_key_is_the_daemons_signing_key(self) -> None:
        """webhook-key prints the key the daemon signs with (data_dir/signing.key), in anymail's form,
        the same on every call."""
        from mtad.webhooks.signing import WebhookSigner

        first = self.mtad("webhook-key").strip()
        self.assertEqual(first, self.mtad("webhook-key").strip())
        signer = WebhookSigner.load_or_create(self.dir / "data" / "signing.key")
        self.assertEqual(first, signer.public_key_for_anymail())

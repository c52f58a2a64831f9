"""Tests for mtad.store.webhooks: webhook settings, which webhooks an event goes to, the request log and
its retention, on SQLite (and PostgreSQL and MySQL/MariaDB when configured)."""

from __future__ import annotations

from typing import Any

import attrs
import sqlalchemy as sa
from twisted.internet.task import Clock

from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store import webhooks as ws
from mtad.store.db import NotFound
from mtad.store.tables import webhook_events, webhook_requests, webhooks
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase, SynchronousDatabase

NOW = 1_700_000_000.0
DAY = 86400.0
URL = "https://hooks.example.com/postal?token=abc"


def count(conn: Any, table: Any) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def attempt(uuid: str, number: int, **fields: Any) -> ws.WebhookRequest:
    values: dict[str, Any] = {
        "server_id": 1,
        "webhook_id": None,
        "uuid": uuid,
        "event": "MessageSent",
        "url": URL,
        "attempt": number,
        "timestamp": NOW,
        "status_code": 500,
        "duration": 0.25,
        "response": "Internal Server Error",
        "payload": '{"event":"MessageSent","payload":{"subject":"Hi 😀"}}',
        "will_retry": True,
    }
    values.update(fields)
    return ws.WebhookRequest(**values)


class WebhookTestCase(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.transaction(os_.create_organization, "Acme", NOW)
        self.server = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.other = self.transaction(ss.create_server, "acme", "Other", NOW)

    def add(self, url: str = URL, server: ss.Server | None = None, **kwargs: Any) -> ws.Webhook:
        kwargs.setdefault("name", None)
        name = kwargs.pop("name")
        webhook: ws.Webhook = self.transaction(
            ws.add_webhook, (server or self.server).id, name, url, NOW, **kwargs
        )
        return webhook

    def attempt(self, uuid: str, number: int, **fields: Any) -> ws.WebhookRequest:
        """An attempt of the main server's unless ``server_id`` says otherwise."""
        return attempt(uuid, number, **{"server_id": self.server.id, **fields})


class WebhookSettingsTests(WebhookTestCase):
    def test_add_and_find(self) -> None:
        """A webhook is added for all events (named after its host) or chosen ones, enabled unless said
        otherwise, and found by id and uuid, within its server only."""
        every = self.add()
        self.assertEqual(
            (every.name, every.url, every.enabled, every.all_events, every.events),
            ("hooks.example.com", URL, True, True, frozenset()),
        )
        self.assertRegex(every.uuid, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")
        chosen = self.add(
            "http://10.0.0.5:8080/hook",
            name="  Bounces 😀 ",
            events=["MessageBounced", "SpamComplaint", "MessageBounced"],
            enabled=False,
        )
        self.assertEqual(
            (chosen.name, chosen.enabled, chosen.all_events, chosen.events),
            ("Bounces 😀", False, False, frozenset({"MessageBounced", "SpamComplaint"})),
        )
        self.assertNotEqual(every.uuid, chosen.uuid)
        self.assertEqual(self.transaction(ws.find_webhook, id=chosen.id), chosen)
        self.assertEqual(
            self.transaction(ws.find_webhook, uuid=chosen.uuid, server_id=self.server.id), chosen
        )
        self.assertIsNone(self.transaction(ws.find_webhook, id=chosen.id, server_id=self.other.id))
        self.assertIsNone(self.transaction(ws.find_webhook, uuid=chosen.uuid, server_id=self.other.id))
        self.assertIsNone(self.transaction(ws.find_webhook, id=999))
        self.assertEqual(self.transaction(ws.list_webhooks, self.server.id), [every, chosen])
        self.assertEqual(self.transaction(ws.list_webhooks, self.other.id), [])
        theirs = self.add(server=self.other)
        self.assertEqual(self.transaction(ws.list_webhooks), [every, chosen, theirs])
        with self.assertRaises(NotFound):
            self.transaction(ws.add_webhook, 999, None, URL, NOW)

    def test_bad_urls(self) -> None:
        """URLs that are not http(s), have no host, carry credentials or whitespace, or characters no URL
        has are refused with an error naming `url`; unusual but valid ones are taken."""
        for bad, says in (
            ("ftp://example.com/", "http or https"),
            ("example.com/hook", "http or https"),
            ("javascript:alert(1)", "http or https"),
            ("https:///hook", "host"),
            ("http://:8080/hook", "host"),
            ("https://user:secret@example.com/", "password"),
            ("https://token@example.com/", "user name"),
            ("https://example.com/a hook", "whitespace"),
            ("https://example.com/\thook", "whitespace"),
            ("https://example.com/\x00", "characters"),
            ("https://exämple.com/", "ASCII"),
            ('https://example.com/"', "characters"),
            ("https://example.com/%zz", "characters"),
            ("https://exa$mple.com/", "host name"),
            ("https://example..com/", "host name"),
            ("https://[::g]/", "IPv6"),
            ("https://example.com:99999/", "not a valid URL"),
            ("https://example.com:0/", "port 0"),
            ("", "http or https"),
        ):
            with self.assertRaises(ws.WebhookError, msg=bad) as raised:
                self.add(bad)
            self.assertEqual(raised.exception.field, "url", bad)
            self.assertIn("`url`", str(raised.exception), bad)
            self.assertIn(says, str(raised.exception), bad)
        for good in (
            "HTTPS://Example.COM",
            "http://[2001:db8::1]:8080/h?a=b&c=%20#frag",
            "https://hooks.example.com./x/@/y",
            "http://127.0.0.1/",
            "https://a_b.example.com/~me/(x);y=1,2*!$'",
        ):
            self.assertEqual(self.add(good).url, good)
        self.assertEqual(self.transaction(ws.list_webhooks, self.other.id), [])

    def test_bad_names_and_events(self) -> None:
        """Unknown events (named with their index and the list of valid ones), no events, and empty or
        overlong names are refused."""
        with self.assertRaises(ws.WebhookError) as raised:
            self.add(events=["MessageSent", "messagebounced"])
        self.assertEqual(raised.exception.field, "events[1]")
        for event in ws.WEBHOOK_EVENTS:
            self.assertIn(event, str(raised.exception))
        with self.assertRaises(ws.WebhookError) as raised:
            self.add(events=[])
        self.assertEqual(raised.exception.field, "events")
        for bad in ("", "   ", "x" * 256):
            with self.assertRaises(ws.WebhookError) as raised:
                self.add(name=bad)
            self.assertEqual(raised.exception.field, "name")
        self.assertEqual(self.add(name="x" * 255).name, "x" * 255)
        self.assertEqual(
            len(ws.WEBHOOK_EVENTS), 13
        )  # Postal's ten, MessageSuppressed, SpamComplaint, ServerSuspended

    def test_update(self) -> None:
        """Updating changes only what is given: events to a set or (None) all of them, name, URL, enabled;
        updated_at moves; a webhook of another server is not found."""
        webhook = self.add(events=["MessageSent"])
        changed = self.transaction(
            ws.update_webhook, webhook.id, NOW + 5, events=["MessageHeld", "MessageLoaded"]
        )
        self.assertEqual(
            attrs.evolve(webhook, events=frozenset({"MessageHeld", "MessageLoaded"}), updated_at=NOW + 5),
            changed,
        )
        changed = self.transaction(
            ws.update_webhook, webhook.id, NOW + 6, name="Renamed", url="http://b.example/", enabled=False
        )
        self.assertEqual(
            (changed.name, changed.url, changed.enabled, changed.events),
            ("Renamed", "http://b.example/", False, frozenset({"MessageHeld", "MessageLoaded"})),
        )
        every = self.transaction(
            ws.update_webhook, webhook.id, NOW + 7, events=None, server_id=self.server.id
        )
        self.assertEqual((every.all_events, every.events, every.updated_at), (True, frozenset(), NOW + 7))
        self.assertEqual(self.transaction(count, webhook_events), 0)
        self.assertEqual(self.transaction(ws.get_webhook, webhook.id), every)
        with self.assertRaises(NotFound):
            self.transaction(ws.update_webhook, webhook.id, NOW, enabled=True, server_id=self.other.id)
        with self.assertRaises(ws.WebhookError) as raised:
            self.transaction(ws.update_webhook, webhook.id, NOW, url="gopher://x/")
        self.assertEqual(raised.exception.field, "url")
        self.assertEqual(self.transaction(ws.get_webhook, webhook.id), every)

    def test_remove_keeps_log(self) -> None:
        """Removing a webhook removes its event choices and keeps its logged requests, without it;
        removing it again, or another server's, is NotFound."""
        webhook = self.add(events=["MessageSent", "MessageBounced"])
        kept = self.add(events=["MessageSent"])
        self.transaction(
            ws.record_webhook_requests,
            [self.attempt("u-1", 1, webhook_id=webhook.id), self.attempt("u-2", 1, webhook_id=kept.id)],
        )
        with self.assertRaises(NotFound):
            self.transaction(ws.remove_webhook, webhook.id, self.other.id)
        self.assertEqual(self.transaction(ws.remove_webhook, webhook.id, self.server.id), webhook)
        self.assertIsNone(self.transaction(ws.find_webhook, id=webhook.id))
        self.assertEqual(self.transaction(count, webhook_events), 1)
        logged = self.transaction(ws.list_webhook_requests, self.server.id)
        self.assertEqual({r.uuid: r.webhook_id for r in logged}, {"u-1": None, "u-2": kept.id})
        with self.assertRaises(NotFound):
            self.transaction(ws.remove_webhook, webhook.id)

    def test_webhooks_for_event(self) -> None:
        """An event goes to the server's enabled webhooks for all events or for that event, each with its
        chosen events, in one query; not to disabled ones nor another server's."""
        every = self.add()
        sent = self.add(events=["MessageSent", "MessageBounced"])
        self.add(events=["MessageHeld"])
        self.add(enabled=False)
        self.add(events=["MessageSent"], enabled=False)
        self.add(server=self.other)
        queries: list[str] = []

        def for_event(conn: Any, event: str) -> list[ws.Webhook]:
            sa.event.listen(conn, "before_cursor_execute", lambda *a: queries.append(a[2]))
            return ws.webhooks_for_event(conn, self.server.id, event)

        found = self.transaction(for_event, "MessageSent")
        self.assertEqual(found, [every, sent])
        self.assertEqual(found[1].events, frozenset({"MessageSent", "MessageBounced"}))
        self.assertTrue(all(w.wants("MessageSent") for w in found))
        self.assertEqual(len(queries), 1)
        self.assertEqual(self.transaction(for_event, "DomainDNSError"), [every])
        self.assertEqual(
            [w.events for w in self.transaction(for_event, "MessageHeld")],
            [frozenset(), frozenset({"MessageHeld"})],
        )

    def test_touch_last_used(self) -> None:
        """Touching sets last_used_at of the webhooks named, and never moves it back."""
        first, second, untouched = self.add(), self.add(), self.add()
        self.transaction(ws.touch_last_used, [first.id, second.id, 999], NOW + 10)
        self.transaction(ws.touch_last_used, [first.id], NOW + 5)
        self.transaction(ws.touch_last_used, [], NOW + 20)
        self.assertEqual(
            [w.last_used_at for w in self.transaction(ws.list_webhooks, self.server.id)],
            [NOW + 10, NOW + 10, None],
        )
        self.assertEqual(self.transaction(ws.get_webhook, untouched.id).updated_at, NOW)

    def test_server_cascade(self) -> None:
        """Deleting a server (there is no command for it yet) takes its webhooks and their events along."""
        self.add(events=["MessageSent"])
        self.add(server=self.other)
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM servers WHERE id = :id"), {"id": self.server.id})
        self.assertEqual(self.transaction(count, webhook_events), 0)
        self.assertEqual([w.server_id for w in self.transaction(ws.list_webhooks)], [self.other.id])
        self.assertEqual(self.transaction(count, webhooks), 1)


class RequestLogTests(WebhookTestCase):
    def test_round_trip_and_idempotent(self) -> None:
        """Logged attempts come back whole (emoji, pseudo codes, no response, long payloads); logging a
        batch again adds nothing and keeps the first record."""
        webhook = self.add()
        payload = '{"payload":"' + "😀" * 40_000 + '"}'
        first = [
            self.attempt("u-1", 1, webhook_id=webhook.id, status_code=-1, response=None, error="Timed out"),
            self.attempt("u-1", 2, webhook_id=webhook.id, timestamp=NOW + 120, payload=payload),
            self.attempt(
                "u-2", 1, status_code=200, will_retry=False, response="OK ✓", timestamp=NOW + 1, duration=1.5
            ),
        ]
        self.transaction(ws.record_webhook_requests, first)
        self.transaction(
            ws.record_webhook_requests,
            [
                self.attempt("u-1", 2, webhook_id=webhook.id, status_code=204),
                self.attempt("u-1", 3, timestamp=NOW + 300),
            ],
        )
        self.transaction(ws.record_webhook_requests, [])
        logged = self.transaction(ws.list_webhook_requests, self.server.id)
        self.assertEqual(
            [(r.uuid, r.attempt) for r in logged], [("u-1", 3), ("u-1", 2), ("u-2", 1), ("u-1", 1)]
        )
        self.assertEqual([attrs.evolve(r, id=None) for r in logged[1:]], [first[1], first[2], first[0]])
        self.assertEqual(len({r.id for r in logged}), 4)

    def test_deleted_webhook_logged_without_it(self) -> None:
        """An attempt for a webhook deleted in the meantime is logged with no webhook, not refused."""
        webhook = self.add()
        self.transaction(ws.remove_webhook, webhook.id)
        self.transaction(ws.record_webhook_requests, [self.attempt("u-1", 1, webhook_id=webhook.id)])
        (logged,) = self.transaction(ws.list_webhook_requests, self.server.id)
        self.assertIsNone(logged.webhook_id)

    def test_filters_and_paging(self) -> None:
        """The log is listed newest first (ties by id), by server (or all), webhook and uuid, and paged
        with before_id and limit; a page after a deleted request is empty."""
        one, two = self.add(), self.add()
        mine = self.server.id
        for row in (
            self.attempt("a", 1, webhook_id=one.id, timestamp=NOW + 1),
            self.attempt("b", 1, webhook_id=two.id, timestamp=NOW + 3),
            self.attempt("a", 2, webhook_id=one.id, timestamp=NOW + 3),
            self.attempt("c", 1, webhook_id=one.id, timestamp=NOW + 2),
            self.attempt("d", 1, server_id=self.other.id, timestamp=NOW + 9),
        ):
            self.transaction(ws.record_webhook_requests, [row])

        def listed(server_id: int | None = mine, **kwargs: Any) -> list[str]:
            found = self.transaction(ws.list_webhook_requests, server_id, **kwargs)
            return [f"{r.uuid}{r.attempt}" for r in found]

        self.assertEqual(listed(), ["a2", "b1", "c1", "a1"])
        self.assertEqual(listed(None), ["d1", "a2", "b1", "c1", "a1"])
        self.assertEqual(listed(webhook_id=one.id), ["a2", "c1", "a1"])
        self.assertEqual(listed(uuid="a"), ["a2", "a1"])
        self.assertEqual(listed(uuid="a", webhook_id=two.id), [])
        self.assertEqual(listed(self.other.id, uuid="a"), [])
        pages: list[list[str]] = []
        before = None
        while True:
            page = self.transaction(ws.list_webhook_requests, self.server.id, before_id=before, limit=2)
            if not page:
                break
            pages.append([f"{r.uuid}{r.attempt}" for r in page])
            before = page[-1].id
        self.assertEqual(pages, [["a2", "b1"], ["c1", "a1"]])
        self.assertEqual(listed(before_id=999), [])

    def test_delete_before(self) -> None:
        """Deletion takes requests made before a time, oldest first, at most ``limit`` at a time."""
        self.transaction(
            ws.record_webhook_requests, [self.attempt(f"u-{i}", 1, timestamp=NOW + i) for i in range(5)]
        )
        self.assertEqual(self.transaction(ws.delete_webhook_requests_before, NOW + 3, 2), 2)
        self.assertEqual(self.transaction(ws.delete_webhook_requests_before, NOW + 3, 2), 1)
        self.assertEqual(self.transaction(ws.delete_webhook_requests_before, NOW + 3, 2), 0)
        kept = self.transaction(ws.list_webhook_requests, None)
        self.assertEqual([r.uuid for r in kept], ["u-4", "u-3"])
        self.assertEqual(self.transaction(count, webhook_requests), 2)


class WebhookSettingsPostgresTests(WebhookSettingsTests):
    backend = POSTGRES


class WebhookSettingsMySQLTests(WebhookSettingsTests):
    backend = MYSQL


class RequestLogPostgresTests(RequestLogTests):
    backend = POSTGRES


class RequestLogMySQLTests(RequestLogTests):
    backend = MYSQL


class RetentionTests(DatabaseTestCase):
    """`WebhookRequestRetention` on a `task.Clock`, with real SQL (SQLite) run in the test's thread."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = SynchronousDatabase(self.engine)

    def log(self, name: str, age_days: float) -> None:
        self.transaction(ws.record_webhook_requests, [attempt(name, 1, timestamp=NOW - age_days * DAY)])

    def kept(self) -> list[str]:
        return sorted(r.uuid for r in self.transaction(ws.list_webhook_requests, None))

    def start(self, **options: Any) -> ws.WebhookRequestRetention:
        service = ws.WebhookRequestRetention(self.clock, self.database, **options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_ten_days_in_batches(self) -> None:
        """By default requests older than 10 days (as Postal) are deleted at start, in transactions of at
        most ``batch``, and those reaching that age later at the next interval."""
        for i in range(5):
            self.log(f"old-{i}", 11 + i)
        self.log("young", 9.99)
        self.start(batch=2, interval=3600.0)
        self.assertEqual(self.kept(), ["young"])
        self.assertEqual(self.database.calls, 3)
        self.clock.advance(3600)
        self.assertEqual(self.kept(), [])

    def test_keep_seconds(self) -> None:
        """A shorter retention deletes what it no longer keeps; a negative one is refused."""
        self.log("a", 2)
        self.log("b", 0.5)
        self.start(keep_seconds=DAY)
        self.assertEqual(self.kept(), ["b"])
        with self.assertRaises(ValueError):
            ws.WebhookRequestRetention(self.clock, self.database, keep_seconds=-1)

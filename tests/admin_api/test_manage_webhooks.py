"""The webhook endpoints of the ``/api/v2`` management API, against real SQLite (and the test Redis the
management API fixture brings): webhooks added, read, changed and deleted, their request log paged, all
scoped to the caller's server."""

from __future__ import annotations

from typing import Any

from admin_api.manage_api import ManageAPI
from admin_api.manage_openapi import OPENAPI
from mtad.store import servers as ss
from mtad.store import webhooks as ws
from mtad.store.db import make_engine
from tests.admin_api.support import NOW
from tests.admin_api.test_manage_api import ManageAPITestCase
from tests.store.support import SynchronousDatabase

WEBHOOKS = "/api/v2/webhooks"
LOG = "/api/v2/webhook-requests"
URL = "https://hooks.example.com/postal"


class WebhookAPITestCase(ManageAPITestCase):
    async def add(self, key: str = "main", **given: Any) -> dict[str, Any]:
        """Add a webhook through the API (``url`` defaults to `URL`); its JSON."""
        status, body, _ = await self.v2("POST", WEBHOOKS, key=key, json={"url": URL, **given})
        self.assertEqual(status, 201, body)
        webhook: dict[str, Any] = body
        return webhook

    def log(self, *requests: ws.WebhookRequest) -> None:
        self.transaction(ws.record_webhook_requests, list(requests))

    def attempt(self, uuid: str, number: int, webhook_id: int | None, **fields: Any) -> ws.WebhookRequest:
        values: dict[str, Any] = {
            "server_id": self.server.id,
            "webhook_id": webhook_id,
            "uuid": uuid,
            "event": "MessageSent",
            "url": URL,
            "attempt": number,
            "timestamp": NOW + number,
            "status_code": 200,
            "duration": 0.5,
            "response": "OK",
            "payload": f'{{"event":"MessageSent","uuid":"{uuid}"}}',
            "will_retry": False,
        }
        values.update(fields)
        return ws.WebhookRequest(**values)


class WebhookTests(WebhookAPITestCase):
    async def test_add_get_list(self) -> None:
        """POST /api/v2/webhooks adds a webhook (201, Location), for all events unless `events` names
        some; GET lists the server's and reads one by id or uuid; another server sees none of them."""
        status, body, headers = await self.v2("POST", WEBHOOKS, json={"url": URL})
        self.assertEqual(status, 201)
        every = body
        self.assertEqual(headers.getRawHeaders("location"), [f"{WEBHOOKS}/{every['id']}"])
        self.assertEqual(
            {k: v for k, v in every.items() if k not in ("id", "uuid")},
            {
                "name": "hooks.example.com",
                "url": URL,
                "enabled": True,
                "all_events": True,
                "events": None,
                "created_at": NOW,
                "updated_at": NOW,
                "last_used_at": None,
            },
        )
        self.assertEqual(set(every), set(OPENAPI["components"]["schemas"]["Webhook"]["properties"]))
        chosen = await self.add(
            name="Bounces 😀", events=["SpamComplaint", "MessageBounced"], enabled=False, url="http://b.test/"
        )
        self.assertEqual(
            (chosen["name"], chosen["events"], chosen["all_events"], chosen["enabled"]),
            ("Bounces 😀", ["MessageBounced", "SpamComplaint"], False, False),
        )
        self.assertEqual((await self.add(events=None))["events"], None)
        status, body, _ = await self.v2("GET", WEBHOOKS)
        self.assertEqual(status, 200)
        self.assertEqual([w["id"] for w in body["webhooks"]][:2], [every["id"], chosen["id"]])
        self.assertEqual(body["webhooks"][1], chosen)
        for ref in (str(chosen["id"]), chosen["uuid"], chosen["uuid"].upper()):
            status, body, _ = await self.v2("GET", f"{WEBHOOKS}/{ref}")
            self.assertEqual((status, body), (200, chosen), ref)
        theirs = await self.add(key=self.other_key)
        _, body, _ = await self.v2("GET", WEBHOOKS, key=self.other_key)
        self.assertEqual(body["webhooks"], [theirs])
        for ref in (str(chosen["id"]), chosen["uuid"]):
            self.assertError(
                await self.v2("GET", f"{WEBHOOKS}/{ref}", key=self.other_key), 404, "WebhookNotFound"
            )
        self.assertError(await self.v2("GET", f"{WEBHOOKS}/987654"), 404, "WebhookNotFound")
        for bad in ("abc", "0", "-1", "99999999999999999999", "1.5"):
            self.assertError(await self.v2("GET", f"{WEBHOOKS}/{bad}"), 400, "InvalidParameter", "id", bad)

    async def test_bad_new_webhooks(self) -> None:
        """Bodies that are not JSON objects are 400 InvalidJSON; a missing or bad URL, unknown events,
        wrong types and unknown fields are 400 naming the field; nothing is added."""
        for raw in (b"{", b"", b"[]", b'"https://x.test/"', b"\xff"):
            self.assertError(await self.v2("POST", WEBHOOKS, data=raw), 400, "InvalidJSON", None, raw)
        for given, field in (
            ({}, "url"),
            ({"url": None}, "url"),
            ({"url": 5}, "url"),
            ({"url": "ftp://x.test/"}, "url"),
            ({"url": "https://u:p@x.test/"}, "url"),
            ({"url": "https://x.test/a b"}, "url"),
            ({"url": "https:///x"}, "url"),
            ({"url": URL, "events": "MessageSent"}, "events"),
            ({"url": URL, "events": []}, "events"),
            ({"url": URL, "events": ["MessageSent", "Nope"]}, "events[1]"),
            ({"url": URL, "events": [5]}, "events[0]"),
            ({"url": URL, "name": 5}, "name"),
            ({"url": URL, "name": "  "}, "name"),
            ({"url": URL, "name": "x" * 256}, "name"),
            ({"url": URL, "enabled": "yes"}, "enabled"),
            ({"url": URL, "enabled": None}, "enabled"),
            ({"url": URL, "sign": False}, "sign"),
        ):
            error = self.assertError(
                await self.v2("POST", WEBHOOKS, json=given), 400, "InvalidParameter", field, given
            )
            self.assertIn(f"`{field}`", error["message"], given)
        _, body, _ = await self.v2("POST", WEBHOOKS, json={"url": URL, "events": ["Nope"]})
        for event in ws.WEBHOOK_EVENTS:
            self.assertIn(event, body["error"]["message"])
        _, body, _ = await self.v2("GET", WEBHOOKS)
        self.assertEqual(body, {"webhooks": []})

    async def test_update(self) -> None:
        """PATCH changes only the fields given (events to a list, or null for all) and moves updated_at;
        bad changes are 400 naming the field and change nothing; another server's webhook is 404."""
        webhook = await self.add(events=["MessageSent"])
        path = f"{WEBHOOKS}/{webhook['id']}"
        self.clock.advance(10)
        status, body, _ = await self.v2("PATCH", path, json={"events": ["MessageHeld", "MessageLoaded"]})
        self.assertEqual(status, 200, body)
        self.assertEqual(
            body, {**webhook, "events": ["MessageHeld", "MessageLoaded"], "updated_at": NOW + 10}
        )
        status, body, _ = await self.v2(
            "PATCH",
            f"{WEBHOOKS}/{webhook['uuid']}",
            json={"url": "http://new.test/", "name": "New", "enabled": False},
        )
        self.assertEqual(
            (body["url"], body["name"], body["enabled"], body["events"]),
            ("http://new.test/", "New", False, ["MessageHeld", "MessageLoaded"]),
        )
        _, body, _ = await self.v2("PATCH", path, json={"events": None, "enabled": True})
        self.assertEqual((body["all_events"], body["events"], body["enabled"]), (True, None, True))
        before = (await self.v2("GET", path))[1]
        for given, field in (
            ({}, None),
            ({"url": None}, "url"),
            ({"url": "mailto:a@b.test"}, "url"),
            ({"name": None}, "name"),
            ({"events": ["Nope"]}, "events[0]"),
            ({"enabled": 1}, "enabled"),
            ({"all_events": True}, "all_events"),
        ):
            self.assertError(await self.v2("PATCH", path, json=given), 400, "InvalidParameter", field, given)
        self.assertError(await self.v2("PATCH", path, data=b"[1]"), 400, "InvalidJSON")
        self.assertEqual((await self.v2("GET", path))[1], before)
        self.assertError(
            await self.v2("PATCH", path, key=self.other_key, json={"enabled": False}), 404, "WebhookNotFound"
        )
        self.assertError(
            await self.v2("PATCH", f"{WEBHOOKS}/987654", json={"enabled": False}), 404, "WebhookNotFound"
        )
        self.assertEqual((await self.v2("GET", path))[1], before)

    async def test_delete(self) -> None:
        """DELETE removes the webhook (again is 404) and keeps its logged requests, without it; another
        server's webhook is 404 and stays."""
        webhook = await self.add()
        theirs = await self.add(key=self.other_key)
        self.log(self.attempt("u-1", 1, webhook["id"]))
        self.assertError(await self.v2("DELETE", f"{WEBHOOKS}/{theirs['id']}"), 404, "WebhookNotFound")
        status, body, _ = await self.v2("DELETE", f"{WEBHOOKS}/{webhook['uuid']}")
        self.assertEqual(
            (status, body), (200, {"id": webhook["id"], "uuid": webhook["uuid"], "deleted": True})
        )
        self.assertError(await self.v2("DELETE", f"{WEBHOOKS}/{webhook['id']}"), 404, "WebhookNotFound")
        self.assertError(await self.v2("GET", f"{WEBHOOKS}/{webhook['id']}/requests"), 404, "WebhookNotFound")
        _, body, _ = await self.v2("GET", LOG)
        self.assertEqual([(r["uuid"], r["webhook_id"]) for r in body["requests"]], [("u-1", None)])
        _, body, _ = await self.v2("GET", WEBHOOKS, key=self.other_key)
        self.assertEqual(body["webhooks"], [theirs])


class RequestLogTests(WebhookAPITestCase):
    async def test_paging(self) -> None:
        """The request log is the server's attempts newest first, in pages of `limit` chained by
        `next_before`, with every logged field; pseudo codes and absent responses come back as logged."""
        webhook = await self.add()
        self.log(
            self.attempt(
                "u-1",
                1,
                webhook["id"],
                status_code=-2,
                response=None,
                error="Connection refused",
                will_retry=True,
            ),
            self.attempt("u-1", 2, webhook["id"]),
            self.attempt("u-2", 3, None, event="MessageBounced"),
            self.attempt("u-3", 4, None, server_id=self.other_server.id),
        )
        status, body, _ = await self.v2("GET", LOG)
        self.assertEqual(status, 200)
        self.assertEqual(
            [(r["uuid"], r["attempt"]) for r in body["requests"]], [("u-2", 3), ("u-1", 2), ("u-1", 1)]
        )
        self.assertEqual((body["more"], body["next_before"]), (False, None))
        oldest = body["requests"][-1]
        self.assertEqual(set(oldest), set(OPENAPI["components"]["schemas"]["WebhookRequest"]["properties"]))
        self.assertEqual(
            {k: v for k, v in oldest.items() if k != "id"},
            {
                "uuid": "u-1",
                "webhook_id": webhook["id"],
                "event": "MessageSent",
                "url": URL,
                "attempt": 1,
                "timestamp": NOW + 1,
                "status_code": -2,
                "duration": 0.5,
                "response": None,
                "payload": '{"event":"MessageSent","uuid":"u-1"}',
                "will_retry": True,
                "error": "Connection refused",
            },
        )
        pages = []
        query = "limit=2"
        while True:
            status, body, _ = await self.v2("GET", f"{LOG}?{query}")
            self.assertEqual(status, 200, body)
            pages.append([r["attempt"] for r in body["requests"]])
            if not body["more"]:
                break
            self.assertEqual(body["next_before"], body["requests"][-1]["id"])
            query = f"limit=2&before={body['next_before']}"
        self.assertEqual(pages, [[3, 2], [1]])
        _, body, _ = await self.v2("GET", f"{LOG}?uuid=u-1")
        self.assertEqual([r["attempt"] for r in body["requests"]], [2, 1])
        _, body, _ = await self.v2("GET", f"{LOG}?uuid=u-3")
        self.assertEqual(body["requests"], [])
        _, body, _ = await self.v2("GET", LOG, key=self.other_key)
        self.assertEqual([r["uuid"] for r in body["requests"]], ["u-3"])

    async def test_of_one_webhook(self) -> None:
        """GET /api/v2/webhooks/{id}/requests is that webhook's log only; another server's webhook is 404."""
        one, two = await self.add(), await self.add()
        theirs = await self.add(key=self.other_key)
        self.log(
            self.attempt("a", 1, one["id"]), self.attempt("b", 2, two["id"]), self.attempt("a", 3, one["id"])
        )
        for ref in (one["id"], one["uuid"]):
            status, body, _ = await self.v2("GET", f"{WEBHOOKS}/{ref}/requests")
            self.assertEqual((status, [r["attempt"] for r in body["requests"]]), (200, [3, 1]))
        _, body, _ = await self.v2("GET", f"{WEBHOOKS}/{one['id']}/requests?limit=1")
        self.assertEqual(([r["attempt"] for r in body["requests"]], body["more"]), ([3], True))
        _, body, _ = await self.v2("GET", f"{WEBHOOKS}/{one['id']}/requests?uuid=b")
        self.assertEqual(body["requests"], [])
        self.assertError(await self.v2("GET", f"{WEBHOOKS}/{theirs['id']}/requests"), 404, "WebhookNotFound")

    async def test_bad_query(self) -> None:
        """Unknown, repeated and malformed query parameters of the log are 400 naming the parameter."""
        webhook = await self.add()
        for query, field in (
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("before=x", "before"),
            ("before=0", "before"),
            ("uuid=", "uuid"),
            ("uuid=a&uuid=b", "uuid"),
            ("webhook=1", "webhook"),
        ):
            for path in (LOG, f"{WEBHOOKS}/{webhook['id']}/requests"):
                self.assertError(
                    await self.v2("GET", f"{path}?{query}"), 400, "InvalidParameter", field, query
                )


class WebhookAccessTests(WebhookAPITestCase):
    def calls(self, webhook: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        path = f"{WEBHOOKS}/{webhook['id']}"
        return [
            ("GET", WEBHOOKS, {}),
            ("POST", WEBHOOKS, {"json": {"url": URL}}),
            ("GET", path, {}),
            ("PATCH", path, {"json": {"enabled": False}}),
            ("DELETE", path, {}),
            ("GET", f"{path}/requests", {}),
            ("GET", LOG, {}),
        ]

    async def test_no_or_wrong_key(self) -> None:
        """Without a valid API key every webhook endpoint is 401 and nothing changes."""
        webhook = await self.add()
        for method, path, kwargs in self.calls(webhook):
            self.assertError(await self.v2(method, path, key=None, **kwargs), 401, "Unauthenticated")
            self.assertError(await self.v2(method, path, key="wrong", **kwargs), 401, "InvalidServerAPIKey")
        _, body, _ = await self.v2("GET", WEBHOOKS)
        self.assertEqual(body["webhooks"], [webhook])

    async def test_suspended_server(self) -> None:
        """A suspended server's key is 403 on every webhook endpoint."""
        webhook = await self.add()
        self.transaction(ss.suspend_server, self.server.id, "unpaid", NOW)
        for method, path, kwargs in self.calls(webhook):
            self.assertError(await self.v2(method, path, **kwargs), 403, "ServerSuspended")

    async def test_database_unavailable(self) -> None:
        """When the database cannot be used, the webhook endpoints are 503 DatabaseUnavailable."""
        webhook = await self.add()
        broken = make_engine(f"sqlite:///{self.mktemp()}/missing/directory/mtad.sqlite3")
        self.addCleanup(broken.dispose)
        self.use_manage(ManageAPI(self.clock, SynchronousDatabase(broken), self.queue))  # type: ignore[arg-type]
        for method, path, kwargs in self.calls(webhook):
            self.assertError(await self.v2(method, path, **kwargs), 503, "DatabaseUnavailable")
        self.flushLoggedErrors()

    async def test_wrong_method(self) -> None:
        """A webhook path with a method it does not answer is 405 with Allow listing those it does."""
        webhook = await self.add()
        answer = await self.v2("PUT", f"{WEBHOOKS}/{webhook['id']}", json={})
        self.assertError(answer, 405, "MethodNotAllowed")
        self.assertEqual(answer[2].getRawHeaders("allow"), ["DELETE, GET, PATCH"])
        answer = await self.v2("POST", LOG)
        self.assertEqual(answer[2].getRawHeaders("allow"), ["GET"])

"""The ``/api/v2`` management API against a real Redis and SQLite: held messages listed, released and
cancelled one at a time and in bulk, scoped to the caller's server, and its OpenAPI document.

Messages are held the way they are in the daemon: sent through the ``/api/v1`` send API with a held
credential (or to a Development server), then held by the real `DeliveryService` on a `task.Clock`; the
event stream is recorded into SQL as the recorder does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from admin_api.manage_api import MAX_BULK_IDS, ManageAPI, route_paths
from admin_api.manage_openapi import OPENAPI
from mtad.events.recorder import MESSAGE_DELIVERY, parse_delivery
from mtad.outbound.delivery import DeliveryService, DeliverySettings
from mtad.outbound.holds import HOLD_CANCELLED
from mtad.queue.client import RedisClient
from mtad.queue.redis_queue import RedisQueue
from mtad.store import credentials as cs
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.messages import MessageStatus, find_message, list_deliveries
from mtad.submission.answers import HoldReason
from tests.admin_api.support import BASE, NOW, LegacyAPITestCase, settled
from tests.outbound.hold_support import DEVELOPMENT, record_stream, stream_events
from tests.outbound.test_delivery import POOLS, FakeDeliverer, eventually
from tests.redis_server import real_reactor
from tests.store.support import SynchronousDatabase
from tests.test_accept import closed_port

SEND = "/api/v1/send/message"
HELD = "/api/v2/held"
DAY = 86400.0
WEEK = 7 * DAY


class ManageAPITestCase(LegacyAPITestCase):
    """``self.manage`` beside the legacy API of `LegacyAPITestCase`, and held credentials to send with:
    ``self.hold_key`` (acme/main), ``self.other_hold_key`` (acme/other)."""

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.hold_key = self.new_key(self.server, hold=True)
        self.other_hold_key = self.new_key(self.other_server, hold=True)
        self.use_manage(ManageAPI(self.clock, self.database, self.queue))  # type: ignore[arg-type]

    def use_manage(self, manage: ManageAPI) -> None:
        self.manage = manage
        self.manage_stub = StubTreq(manage.app.resource())

    async def send(self, *to: str, key: str | None = None, **params: Any) -> list[int]:
        """Send one message to ``to`` through the send API; the ids of its messages, in ``to``'s order."""
        params = {"to": list(to), "from": "app@example.test", "subject": "Hi 😀", "plain_body": "x", **params}
        envelope = await self.call(SEND, params, key=key or self.hold_key)
        self.assertEqual(envelope["status"], "success", envelope)
        messages = envelope["data"]["messages"]
        return [messages[address]["id"] for address in to]

    async def held_count(self) -> int:
        count: int = await self.redis.execute("ZCARD", self.keys.held)
        return count

    async def hold_accepted(self, count: int) -> None:
        """Let the delivery service hold what was accepted, until ``count`` messages are held in all."""
        service = DeliveryService(
            self.clock, self.queue, FakeDeliverer(), POOLS, DeliverySettings(), "holder"
        )
        service.startService()
        try:

            async def probe() -> bool:
                return await self.held_count() == count

            await eventually(probe)
        finally:
            await service.stopService()

    async def record(self) -> None:
        await record_stream(self.redis, self.keys, self.engine, self.clock.seconds())

    async def held(self, *to: str, key: str | None = None) -> list[int]:
        """Send to ``to`` with a held credential, hold and record; the ids."""
        ids = await self.send(*to, key=key)
        await self.hold_accepted(await self.held_count() + len(ids))
        await self.record()
        return ids

    async def v2(
        self, method: str, path: str, *, key: str | None = "main", **kwargs: Any
    ) -> tuple[int, Any, Headers]:
        """One request to the management API: status, decoded JSON body, headers. ``key`` "main" means
        acme/main's API key; None sends none."""
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["X-Server-API-Key"] = self.key if key == "main" else key
        stub = self.manage_stub
        response = await settled(stub.flush, stub.request(method, BASE + path, headers=headers, **kwargs))
        body = await settled(stub.flush, stub.content(response))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        return response.code, json.loads(body), response.headers

    async def state(self, message_id: int) -> str | None:
        return (await self.queue.message_fields(message_id)).get("state")

    def status(self, message_id: int) -> MessageStatus:
        with self.engine.connect() as conn:
            message = find_message(conn, message_id)
        assert message is not None
        return message.status

    def assertError(  # type: ignore[override]
        self,
        answer: tuple[int, Any, Headers],
        status: int,
        code: str,
        field: str | None = None,
        given: object = None,
    ) -> dict[str, Any]:
        got, body, _ = answer
        self.assertEqual((got, body.get("error", {}).get("code")), (status, code), (given, body))
        self.assertEqual(body["error"]["field"], field, (given, body))
        self.assertIsInstance(body["error"]["message"], str)
        error: dict[str, Any] = body["error"]
        return error


class ListTests(ManageAPITestCase):
    async def test_list_filters(self) -> None:
        """GET /api/v2/held lists the server's recorded held messages, longest held first, with their
        hold times; rcpt_to (with * patterns), mail_from, before and limit narrow it down."""
        a, b = await self.held("a@example.com", "B@Example.com")
        self.clock.advance(DAY)
        (c,) = await self.held("c@other.test")
        (d,) = await self.send("d@example.com", **{"from": "news@example.test"})
        await self.hold_accepted(4)
        await self.record()
        status, body, _ = await self.v2("GET", HELD)
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["messages"]], [a, b, c, d])
        self.assertFalse(body["more"])
        first = body["messages"][0]
        self.assertEqual(
            {k: first[k] for k in ("rcpt_to", "mail_from", "subject", "held_at", "hold_expiry", "timestamp")},
            {
                "rcpt_to": "a@example.com",
                "mail_from": "app@example.test",
                "subject": "Hi 😀",
                "held_at": NOW,
                "hold_expiry": NOW + WEEK,
                "timestamp": NOW,
            },
        )
        self.assertEqual(set(first), set(OPENAPI["components"]["schemas"]["HeldMessage"]["properties"]))

        async def ids(query: str) -> list[int]:
            status, body, _ = await self.v2("GET", f"{HELD}?{query}")
            self.assertEqual(status, 200, body)
            return [m["id"] for m in body["messages"]]

        self.assertEqual(await ids("rcpt_to=*@EXAMPLE.com"), [a, b, d])
        self.assertEqual(await ids("rcpt_to=b@example.com"), [b])
        self.assertEqual(await ids("mail_from=NEWS@example.test"), [d])
        self.assertEqual(await ids(f"before={NOW + 1}"), [a, b])
        self.assertEqual(await ids("before=2023-11-14T22:13:21Z"), [a, b])
        self.assertEqual(await ids("before=2023-11-14"), [])
        _, body, _ = await self.v2("GET", f"{HELD}?limit=3")
        self.assertEqual(([m["id"] for m in body["messages"]], body["more"]), ([a, b, c], True))

    async def test_only_the_callers_server(self) -> None:
        """Another server's held messages are not listed; Development-mode holds are listed like
        credential holds."""
        (mine,) = await self.held("a@example.com")
        (theirs,) = await self.held("b@example.com", key=self.other_hold_key)
        dev_server = self.transaction(ss.create_server, "acme", "Dev", NOW, mode=ss.ServerMode.DEVELOPMENT)
        dev_key = self.new_key(dev_server)
        (dev,) = await self.held("c@example.com", key=dev_key)
        fields = await self.queue.message_fields(dev)
        self.assertEqual(fields["hold_reason"], DEVELOPMENT)
        self.assertEqual((await self.queue.message_fields(mine))["hold_reason"], HoldReason.CREDENTIAL.value)
        for key, expected in ((None, mine), (self.other_key, theirs), (dev_key, dev)):
            _, body, _ = await self.v2("GET", HELD, key=key or "main")
            self.assertEqual([m["id"] for m in body["messages"]], [expected])

    async def test_bad_query(self) -> None:
        """Unknown, repeated and malformed query parameters are 400 naming the parameter."""
        for query, field in (
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("before=last%20week", "before"),
            ("before=nan", "before"),
            ("rcpt_to=", "rcpt_to"),
            ("rcpt_to=a@x&rcpt_to=b@x", "rcpt_to"),
            ("server=acme/other", "server"),
        ):
            self.assertError(await self.v2("GET", f"{HELD}?{query}"), 400, "InvalidParameter", field)


class SingleTests(ManageAPITestCase):
    async def test_release(self) -> None:
        """POST /api/v2/held/{id}/release makes the message due now without its hold reason; a second
        release is 404, as is an unknown id."""
        message_id, kept = await self.held("a@example.com", "b@example.com")
        self.clock.advance(60)
        status, body, _ = await self.v2("POST", f"{HELD}/{message_id}/release")
        self.assertEqual((status, body), (200, {"id": message_id, "released": True}))
        fields = await self.queue.message_fields(message_id)
        self.assertEqual((fields["state"], float(fields["due_at"])), ("due", NOW + 60))
        self.assertNotIn("hold_reason", fields)
        self.assertEqual(await self.state(kept), "held")
        self.assertError(await self.v2("POST", f"{HELD}/{message_id}/release"), 404, "NotHeld")
        self.assertError(await self.v2("POST", f"{HELD}/987654321/release"), 404, "NotHeld")

    async def test_cancel(self) -> None:
        """POST /api/v2/held/{id}/cancel deletes the message with a HoldCancelled event; recorded, its
        status is HoldCancelled and it is no longer listed; cancelling again is 404."""
        message_id, kept = await self.held("a@example.com", "b@example.com")
        status, body, _ = await self.v2("POST", f"{HELD}/{message_id}/cancel")
        self.assertEqual((status, body), (200, {"id": message_id, "cancelled": True}))
        self.assertEqual(await self.queue.message_fields(message_id), {})
        self.assertEqual(await self.state(kept), "held")
        attempt = parse_delivery((await stream_events(self.redis, self.keys))[-1])
        self.assertEqual((attempt.message_id, attempt.status), (message_id, "HoldCancelled"))
        await self.record()
        self.assertEqual(self.status(message_id), MessageStatus.HOLD_CANCELLED)
        with self.engine.connect() as conn:
            last = list_deliveries(conn, message_id)[-1]
        self.assertEqual((last.status, last.details), (MessageStatus.HOLD_CANCELLED, HOLD_CANCELLED))
        _, body, _ = await self.v2("GET", HELD)
        self.assertEqual([m["id"] for m in body["messages"]], [kept])
        self.assertError(await self.v2("POST", f"{HELD}/{message_id}/cancel"), 404, "NotHeld")

    async def test_another_servers_message(self) -> None:
        """Another server's held message is 404 to release and to cancel, as if it did not exist, and
        stays held."""
        (theirs,) = await self.held("a@example.com", key=self.other_hold_key)
        for action in ("release", "cancel"):
            self.assertError(await self.v2("POST", f"{HELD}/{theirs}/{action}"), 404, "NotHeld")
        self.assertEqual(await self.state(theirs), "held")
        status, _, _ = await self.v2("POST", f"{HELD}/{theirs}/cancel", key=self.other_key)
        self.assertEqual(status, 200)

    async def test_bad_id(self) -> None:
        """An id that is not a positive 64-bit integer is 400 naming `id`."""
        for bad in ("abc", "0", "-3", "1.5", "99999999999999999999"):
            self.assertError(await self.v2("POST", f"{HELD}/{bad}/release"), 400, "InvalidParameter", "id")


class BulkTests(ManageAPITestCase):
    async def test_release_by_ids(self) -> None:
        """Bulk release by ids releases the held ones and lists the rest (released already, another
        server's, unknown) as not held, in the order given; a repeated id counts once."""
        a, b, stale = await self.held("a@example.com", "b@example.com", "c@example.com")
        (theirs,) = await self.held("d@example.com", key=self.other_hold_key)
        self.assertTrue(await self.queue.release_held(stale, NOW))
        status, body, _ = await self.v2(
            "POST", f"{HELD}/release", json={"ids": [a, stale, theirs, 987654321, b, a]}
        )
        self.assertEqual(
            (status, body), (200, {"requested": 5, "released": 2, "not_held": [stale, theirs, 987654321]})
        )
        self.assertEqual([await self.state(i) for i in (a, b, theirs)], ["due", "due", "held"])

    async def test_cancel_by_filters(self) -> None:
        """Bulk cancel by filters cancels this server's recorded held messages that match, only those,
        each recorded HoldCancelled."""
        a, b, other_domain = await self.held("a@example.com", "b@example.com", "c@elsewhere.test")
        self.clock.advance(DAY)
        (young,) = await self.held("d@example.com")
        (theirs,) = await self.held("e@example.com", key=self.other_hold_key)
        status, body, _ = await self.v2(
            "POST", f"{HELD}/cancel", json={"rcpt_to": "*@example.com", "before": NOW + 1}
        )
        self.assertEqual((status, body), (200, {"requested": 2, "cancelled": 2, "not_held": []}))
        await self.record()
        self.assertEqual(
            [self.status(i) for i in (a, b, other_domain, young, theirs)],
            [MessageStatus.HOLD_CANCELLED] * 2 + [MessageStatus.HELD] * 3,
        )
        cancelled = [e for e in await stream_events(self.redis, self.keys) if e.type == MESSAGE_DELIVERY]
        self.assertEqual(
            sorted(
                parse_delivery(e).message_id for e in cancelled if parse_delivery(e).status == "HoldCancelled"
            ),
            [a, b],
        )

    async def test_all(self) -> None:
        """{"all": true} releases every held message of the server and none of another's; then none of
        them is held any more."""
        mine = await self.held("a@example.com", "b@example.com")
        (theirs,) = await self.held("c@example.com", key=self.other_hold_key)
        status, body, _ = await self.v2("POST", f"{HELD}/release", json={"all": True})
        self.assertEqual((status, body), (200, {"requested": 2, "released": 2, "not_held": []}))
        self.assertEqual([await self.state(i) for i in (*mine, theirs)], ["due", "due", "held"])
        # Released messages are Held in SQL until delivery records them: listed, but no longer held.
        await self.record()
        status, body, _ = await self.v2("POST", f"{HELD}/cancel", json={"all": True, "mail_from": "*"})
        self.assertEqual((status, body), (200, {"requested": 2, "cancelled": 0, "not_held": mine}))

    async def test_listed_but_no_longer_held(self) -> None:
        """A message SQL still lists as held that has left the held set (expired, released by the CLI)
        is reported as not held, not counted."""
        _, gone = await self.held("a@example.com", "b@example.com")
        self.assertTrue(await self.queue.release_held(gone, NOW))
        status, body, _ = await self.v2("POST", f"{HELD}/cancel", json={"rcpt_to": "*"})
        self.assertEqual((status, body), (200, {"requested": 2, "cancelled": 1, "not_held": [gone]}))

    async def test_bad_bodies(self) -> None:
        """Bodies that are not JSON objects are 400 InvalidJSON; wrong fields and types are 400 naming the
        field; nothing is done."""
        (message_id,) = await self.held("a@example.com")
        for body in (b"{", b"", b"[1, 2]", b'"all"', b"\xff"):
            self.assertError(await self.v2("POST", f"{HELD}/release", data=body), 400, "InvalidJSON")
        for given, field in (
            ({"ids": message_id}, "ids"),
            ({"ids": []}, "ids"),
            ({"ids": [message_id, "2"]}, "ids[1]"),
            ({"ids": [True]}, "ids[0]"),
            ({"ids": [0]}, "ids[0]"),
            ({"ids": [1.5]}, "ids[0]"),
            ({"ids": list(range(1, MAX_BULK_IDS + 2))}, "ids"),
            ({"ids": [message_id], "all": True}, "all"),
            ({"ids": [message_id], "rcpt_to": "*"}, "rcpt_to"),
            ({"all": "yes"}, "all"),
            ({"rcpt_to": 5}, "rcpt_to"),
            ({"mail_from": " "}, "mail_from"),
            ({"before": "last week"}, "before"),
            ({"before": None}, "before"),
            ({"server": "acme/other"}, "server"),
            ({}, None),
            ({"all": False}, None),
        ):
            for action in ("release", "cancel"):
                answer = await self.v2("POST", f"{HELD}/{action}", json=given)
                self.assertError(answer, 400, "InvalidParameter", field, given)
        self.assertEqual(await self.state(message_id), "held")


class AccessTests(ManageAPITestCase):
    async def test_no_or_wrong_key(self) -> None:
        """Without a key, or with one that is not an API key, every endpoint but the document is 401 with
        a WWW-Authenticate challenge; nothing is done."""
        (message_id,) = await self.held("a@example.com")
        calls = [
            ("GET", HELD, {}),
            ("POST", f"{HELD}/{message_id}/release", {}),
            ("POST", f"{HELD}/{message_id}/cancel", {}),
            ("POST", f"{HELD}/release", {"json": {"all": True}}),
            ("POST", f"{HELD}/cancel", {"json": {"all": True}}),
        ]
        smtp_password = self.transaction(
            cs.create_credential, self.server.id, cs.CredentialType.SMTP, NOW
        ).secret
        for method, path, kwargs in calls:
            answer = await self.v2(method, path, key=None, **kwargs)
            self.assertError(answer, 401, "Unauthenticated")
            self.assertEqual(
                answer[2].getRawHeaders("www-authenticate"), ['APIKey header="X-Server-API-Key"']
            )
            self.assertError(await self.v2(method, path, key="  ", **kwargs), 401, "Unauthenticated")
            self.assertError(await self.v2(method, path, key="wrong", **kwargs), 401, "InvalidServerAPIKey")
            self.assertError(
                await self.v2(method, path, key=smtp_password, **kwargs), 401, "InvalidServerAPIKey"
            )
        self.assertEqual(await self.state(message_id), "held")

    async def test_suspended_server(self) -> None:
        """A suspended server's key is 403 ServerSuspended; its held messages stay held."""
        (message_id,) = await self.held("a@example.com")
        self.transaction(ss.suspend_server, self.server.id, "unpaid", NOW)
        body = self.assertError(await self.v2("GET", HELD), 403, "ServerSuspended")
        self.assertEqual(body["reason"], "unpaid")
        self.assertError(await self.v2("POST", f"{HELD}/{message_id}/release"), 403, "ServerSuspended")
        self.assertError(await self.v2("POST", f"{HELD}/cancel", json={"all": True}), 403, "ServerSuspended")
        self.assertEqual(await self.state(message_id), "held")

    async def test_revoked_at_once(self) -> None:
        """A key is looked up on every request: a deleted credential is refused on the next one."""
        status, _, _ = await self.v2("GET", HELD)
        self.assertEqual(status, 200)
        credential = next(
            c
            for c in self.transaction(cs.list_credentials, self.server.id)
            if c.type is cs.CredentialType.API
        )
        self.transaction(cs.delete_credential, credential.id)
        self.assertError(await self.v2("GET", HELD), 401, "InvalidServerAPIKey")

    async def test_use_recorded(self) -> None:
        """A request records the credential's last use (at most once a minute)."""

        def last_used() -> float | None:
            (credential,) = [
                c for c in self.transaction(cs.list_credentials, self.server.id) if c.last_used_at is not None
            ] or [None]
            return None if credential is None else credential.last_used_at

        self.assertIsNone(last_used())
        await self.v2("GET", HELD)
        self.assertEqual(last_used(), NOW)
        self.clock.advance(30)
        await self.v2("GET", HELD)
        self.assertEqual(last_used(), NOW)
        self.clock.advance(31)
        await self.v2("GET", HELD)
        self.assertEqual(last_used(), NOW + 61)


class UnavailableTests(ManageAPITestCase):
    async def test_redis_unavailable(self) -> None:
        """Without Redis, releasing and cancelling are 503 QueueUnavailable, in bulk with nothing
        completed; listing (SQL only) still works."""
        (message_id,) = await self.held("a@example.com")
        client = RedisClient.from_url(real_reactor(), f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)
        self.addCleanup(client.disconnect)
        self.use_manage(ManageAPI(self.clock, self.database, RedisQueue(client, self.keys)))  # type: ignore[arg-type]
        self.assertError(await self.v2("POST", f"{HELD}/{message_id}/release"), 503, "QueueUnavailable")
        self.assertError(await self.v2("POST", f"{HELD}/{message_id}/cancel"), 503, "QueueUnavailable")
        error = self.assertError(
            await self.v2("POST", f"{HELD}/cancel", json={"ids": [message_id]}), 503, "QueueUnavailable"
        )
        self.assertEqual((error["requested"], error["completed"]), (1, []))
        status, body, _ = await self.v2("GET", HELD)
        self.assertEqual((status, [m["id"] for m in body["messages"]]), (200, [message_id]))
        self.assertEqual(await self.state(message_id), "held")

    async def test_database_unavailable(self) -> None:
        """When the database cannot be used, every authenticated endpoint is 503 DatabaseUnavailable."""
        broken = make_engine(f"sqlite:///{self.mktemp()}/missing/directory/mtad.sqlite3")
        self.addCleanup(broken.dispose)
        self.use_manage(ManageAPI(self.clock, SynchronousDatabase(broken), self.queue))  # type: ignore[arg-type]
        self.assertError(await self.v2("GET", HELD), 503, "DatabaseUnavailable")
        self.assertError(await self.v2("POST", f"{HELD}/1/release"), 503, "DatabaseUnavailable")
        self.flushLoggedErrors()

    async def test_database_timeout(self) -> None:
        """A database that does not answer within the timeout is 503 DatabaseUnavailable."""
        from tests.smtp.test_relay_policy import StalledDatabase

        clock = Clock()
        manage = ManageAPI(clock, StalledDatabase(), self.queue, timeout=5.0)  # type: ignore[arg-type]
        self.use_manage(manage)
        stub = self.manage_stub
        d = stub.request("GET", BASE + HELD, headers={"X-Server-API-Key": self.key})
        stub.flush()
        clock.advance(5)
        response = await settled(stub.flush, d)
        body = json.loads(await settled(stub.flush, stub.content(response)))
        self.assertEqual((response.code, body["error"]["code"]), (503, "DatabaseUnavailable"))


class RoutingTests(ManageAPITestCase):
    async def test_unknown_path_and_method(self) -> None:
        """An unknown path under /api/v2 is a JSON 404; a known path with the wrong method a JSON 405 with
        Allow."""
        self.assertError(await self.v2("GET", "/api/v2/nothing"), 404, "NotFound")
        answer = await self.v2("GET", f"{HELD}/release")
        self.assertError(answer, 405, "MethodNotAllowed")
        self.assertEqual(answer[2].getRawHeaders("allow"), ["POST"])


class DocumentTests(ManageAPITestCase):
    async def test_served_document(self) -> None:
        """GET /api/v2/openapi.json needs no key and serves the OpenAPI 3.1 document as valid JSON."""
        status, body, _ = await self.v2("GET", "/api/v2/openapi.json", key=None)
        self.assertEqual((status, body), (200, OPENAPI))
        self.assertEqual(body["openapi"], "3.1.0")
        self.assertEqual(json.loads(json.dumps(OPENAPI)), OPENAPI)

    def test_routes_match_document(self) -> None:
        """Every route the app serves is in the document with its methods, and nothing else is."""
        documented = {
            path: {m for m in item if m in ("get", "put", "post", "delete", "patch")}
            for path, item in OPENAPI["paths"].items()
        }
        self.assertEqual(route_paths(ManageAPI.app), documented)

    def test_document_consistent(self) -> None:
        """Every $ref resolves, every path parameter is declared, every operation has a unique id and
        answers 200 (201 to create), and those needing a key document 401, 403 and 503."""

        def resolve(ref: str) -> Any:
            self.assertTrue(ref.startswith("#/"), ref)
            node: Any = OPENAPI
            for part in ref[2:].split("/"):
                self.assertIn(part, node, ref)
                node = node[part]
            return node

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if "$ref" in node:
                    resolve(node["$ref"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(OPENAPI)
        operation_ids = []
        for path, item in OPENAPI["paths"].items():
            for method, operation in item.items():
                operation_ids.append(operation["operationId"])
                declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
                self.assertEqual(declared, set(re.findall(r"{(\w+)}", path)), path)
                self.assertTrue({"200", "201"} & set(operation["responses"]), (method, path))
                if operation.get("security", OPENAPI["security"]):
                    self.assertLessEqual({"401", "403", "503"}, set(operation["responses"]), (method, path))
        self.assertEqual(len(operation_ids), len(set(operation_ids)))

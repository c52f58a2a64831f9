"""The suppression endpoints of the ``/api/v2`` management API, against real SQLite (and the test Redis
the management API fixture brings): entries added, read, listed in pages, exported and removed, all
scoped to the caller's server."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from admin_api.manage_api import ManageAPI
from admin_api.manage_openapi import OPENAPI
from mtad.config import SuppressionConfig
from mtad.store import suppressions as sup
from tests.admin_api.support import BASE, NOW, settled
from tests.admin_api.test_manage_api import ManageAPITestCase

SUPPRESSIONS = "/api/v2/suppressions"
DAY = 86400.0


class SuppressionAPITests(ManageAPITestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.use_manage(
            ManageAPI(
                self.clock,
                self.database,  # type: ignore[arg-type]
                self.queue,
                suppression=SuppressionConfig(expiry_days=10, unsubscribe_expiry_days=0),
            )
        )

    async def add(self, key: str = "main", **given: Any) -> dict[str, Any]:
        status, body, _ = await self.v2("POST", SUPPRESSIONS, key=key, json=given)
        self.assertEqual(status, 201, body)
        entry: dict[str, Any] = body
        return entry

    async def raw(self, path: str, key: str | None = "main") -> tuple[int, bytes, list[str]]:
        """A request answered with something other than JSON: status, body, content types."""
        headers = {} if key is None else {"X-Server-API-Key": self.key if key == "main" else key}
        stub = self.manage_stub
        response = await settled(stub.flush, stub.request("GET", BASE + path, headers=headers))
        body = await settled(stub.flush, stub.content(response))
        return response.code, body, response.headers.getRawHeaders("content-type") or []

    async def test_add_get_remove(self) -> None:
        """POST adds an entry (201, Location), lower-cased, Manual expiring after expiry_days unless
        `expires_at` says otherwise (null: never), Unsubscribe by its own setting; GET reads it in any
        case; DELETE removes it, then both are 404; another server sees none of it."""
        status, body, headers = await self.v2(
            "POST", SUPPRESSIONS, json={"address": "Bob@Example.COM", "reason": "asked 😀"}
        )
        self.assertEqual(status, 201)
        self.assertEqual(
            body,
            {
                "address": "bob@example.com",
                "source": "Manual",
                "reason": "asked 😀",
                "message_id": None,
                "created_at": NOW,
                "expires_at": NOW + 10 * DAY,
            },
        )
        self.assertEqual(set(body), set(OPENAPI["components"]["schemas"]["Suppression"]["properties"]))
        self.assertEqual(headers.getRawHeaders("location"), [f"{SUPPRESSIONS}/bob@example.com"])
        self.assertEqual((await self.add(address="u@x.test", source="Unsubscribe"))["expires_at"], None)
        self.assertEqual((await self.add(address="n@x.test", expires_at=None))["expires_at"], None)
        self.assertEqual(
            (await self.add(address="t@x.test", expires_at="2023-11-20T00:00:00Z"))["expires_at"],
            1700438400.0,
        )
        self.assertEqual((await self.add(address="s@x.test", expires_at=NOW + 5))["expires_at"], NOW + 5)
        status, got, _ = await self.v2("GET", f"{SUPPRESSIONS}/BOB@example.com")
        self.assertEqual((status, got), (200, body))
        self.assertError(
            await self.v2("GET", f"{SUPPRESSIONS}/bob@example.com", key=self.other_key),
            404,
            "SuppressionNotFound",
        )
        self.assertError(
            await self.v2("DELETE", f"{SUPPRESSIONS}/bob@example.com", key=self.other_key),
            404,
            "SuppressionNotFound",
        )
        status, gone, _ = await self.v2("DELETE", f"{SUPPRESSIONS}/Bob@Example.com")
        self.assertEqual((status, gone), (200, {"address": "bob@example.com", "deleted": True}))
        self.assertError(await self.v2("GET", f"{SUPPRESSIONS}/bob@example.com"), 404, "SuppressionNotFound")
        self.assertError(
            await self.v2("DELETE", f"{SUPPRESSIONS}/bob@example.com"), 404, "SuppressionNotFound"
        )

    async def test_bad_new_entries(self) -> None:
        """Bodies that are not JSON objects are 400 InvalidJSON; a missing or bad address, an unknown
        source, a bad or past expiry, a reason that is not a string and unknown fields are 400 naming
        the field; nothing is added."""
        for raw in (b"{", b"", b"[]", b'"a@b.c"'):
            self.assertError(await self.v2("POST", SUPPRESSIONS, data=raw), 400, "InvalidJSON", None, raw)
        for given, field in (
            ({}, "address"),
            ({"address": None}, "address"),
            ({"address": 5}, "address"),
            ({"address": "bob"}, "address"),
            ({"address": "a b@c.d"}, "address"),
            ({"address": "a@b.c", "source": "manual"}, "source"),
            ({"address": "a@b.c", "reason": 5}, "reason"),
            ({"address": "a@b.c", "expires_at": NOW}, "expires_at"),
            ({"address": "a@b.c", "expires_at": "yesterday"}, "expires_at"),
            ({"address": "a@b.c", "expires_at": True}, "expires_at"),
            ({"address": "a@b.c", "days": 3}, "days"),
        ):
            self.assertError(
                await self.v2("POST", SUPPRESSIONS, json=given), 400, "InvalidParameter", field, given
            )
        _, body, _ = await self.v2("GET", SUPPRESSIONS)
        self.assertEqual(body["total"], 0)

    async def test_list_paged_and_filtered(self) -> None:
        """GET lists the server's entries newest first, a page at a time with the total and page count,
        filtered by source and address substring; bad query parameters are 400 naming them."""
        for i in range(5):
            self.clock.advance(1)
            await self.add(address=f"user{i}@example.com", source="HardBounce" if i % 2 else "Manual")
        await self.add(address="theirs@example.com", key=self.other_key)
        status, body, _ = await self.v2("GET", f"{SUPPRESSIONS}?per_page=2&page=2")
        self.assertEqual(status, 200)
        self.assertEqual(
            {k: v for k, v in body.items() if k != "suppressions"},
            {"page": 2, "per_page": 2, "total": 5, "pages": 3},
        )
        self.assertEqual(
            [s["address"] for s in body["suppressions"]], ["user2@example.com", "user1@example.com"]
        )
        _, body, _ = await self.v2("GET", f"{SUPPRESSIONS}?source=HardBounce")
        self.assertEqual(
            [s["address"] for s in body["suppressions"]], ["user3@example.com", "user1@example.com"]
        )
        _, body, _ = await self.v2("GET", f"{SUPPRESSIONS}?search=USER4")
        self.assertEqual([s["address"] for s in body["suppressions"]], ["user4@example.com"])
        _, body, _ = await self.v2("GET", SUPPRESSIONS, key=self.other_key)
        self.assertEqual([s["address"] for s in body["suppressions"]], ["theirs@example.com"])
        for query, field in (
            ("page=0", "page"),
            ("per_page=1001", "per_page"),
            ("per_page=x", "per_page"),
            ("source=Bounce", "source"),
            ("limit=5", "limit"),
            ("page=1&page=2", "page"),
        ):
            self.assertError(
                await self.v2("GET", f"{SUPPRESSIONS}?{query}"), 400, "InvalidParameter", field, query
            )

    async def test_export(self) -> None:
        """GET /export streams every entry of the server (more than one chunk) as JSON lines, or as CSV
        with a header, filtered like the list; a bad format is 400 JSON; no key is 401."""
        with self.engine.begin() as conn:
            for i in range(1203):
                sup.add_suppression(
                    conn, self.server.id, f"u{i}@example.com", "Complaint", NOW, reason="abuse"
                )
        await self.add(address="theirs@example.com", key=self.other_key)
        status, body, types = await self.raw(f"{SUPPRESSIONS}/export")
        self.assertEqual((status, types), (200, ["application/jsonl; charset=utf-8"]))
        entries = [json.loads(line) for line in body.decode().splitlines()]
        self.assertEqual([e["address"] for e in entries], [f"u{i}@example.com" for i in range(1203)])
        self.assertEqual(entries[0]["source"], "Complaint")
        status, body, types = await self.raw(f"{SUPPRESSIONS}/export?format=csv&search=u120")
        self.assertEqual((status, types), (200, ["text/csv; charset=utf-8"]))
        rows = list(csv.reader(io.StringIO(body.decode())))
        self.assertEqual(rows[0], ["address", "source", "reason", "message_id", "created_at", "expires_at"])
        self.assertEqual(
            [r[0] for r in rows[1:]],
            ["u120@example.com", "u1200@example.com", "u1201@example.com", "u1202@example.com"],
        )
        self.assertEqual(rows[1][1:], ["Complaint", "abuse", "", "2023-11-14T22:13:20Z", ""])
        _, body, _ = await self.raw(f"{SUPPRESSIONS}/export?source=Manual")
        self.assertEqual(body, b"")
        status, body, types = await self.raw(f"{SUPPRESSIONS}/export?format=xml")
        self.assertEqual((status, types), (400, ["application/json; charset=utf-8"]))
        self.assertEqual(json.loads(body)["error"]["field"], "format")
        status, _, _ = await self.raw(f"{SUPPRESSIONS}/export", key=None)
        self.assertEqual(status, 401)

"""The endpoint and route paths of the ``/api/v2`` management API, through the real Klein app against real
SQLite (Postgres and MySQL too when ``MTAD_TEST_POSTGRES_URL`` / ``MTAD_TEST_MYSQL_URL`` are set): endpoints
of each kind and routes added, read, listed and deleted, bad input answered naming the field, names and
addresses already taken 409, all scoped to the caller's server."""

from __future__ import annotations

from typing import Any, ClassVar

from admin_api.manage_api import ManageAPI
from admin_api.manage_openapi import OPENAPI
from mtad.store import domains as ds
from mtad.store import organizations as os_
from mtad.store import routes as rs
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from tests.admin_api.support import NOW
from tests.admin_api.test_manage_api import ManageAPITestCase
from tests.store.support import MYSQL, POSTGRES, SQLITE, SynchronousDatabase, fresh_database_url

ENDPOINTS = "/api/v2/endpoints"
ROUTES = "/api/v2/routes"
URL = "https://in.example.com/mail"
HTTP = {"kind": "HTTP", "name": "app", "url": URL}
SMTP = {"kind": "SMTP", "name": "relay", "hostname": "mx.example.net"}
ADDRESS = {"kind": "Address", "name": "fwd", "address": "someone@example.org"}
#: An endpoint's JSON with every field of every kind null, for the expected answers to start from.
NULLS: dict[str, Any] = {
    "url": None,
    "encoding": None,
    "format": None,
    "strip_replies": None,
    "include_attachments": None,
    "timeout": None,
    "hostname": None,
    "port": None,
    "tls_mode": None,
    "address": None,
}


class RoutesAPITestCase(ManageAPITestCase):
    """acme/main owns the verified domain ``example.test``, acme/other ``other.test``; the organization
    owns ``shared.test``; ``unverified.test`` of acme/main is not verified."""

    backend: ClassVar[str] = SQLITE

    async def _set_up_redis(self) -> None:
        url = None if self.backend == SQLITE else fresh_database_url(self, self.backend)
        await super()._set_up_redis()
        if url is not None:
            # The fixture's database is SQLite: the same again on the backend under test.
            self.engine = make_engine(url)
            self.addCleanup(self.engine.dispose)
            upgrade_schema(self.engine)
            self.database = SynchronousDatabase(self.engine)
            self.transaction(os_.create_organization, "Acme", NOW)
            self.server = self.transaction(ss.create_server, "acme", "Main", NOW)
            self.other_server = self.transaction(ss.create_server, "acme", "Other", NOW)
            self.key = self.new_key(self.server)
            self.other_key = self.new_key(self.other_server)
            self.use_manage(ManageAPI(self.clock, self.database, self.queue))  # type: ignore[arg-type]
        self.domain("example.test", server_id=self.server.id)
        self.domain("other.test", server_id=self.other_server.id)
        self.domain("shared.test", organization_id=self.server.organization_id)
        self.domain("unverified.test", server_id=self.server.id, verified=False)

    def domain(self, name: str, *, verified: bool = True, **owner: Any) -> None:
        made = self.transaction(ds.create_domain, name, NOW, rsa_bits=1024, **owner)
        if verified:
            self.transaction(ds.verify_domain, made.id, NOW)

    async def endpoint(self, key: str = "main", **given: Any) -> dict[str, Any]:
        """Add an endpoint through the API (`HTTP` with ``given`` unless ``given`` has a kind); its JSON."""
        status, body, _ = await self.v2(
            "POST", ENDPOINTS, key=key, json=given if "kind" in given else {**HTTP, **given}
        )
        self.assertEqual(status, 201, body)
        endpoint: dict[str, Any] = body
        return endpoint

    async def route(self, key: str = "main", **given: Any) -> dict[str, Any]:
        status, body, _ = await self.v2("POST", ROUTES, key=key, json=given)
        self.assertEqual(status, 201, body)
        route: dict[str, Any] = body
        return route


class EndpointTests(RoutesAPITestCase):
    async def test_add_get_list(self) -> None:
        """POST /api/v2/endpoints adds an endpoint of each kind (201, Location), with every field of every
        kind in its JSON (null where not of its kind) and the store's defaults; GET lists the server's by
        name and reads one by uuid (any case), name or id; another server sees none of them."""
        status, body, headers = await self.v2("POST", ENDPOINTS, json=HTTP)
        self.assertEqual(status, 201, body)
        http = body
        self.assertEqual(headers.getRawHeaders("location"), [f"{ENDPOINTS}/{http['uuid']}"])
        self.assertEqual(set(http), set(OPENAPI["components"]["schemas"]["Endpoint"]["properties"]))
        self.assertIsInstance(http["id"], int)
        self.assertEqual(
            {k: v for k, v in http.items() if k not in ("id", "uuid")},
            {
                **NULLS,
                "kind": "HTTP",
                "name": "app",
                "url": URL,
                "encoding": "BodyAsJSON",
                "format": "Hash",
                "strip_replies": False,
                "include_attachments": True,
                "timeout": 5,
            },
        )
        form = await self.endpoint(
            kind="http",
            name="raw 😀",
            url="http://127.0.0.1:8080/in",
            encoding="FormData",
            format="RawMessage",
            strip_replies=True,
            include_attachments=False,
            timeout=60,
        )
        self.assertEqual(
            {k: v for k, v in form.items() if k not in ("id", "uuid")},
            {
                **NULLS,
                "kind": "HTTP",
                "name": "raw 😀",
                "url": "http://127.0.0.1:8080/in",
                "encoding": "FormData",
                "format": "RawMessage",
                "strip_replies": True,
                "include_attachments": False,
                "timeout": 60,
            },
        )
        smtp = await self.endpoint(**SMTP)
        self.assertEqual(
            {k: v for k, v in smtp.items() if k not in ("id", "uuid")},
            {
                **NULLS,
                "kind": "SMTP",
                "name": "relay",
                "hostname": "mx.example.net",
                "port": 25,
                "tls_mode": "Auto",
            },
        )
        tls = await self.endpoint(
            kind="SMTP", name="tls", hostname="MX.Example.NET.", port=465, tls_mode="tls"
        )
        self.assertEqual((tls["hostname"], tls["port"], tls["tls_mode"]), ("mx.example.net", 465, "TLS"))
        forward = await self.endpoint(kind="Address", name="fwd", address="Someone@Example.ORG")
        self.assertEqual(
            {k: v for k, v in forward.items() if k not in ("id", "uuid")},
            {**NULLS, "kind": "Address", "name": "fwd", "address": "someone@example.org"},
        )
        status, body, _ = await self.v2("GET", ENDPOINTS)
        self.assertEqual(status, 200)
        self.assertEqual(body, {"endpoints": [http, forward, form, smtp, tls]})
        for ref in (smtp["uuid"], smtp["uuid"].upper(), "relay", str(smtp["id"])):
            self.assertEqual((await self.v2("GET", f"{ENDPOINTS}/{ref}"))[:2], (200, smtp), ref)
        theirs = await self.endpoint(key=self.other_key)
        self.assertEqual(theirs["name"], "app")
        _, body, _ = await self.v2("GET", ENDPOINTS, key=self.other_key)
        self.assertEqual(body, {"endpoints": [theirs]})
        for ref in (smtp["uuid"], "relay", str(smtp["id"])):
            self.assertError(
                await self.v2("GET", f"{ENDPOINTS}/{ref}", key=self.other_key), 404, "EndpointNotFound"
            )
        self.assertError(await self.v2("GET", f"{ENDPOINTS}/987654"), 404, "EndpointNotFound")
        self.assertError(await self.v2("GET", f"{ENDPOINTS}/nothing"), 404, "EndpointNotFound")

    async def test_bad_new_endpoints(self) -> None:
        """Bodies that are not JSON objects are 400 InvalidJSON; a missing or unknown kind, a missing or bad
        field, a field of another kind and an unknown field are 400 naming it; nothing is added."""
        for raw in (b"{", b"", b"[]", b'"HTTP"', b"\xff"):
            self.assertError(await self.v2("POST", ENDPOINTS, data=raw), 400, "InvalidJSON", None, raw)
        for given, field in (
            ({}, "kind"),
            ({"name": "x", "url": URL}, "kind"),
            ({**HTTP, "kind": "FTP"}, "kind"),
            ({**HTTP, "kind": 1}, "kind"),
            ({"kind": "HTTP", "url": URL}, "name"),
            ({**HTTP, "name": 5}, "name"),
            ({**HTTP, "name": "  "}, "name"),
            ({**HTTP, "name": "x" * 256}, "name"),
            ({"kind": "HTTP", "name": "x"}, "url"),
            ({**HTTP, "url": None}, "url"),
            ({**HTTP, "url": "ftp://x.test/"}, "url"),
            ({**HTTP, "url": "https://u:p@x.test/"}, "url"),
            ({**HTTP, "encoding": "XML"}, "encoding"),
            ({**HTTP, "encoding": None}, "encoding"),
            ({**HTTP, "format": "Text"}, "format"),
            ({**HTTP, "timeout": 4}, "timeout"),
            ({**HTTP, "timeout": 61}, "timeout"),
            ({**HTTP, "timeout": "5"}, "timeout"),
            ({**HTTP, "timeout": True}, "timeout"),
            ({**HTTP, "timeout": 5.5}, "timeout"),
            ({**HTTP, "strip_replies": "yes"}, "strip_replies"),
            ({**HTTP, "include_attachments": 1}, "include_attachments"),
            ({**HTTP, "port": 25}, "port"),
            ({**HTTP, "address": "a@b.test"}, "address"),
            ({"kind": "SMTP", "name": "x"}, "hostname"),
            ({**SMTP, "hostname": "bad host"}, "hostname"),
            ({**SMTP, "hostname": 5}, "hostname"),
            ({**SMTP, "port": 0}, "port"),
            ({**SMTP, "port": 65536}, "port"),
            ({**SMTP, "port": "25"}, "port"),
            ({**SMTP, "tls_mode": "SSL"}, "tls_mode"),
            ({**SMTP, "url": URL}, "url"),
            ({**SMTP, "timeout": 10}, "timeout"),
            ({"kind": "Address", "name": "x"}, "address"),
            ({**ADDRESS, "address": "nobody"}, "address"),
            ({**ADDRESS, "address": "a b@example.org"}, "address"),
            ({**ADDRESS, "address": "a@"}, "address"),
            ({**ADDRESS, "address": ["a@b.test"]}, "address"),
            ({**ADDRESS, "hostname": "mx.example.net"}, "hostname"),
            ({**HTTP, "colour": "red"}, "colour"),
        ):
            error = self.assertError(
                await self.v2("POST", ENDPOINTS, json=given), 400, "InvalidParameter", field, given
            )
            self.assertIn(f"`{field}`", error["message"], given)
        _, body, _ = await self.v2("GET", ENDPOINTS)
        self.assertEqual(body, {"endpoints": []})

    async def test_name_taken(self) -> None:
        """A name the server's endpoints already have is 409 EndpointExists naming `name`, whatever the
        kind; another server may use it."""
        first = await self.endpoint()
        for given in (HTTP, {**SMTP, "name": "app"}, {**ADDRESS, "name": " app "}):
            self.assertError(
                await self.v2("POST", ENDPOINTS, json=given), 409, "EndpointExists", "name", given
            )
        await self.endpoint(key=self.other_key)
        _, body, _ = await self.v2("GET", ENDPOINTS)
        self.assertEqual(body, {"endpoints": [first]})

    async def test_delete(self) -> None:
        """DELETE removes the endpoint (again is 404): routes lose it, and one in Endpoint mode left with
        none turns to Reject; another server's endpoint is 404 and stays."""
        app = await self.endpoint()
        other = await self.endpoint(name="other", url="https://other.example.com/")
        theirs = await self.endpoint(key=self.other_key)
        only = await self.route(address="info@example.test", endpoints=["app"])
        both = await self.route(address="*@example.test", endpoints=["app", "other"])
        self.assertError(await self.v2("DELETE", f"{ENDPOINTS}/{theirs['uuid']}"), 404, "EndpointNotFound")
        status, body, _ = await self.v2("DELETE", f"{ENDPOINTS}/app")
        self.assertEqual(
            (status, body), (200, {"id": app["id"], "uuid": app["uuid"], "name": "app", "deleted": True})
        )
        for ref in ("app", app["uuid"], str(app["id"])):
            self.assertError(await self.v2("DELETE", f"{ENDPOINTS}/{ref}"), 404, "EndpointNotFound")
            self.assertError(await self.v2("GET", f"{ENDPOINTS}/{ref}"), 404, "EndpointNotFound")
        _, body, _ = await self.v2("GET", f"{ROUTES}/{only['uuid']}")
        self.assertEqual(body, {**only, "mode": "Reject", "endpoints": []})
        _, body, _ = await self.v2("GET", f"{ROUTES}/{both['uuid']}")
        self.assertEqual(
            body, {**both, "endpoints": [{"uuid": other["uuid"], "name": "other", "kind": "HTTP"}]}
        )
        status, body, _ = await self.v2("DELETE", f"{ENDPOINTS}/{other['id']}")
        self.assertEqual((status, body["uuid"]), (200, other["uuid"]))
        _, body, _ = await self.v2("GET", ENDPOINTS, key=self.other_key)
        self.assertEqual(body, {"endpoints": [theirs]})


class RouteTests(RoutesAPITestCase):
    async def test_add_get_list(self) -> None:
        """POST /api/v2/routes adds a route (201, Location) with its endpoints in the order named (by name
        or uuid); the mode and spam mode default to Endpoint and Mark; GET lists the server's and reads one
        by uuid, token, address (any case) or id; another server sees none of them."""
        app = await self.endpoint()
        relay = await self.endpoint(**SMTP)
        status, body, headers = await self.v2(
            "POST", ROUTES, json={"address": "Info@Example.TEST", "endpoints": [relay["uuid"], "app"]}
        )
        self.assertEqual(status, 201, body)
        info = body
        self.assertEqual(headers.getRawHeaders("location"), [f"{ROUTES}/{info['uuid']}"])
        self.assertEqual(set(info), set(OPENAPI["components"]["schemas"]["Route"]["properties"]))
        self.assertEqual(
            {k: v for k, v in info.items() if k not in ("id", "uuid", "token")},
            {
                "address": "info@example.test",
                "name": "info",
                "domain": "example.test",
                "mode": "Endpoint",
                "spam_mode": "Mark",
                "endpoints": [
                    {"uuid": relay["uuid"], "name": "relay", "kind": "SMTP"},
                    {"uuid": app["uuid"], "name": "app", "kind": "HTTP"},
                ],
            },
        )
        self.assertRegex(info["token"], "^[a-z0-9]{8}$")
        wildcard = await self.route(address="*@example.test", endpoints=["app"], spam_mode="quarantine")
        self.assertEqual(
            (wildcard["name"], wildcard["domain"], wildcard["address"], wildcard["spam_mode"]),
            ("*", "example.test", "*@example.test", "Quarantine"),
        )
        held = await self.route(address="held@shared.test", mode="hold", endpoints=[])
        self.assertEqual((held["mode"], held["endpoints"]), ("Hold", []))
        kept = await self.route(address="kept@example.test", mode="Accept", spam_mode="Fail", endpoints=None)
        self.assertEqual((kept["mode"], kept["spam_mode"]), ("Accept", "Fail"))
        bounces = await self.route(address="__returnpath__", endpoints=[app["uuid"]])
        self.assertEqual(
            (bounces["name"], bounces["domain"], bounces["address"]),
            ("__returnpath__", None, "__returnpath__"),
        )
        status, body, _ = await self.v2("GET", ROUTES)
        self.assertEqual(status, 200)
        listed = body["routes"]
        self.assertEqual(
            sorted(r["address"] for r in listed),
            sorted(
                [
                    "info@example.test",
                    "*@example.test",
                    "held@shared.test",
                    "kept@example.test",
                    "__returnpath__",
                ]
            ),
        )
        self.assertEqual(
            [r["address"] for r in listed if r["domain"] is not None],
            ["*@example.test", "info@example.test", "kept@example.test", "held@shared.test"],
        )
        self.assertIn(info, listed)
        for ref in (
            info["uuid"],
            info["uuid"].upper(),
            info["token"],
            info["token"].upper(),
            "info@example.test",
            "INFO@Example.Test",
            str(info["id"]),
        ):
            self.assertEqual((await self.v2("GET", f"{ROUTES}/{ref}"))[:2], (200, info), ref)
        self.assertEqual((await self.v2("GET", f"{ROUTES}/*@example.test"))[:2], (200, wildcard))
        self.assertEqual((await self.v2("GET", f"{ROUTES}/%2A@example.test"))[:2], (200, wildcard))
        self.assertEqual((await self.v2("GET", f"{ROUTES}/__returnpath__"))[:2], (200, bounces))
        _, body, _ = await self.v2("GET", ROUTES, key=self.other_key)
        self.assertEqual(body, {"routes": []})
        for ref in (info["uuid"], info["token"], "info@example.test", str(info["id"]), "__returnpath__"):
            self.assertError(
                await self.v2("GET", f"{ROUTES}/{ref}", key=self.other_key), 404, "RouteNotFound"
            )
        self.assertError(await self.v2("GET", f"{ROUTES}/nobody@example.test"), 404, "RouteNotFound")
        self.assertError(await self.v2("GET", f"{ROUTES}/987654"), 404, "RouteNotFound")
        # The other server routes its own domain, and its return path, with its own endpoints.
        await self.endpoint(key=self.other_key)
        theirs = await self.route(key=self.other_key, address="__returnpath__", endpoints=["app"])
        self.assertNotEqual(theirs["endpoints"], bounces["endpoints"])
        await self.route(key=self.other_key, address="info@other.test", mode="Reject")

    async def test_bad_new_routes(self) -> None:
        """Bodies that are not JSON objects are 400 InvalidJSON; a missing or malformed address, a domain
        that is not the server's verified domain, bad modes, endpoints that are not the server's or do not
        fit the mode or the address, and unknown fields are 400 naming the field; nothing is added."""
        await self.endpoint()
        await self.endpoint(**SMTP)
        await self.endpoint(key=self.other_key, name="theirs")
        for raw in (b"{", b"", b"[]", b'"info@example.test"'):
            self.assertError(await self.v2("POST", ROUTES, data=raw), 400, "InvalidJSON", None, raw)
        for given, field in (
            ({}, "address"),
            ({"endpoints": ["app"]}, "address"),
            ({"address": None, "endpoints": ["app"]}, "address"),
            ({"address": 5, "endpoints": ["app"]}, "address"),
            ({"address": "info", "endpoints": ["app"]}, "address"),
            ({"address": "a b@example.test", "endpoints": ["app"]}, "address"),
            ({"address": "in_fo@example.test", "endpoints": ["app"]}, "address"),
            ({"address": "info+tag@example.test", "endpoints": ["app"]}, "address"),
            ({"address": "info@", "endpoints": ["app"]}, "address"),
            ({"address": "info@unverified.test", "endpoints": ["app"]}, "address"),
            ({"address": "info@other.test", "endpoints": ["app"]}, "address"),
            ({"address": "info@nowhere.test", "endpoints": ["app"]}, "address"),
            ({"address": "info@example.test", "mode": "Drop"}, "mode"),
            ({"address": "info@example.test", "mode": None}, "mode"),
            ({"address": "info@example.test", "mode": "Accept", "spam_mode": "Ignore"}, "spam_mode"),
            ({"address": "info@example.test"}, "endpoints"),
            ({"address": "info@example.test", "endpoints": []}, "endpoints"),
            ({"address": "info@example.test", "endpoints": "app"}, "endpoints"),
            ({"address": "info@example.test", "endpoints": [5]}, "endpoints[0]"),
            ({"address": "info@example.test", "endpoints": ["app", ""]}, "endpoints[1]"),
            ({"address": "info@example.test", "endpoints": ["app", "missing"]}, "endpoints[1]"),
            ({"address": "info@example.test", "endpoints": ["theirs"]}, "endpoints[0]"),
            ({"address": "info@example.test", "mode": "Hold", "endpoints": ["app"]}, "endpoints"),
            ({"address": "*@example.test", "endpoints": ["app", "relay"]}, "endpoints"),
            ({"address": "__returnpath__", "endpoints": ["relay"]}, "endpoints"),
            ({"address": "info@example.test", "endpoints": ["app"], "domain": "example.test"}, "domain"),
            ({"address": "info@example.test", "endpoints": ["app"], "token": "abcdefgh"}, "token"),
        ):
            self.assertError(await self.v2("POST", ROUTES, json=given), 400, "InvalidParameter", field, given)
        _, body, _ = await self.v2("GET", ROUTES)
        self.assertEqual(body, {"routes": []})

    async def test_address_taken(self) -> None:
        """An address that has a route, of this server or another (a domain of the organization is both
        servers'), and a second return-path route are 409 RouteExists naming `address`."""
        await self.endpoint()
        await self.endpoint(key=self.other_key)
        first = await self.route(address="info@shared.test", endpoints=["app"])
        await self.route(address="__returnpath__", endpoints=["app"])
        for key, given in (
            ("main", {"address": "info@shared.test", "mode": "Accept"}),
            ("main", {"address": "INFO@shared.test", "endpoints": ["app"]}),
            (self.other_key, {"address": "info@shared.test", "endpoints": ["app"]}),
            ("main", {"address": "__returnpath__", "endpoints": ["app"]}),
        ):
            self.assertError(
                await self.v2("POST", ROUTES, key=key, json=given), 409, "RouteExists", "address", given
            )
        _, body, _ = await self.v2("GET", ROUTES, key=self.other_key)
        self.assertEqual(body, {"routes": []})
        self.assertEqual((await self.v2("GET", f"{ROUTES}/info@shared.test"))[1], first)
        await self.route(key=self.other_key, address="other@shared.test", endpoints=["app"])

    async def test_delete(self) -> None:
        """DELETE removes the route (again is 404) and leaves its endpoints; another server's route is 404
        and stays."""
        app = await self.endpoint()
        await self.endpoint(key=self.other_key)
        info = await self.route(address="info@example.test", endpoints=["app"])
        bounces = await self.route(address="__returnpath__", endpoints=["app"])
        theirs = await self.route(key=self.other_key, address="info@other.test", endpoints=["app"])
        self.assertError(await self.v2("DELETE", f"{ROUTES}/{theirs['uuid']}"), 404, "RouteNotFound")
        self.assertError(await self.v2("DELETE", f"{ROUTES}/info@other.test"), 404, "RouteNotFound")
        status, body, _ = await self.v2("DELETE", f"{ROUTES}/Info@Example.test")
        self.assertEqual(
            (status, body),
            (200, {"id": info["id"], "uuid": info["uuid"], "address": "info@example.test", "deleted": True}),
        )
        for ref in ("info@example.test", info["uuid"], info["token"], str(info["id"])):
            self.assertError(await self.v2("DELETE", f"{ROUTES}/{ref}"), 404, "RouteNotFound")
            self.assertError(await self.v2("GET", f"{ROUTES}/{ref}"), 404, "RouteNotFound")
        status, body, _ = await self.v2("DELETE", f"{ROUTES}/{bounces['token']}")
        self.assertEqual((status, body["address"]), (200, "__returnpath__"))
        _, body, _ = await self.v2("GET", ROUTES)
        self.assertEqual(body, {"routes": []})
        self.assertEqual((await self.v2("GET", f"{ENDPOINTS}/app"))[1], app)
        _, body, _ = await self.v2("GET", ROUTES, key=self.other_key)
        self.assertEqual(body, {"routes": [theirs]})
        # The address is free again.
        await self.route(address="info@example.test", mode="Accept")

    async def test_seen_by_the_smtp_lookup(self) -> None:
        """A route added through the API is the one the per-RCPT lookup finds (plus-addressing included),
        and once deleted through the API it is not."""
        await self.endpoint()
        info = await self.route(address="info@example.test", endpoints=["app"])
        match = self.transaction(rs.route_for, "Info+news@example.test")
        self.assertEqual((match.route.uuid, match.tag), (info["uuid"], "news"))
        await self.v2("DELETE", f"{ROUTES}/{info['uuid']}")
        self.assertIsNone(self.transaction(rs.route_for, "info@example.test"))


class AccessTests(RoutesAPITestCase):
    async def calls(self) -> list[tuple[str, str, dict[str, Any]]]:
        await self.endpoint()
        await self.route(address="info@example.test", endpoints=["app"])
        return [
            ("GET", ENDPOINTS, {}),
            ("POST", ENDPOINTS, {"json": {**HTTP, "name": "new"}}),
            ("GET", f"{ENDPOINTS}/app", {}),
            ("DELETE", f"{ENDPOINTS}/app", {}),
            ("GET", ROUTES, {}),
            ("POST", ROUTES, {"json": {"address": "new@example.test", "mode": "Accept"}}),
            ("GET", f"{ROUTES}/info@example.test", {}),
            ("DELETE", f"{ROUTES}/info@example.test", {}),
        ]

    async def test_no_or_wrong_key(self) -> None:
        """Without a valid API key every endpoint and route path is 401 and nothing changes."""
        for method, path, kwargs in await self.calls():
            self.assertError(await self.v2(method, path, key=None, **kwargs), 401, "Unauthenticated")
            self.assertError(await self.v2(method, path, key="wrong", **kwargs), 401, "InvalidServerAPIKey")
        _, body, _ = await self.v2("GET", ENDPOINTS)
        self.assertEqual([e["name"] for e in body["endpoints"]], ["app"])
        _, body, _ = await self.v2("GET", ROUTES)
        self.assertEqual([r["address"] for r in body["routes"]], ["info@example.test"])

    async def test_suspended_server(self) -> None:
        """A suspended server's key is 403 on every endpoint and route path."""
        calls = await self.calls()
        self.transaction(ss.suspend_server, self.server.id, "unpaid", NOW)
        for method, path, kwargs in calls:
            self.assertError(await self.v2(method, path, **kwargs), 403, "ServerSuspended")

    async def test_database_unavailable(self) -> None:
        """When the database cannot be used, the endpoint and route paths are 503 DatabaseUnavailable."""
        calls = await self.calls()
        broken = make_engine(f"sqlite:///{self.mktemp()}/missing/directory/mtad.sqlite3")
        self.addCleanup(broken.dispose)
        self.use_manage(ManageAPI(self.clock, SynchronousDatabase(broken), self.queue))  # type: ignore[arg-type]
        for method, path, kwargs in calls:
            self.assertError(await self.v2(method, path, **kwargs), 503, "DatabaseUnavailable")
        self.flushLoggedErrors()

    async def test_wrong_method(self) -> None:
        """A path with a method it does not answer is 405 with Allow listing those it does."""
        for path, allowed in (
            (ENDPOINTS, "GET, POST"),
            (f"{ENDPOINTS}/app", "DELETE, GET"),
            (ROUTES, "GET, POST"),
            (f"{ROUTES}/info@example.test", "DELETE, GET"),
        ):
            answer = await self.v2("PUT", path, json={})
            self.assertError(answer, 405, "MethodNotAllowed")
            self.assertEqual(answer[2].getRawHeaders("allow"), [allowed])


class PostgresEndpointTests(EndpointTests):
    backend = POSTGRES


class MySQLEndpointTests(EndpointTests):
    backend = MYSQL


class PostgresRouteTests(RouteTests):
    backend = POSTGRES


class MySQLRouteTests(RouteTests):
    backend = MYSQL

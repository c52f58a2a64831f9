"""Tests for mtad.store.routes: endpoints, routes and the per-RCPT lookup, on SQLite (and PostgreSQL and
MySQL/MariaDB when configured)."""

from __future__ import annotations

from typing import Any

from mtad.store import domains as ds
from mtad.store import organizations as os_
from mtad.store import routes as rs
from mtad.store import servers as ss
from mtad.store.db import AlreadyExists, NotFound
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase

NOW = 1_700_000_000.0


class RouteTestCase(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.transaction(os_.create_organization, "Acme", NOW)
        self.server = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.other = self.transaction(ss.create_server, "acme", "Other", NOW)
        self.domain = self.verified("example.org", server_id=self.server.id)
        self.hook = self.transaction(
            rs.add_http_endpoint, self.server.id, "app", "https://app.example/in", NOW
        )

    def verified(self, name: str, **owner: Any) -> ds.Domain:
        domain = self.transaction(ds.create_domain, name, NOW, rsa_bits=1024, **owner)
        verified: ds.Domain = self.transaction(ds.verify_domain, domain.id, NOW)
        return verified

    def route(self, address: str, server: ss.Server | None = None, **kwargs: Any) -> rs.Route:
        kwargs.setdefault(
            "endpoints_", [self.hook.name] if kwargs.get("mode", "Endpoint") == "Endpoint" else []
        )
        route: rs.Route = self.transaction(rs.add_route, (server or self.server).id, address, NOW, **kwargs)
        return route

    def error(self, fn: Any, *args: Any, **kwargs: Any) -> rs.RouteError:
        with self.assertRaises(rs.RouteError) as raised:
            self.transaction(fn, *args, **kwargs)
        return raised.exception


class EndpointTests(RouteTestCase):
    def test_kinds_and_defaults(self) -> None:
        """HTTP endpoints default to Postal's JSON Hash with attachments and a 5 s timeout; SMTP to port
        25 with opportunistic STARTTLS; an address endpoint keeps the address lower-cased."""
        self.assertEqual(
            (self.hook.kind, self.hook.encoding, self.hook.format, self.hook.timeout),
            (rs.EndpointKind.HTTP, rs.Encoding.JSON, rs.Format.HASH, 5),
        )
        self.assertTrue(self.hook.include_attachments)
        self.assertFalse(self.hook.strip_replies)
        smtp = self.transaction(rs.add_smtp_endpoint, self.server.id, "relay", "MX.Example.NET.", NOW)
        self.assertEqual((smtp.hostname, smtp.port, smtp.tls_mode), ("mx.example.net", 25, rs.TLSMode.AUTO))
        forward = self.transaction(rs.add_address_endpoint, self.server.id, "boss", "Boss@Example.NET", NOW)
        self.assertEqual(forward.address, "boss@example.net")
        raw = self.transaction(
            rs.add_http_endpoint,
            self.server.id,
            "raw",
            "http://10.0.0.5:8080/raw",
            NOW,
            encoding="formdata",
            format="RawMessage",
            timeout=60,
        )
        self.assertEqual((raw.encoding, raw.format, raw.timeout), (rs.Encoding.FORM, rs.Format.RAW, 60))
        names = [e.name for e in self.transaction(rs.list_endpoints, self.server.id)]
        self.assertEqual(names, ["app", "boss", "raw", "relay"])
        self.assertEqual(self.transaction(rs.list_endpoints, self.other.id), [])

    def test_bad_input_names_the_field(self) -> None:
        cases = [
            (rs.add_http_endpoint, ("x", "ftp://app.example/"), {}, "url"),
            (rs.add_http_endpoint, ("x", "https://app.example/"), {"timeout": 61}, "timeout"),
            (rs.add_http_endpoint, ("x", "https://app.example/"), {"timeout": 4}, "timeout"),
            (rs.add_http_endpoint, ("x", "https://app.example/"), {"encoding": "XML"}, "encoding"),
            (rs.add_http_endpoint, ("x", "https://app.example/"), {"format": "Text"}, "format"),
            (rs.add_http_endpoint, ("", "https://app.example/"), {}, "name"),
            (rs.add_smtp_endpoint, ("x", "not a host"), {}, "hostname"),
            (rs.add_smtp_endpoint, ("x", "mx.example.net"), {"port": 0}, "port"),
            (rs.add_smtp_endpoint, ("x", "mx.example.net"), {"tls_mode": "STARTLS"}, "tls_mode"),
            (rs.add_address_endpoint, ("x", "nobody"), {}, "address"),
        ]
        for fn, args, kwargs, field in cases:
            error = self.error(fn, self.server.id, *args, NOW, **kwargs)
            self.assertEqual(error.field, field, (args, kwargs))
            self.assertIn(f"`{field}`", error.message)
        with self.assertRaises(AlreadyExists):
            self.transaction(rs.add_http_endpoint, self.server.id, "app", "https://app.example/2", NOW)

    def test_removing_the_last_endpoint_rejects(self) -> None:
        """Deleting an endpoint takes it off its routes; a route left with none turns to Reject."""
        second = self.transaction(rs.add_http_endpoint, self.server.id, "second", "https://b.example/", NOW)
        both = self.route("both@example.org", endpoints_=["app", "second"])
        only = self.route("only@example.org")
        self.transaction(rs.remove_endpoint, self.server.id, "app", NOW)
        both = self.transaction(rs.get_route, self.server.id, both.id)
        only = self.transaction(rs.get_route, self.server.id, only.id)
        self.assertEqual(([e.id for e in both.endpoints], both.mode), ([second.id], rs.RouteMode.ENDPOINT))
        self.assertEqual((only.endpoints, only.mode), ((), rs.RouteMode.REJECT))
        with self.assertRaises(NotFound):
            self.transaction(rs.get_endpoint, self.server.id, "app")


class RouteTests(RouteTestCase):
    def test_routes_and_lookup(self) -> None:
        """An exact route wins over the domain's wildcard; plus-addressing matches the local part and
        keeps the tag; case does not matter; an unrouted domain has no route at all."""
        support = self.route("Support@Example.ORG")
        catch_all = self.route("*@example.org")
        self.assertEqual(
            (support.name, support.domain, support.address), ("support", "example.org", "support@example.org")
        )
        self.assertEqual(len(support.token), 8)
        self.assertNotEqual(support.token, catch_all.token)
        match = self.transaction(rs.route_for, "SUPPORT+Ticket-42@example.org")
        assert match is not None
        self.assertEqual((match.route.id, match.tag), (support.id, "ticket-42"))
        match = self.transaction(rs.route_for, "anyone@example.org")
        assert match is not None
        self.assertEqual((match.route.id, match.tag), (catch_all.id, None))
        self.assertIsNone(self.transaction(rs.route_for, "someone@elsewhere.example"))
        self.assertIsNone(self.transaction(rs.route_for, "not-an-address"))
        self.assertTrue(self.transaction(rs.has_routes, "EXAMPLE.org"))
        self.assertFalse(self.transaction(rs.has_routes, "elsewhere.example"))
        self.assertEqual(self.transaction(rs.route_by_token, support.token.upper()), support)
        self.assertEqual(self.transaction(rs.get_route, self.server.id, "support@example.org"), support)
        self.assertEqual(self.transaction(rs.get_route, self.server.id, support.uuid), support)
        self.assertEqual([r.name for r in self.transaction(rs.list_routes, self.server.id)], ["*", "support"])
        self.transaction(rs.remove_route, self.server.id, "*@example.org")
        self.assertIsNone(self.transaction(rs.route_for, "anyone@example.org"))

    def test_modes_and_their_endpoints(self) -> None:
        self.assertEqual(self.route("keep@example.org", mode="accept").mode, rs.RouteMode.ACCEPT)
        self.assertEqual(self.route("no@example.org", mode="Reject").endpoints, ())
        self.assertEqual(self.error(rs.add_route, self.server.id, "x@example.org", NOW).field, "endpoints")
        error = self.error(
            rs.add_route, self.server.id, "x@example.org", NOW, mode="Hold", endpoints_=["app"]
        )
        self.assertEqual(error.field, "endpoints")
        self.assertEqual(
            self.error(rs.add_route, self.server.id, "x@example.org", NOW, mode="Drop").field, "mode"
        )
        error = self.error(
            rs.add_route, self.server.id, "x@example.org", NOW, endpoints_=["app"], spam_mode="Ignore"
        )
        self.assertEqual(error.field, "spam_mode")
        with self.assertRaises(NotFound):
            self.transaction(rs.add_route, self.server.id, "x@example.org", NOW, endpoints_=["nope"])
        # Forwarding a whole domain by SMTP or to an address is refused, as in Postal.
        self.transaction(rs.add_address_endpoint, self.server.id, "boss", "boss@example.net", NOW)
        error = self.error(rs.add_route, self.server.id, "*@example.org", NOW, endpoints_=["boss"])
        self.assertEqual(error.field, "endpoints")
        self.assertEqual(self.route("boss@example.org", endpoints_=["boss"]).endpoints[0].name, "boss")

    def test_addresses_and_domains(self) -> None:
        """Local parts as Postal allows them; the domain must be a verified one of the server or its
        organization; one route per address across servers; one return-path route per server."""
        for bad in ("a b@example.org", "a+tag@example.org", "noat", "@example.org", "x@not_a_domain", ""):
            self.assertEqual(self.error(rs.add_route, self.server.id, bad, NOW).field, "address", bad)
        self.assertEqual(
            self.error(rs.add_route, self.server.id, "a@unknown.example", NOW, endpoints_=["app"]).field,
            "address",
        )
        unverified = self.transaction(
            ds.create_domain, "new.example", NOW, server_id=self.server.id, rsa_bits=1024
        )
        self.assertIn(
            "not a verified domain",
            self.error(rs.add_route, self.server.id, f"a@{unverified.name}", NOW, endpoints_=["app"]).message,
        )
        org = self.verified("shared.example", organization_id=self.server.organization_id)
        self.assertEqual(self.route("team@shared.example").domain_id, org.id)
        # The same name added to the other server: still one route per address.
        self.verified("example.org", server_id=self.other.id)
        endpoint = self.transaction(rs.add_http_endpoint, self.other.id, "app", "https://o.example/", NOW)
        self.route("support@example.org")
        with self.assertRaises(AlreadyExists):
            self.transaction(
                rs.add_route, self.other.id, "support@example.org", NOW, endpoints_=[endpoint.id]
            )
        returns = self.route("__returnpath__")
        self.assertEqual((returns.domain, returns.address), (None, "__returnpath__"))
        with self.assertRaises(AlreadyExists):
            self.route("__returnpath__")
        self.assertEqual(self.transaction(rs.get_route, self.server.id, "__returnpath__").id, returns.id)


class RoutePostgresTests(RouteTests):
    backend = POSTGRES


class RouteMySQLTests(RouteTests):
    backend = MYSQL


class EndpointPostgresTests(EndpointTests):
    backend = POSTGRES


class EndpointMySQLTests(EndpointTests):
    backend = MYSQL

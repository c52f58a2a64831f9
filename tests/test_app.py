"""Start-up of the composed daemon: what stops it, and that a failed start lets go of what it started."""

from __future__ import annotations

import gc
import shutil
import socket
import tempfile
from typing import Any

import treq
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from mtad.app import MtadService, StartupError
from mtad.config import parse_config
from mtad.outbound.mx import parse_nameservers
from tests.redis_server import real_reactor
from tests.store.support import SQLITE, fresh_database_url
from tests.test_accept import closed_port


class StartupTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="mtad-app-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)

    def config(self, **sections: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "general": {"data_dir": self.data_dir},
            "smtp": {"listeners": [{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none"}]},
            "http": {"listeners": ["tcp:0:interface=127.0.0.1"]},
            "dns": {"nameservers": ["127.0.0.1:53"]},
        }
        data.update(sections)
        return data

    async def start(self, data: dict[str, Any], **options: Any) -> MtadService:
        service = MtadService(parse_config(data), real_reactor(), exit_on_failure=False, **options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def failed_start(self, data: dict[str, Any]) -> tuple[MtadService, StartupError]:
        service = await self.start(data)
        try:
            await service.when_started()
        except StartupError as e:
            self.flushLoggedErrors(StartupError)
            return service, e
        self.fail("start-up succeeded")

    async def test_embedded_defaults_start_and_stop(self) -> None:
        """With only a data directory, mtad starts its own Redis and SQLite and stops them again."""
        service = await self.start(self.config())
        await service.when_started()
        assert service.embedded_redis is not None
        self.assertTrue(service.embedded_redis.ready)
        self.assertEqual({name.split()[0] for name in service.ports}, {"smtp", "http"})
        await service.stopService()
        self.assertFalse(service.embedded_redis.ready)
        self.assertEqual(service.embedded_redis.pid, None)

    async def test_freeze_gc_once_ready(self) -> None:
        """The daemon (tap.makeService) freezes what start-up left alive, so the cyclic collector stops
        walking it on every full collection; without the option nothing is frozen."""
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        plain = await self.start(self.config())
        await plain.when_started()
        self.assertEqual(gc.get_freeze_count(), 0)
        await plain.stopService()
        service = await self.start(self.config(), freeze_gc=True)
        await service.when_started()
        self.assertGreater(gc.get_freeze_count(), 10_000)

    async def test_http_serves_management_api(self) -> None:
        """The HTTP listener serves the management API under /api/v2 beside /api/v1 and /status."""
        service = await self.start(self.config())
        await service.when_started()
        (name,) = [name for name in service.ports if name.startswith("http ")]
        base = f"http://127.0.0.1:{service.ports[name].getHost().port}"  # type: ignore[attr-defined]
        pool = HTTPConnectionPool(real_reactor(), persistent=False)

        async def get(path: str) -> tuple[int, Any]:
            response = await treq.get(base + path, reactor=real_reactor(), pool=pool)
            return response.code, await response.json()

        status, document = await get("/api/v2/openapi.json")
        self.assertEqual((status, document["openapi"]), (200, "3.1.0"))
        status, answer = await get("/api/v2/held")
        self.assertEqual((status, answer["error"]["code"]), (401, "Unauthenticated"))
        status, answer = await get("/api/v1/send/message")
        self.assertEqual((status, answer["data"]["code"]), (200, "AccessDenied"))

    async def test_unreachable_redis_names_the_key(self) -> None:
        """An external Redis that does not answer stops start-up with an error naming redis.url."""
        _, error = await self.failed_start(
            self.config(redis={"url": f"redis://127.0.0.1:{closed_port()}/0", "timeout": 0.5})
        )
        self.assertIn("redis.url", str(error))

    async def test_uninitialized_external_database(self) -> None:
        """A configured database without the schema is not migrated behind the operator's back."""
        url = fresh_database_url(self, SQLITE)
        service, error = await self.failed_start(self.config(database={"url": url}))
        self.assertIn("mtad initialize", str(error))
        self.assertEqual(service.ports, {})

    async def test_listener_in_use_names_the_listener(self) -> None:
        """A port that cannot be bound stops start-up with the listener's endpoint in the message."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            endpoint = f"tcp:{port}:interface=127.0.0.1"
            service, error = await self.failed_start(
                self.config(smtp={"listeners": [{"endpoint": endpoint, "tls": "none"}]})
            )
        self.assertIn(endpoint, str(error))
        await service.stopService()
        assert service.embedded_redis is not None
        self.assertFalse(service.embedded_redis.ready)

    async def test_bad_nameserver(self) -> None:
        """A nameserver that is not an IP address stops start-up naming dns.nameservers."""
        _, error = await self.failed_start(self.config(dns={"nameservers": ["dns.example"]}))
        self.assertIn("dns.nameservers", str(error))


class NameserverTests(unittest.SynchronousTestCase):
    def test_forms(self) -> None:
        """host, host:port and [v6]:port are understood; port 53 is the default."""
        self.assertEqual(
            parse_nameservers(["127.0.0.1", "127.0.0.2:5353", "[::1]:54", "::1"]),
            (("127.0.0.1", 53), ("127.0.0.2", 5353), ("::1", 54), ("::1", 53)),
        )

    def test_bad_entries(self) -> None:
        """Names, bad ports and empty resolv.conf are errors that say what is wrong."""
        self.assertRaises(ValueError, parse_nameservers, ["ns.example"])
        self.assertRaises(ValueError, parse_nameservers, ["127.0.0.1:99999"])
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# nothing\nsearch example\n")
        self.assertRaises(ValueError, parse_nameservers, [], path)
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.53\nnameserver fe80::1%eth0\n")
        self.assertEqual(parse_nameservers([], path), (("127.0.0.53", 53), ("fe80::1", 53)))

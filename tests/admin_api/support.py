"""A legacy API under test: real SQLite, real Redis, StubTreq in front of the Klein resource.

The sending-domain check is a plain in-memory function here (the daemon wires
``mtad.store.domains.find_sending_domain``); it records every call so tests can see the cache work.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from admin_api.legacy_api import LegacyAPI
from mtad.accept import Acceptor
from mtad.queue.redis_queue import RedisQueue
from mtad.store import credentials as cs
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.servers import Server
from mtad.submission.policy import SubmissionPolicy
from tests.redis_server import RedisTestCase, real_reactor
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0
HOSTNAME = "mx.mtad.test"
MAX_MESSAGE_SIZE = 200_000
BASE = "http://api.mtad.test"


async def settled(flush: Callable[[], None], d: Deferred[Any]) -> Any:
    """The result of ``d``, pumping the in-memory HTTP connection while real Redis I/O completes.

    ``d.called`` is no test: a Deferred waiting on another one is called but has no result yet.
    """
    results: list[object] = []

    def note(result: object) -> object:
        results.append(result)
        return result

    d.addBoth(note)
    while not results:
        flush()
        await deferLater(real_reactor(), 0.001, lambda: None)
    return await d


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def parse(message: bytes) -> EmailMessage:
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(message)
    assert isinstance(parsed, EmailMessage)
    return parsed


def text(part: Any) -> str:
    """A text part's content with the wire's CRLF line ends as newlines."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


class LegacyAPITestCase(RedisTestCase):
    """``self.api`` for server ``acme/main`` (API key ``self.key``), which may send as ``example.test``."""

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = RedisQueue(self.redis, self.keys)
        self.acceptor = Acceptor(self.queue, self.clock, default_pool="main", timeout=5.0)
        self.transaction(os_.create_organization, "Acme", NOW)
        self.server: Server = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.other_server: Server = self.transaction(ss.create_server, "acme", "Other", NOW)
        self.key = self.new_key(self.server)
        self.other_key = self.new_key(self.other_server)
        self.sending_domains = {"example.test"}
        self.domain_checks: list[tuple[int, str]] = []
        self.api = self.make_api()
        self.stub = StubTreq(self.api.app.resource())

    def transaction(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)

    def new_key(self, server: Server, **kwargs: Any) -> str:
        made = self.transaction(cs.create_credential, server.id, cs.CredentialType.API, NOW, **kwargs)
        assert made.secret is not None
        secret: str = made.secret
        return secret

    async def sending_domain_check(self, server: Server, domain: str) -> bool:
        self.domain_checks.append((server.id, domain))
        return domain in self.sending_domains

    def make_api(self, **kwargs: Any) -> LegacyAPI:
        """The API over its own `SubmissionPolicy`, to which ``acceptor``, ``sending_domain_check``,
        ``sender_allowed`` and ``cache_seconds`` go (``timeout`` goes to both)."""
        policy_kwargs = {
            name: kwargs.pop(name) for name in ("sender_allowed", "cache_seconds") if name in kwargs
        }
        if "timeout" in kwargs:
            policy_kwargs["timeout"] = kwargs["timeout"]
        submission = SubmissionPolicy(
            self.clock,
            self.database,  # type: ignore[arg-type]
            kwargs.pop("acceptor", self.acceptor),
            sending_domain_check=kwargs.pop("sending_domain_check", self.sending_domain_check),
            **policy_kwargs,
        )
        kwargs.setdefault("max_message_size", MAX_MESSAGE_SIZE)
        kwargs.setdefault("hostname", HOSTNAME)
        return LegacyAPI(self.clock, self.database, submission, self.queue, **kwargs)  # type: ignore[arg-type]

    def use(self, api: LegacyAPI) -> None:
        self.api = api
        self.stub = StubTreq(api.app.resource())

    async def request(
        self, path: str, *, method: str = "POST", key: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Send a request and return the decoded envelope (after checking it is HTTP 200 JSON)."""
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["X-Server-API-Key"] = key
        response = await settled(
            self.stub.flush, self.stub.request(method, BASE + path, headers=headers, **kwargs)
        )
        body = await settled(self.stub.flush, self.stub.content(response))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        envelope: dict[str, Any] = json.loads(body)
        self.assertEqual(set(envelope), {"status", "time", "flags", "data"})
        self.assertIsInstance(envelope["time"], float)
        self.assertEqual(envelope["flags"], {})
        return envelope

    async def call(self, path: str, params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Send ``params`` as a JSON body with the test server's key."""
        kwargs.setdefault("key", self.key)
        return await self.request(path, json=params, **kwargs)

    def assertError(self, envelope: dict[str, Any], code: str, message: str | None = None) -> None:
        self.assertEqual((envelope["status"], envelope["data"].get("code")), ("error", code), envelope)
        if message is not None:
            self.assertEqual(envelope["data"]["message"], message)

    def assertParameterError(self, envelope: dict[str, Any], message: str) -> None:
        self.assertEqual(envelope["status"], "parameter-error", envelope)
        self.assertEqual(set(envelope["data"]), {"message"})
        self.assertIn(message, envelope["data"]["message"])

    async def body_of(self, message_id: int) -> bytes:
        fields = await self.queue.message_fields(message_id)
        body: bytes = await self.redis.execute("HGET", fields["body"], "data")
        return body

    async def queued_ids(self) -> list[int]:
        ids = await self.redis.execute("ZRANGE", self.keys.created, 0, -1)
        return [int(i) for i in ids]

"""Real Redis, real SQLite, the real recorder: what the bounce tests run against."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from mtad.bounces.inbox import BounceInbox
from mtad.bounces.matching import ReturnPathDomains
from mtad.bounces.processor import BounceProcessor, ProcessorSettings
from mtad.events.consumer import StreamConsumer
from mtad.events.recorder import Recorder, record_events
from mtad.events.schema import MessageQueued, Received, delivery_event
from mtad.mail.verp import encode_return_path
from mtad.queue.events import EventStream
from mtad.queue.model import NewMessage
from mtad.queue.redis_queue import RedisQueue
from mtad.store.db import make_engine
from mtad.store.messages import Delivery, Message, find_message, list_deliveries
from mtad.store.migrate import upgrade_schema
from mtad.store.raw_messages import raw_message_data
from tests.redis_server import RedisTestCase
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

T = TypeVar("T")

NOW = 1_700_000_000.0
SECRET = b"a test secret of 32 characters.."
DOMAIN = "rp.mtad.test"
DOMAINS = ReturnPathDomains(DOMAIN, "psrp")
SERVER = 3
BODY = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: Welcome\r\n\r\nHello\r\n"


class BounceTestCase(RedisTestCase):
    """Each test gets ``self.inbox``, ``self.queue``, ``self.database`` (SQLite, migrated) and a Clock."""

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = RedisQueue(self.redis, self.keys)
        self.inbox = BounceInbox(self.redis, self.clock, self.keys)
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.parsed_in_thread = 0

    def in_thread(self, fn: Callable[[], T]) -> Deferred[T]:
        self.parsed_in_thread += 1
        return deferToThread(fn)

    def processor(self, database: Any = None, **settings: Any) -> BounceProcessor:
        return BounceProcessor(
            self.inbox,
            database if database is not None else self.database,
            self.clock,
            self.in_thread,
            secret=SECRET,
            domains=DOMAINS,
            settings=ProcessorSettings(**settings),
        )

    def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        with self.engine.begin() as conn:
            return fn(conn, *args)

    def verp(self, message_id: int, server_id: int = SERVER) -> str:
        return encode_return_path(SECRET, server_id, message_id, DOMAIN)

    async def send(self, rcpt: str = "user@example.com", token: str | None = None) -> int:
        """An outgoing message accepted, sent (``Sent``) and recorded, as it is before a bounce comes."""
        [message_id] = await self.queue.enqueue(
            BODY,
            [
                NewMessage(
                    token=token or f"tok{rcpt.partition('@')[0]}",
                    server_id=SERVER,
                    scope="outgoing",
                    mail_from="app@example.org",
                    rcpt_to=rcpt,
                    event={"subject": "Welcome", "message_id": "welcome-1@example.org", "tag": "welcome"},
                )
            ],
            NOW,
        )
        [claimed] = await self.queue.claim(NOW, 10, 300, "worker")
        self.clock.advance(1)
        sent = delivery_event(
            claimed, status="Sent", timestamp=self.clock.seconds(), details="Message accepted", code=250
        )
        self.assertTrue(await self.queue.ack(claimed.id, claimed.lease_token, sent))
        await self.record()
        self.clock.advance(1)  # the bounce comes later
        return message_id

    def record_bounce_message(self, message_id: int, token: str) -> None:
        """An outgoing message that is itself a bounce (``bounce`` set), recorded."""
        queued = MessageQueued(
            id=message_id,
            token=token,
            server_id=SERVER,
            scope="outgoing",
            mail_from="",
            rcpt_to="sender@example.net",
            size=100,
            timestamp=NOW,
            bounce=True,
        )
        self.transaction(record_events, [Received(f"{int(NOW * 1000)}-{message_id}", queued)], NOW)

    def recorder(self) -> StreamConsumer:
        stream = EventStream(self.redis, "recorder", "recorder-1", keys=self.keys)
        return StreamConsumer(stream, Recorder(self.database, self.clock, self.queue), self.clock)

    async def record(self) -> None:
        """Run the recorder until it has recorded everything on the stream."""
        recorder = self.recorder()
        while await recorder.run_once():
            pass

    async def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """The data of the stream's events (of ``event_type``), oldest first."""
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        found = []
        for _id, raw in entries:
            values = {raw[i].decode(): raw[i + 1] for i in range(0, len(raw), 2)}
            if event_type is None or values["type"].decode() == event_type:
                found.append({"type": values["type"].decode(), **json.loads(values["data"])})
        return found

    def message(self, message_id: int) -> Message:
        found = self.transaction(find_message, message_id)
        assert found is not None, f"message {message_id} not recorded"
        return found

    def deliveries(self, message_id: int) -> list[Delivery]:
        return self.transaction(list_deliveries, message_id)

    def raw(self, message_id: int) -> bytes | None:
        return self.transaction(raw_message_data, message_id)

    async def inbox_keys(self) -> list[bytes]:
        keys = await self.redis.execute("KEYS", f"{self.keys.prefix}bounce*")
        return sorted(keys)

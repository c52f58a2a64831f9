"""The held-message commands of mtad.cli against a real SQLite database and the test Redis.

Commands run in a thread, as on the command line, with their Redis work run on trial's reactor
(``blockingCallFromThread``) under this test's key prefix. One test runs the real ``mtad`` command in a
child process, where the command runs the global reactor itself.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from mtad.cli import main
from mtad.events.recorder import MESSAGE_DELIVERY, parse_delivery
from mtad.outbound.delivery import DeliveryService, DeliverySettings
from mtad.outbound.holds import HOLD_CANCELLED
from mtad.queue.model import NewMessage
from mtad.queue.redis_queue import RedisQueue
from mtad.store.db import make_engine
from mtad.store.messages import MessageStatus, find_message
from mtad.store.servers import list_servers
from tests.outbound.hold_support import BODY, DEVELOPMENT, hold_message, record_stream, stream_events
from tests.outbound.test_delivery import POOLS, SENT, FakeDeliverer, eventually, every
from tests.redis_server import RedisTestCase, redis_url

T = TypeVar("T")

reactor: Any = _reactor

DAY = 86400.0
ROOT = Path(__file__).resolve().parents[2]


def short_directory(test: RedisTestCase) -> Path:
    """A new directory under the system's temporary directory, removed after ``test``."""
    path = tempfile.mkdtemp(prefix="mtad-cli-")
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def on_trial_reactor(work: Callable[[Any], Coroutine[Any, Any, T]], /) -> T:
    """The CLI's runner for tests: run ``work`` on trial's reactor from the command's thread."""
    result: T = blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(work(reactor)))
    return result


class HeldCommandTests(RedisTestCase):
    engine: Engine
    config: Path
    queue: RedisQueue
    main_id: int
    other_id: int

    def setUp(self) -> Deferred[None]:
        # Short, so that the embedded Redis's socket path would fit (107 bytes); trial's are too long.
        self.dir = short_directory(self)
        self.config = self.dir / "mtad.toml"
        return super().setUp()

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.write_config(await redis_url())
        await self.mtad("initialize")
        await self.mtad("make-organization", "Acme")
        await self.mtad("make-server", "acme", "Main", "--mode", "Development")
        await self.mtad("make-server", "acme", "Other")
        self.engine = make_engine(f"sqlite:///{self.dir / 'data' / 'mtad.sqlite3'}")
        self.addCleanup(self.engine.dispose)
        with self.engine.connect() as conn:
            ids = {s.full_permalink: s.id for s in list_servers(conn)}
        self.main_id, self.other_id = ids["acme/main"], ids["acme/other"]
        self.now = time.time()

    def write_config(self, url: str | None, timeout: float = 5.0) -> None:
        text = f'[general]\ndata_dir = "{self.dir / "data"}"\n'
        if url is not None:
            text += f'[redis]\nurl = "{url}"\ntimeout = {timeout}\n'
        self.config.write_text(text)

    async def mtad(self, *argv: str, status: int = 0) -> str:
        """Run a command; return its stdout (status 0) or stdout and stderr (otherwise)."""
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(
            main,
            ["--config", str(self.config), *argv],
            out,
            err,
            run_async=on_trial_reactor,
            queue_keys=self.keys,
        )
        self.assertEqual(code, status, out.getvalue() + err.getvalue())
        return out.getvalue() if status == 0 else out.getvalue() + err.getvalue()

    async def hold(self, rcpt_to: str, age: float = 0.0, server: str = "main", **options: Any) -> int:
        server_id = self.main_id if server == "main" else self.other_id
        return await hold_message(self.queue, self.now - age, rcpt_to, server_id=server_id, **options)

    async def record(self) -> None:
        await record_stream(self.redis, self.keys, self.engine, time.time())

    def status(self, message_id: int) -> MessageStatus:
        with self.engine.connect() as conn:
            message = find_message(conn, message_id)
        assert message is not None
        return message.status

    async def test_list_held(self) -> None:
        """list-held shows recorded held messages, longest held first, for all servers or one, filtered by
        recipient (with * patterns), sender and hold time."""
        a = await self.hold("a@example.com", age=3 * DAY)
        b = await self.hold("B@Example.com", age=DAY, mail_from="news@mtad.test")
        c = await self.hold("c@other.test", server="other")
        await self.record()
        out = await self.mtad("list-held")
        lines = out.splitlines()
        self.assertEqual(
            lines[0].split(), ["ID", "SERVER", "MAIL", "FROM", "RCPT", "TO", "HELD", "EXPIRES", "SUBJECT"]
        )
        self.assertEqual([int(line.split()[0]) for line in lines[1:]], [a, b, c])
        self.assertRegex(
            lines[1], rf"^{a} +acme/main +app@mtad\.test +a@example\.com +\d{{4}}-\d\d-\d\d .+Hello a@"
        )
        out = await self.mtad("list-held", "acme/other")
        self.assertEqual([int(line.split()[0]) for line in out.splitlines()[1:]], [c])
        out = await self.mtad("list-held", "--rcpt-to", "*@EXAMPLE.com")
        self.assertEqual([int(line.split()[0]) for line in out.splitlines()[1:]], [a, b])
        out = await self.mtad("list-held", "--rcpt-to", "b@example.com", "--mail-from", "NEWS@mtad.test")
        self.assertEqual([int(line.split()[0]) for line in out.splitlines()[1:]], [b])
        out = await self.mtad("list-held", "--before", "2d")
        self.assertEqual([int(line.split()[0]) for line in out.splitlines()[1:]], [a])
        out = await self.mtad("list-held", "--limit", "1")
        self.assertIn("only the 1 longest held are shown", out)
        out = await self.mtad("list-held", "acme/other", "--rcpt-to", "%@other.test")
        self.assertEqual(out, "no held messages (server acme/other, rcpt to %@other.test)\n")

    async def test_release_by_id(self) -> None:
        """release-held makes a held message due now without its hold reason; releasing it again, or an
        unknown id, is reported and exits 1."""
        message_id = await self.hold("a@example.com")
        out = await self.mtad("release-held", str(message_id))
        self.assertEqual(out, f"released {message_id}\n")
        fields = await self.queue.message_fields(message_id)
        self.assertEqual(fields["state"], "due")
        self.assertNotIn("hold_reason", fields)
        self.assertGreaterEqual(float(fields["due_at"]), self.now)
        (claimed,) = await self.queue.claim(time.time() + 1, 10, 60.0, "test")
        self.assertEqual(claimed.id, message_id)
        self.assertNotIn("hold_reason", claimed.fields)
        out = await self.mtad("release-held", str(message_id), "999999", status=1)
        self.assertIn(f"{message_id}: not held in the queue", out)
        self.assertIn("999999: not held in the queue", out)
        self.assertIn("mtad: error: 2 of 2 messages were not held", out)

    async def test_cancel_by_id(self) -> None:
        """cancel-held deletes a held message with a HoldCancelled event; the recorder then shows it
        HoldCancelled and list-held no longer lists it."""
        message_id = await self.hold("a@example.com")
        kept = await self.hold("b@example.com")
        await self.record()
        out = await self.mtad("cancel-held", str(message_id))
        self.assertEqual(out, f"cancelled {message_id}\n")
        self.assertEqual(await self.queue.message_fields(message_id), {})
        self.assertEqual((await self.queue.message_fields(kept))["state"], "held")
        event = (await stream_events(self.redis, self.keys))[-1]
        self.assertEqual(event.type, MESSAGE_DELIVERY)
        attempt = parse_delivery(event)
        self.assertEqual(
            (attempt.message_id, attempt.status, attempt.details),
            (message_id, "HoldCancelled", HOLD_CANCELLED),
        )
        await self.record()
        self.assertEqual(self.status(message_id), MessageStatus.HOLD_CANCELLED)
        out = await self.mtad("list-held")
        self.assertEqual([int(line.split()[0]) for line in out.splitlines()[1:]], [kept])
        out = await self.mtad("cancel-held", str(message_id), status=1)
        self.assertIn("not held in the queue", out)

    async def test_bulk_release_by_server_and_recipient(self) -> None:
        """release-held --server with a recipient pattern releases the matching held messages of that server
        only, counting them and reporting those no longer held in Redis as skipped."""
        a = await self.hold("a@example.com")
        b = await self.hold("b@example.com")
        stale = await self.hold("c@example.com")
        other_domain = await self.hold("d@elsewhere.test")
        other_server = await self.hold("e@example.com", server="other")
        await self.record()
        self.assertTrue(await self.queue.release_held(stale, self.now))
        out = await self.mtad("release-held", "--server", "acme/main", "--rcpt-to", "*@example.com")
        self.assertEqual(
            out,
            "released 2 of 3 held messages (server acme/main, rcpt to *@example.com)\n"
            f"  skipped {stale}: not held in the queue (released, cancelled, expired or delivered already, "
            "or no such message)\n",
        )
        for message_id in (a, b):
            self.assertEqual((await self.queue.message_fields(message_id))["state"], "due")
        for message_id in (other_domain, other_server):
            self.assertEqual((await self.queue.message_fields(message_id))["state"], "held")

    async def test_bulk_cancel_all_before(self) -> None:
        """cancel-held --all --before cancels every server's messages held before that time, no others."""
        old_main = await self.hold("a@example.com", age=3 * DAY)
        old_other = await self.hold("b@example.com", age=4 * DAY, server="other")
        young = await self.hold("c@example.com", age=DAY)
        await self.record()
        out = await self.mtad("cancel-held", "--all", "--before", "2d")
        self.assertRegex(
            out, r"^cancelled 2 of 2 held messages \(held before \d{4}-\d\d-\d\d [\d:]+ UTC\)\n$"
        )
        await self.record()
        self.assertEqual(
            [self.status(i) for i in (old_main, old_other, young)],
            [MessageStatus.HOLD_CANCELLED, MessageStatus.HOLD_CANCELLED, MessageStatus.HELD],
        )
        out = await self.mtad("cancel-held", "--server", "acme/main", "--before", "2d")
        self.assertEqual(out, "no held messages (server acme/main, held before " + out.split("before ")[1])

    async def test_selection_errors(self) -> None:
        """Without ids, filters or --all nothing is done; ids and filters together, an unknown server and a
        bad time are errors."""
        message_id = await self.hold("a@example.com")
        await self.record()
        out = await self.mtad("release-held", status=1)
        self.assertIn("name the messages: their ids, filters", out)
        out = await self.mtad("cancel-held", str(message_id), "--all", status=1)
        self.assertIn("not both", out)
        out = await self.mtad("cancel-held", "--server", "acme/nope", status=1)
        self.assertIn("no server 'acme/nope'", out)
        self.patch(sys, "stderr", io.StringIO())
        await self.mtad("list-held", "--before", "last week", status=2)
        self.assertEqual((await self.queue.message_fields(message_id))["state"], "held")

    async def test_redis_unreachable(self) -> None:
        """Without a reachable Redis the commands fail with one line: for redis.url naming the address, for
        the embedded Redis saying that it runs only while the daemon does."""
        message_id = await self.hold("a@example.com")
        self.write_config(f"unix://{self.dir / 'nothing.sock'}?db=0", timeout=0.3)
        out = await self.mtad("release-held", str(message_id), status=1)
        self.assertRegex(
            out,
            r"^mtad: error: redis\.url: could not connect to Redis at unix://.*nothing\.sock db 0 "
            r"within 0\.3 s\n$",
        )
        self.write_config(None)
        out = await self.mtad("cancel-held", str(message_id), status=1)
        socket = self.dir / "data" / "redis.sock"
        self.assertEqual(
            out,
            f"mtad: error: the embedded Redis is not running (no socket at {socket}): "
            "it runs only while the mtad daemon runs with this data_dir; start mtad and try again "
            "(or set redis.url)\n",
        )
        self.assertEqual((await self.queue.message_fields(message_id))["state"], "held")

    async def test_redis_error(self) -> None:
        """A Redis error while releasing ends the command with one line quoting Redis, no traceback."""
        message_id = await self.hold("a@example.com")
        await self.redis.execute("DEL", self.keys.held)
        await self.redis.execute("SET", self.keys.held, "not a sorted set")
        out = await self.mtad("release-held", str(message_id), status=1)
        self.assertRegex(out, r"^mtad: error: Redis: Redis error: .*WRONGTYPE.*\n$")

    async def test_released_message_is_delivered(self) -> None:
        """A message the delivery service held (development mode) is delivered once released, not held
        again, and is recorded Sent."""
        clock = Clock()
        clock.advance(self.now)
        (message_id,) = await self.queue.enqueue(
            BODY,
            [
                NewMessage(
                    token="tok",
                    server_id=self.main_id,
                    scope="outgoing",
                    mail_from="app@mtad.test",
                    rcpt_to="a@example.com",
                    pool="default",
                    fields={"hold_reason": DEVELOPMENT},
                )
            ],
            self.now,
        )
        deliverer = FakeDeliverer(every(SENT))
        service = DeliveryService(clock, self.queue, deliverer, POOLS, DeliverySettings(), "test-worker")
        service.startService()
        self.addCleanup(service.stopService)

        async def recorded(status: MessageStatus) -> bool:
            await self.record()
            with self.engine.connect() as conn:
                message = find_message(conn, message_id)
            return message is not None and message.status == status

        await eventually(lambda: recorded(MessageStatus.HELD))
        out = await self.mtad("list-held", "acme/main")
        self.assertRegex(out, rf"\n{message_id} +acme/main ")
        await self.mtad("release-held", str(message_id))
        clock.advance(max(1.0, time.time() - self.now + 1))
        await eventually(lambda: recorded(MessageStatus.SENT))
        self.assertEqual(len(deliverer.calls), 1)
        self.assertEqual(deliverer.calls[0][1][0].recipients, ("a@example.com",))


class CommandProcessTests(RedisTestCase):
    async def test_real_command_runs_reactor(self) -> None:
        """The installed command runs its Redis work on the global reactor of its own process and exits
        with the result: 1 with a line per id that is not held, 1 with one line when Redis is down."""
        directory = short_directory(self)
        config = directory / "mtad.toml"
        base = f'[general]\ndata_dir = "{directory / "data"}"\n'
        config.write_text(base + f'[redis]\nurl = "{await redis_url()}"\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [str(Path(sys.executable).with_name("mtad")), "--config", str(config)]

        async def run(*argv: str) -> tuple[str, str, int]:
            out, err, code = await getProcessOutputAndValue(
                command[0], [*command[1:], *argv], env=env, path=str(ROOT)
            )
            return out.decode(), err.decode(), code

        _, err, code = await run("initialize")
        self.assertEqual(code, 0, err)
        # No such message: read-only for the queue, so the daemon's key prefix is safe to use here.
        out, err, code = await run("release-held", "987654321987")
        self.assertEqual(
            (code, err), (1, "mtad: error: 1 of 1 messages were not held; nothing done for them\n")
        )
        self.assertIn("987654321987: not held in the queue", out)
        config.write_text(base + f'[redis]\nurl = "unix://{directory / "none.sock"}"\ntimeout = 0.3\n')
        out, err, code = await run("cancel-held", "1")
        self.assertEqual((out, code), ("", 1))
        self.assertRegex(
            err, r"^mtad: error: redis\.url: could not connect to Redis at .*none\.sock db 0 within 0\.3 s\n$"
        )
        self.assertIsNone(re.search("Traceback", err))

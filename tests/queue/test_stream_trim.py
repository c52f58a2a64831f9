"""Trimming the event stream only behind every consumer group (TRIM_ACKNOWLEDGED), on a real Redis.

No event may go before every consumer group has been given it and acknowledged it (DESIGN.md); producers
never trim at all, so a stuck group makes the stream grow (and ``/status`` raise its alarm) rather than lose
events.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from mtad.events.schema import MessageDelivery
from mtad.events.trim import StreamTrim
from mtad.queue import keys as queue_keys
from mtad.queue.events import EventStream, StreamMaintenance
from mtad.queue.model import Event, NewMessage
from mtad.queue.redis_queue import RedisQueue
from tests.outbound.test_delivery import eventually
from tests.redis_server import RedisTestCase

NOW = 1_700_000_000.0
GROUPS = ("recorder", "webhooks")


def message(rcpt: str) -> NewMessage:
    return NewMessage(token=f"tok-{rcpt}", server_id=3, scope="incoming", mail_from="s@x.test", rcpt_to=rcpt)


class TrimTestCase(RedisTestCase):
    queue: RedisQueue
    maintenance: StreamMaintenance

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)
        self.maintenance = StreamMaintenance(self.redis, self.keys)

    def stream(self, group: str, consumer: str = "c1") -> EventStream:
        return EventStream(self.redis, group, consumer, self.keys)

    async def accept(self, count: int) -> None:
        await self.queue.enqueue(b"x", [message(f"r{i}@x.test") for i in range(count)], NOW)

    async def ids(self) -> list[str]:
        return [e[0].decode() for e in await self.redis.execute("XRANGE", self.keys.events, "-", "+")]

    async def length(self) -> int:
        return int(await self.redis.execute("XLEN", self.keys.events))

    async def read_and_ack(self, group: str, count: int, ack: Sequence[int] | None = None) -> list[Event]:
        """``group`` reads ``count`` entries and acknowledges those at the positions ``ack`` (all by
        default)."""
        stream = self.stream(group)
        events = await stream.read(count)
        chosen = range(len(events)) if ack is None else ack
        await stream.ack([events[i].id for i in chosen])
        return events


class TrimTests(TrimTestCase):
    async def test_no_stream(self) -> None:
        """Without a stream there is nothing to trim (and no stream is created)."""
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)
        self.assertEqual(await self.redis.execute("EXISTS", self.keys.events), 0)

    async def test_required_group_missing(self) -> None:
        """While a required group does not exist, nothing is trimmed (-1), however far the others are."""
        await self.accept(4)
        await self.read_and_ack("recorder", 10)
        self.assertEqual(await self.maintenance.trim(GROUPS), -1)
        self.assertEqual(await self.length(), 4)

    async def test_group_never_read(self) -> None:
        """A group that exists but never read bounds the trim at the stream's beginning: nothing goes,
        whether it is required or not, and whatever else is missing."""
        await self.accept(4)
        await self.read_and_ack("recorder", 10)
        await self.stream("webhooks").ensure_group()
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)
        self.assertEqual(await self.maintenance.trim(["recorder"]), 0)
        self.assertLessEqual(await self.maintenance.trim([*GROUPS, "suppression"]), 0)
        self.assertEqual(await self.length(), 4)

    async def test_trims_behind_the_slowest_group(self) -> None:
        """Only the entries every group has acknowledged go; the slowest group's unread ones stay."""
        await self.accept(6)
        written = await self.ids()
        await self.read_and_ack("recorder", 10)
        await self.read_and_ack("webhooks", 2)
        self.assertEqual(await self.maintenance.trim(GROUPS), 1)
        # The last acknowledged entry of the slowest group bounds the trim and stays (XTRIM MINID).
        self.assertEqual(await self.ids(), written[1:])
        # The slow group loses nothing: it reads on from where it was.
        rest = await self.read_and_ack("webhooks", 10)
        self.assertEqual([e.id for e in rest], written[2:])
        self.assertEqual(await self.maintenance.trim(GROUPS), 4)
        self.assertEqual(await self.ids(), written[5:])

    async def test_never_past_a_pending_entry(self) -> None:
        """An entry given to a group and not acknowledged (its consumer crashed) is never trimmed, nor
        anything after it, even when the group acknowledged later ones."""
        await self.accept(6)
        written = await self.ids()
        await self.read_and_ack("recorder", 10)
        await self.read_and_ack("webhooks", 10, ack=[0, 1, 3, 4, 5])
        self.assertEqual(await self.maintenance.trim(GROUPS), 2)
        self.assertEqual(await self.ids(), written[2:])
        # Still there to be read again by the consumer that left it pending.
        (again,) = await self.stream("webhooks").read(10)
        self.assertEqual(again.id, written[2])
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)

    async def test_pending_in_the_fast_group_bounds_too(self) -> None:
        """Whichever group holds the oldest unacknowledged entry bounds the trim."""
        await self.accept(5)
        written = await self.ids()
        await self.read_and_ack("recorder", 10, ack=[])  # everything pending
        await self.read_and_ack("webhooks", 10)
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)
        self.assertEqual(await self.ids(), written)

    async def test_unlisted_groups_bound_the_trim(self) -> None:
        """A group not in the required list still keeps what it has not acknowledged."""
        await self.accept(4)
        written = await self.ids()
        await self.read_and_ack("recorder", 10)
        await self.read_and_ack("webhooks", 10)
        await self.read_and_ack("suppression", 1, ack=[])
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)
        self.assertEqual(await self.ids(), written)

    async def test_everything_acknowledged(self) -> None:
        """When every group has acknowledged everything, all but the last entry go; trimming again
        changes nothing."""
        await self.accept(5)
        written = await self.ids()
        for group in GROUPS:
            await self.read_and_ack(group, 10)
        self.assertEqual(await self.maintenance.trim(GROUPS), 4)
        self.assertEqual(await self.ids(), written[4:])
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)

    async def test_no_groups_at_all(self) -> None:
        """A stream nobody reads is not trimmed when groups are required, nor when none are."""
        await self.accept(3)
        self.assertEqual(await self.maintenance.trim(GROUPS), -1)
        self.assertEqual(await self.maintenance.trim([]), 0)
        self.assertEqual(await self.length(), 3)


class ProducersNeverTrimTests(TrimTestCase):
    def test_no_script_caps_the_stream(self) -> None:
        """No Lua script adds to a stream with MAXLEN or MINID; only TRIM_ACKNOWLEDGED trims."""
        trimming = []
        for name in dir(queue_keys):
            script = getattr(queue_keys, name)
            if not isinstance(script, queue_keys.Script):
                continue
            source = script.source.decode()
            for call in re.findall(r"redis\.call\(\s*'X(?:ADD|TRIM)'[^)]*\)", source, re.IGNORECASE):
                if re.search(r"MAXLEN|MINID|XTRIM", call, re.IGNORECASE):
                    trimming.append(script.name)
        self.assertEqual(trimming, ["trim_acknowledged"])

    async def test_stream_grows_while_no_group_acknowledges(self) -> None:
        """With a group reading nothing and one reading without acknowledging, every event written by
        accepting and settling messages stays, past any approximate cap (whole 100-entry nodes)."""
        await self.stream("recorder").ensure_group()
        await self.read_and_ack("webhooks", 1, ack=[])
        for _ in range(10):
            await self.accept(250)
        self.assertEqual(await self.length(), 2500)
        claimed = await self.queue.claim(NOW, 500, 60.0, "w")
        for c in claimed:
            event = MessageDelivery(message_id=c.id, attempt=1, status="Sent", timestamp=NOW)
            self.assertTrue(await self.queue.ack(c.id, c.lease_token, event))
        self.assertEqual(await self.length(), 3000)
        await self.read_and_ack("webhooks", 1000, ack=[])
        self.assertEqual(await self.maintenance.trim(GROUPS), 0)
        self.assertEqual(await self.length(), 3000)


@implementer(ILogObserver)
class ListObserver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class StreamTrimTests(TrimTestCase):
    def trim(self) -> tuple[StreamTrim, ListObserver]:
        observer = ListObserver()
        trim = StreamTrim(Clock(), self.maintenance, GROUPS, interval=10.0)
        trim.log = Logger(observer=observer)
        return trim, observer

    async def test_sweep_trims_acknowledged(self) -> None:
        """A sweep trims what every group acknowledged and answers how many went."""
        await self.accept(3)
        for group in GROUPS:
            await self.read_and_ack(group, 10)
        trim, observer = self.trim()
        self.assertEqual(await trim.sweep(), 2)
        self.assertEqual(await self.length(), 1)
        self.assertEqual(observer.events, [])

    async def test_missing_group_warned_once(self) -> None:
        """While a required group is missing each sweep trims nothing and says so once; once the group
        exists and has acknowledged, sweeps trim again."""
        await self.accept(3)
        await self.read_and_ack("recorder", 10)
        trim, observer = self.trim()
        self.assertEqual(await trim.sweep(), 0)
        self.assertEqual(await trim.sweep(), 0)
        self.assertEqual(len(observer.events), 1)
        self.assertIn("does not exist yet", observer.events[0]["log_format"])
        self.assertEqual(await self.length(), 3)
        await self.read_and_ack("webhooks", 10)
        self.assertEqual(await trim.sweep(), 2)
        self.assertEqual(len(observer.events), 1)

    async def test_sweep_service_trims_on_its_clock(self) -> None:
        """The service sweeps at start and then every interval on its clock."""
        await self.accept(3)
        for group in GROUPS:
            await self.read_and_ack(group, 10)
        clock = Clock()
        service = StreamTrim(clock, self.maintenance, GROUPS, interval=10.0)
        service.startService()
        self.addCleanup(service.stopService)

        async def length_is(expected: int) -> bool:
            return await self.length() == expected

        await eventually(lambda: length_is(1))
        await self.accept(2)
        for group in GROUPS:
            await self.read_and_ack(group, 10)
        clock.advance(9.9)
        self.assertEqual(await self.length(), 3)
        clock.advance(0.1)
        await eventually(lambda: length_is(1))

"""The queue scripts against a real Redis: enqueue, claim, leases, settle, held messages, stats."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import gatherResults, succeed

from mtad.events.schema import MessageDelivery, to_dict
from mtad.queue.model import ClaimedMessage, NewMessage, PinnedBody
from mtad.queue.redis_queue import HeldMessage, RedisQueue
from tests.redis_server import RedisTestCase

NOW = 1_700_000_000.0
BODY = b"Subject: hi \xf0\x9f\x98\x80\r\n\r\nHello\r\n"


def message(rcpt: str = "a@example.test", **changes: Any) -> NewMessage:
    values: dict[str, Any] = {
        "token": "tok-" + rcpt,
        "server_id": 7,
        "scope": "outgoing",
        "mail_from": "sender@example.test",
        "rcpt_to": rcpt,
        "pool": "main",
    }
    values.update(changes)
    return NewMessage(**values)


class QueueTestCase(RedisTestCase):
    queue: RedisQueue

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.queue = RedisQueue(self.redis, self.keys)

    async def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every event in the stream as (type, data)."""
        entries = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        result = []
        for _id, fields in entries:
            values = {fields[i].decode(): fields[i + 1] for i in range(0, len(fields), 2)}
            result.append((values["type"].decode(), json.loads(values["data"])))
        return result

    async def exists(self, key: str) -> bool:
        return bool(await self.redis.execute("EXISTS", key))

    async def claim_one(self, now: float = NOW, lease: float = 60.0, owner: str = "w1") -> ClaimedMessage:
        claimed = await self.queue.claim(now, 10, lease, owner)
        self.assertEqual(len(claimed), 1)
        return claimed[0]


class EnqueueTests(QueueTestCase):
    async def test_enqueue_allocates_increasing_ids(self) -> None:
        """Each message gets its own id from one counter; later calls get larger ids."""
        first = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        second = await self.queue.enqueue(BODY, [message("c@x.test")], NOW)
        self.assertEqual(first[1], first[0] + 1)
        self.assertGreater(second[0], first[1])

    async def test_body_stored_once_for_many_recipients(self) -> None:
        """Three recipients of one DATA share a single body key with refcount 3."""
        ids = await self.queue.enqueue(BODY, [message(f"r{i}@x.test") for i in range(3)], NOW)
        bodies = {(await self.queue.message_fields(i))["body"] for i in ids}
        self.assertEqual(len(bodies), 1)
        (body_key,) = bodies
        self.assertEqual(body_key, self.keys.body(ids[0]))
        self.assertEqual(await self.redis.execute("HGET", body_key, "data"), BODY)
        self.assertEqual(await self.redis.execute("HGET", body_key, "refs"), b"3")

    async def test_body_read_back_until_gone(self) -> None:
        """body() gives a queued message's stored body, and None once the message is done and archived."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        fields = await self.queue.message_fields(mid)
        self.assertEqual(await self.queue.body(fields), BODY)
        claimed = await self.claim_one()
        self.assertTrue(await self.queue.ack(mid, claimed.lease_token))
        await self.queue.release_archived([mid])
        self.assertIsNone(await self.queue.body(fields))
        self.assertIsNone(await self.queue.body(await self.queue.message_fields(mid)))

    async def test_message_hash_holds_envelope_and_fields(self) -> None:
        """The hash keeps the envelope, metadata and the caller's extra fields, Unicode intact."""
        (mid,) = await self.queue.enqueue(
            BODY, [message("ü@x.test", fields={"subject": "Grüße 😀", "tag": "t1"})], NOW
        )
        fields = await self.queue.message_fields(mid)
        self.assertEqual(fields["id"], str(mid))
        self.assertEqual(fields["rcpt_to"], "ü@x.test")
        self.assertEqual(fields["subject"], "Grüße 😀")
        self.assertEqual(fields["tag"], "t1")
        self.assertEqual(fields["attempts"], "0")
        self.assertEqual(fields["state"], "due")
        self.assertEqual(float(fields["created_at"]), NOW)
        self.assertEqual(fields["server_id"], "7")
        self.assertEqual(fields["pool"], "main")

    async def test_enqueue_appends_queued_events_in_same_call(self) -> None:
        """One message.queued event per message, carrying the allocated id and the caller's event data."""
        ids = await self.queue.enqueue(
            BODY,
            [message("a@x.test", event={"subject": "Hi 😀"}), message("b@x.test")],
            NOW,
        )
        events = await self.events()
        self.assertEqual([t for t, _ in events], ["message.queued", "message.queued"])
        self.assertEqual([d["id"] for _, d in events], ids)
        first = events[0][1]
        self.assertEqual(first["subject"], "Hi 😀")
        self.assertEqual(first["token"], "tok-a@x.test")
        self.assertEqual(first["size"], len(BODY))
        self.assertEqual(first["timestamp"], NOW)
        self.assertEqual(first["server_id"], 7)
        self.assertEqual(events[1][1]["rcpt_to"], "b@x.test")

    async def test_reserved_fields_rejected(self) -> None:
        """Callers cannot overwrite fields the scripts own (state, lease_token, ...)."""
        with self.assertRaises(ValueError):
            message(fields={"state": "leased"})

    async def test_concurrent_enqueues_all_succeed(self) -> None:
        """200 enqueues issued at once (pipelined, group commit) all succeed with distinct ids."""
        calls = [self.queue.enqueue(BODY, [message(f"r{i}@x.test")], NOW) for i in range(200)]
        results = await gatherResults(calls)
        ids = [r[0] for r in results]
        self.assertEqual(len(set(ids)), 200)
        stats = await self.queue.stats(NOW)
        self.assertEqual(stats.due_now, 200)
        self.assertEqual(len(await self.events()), 200)


class ClaimTests(QueueTestCase):
    async def test_claim_returns_fields_and_body(self) -> None:
        """A claim hands back the envelope, extra fields, lease and the body bytes."""
        (mid,) = await self.queue.enqueue(BODY, [message(fields={"tag": "x"})], NOW)
        claimed = await self.claim_one(NOW + 1, lease=30.0, owner="worker-1")
        self.assertEqual(claimed.id, mid)
        self.assertEqual(claimed.body, BODY)
        self.assertEqual(claimed.rcpt_to, "a@example.test")
        self.assertEqual(claimed.mail_from, "sender@example.test")
        self.assertEqual(claimed.server_id, 7)
        self.assertEqual(claimed.scope, "outgoing")
        self.assertEqual(claimed.pool, "main")
        self.assertEqual(claimed.attempts, 0)
        self.assertEqual(claimed.lease_owner, "worker-1")
        self.assertEqual(claimed.lease_deadline, NOW + 31)
        self.assertEqual(claimed.fields, {"tag": "x"})
        self.assertEqual((await self.queue.message_fields(mid))["state"], "leased")

    async def test_claim_orders_by_due_time_and_respects_limit(self) -> None:
        """Messages come out oldest-due first, at most ``limit`` per claim."""
        ids = await self.queue.enqueue(
            BODY,
            [message("late@x.test", due_at=NOW - 1), message("early@x.test", due_at=NOW - 10)],
            NOW,
        )
        (third,) = await self.queue.enqueue(BODY, [message("mid@x.test", due_at=NOW - 5)], NOW)
        first_batch = await self.queue.claim(NOW, 2, 60, "w")
        self.assertEqual([m.id for m in first_batch], [ids[1], third])
        second_batch = await self.queue.claim(NOW, 2, 60, "w")
        self.assertEqual([m.id for m in second_batch], [ids[0]])
        self.assertEqual(await self.queue.claim(NOW, 2, 60, "w"), [])

    async def test_claim_skips_messages_not_yet_due(self) -> None:
        """A message scheduled for later is not claimed before its time."""
        await self.queue.enqueue(BODY, [message(due_at=NOW + 100)], NOW)
        self.assertEqual(await self.queue.claim(NOW, 10, 60, "w"), [])
        self.assertEqual(len(await self.queue.claim(NOW + 100, 10, 60, "w")), 1)

    async def test_shared_body_returned_to_every_claimed_sibling(self) -> None:
        """Siblings sharing one body each come back with it."""
        await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        claimed = await self.queue.claim(NOW, 10, 60, "w")
        self.assertEqual([m.body for m in claimed], [BODY, BODY])

    async def test_claimed_message_not_claimed_again(self) -> None:
        """A leased message is invisible to other claims while its lease runs."""
        await self.queue.enqueue(BODY, [message()], NOW)
        await self.claim_one()
        self.assertEqual(await self.queue.claim(NOW + 59, 10, 60, "w2"), [])

    async def test_expired_lease_returns_message(self) -> None:
        """After the lease deadline, the next claim takes the message again, with a new lease token."""
        await self.queue.enqueue(BODY, [message()], NOW)
        first = await self.claim_one(NOW, lease=60)
        second = await self.claim_one(NOW + 61, lease=60, owner="w2")
        self.assertEqual(second.id, first.id)
        self.assertNotEqual(second.lease_token, first.lease_token)
        self.assertEqual(second.attempts, 0)
        self.assertFalse(await self.queue.ack(first.id, first.lease_token))
        self.assertTrue(await self.queue.ack(second.id, second.lease_token))

    async def test_requeue_expired_counts(self) -> None:
        """requeue_expired moves only expired leases back to due and says how many."""
        await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        claimed = await self.queue.claim(NOW, 1, 10, "w")
        await self.queue.claim(NOW, 1, 100, "w")
        self.assertEqual(await self.queue.requeue_expired(NOW + 50), 1)
        stats = await self.queue.stats(NOW + 50)
        self.assertEqual((stats.due_now, stats.leased), (1, 1))
        fields = await self.queue.message_fields(claimed[0].id)
        self.assertEqual(fields["state"], "due")
        self.assertNotIn("lease_token", fields)


def delivered(message_id: int, status: str) -> MessageDelivery:
    return MessageDelivery(message_id=message_id, attempt=1, status=status, timestamp=NOW)


class SettleTests(QueueTestCase):
    async def test_ack_deletes_message_and_appends_event(self) -> None:
        """ack deletes the message and appends the caller's event in the same call."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        claimed = await self.claim_one()
        event = delivered(mid, "Sent")
        self.assertTrue(await self.queue.ack(mid, claimed.lease_token, event))
        self.assertEqual(await self.queue.message_fields(mid), {})
        self.assertEqual((await self.events())[-1], ("message.delivery", to_dict(event)))
        stats = await self.queue.stats(NOW)
        self.assertEqual((stats.due_now, stats.leased, stats.oldest_age_seconds), (0, 0, None))

    async def test_ack_with_stale_token_is_noop(self) -> None:
        """ack with a wrong lease token changes nothing, appends no event and returns False."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        await self.claim_one()
        self.assertFalse(await self.queue.ack(mid, "stale", delivered(mid, "Sent")))
        self.assertEqual((await self.queue.message_fields(mid))["state"], "leased")
        self.assertEqual(len(await self.events()), 1)

    async def test_body_deleted_with_last_reference(self) -> None:
        """The shared body (once archived) survives until the last sibling is acked, then is deleted."""
        ids = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        body_key = self.keys.body(ids[0])
        await self.queue.release_archived([ids[0]])
        a, b = await self.queue.claim(NOW, 10, 60, "w")
        self.assertTrue(await self.queue.ack(a.id, a.lease_token))
        self.assertEqual(await self.redis.execute("HGET", body_key, "refs"), b"1")
        self.assertTrue(await self.queue.ack(b.id, b.lease_token))
        self.assertFalse(await self.exists(body_key))

    async def test_retry_counts_attempt_and_reschedules(self) -> None:
        """retry increments attempts and makes the message due again at the given time only."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        claimed = await self.claim_one()
        event = delivered(mid, "SoftFail")
        self.assertTrue(await self.queue.retry(mid, claimed.lease_token, NOW + 300, event))
        self.assertEqual(await self.queue.claim(NOW + 299, 10, 60, "w"), [])
        again = await self.claim_one(NOW + 300)
        self.assertEqual(again.attempts, 1)
        self.assertEqual(again.due_at, NOW + 300)
        self.assertEqual((await self.events())[-1][1]["status"], "SoftFail")

    async def test_retry_with_stale_token_is_noop(self) -> None:
        """retry with a wrong lease token neither counts an attempt nor reschedules."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        await self.claim_one()
        self.assertFalse(await self.queue.retry(mid, "stale", NOW + 300))
        fields = await self.queue.message_fields(mid)
        self.assertEqual((fields["attempts"], fields["state"]), ("0", "leased"))

    async def test_extend_lease(self) -> None:
        """extend_lease keeps a long delivery's message from being reclaimed; stale tokens are refused."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        claimed = await self.claim_one(NOW, lease=60)
        self.assertFalse(await self.queue.extend_lease(mid, "stale", NOW + 500))
        self.assertTrue(await self.queue.extend_lease(mid, claimed.lease_token, NOW + 500))
        self.assertEqual(await self.queue.claim(NOW + 100, 10, 60, "w2"), [])
        self.assertEqual(len(await self.queue.claim(NOW + 501, 10, 60, "w2")), 1)

    async def test_release_returns_to_due_without_attempt(self) -> None:
        """release makes the message due again at once, keeping its attempt count."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        claimed = await self.claim_one()
        self.assertFalse(await self.queue.release(mid, "stale"))
        self.assertTrue(await self.queue.release(mid, claimed.lease_token))
        again = await self.claim_one(NOW)
        self.assertEqual((again.id, again.attempts), (mid, 0))


class HeldTests(QueueTestCase):
    async def test_enqueue_held_is_not_due(self) -> None:
        """A message enqueued held is kept but never claimed until released."""
        (mid,) = await self.queue.enqueue(BODY, [message(held=True)], NOW)
        self.assertEqual(await self.queue.claim(NOW + 1000, 10, 60, "w"), [])
        stats = await self.queue.stats(NOW)
        self.assertEqual((stats.held, stats.due_now), (1, 0))
        self.assertTrue(await self.queue.release_held(mid, NOW + 5))
        self.assertFalse(await self.queue.release_held(mid, NOW + 5))
        self.assertEqual((await self.claim_one(NOW + 5)).id, mid)

    async def test_release_held_forgets_hold_reason(self) -> None:
        """A released message loses its hold reason, so delivery sends it instead of holding it again."""
        (mid,) = await self.queue.enqueue(BODY, [message(fields={"hold_reason": "Development mode"})], NOW)
        claimed = await self.claim_one()
        self.assertEqual(claimed.fields["hold_reason"], "Development mode")
        self.assertTrue(await self.queue.hold(mid, claimed.lease_token, NOW))
        self.assertTrue(await self.queue.release_held(mid, NOW + 5))
        again = await self.claim_one(NOW + 5)
        self.assertNotIn("hold_reason", again.fields)

    async def test_hold_leased_message(self) -> None:
        """hold moves a leased message to the held set (stale token: no-op) with its event."""
        (mid,) = await self.queue.enqueue(BODY, [message()], NOW)
        claimed = await self.claim_one()
        self.assertFalse(await self.queue.hold(mid, "stale", NOW))
        event = delivered(mid, "Held")
        self.assertTrue(await self.queue.hold(mid, claimed.lease_token, NOW, event))
        fields = await self.queue.message_fields(mid)
        self.assertEqual(fields["state"], "held")
        self.assertEqual((await self.queue.stats(NOW)).held, 1)
        self.assertEqual((await self.events())[-1][1]["status"], "Held")

    async def test_cancel_held_deletes_message_and_body(self) -> None:
        """cancel_held removes a held message and its body; non-held messages are refused."""
        (mid,) = await self.queue.enqueue(BODY, [message(held=True)], NOW)
        (other,) = await self.queue.enqueue(BODY, [message()], NOW)
        self.assertFalse(await self.queue.cancel_held(other))
        self.assertTrue(await self.queue.cancel_held(mid, delivered(mid, "HoldCancelled")))
        self.assertEqual(await self.queue.message_fields(mid), {})
        await self.queue.release_archived([mid])
        self.assertFalse(await self.exists(self.keys.body(mid)))
        self.assertEqual(
            (await self.events())[-1], ("message.delivery", to_dict(delivered(mid, "HoldCancelled")))
        )
        self.assertEqual((await self.queue.stats(NOW)).held, 0)


class ArchiveTests(QueueTestCase):
    """Bodies pinned for the recorder's archive: kept until released, released once."""

    async def settle_all(self) -> None:
        for claimed in await self.queue.claim(NOW, 100, 60, "w"):
            self.assertTrue(await self.queue.ack(claimed.id, claimed.lease_token))

    async def test_queued_events_name_the_shared_body(self) -> None:
        """Every message.queued event of one accept carries the body's id, the first message id."""
        ids = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        (single,) = await self.queue.enqueue(BODY, [message(event={"raw_message_id": 1, "id": 2})], NOW)
        events = [data for kind, data in await self.events() if kind == "message.queued"]
        self.assertEqual(
            [(e["id"], e["raw_message_id"]) for e in events],
            [(ids[0], ids[0]), (ids[1], ids[0]), (single, single)],
        )

    async def test_body_outlives_its_messages_until_released(self) -> None:
        """A body whose messages are all done stays (pinned) for the archive; releasing it deletes it."""
        ids = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        await self.settle_all()
        self.assertEqual(await self.queue.bodies_to_archive([ids[0]]), {ids[0]: BODY})
        self.assertEqual(await self.queue.release_archived([ids[0]]), 1)
        self.assertFalse(await self.exists(self.keys.body(ids[0])))
        self.assertEqual(await self.queue.bodies_to_archive([ids[0]]), {})

    async def test_release_is_idempotent(self) -> None:
        """Releasing a body twice (events read twice) never takes it from a message still queued."""
        ids = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        self.assertEqual(await self.queue.release_archived([ids[0]]), 1)
        self.assertEqual(await self.queue.release_archived([ids[0]]), 0)
        self.assertEqual(await self.queue.bodies_to_archive([ids[0]]), {})
        a, b = await self.queue.claim(NOW, 10, 60, "w")
        self.assertTrue(await self.queue.ack(a.id, a.lease_token))
        self.assertEqual(await self.queue.release_archived([ids[0]]), 0)
        self.assertEqual(await self.queue.body(await self.queue.message_fields(b.id)), BODY)
        self.assertTrue(await self.queue.ack(b.id, b.lease_token))
        self.assertFalse(await self.exists(self.keys.body(ids[0])))

    async def test_bodies_to_archive_in_one_call(self) -> None:
        """Pinned bodies come back by id; unknown ids and released bodies are left out."""
        (first,) = await self.queue.enqueue(BODY, [message()], NOW)
        (second,) = await self.queue.enqueue(b"other", [message()], NOW)
        (third,) = await self.queue.enqueue(b"", [message()], NOW)
        await self.queue.release_archived([second])
        self.assertEqual(
            await self.queue.bodies_to_archive([first, second, third, third + 100]), {first: BODY, third: b""}
        )

    async def test_unpinned_body_goes_with_its_last_message(self) -> None:
        """A body stored before bodies were pinned (no ``archive`` field) goes with its last message."""
        ids = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        await self.redis.execute("HDEL", self.keys.body(ids[0]), "archive")
        await self.settle_all()
        self.assertFalse(await self.exists(self.keys.body(ids[0])))
        self.assertEqual(await self.queue.release_archived([ids[0]]), 0)

    async def pending(self) -> dict[int, float]:
        """The archive_pending set: body id → accept time."""
        flat = await self.redis.execute("ZRANGE", self.keys.archive_pending, 0, -1, "WITHSCORES")
        return {int(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def test_pinned_body_listed_by_accept_time(self) -> None:
        """enqueue lists each pinned body (once per accept) at its accept time and notes its server."""
        ids = await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        (later,) = await self.queue.enqueue(BODY, [message(server_id=9)], NOW + 5)
        self.assertEqual(await self.pending(), {ids[0]: NOW, later: NOW + 5})
        self.assertEqual(await self.redis.execute("HGET", self.keys.body(later), "server_id"), b"9")

    async def test_release_takes_body_off_pending(self) -> None:
        """Releasing a body removes its archive_pending entry, whether or not its messages are done."""
        (done,) = await self.queue.enqueue(BODY, [message("a@x.test")], NOW)
        (queued,) = await self.queue.enqueue(BODY, [message("b@x.test", due_at=NOW + 60)], NOW)
        await self.settle_all()
        self.assertEqual(await self.queue.release_archived([done, queued]), 2)
        self.assertEqual(await self.pending(), {})
        self.assertEqual(await self.queue.pinned_before(NOW + 3600, 10, 1 << 20), [])
        self.assertFalse(await self.exists(self.keys.body(done)))
        self.assertTrue(await self.exists(self.keys.body(queued)))

    async def test_pinned_before_oldest_first_bounded(self) -> None:
        """pinned_before gives bodies pinned since at or before a time, oldest first, up to a count and (after
        the first) a byte total, with what their raw messages need."""
        (first,) = await self.queue.enqueue(b"a" * 100, [message(server_id=3)], NOW)
        (second,) = await self.queue.enqueue(b"b" * 100, [message()], NOW + 10)
        (third,) = await self.queue.enqueue(b"c" * 100, [message()], NOW + 20)
        await self.settle_all()
        self.assertEqual(
            await self.queue.pinned_before(NOW + 10, 10, 1 << 20),
            [PinnedBody(first, 3, NOW, b"a" * 100), PinnedBody(second, 7, NOW + 10, b"b" * 100)],
        )
        self.assertEqual(
            [p.id for p in await self.queue.pinned_before(NOW + 20, 2, 1 << 20)], [first, second]
        )
        self.assertEqual([p.id for p in await self.queue.pinned_before(NOW + 20, 10, 250)], [first, second])
        self.assertEqual([p.id for p in await self.queue.pinned_before(NOW + 20, 10, 10)], [first])
        self.assertEqual(await self.queue.pinned_before(NOW - 1, 10, 1 << 20), [])
        self.assertEqual(await self.queue.release_archived([first]), 1)
        self.assertEqual(
            [p.id for p in await self.queue.pinned_before(NOW + 20, 10, 1 << 20)], [second, third]
        )

    async def test_pending_entry_without_pin_dropped(self) -> None:
        """An archive_pending entry whose body is no longer pinned has nothing to archive: pinned_before drops
        it rather than finding it again and again."""
        (gone,) = await self.queue.enqueue(BODY, [message("a@x.test")], NOW)
        (kept,) = await self.queue.enqueue(BODY, [message("b@x.test")], NOW)
        await self.redis.execute("HDEL", self.keys.body(gone), "archive")
        self.assertEqual([p.id for p in await self.queue.pinned_before(NOW, 10, 1 << 20)], [kept])
        self.assertEqual(await self.pending(), {kept: NOW})


class StatsTests(QueueTestCase):
    async def test_stats_counts_each_state(self) -> None:
        """stats splits due now / scheduled / leased / held and reports the oldest message's age."""
        await self.queue.enqueue(BODY, [message("old@x.test")], NOW - 30)
        await self.queue.enqueue(BODY, [message("later@x.test", due_at=NOW + 60)], NOW)
        await self.queue.enqueue(BODY, [message("held@x.test", held=True)], NOW)
        await self.queue.enqueue(BODY, [message("a@x.test"), message("b@x.test")], NOW)
        await self.queue.claim(NOW, 1, 60, "w")
        stats = await self.queue.stats(NOW)
        self.assertEqual(
            (stats.due_now, stats.scheduled, stats.leased, stats.held, stats.oldest_age_seconds),
            (2, 1, 1, 1, 30.0),
        )

    async def test_persistence_info(self) -> None:
        """persistence_info reports AOF and fsync settings of the test Redis."""
        info = await self.queue.persistence_info()
        self.assertIn("aof_enabled", info)
        self.assertIsInstance(info["aof_enabled"], bool)
        self.assertIn(info["appendfsync"], ("always", "everysec", "no", None))


class HeldReadAndExpireTests(QueueTestCase):
    """Reading held messages and expiring them in batches (the hold expiry sweep's queue calls)."""

    def cancelled(self, message: HeldMessage) -> MessageDelivery:
        return delivered(message.id, "HoldCancelled")

    async def test_held_message_reads_only_held(self) -> None:
        """held_message returns a held message's envelope, hold time and fields; None when not held."""
        (mid,) = await self.queue.enqueue(
            BODY, [message("a@x.test", held=True, fields={"hold_reason": "Development mode"})], NOW
        )
        (due,) = await self.queue.enqueue(BODY, [message("b@x.test")], NOW)
        held = await self.queue.held_message(mid)
        assert held is not None
        self.assertEqual(
            (held.id, held.token, held.server_id, held.scope, held.mail_from, held.rcpt_to),
            (mid, "tok-a@x.test", 7, "outgoing", "sender@example.test", "a@x.test"),
        )
        self.assertEqual((held.attempts, held.created_at, held.held_at), (0, NOW, NOW))
        self.assertEqual(held.fields["hold_reason"], "Development mode")
        self.assertIsNone(await self.queue.held_message(due))
        self.assertIsNone(await self.queue.held_message(mid + 1000))
        await self.queue.release_held(mid, NOW)
        self.assertIsNone(await self.queue.held_message(mid))

    async def test_held_before_oldest_first_up_to_limit(self) -> None:
        """held_before lists messages held at or before a time, the longest held first, up to the limit."""
        (young,) = await self.queue.enqueue(BODY, [message("y@x.test", held=True)], NOW + 10)
        (old,) = await self.queue.enqueue(BODY, [message("o@x.test", held=True)], NOW)
        (middle,) = await self.queue.enqueue(BODY, [message("m@x.test", held=True)], NOW + 5)
        self.assertEqual([m.id for m in await self.queue.held_before(NOW + 5, 10)], [old, middle])
        self.assertEqual([m.id for m in await self.queue.held_before(NOW + 10, 2)], [old, middle])
        self.assertEqual([m.id for m in await self.queue.held_before(NOW - 1, 10)], [])
        self.assertEqual((await self.queue.held_before(NOW + 10, 10))[2].id, young)

    async def test_expire_held_cancels_old_holds_with_events(self) -> None:
        """expire_held deletes messages held at or before the time (bodies too) with one event each."""
        (old,) = await self.queue.enqueue(BODY, [message("o@x.test", held=True)], NOW)
        (young,) = await self.queue.enqueue(BODY, [message("y@x.test", held=True)], NOW + 100)
        (due,) = await self.queue.enqueue(BODY, [message("d@x.test")], NOW)
        self.assertEqual(await self.queue.expire_held(NOW + 50, 10, self.cancelled), [old])
        self.assertEqual(await self.queue.message_fields(old), {})
        await self.queue.release_archived([old])
        self.assertFalse(await self.exists(self.keys.body(old)))
        self.assertIsNotNone(await self.queue.held_message(young))
        self.assertEqual((await self.queue.message_fields(due))["state"], "due")
        self.assertEqual(
            (await self.events())[-1], ("message.delivery", to_dict(delivered(old, "HoldCancelled")))
        )
        self.assertEqual((await self.queue.stats(NOW)).held, 1)

    async def test_expire_held_respects_limit(self) -> None:
        """At most ``limit`` messages are expired per call, the longest held first."""
        ids = [(await self.queue.enqueue(BODY, [message(held=True)], NOW + i))[0] for i in range(5)]
        self.assertEqual(await self.queue.expire_held(NOW + 10, 2, self.cancelled), ids[:2])
        self.assertEqual(await self.queue.expire_held(NOW + 10, 2, self.cancelled), ids[2:4])
        self.assertEqual(await self.queue.expire_held(NOW + 10, 2, self.cancelled), ids[4:])
        self.assertEqual(await self.queue.expire_held(NOW + 10, 2, self.cancelled), [])

    async def test_expire_held_skips_messages_changed_since_read(self) -> None:
        """A message released (or held again later) between the read and the cancel is left alone."""
        (released,) = await self.queue.enqueue(BODY, [message("r@x.test", held=True)], NOW)
        (rehold,) = await self.queue.enqueue(BODY, [message("h@x.test", held=True)], NOW)
        (kept,) = await self.queue.enqueue(BODY, [message("k@x.test", held=True)], NOW)
        stale = await self.queue.held_before(NOW, 10)
        self.assertTrue(await self.queue.release_held(released, NOW))
        await self.redis.execute("ZADD", self.keys.held, NOW + 500, rehold)
        self.patch(self.queue, "held_before", lambda before, limit: succeed(stale))
        self.assertEqual(await self.queue.expire_held(NOW, 10, self.cancelled), [kept])
        self.assertEqual((await self.queue.message_fields(released))["state"], "due")
        self.assertIsNotNone(await self.queue.held_message(rehold))
        self.assertEqual([data["message_id"] for _, data in (await self.events())[-1:]], [kept])

    async def test_expire_held_clears_ids_without_message(self) -> None:
        """A held id whose message hash is gone is removed from the held set (with its event)."""
        await self.redis.execute("ZADD", self.keys.held, NOW, 424242)
        self.assertEqual(await self.queue.expire_held(NOW, 10, self.cancelled), [424242])
        self.assertEqual((await self.queue.stats(NOW)).held, 0)

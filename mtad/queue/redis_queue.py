"""The message queue in Redis: accept, claim with a lease, and settle each message in one script call.

Every change that touches more than one key is one Lua script (DESIGN.md, "Where state lives"), so a crash
can never leave a message half-written: ``enqueue`` stores the body once, every recipient's message hash,
its due entry and its ``message.queued`` event in a single round trip. With the embedded Redis running
``appendfsync always``, the reply to that call means the message is on disk, which is when the SMTP server
may say 250 (DESIGN.md invariant 1; RFC 5321 §6.1: once accepted, the message must not be lost).

Claims are leases (invariant 2): ``claim`` moves due messages to the leased set with a deadline and hands
out a lease token; ack/retry/hold/release need that token, so a worker whose lease expired and whose
message another worker now holds changes nothing (the call returns False).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mtad.events.schema import AnyEvent, MessageDelivery, MessageQueued, encode, queued_tail
from mtad.queue.client import RedisClient
from mtad.queue.keys import (
    ACK,
    ARCHIVE_PENDING,
    CANCEL_HELD,
    CLAIM,
    ENQUEUE,
    EXPIRE_HELD,
    EXTEND_LEASE,
    HELD_BEFORE,
    HOLD,
    PINNED_BEFORE,
    RELEASE,
    RELEASE_ARCHIVED,
    RELEASE_HELD,
    REQUEUE_EXPIRED,
    RETRY,
    STATS,
    QueueKeys,
    Script,
)
from mtad.queue.model import (
    RESERVED_FIELDS,
    ClaimedMessage,
    NewMessage,
    PinnedBody,
    QueueError,
    QueueStats,
)

_HELD_FIELDS = frozenset(
    {
        "id",
        "token",
        "server_id",
        "scope",
        "mail_from",
        "rcpt_to",
        "attempts",
        "created_at",
        "held_at",
        "state",
    }
)


@attrs.frozen
class HeldMessage:
    """A message in the held set, as `RedisQueue.held_message` and `RedisQueue.held_before` read it.

    ``held_at`` is when it was held (its score in the held set); ``fields`` are the other fields of its
    hash (``hold_reason``, ``pool``, ``body``, the caller's fields, ...).
    """

    id: int
    token: str
    server_id: int
    scope: str
    mail_from: str
    rcpt_to: str
    attempts: int
    created_at: float
    held_at: float
    fields: Mapping[str, str]


def _held_message(f: Mapping[str, str]) -> HeldMessage:
    return HeldMessage(
        id=int(f["id"]),
        token=f.get("token", ""),
        server_id=int(f.get("server_id", "0")),
        scope=f.get("scope", ""),
        mail_from=f.get("mail_from", ""),
        rcpt_to=f.get("rcpt_to", ""),
        attempts=int(f.get("attempts", "0")),
        created_at=float(f.get("created_at", "0")),
        held_at=float(f.get("held_at", "0")),
        fields={k: v for k, v in f.items() if k not in _HELD_FIELDS},
    )


def _number(value: float) -> str:
    return repr(float(value))


class RedisQueue:
    """The async queue API over one `RedisClient`. Every method returns a Deferred.

    Methods issue their script at once and do not wait for each other, so concurrent SMTP sessions'
    ``enqueue`` calls are pipelined on the shared connection and fsync'd together.
    """

    log = Logger()

    def __init__(
        self,
        client: RedisClient,
        keys: QueueKeys | None = None,
        requeue_batch: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys if keys is not None else QueueKeys()
        self.requeue_batch = requeue_batch

    def _run(self, script: Script, args: list[str | bytes | int | float]) -> Deferred[Any]:
        return self.client.run_script(script, self.keys.queue_keys(), [self.keys.prefix, *args])

    def _event_args(self, event: AnyEvent | None) -> list[str | bytes | int | float]:
        if event is None:
            return ["", ""]
        return list(encode(event))

    # -- accept ---------------------------------------------------------------------------------------

    def enqueue(self, body: bytes, messages: Sequence[NewMessage], now: float) -> Deferred[list[int]]:
        """Store ``body`` once and one queued message per entry of ``messages``; fires with their new ids.

        One script call, one round trip: body, message hashes, due (or held) entries and one
        ``message.queued`` event per message. When it fires, the messages are durable (as durable as the
        Redis persistence settings make them; see `persistence_info`). Each event carries
        ``raw_message_id``, the id of the shared body (the first message's id); the body stays pinned in
        Redis, listed by ``now`` for `pinned_before`, until `release_archived` says it is in SQL. Its raw
        message belongs to the first message's server (one accept is for one server).
        """
        if not messages:
            raise ValueError("enqueue needs at least one message")
        args: list[str | bytes | int | float] = [
            _number(now),
            body,
            len(messages),
            messages[0].server_id,
        ]
        for m in messages:
            # The script writes the two ids itself, once it has allocated them.
            event = MessageQueued(
                id=0,
                raw_message_id=0,
                token=m.token,
                server_id=m.server_id,
                scope=m.scope,
                mail_from=m.mail_from,
                rcpt_to=m.rcpt_to,
                pool=m.pool,
                size=len(body),
                timestamp=now,
                held=m.held,
                subject=m.event.get("subject"),
                message_id=m.event.get("message_id"),
                tag=m.event.get("tag"),
                received_with_ssl=bool(m.event.get("received_with_ssl", False)),
                bounce=bool(m.event.get("bounce", False)),
            )
            tail = queued_tail(event)
            fields: dict[str, str] = {
                "token": m.token,
                "server_id": str(m.server_id),
                "scope": m.scope,
                "mail_from": m.mail_from,
                "rcpt_to": m.rcpt_to,
                "pool": m.pool,
                **m.fields,
            }
            args += [
                _number(now if m.due_at is None else m.due_at),
                "1" if m.held else "0",
                tail,
                len(fields),
            ]
            for name, value in fields.items():
                args += [name, value]
        return self._run(ENQUEUE, args).addCallback(lambda ids: [int(i) for i in ids])

    # -- deliver --------------------------------------------------------------------------------------

    def claim(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> Deferred[list[ClaimedMessage]]:
        """Lease up to ``limit`` messages due at ``now`` (oldest due first) until ``now + lease_seconds``.

        Expired leases are returned to due first (in the same script), so a crashed worker's messages
        come back without a separate sweeper. Bodies come in the same reply, each distinct body once.
        """
        if limit <= 0:
            raise ValueError("claim limit must be positive")
        deadline = now + lease_seconds
        args: list[str | bytes | int | float] = [
            _number(now),
            limit,
            _number(deadline),
            secrets.token_hex(8),
            owner,
            self.requeue_batch,
        ]
        return self._run(CLAIM, args).addCallback(_parse_claim)

    def requeue_expired(self, now: float) -> Deferred[int]:
        """Return leases whose deadline passed to due; fires with how many (up to ``requeue_batch``)."""
        return self._run(REQUEUE_EXPIRED, [_number(now), self.requeue_batch]).addCallback(int)

    def ack(
        self,
        message_id: int,
        lease_token: str,
        event: MessageDelivery | None = None,
        also: AnyEvent | None = None,
    ) -> Deferred[bool]:
        """The message is done (Sent or HardFail): delete it, drop its body reference, append ``event``
        (and ``also`` after it, in the same step: a suppressed message's ``message.suppressed``).

        Fires False (and changes nothing) when ``lease_token`` is no longer the message's lease.
        """
        args = [message_id, lease_token, *self._event_args(event)]
        if also is not None:
            args += self._event_args(also)
        return self._run(ACK, args).addCallback(bool)

    def retry(
        self, message_id: int, lease_token: str, next_attempt_at: float, event: MessageDelivery | None = None
    ) -> Deferred[bool]:
        """Soft failure: count the attempt and make the message due again at ``next_attempt_at``."""
        args = [message_id, lease_token, _number(next_attempt_at), *self._event_args(event)]
        return self._run(RETRY, args).addCallback(bool)

    def hold(
        self, message_id: int, lease_token: str, now: float, event: MessageDelivery | None = None
    ) -> Deferred[bool]:
        """Move a leased message to the held set (kept, never due until `release_held`)."""
        args = [message_id, lease_token, _number(now), *self._event_args(event)]
        return self._run(HOLD, args).addCallback(bool)

    def release_held(self, message_id: int, now: float) -> Deferred[bool]:
        """Make a held message due at ``now``; False when it is not held."""
        return self._run(RELEASE_HELD, [message_id, _number(now)]).addCallback(bool)

    def cancel_held(self, message_id: int, event: MessageDelivery | None = None) -> Deferred[bool]:
        """Delete a held message (and its body reference); False when it is not held."""
        return self._run(CANCEL_HELD, [message_id, *self._event_args(event)]).addCallback(bool)

    def held_message(self, message_id: int) -> Deferred[HeldMessage | None]:
        """The held message with this id; None when it is not held (any more, or never was)."""

        def parse(reply: list[bytes]) -> HeldMessage | None:
            fields = _pairs(reply)
            return _held_message(fields) if fields.get("state") == "held" else None

        return self.client.execute("HGETALL", self.keys.message(message_id)).addCallback(parse)

    def held_before(self, before: float, limit: int) -> Deferred[list[HeldMessage]]:
        """Up to ``limit`` messages held at or before ``before``, the longest held first."""
        if limit <= 0:
            raise ValueError("held_before limit must be positive")

        def parse(reply: list[list[bytes]]) -> list[HeldMessage]:
            return [_held_message(_pairs(raw)) for raw in reply]

        return self._run(HELD_BEFORE, [_number(before), limit]).addCallback(parse)

    def expire_held(
        self, before: float, limit: int, event_for: Callable[[HeldMessage], MessageDelivery]
    ) -> Deferred[list[int]]:
        """Cancel up to ``limit`` messages held at or before ``before``, each with ``event_for(message)``.

        Two round trips: read the candidates (`held_before`), then cancel them in one script that skips any
        released, cancelled or held again in between, so two processes sweeping at once cancel each message
        once. Fires with the ids cancelled.
        """
        return Deferred.fromCoroutine(self._expire_held(before, limit, event_for))

    async def _expire_held(
        self, before: float, limit: int, event_for: Callable[[HeldMessage], MessageDelivery]
    ) -> list[int]:
        candidates = await self.held_before(before, limit)
        if not candidates:
            return []
        args: list[str | bytes | int | float] = [_number(before), MessageDelivery.TYPE, len(candidates)]
        for message in candidates:
            args += [message.id, encode(event_for(message))[1]]
        expired = await self._run(EXPIRE_HELD, args)
        return [int(i) for i in expired]

    def extend_lease(self, message_id: int, lease_token: str, deadline: float) -> Deferred[bool]:
        """Push a lease's deadline to ``deadline`` for a long delivery; False when the lease is stale."""
        return self._run(EXTEND_LEASE, [message_id, lease_token, _number(deadline)]).addCallback(bool)

    def release(self, message_id: int, lease_token: str, due_at: float | None = None) -> Deferred[bool]:
        """Give a leased message back, due at ``due_at`` (default: its previous due time), no attempt counted.

        Used on shutdown (previous due time) and when no connection slot was free (due a little later).
        """
        at = "" if due_at is None else _number(due_at)
        return self._run(RELEASE, [message_id, lease_token, at]).addCallback(bool)

    # -- archive --------------------------------------------------------------------------------------

    def bodies_to_archive(self, raw_message_ids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """The bodies among ``raw_message_ids`` still pinned for the archive, by id, in one call.

        A body already released (archived by an earlier read of the same events), gone, or stored before
        bodies were archived is simply absent from the answer.
        """
        if not raw_message_ids:
            return succeed({})

        def parse(reply: list[Any]) -> dict[int, bytes]:
            return {int(reply[i]): bytes(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}

        return self._run(ARCHIVE_PENDING, list(raw_message_ids)).addCallback(parse)

    def pinned_before(self, before: float, limit: int, max_bytes: int) -> Deferred[list[PinnedBody]]:
        """The bodies pinned for the archive since at or before ``before``, oldest first, in one call.

        At most ``limit`` of them, and beyond the first only while their data adds up to at most
        ``max_bytes``. For bodies whose ``message.queued`` events the recorder never read: store them, then
        `release_archived` them.
        """
        if limit <= 0:
            raise ValueError("pinned_before limit must be positive")

        def parse(reply: list[list[Any]]) -> list[PinnedBody]:
            return [
                PinnedBody(id=int(id), server_id=int(server_id), accepted_at=float(at), data=bytes(data))
                for id, at, server_id, data in reply
            ]

        return self._run(PINNED_BEFORE, [_number(before), limit, max_bytes]).addCallback(parse)

    def release_archived(self, raw_message_ids: Sequence[int]) -> Deferred[int]:
        """Unpin bodies that are now in SQL (one call for the batch); fires with how many were pinned.

        Call only after the transaction that stored them has committed. Each body whose last message is
        done goes at once; releasing twice changes nothing. Released bodies leave `pinned_before`.
        """
        if not raw_message_ids:
            return succeed(0)
        return self._run(RELEASE_ARCHIVED, list(raw_message_ids)).addCallback(int)

    # -- inspect --------------------------------------------------------------------------------------

    def stats(self, now: float) -> Deferred[QueueStats]:
        """Queue depth: due now, scheduled later, leased, held, and the age of the oldest message."""

        def parse(reply: list[Any]) -> QueueStats:
            due_now, due_total, leased, held, oldest = reply
            oldest_age = None if not oldest else max(0.0, now - float(oldest))
            return QueueStats(
                due_now=int(due_now),
                scheduled=int(due_total) - int(due_now),
                leased=int(leased),
                held=int(held),
                oldest_age_seconds=oldest_age,
            )

        return self._run(STATS, [_number(now)]).addCallback(parse)

    def message_fields(self, message_id: int) -> Deferred[dict[str, str]]:
        """Every field of a queued message's hash (empty when it is gone), for the API and tests."""

        def parse(reply: list[bytes]) -> dict[str, str]:
            return _pairs(reply)

        d = self.client.execute("HGETALL", self.keys.message(message_id))
        return d.addCallback(parse)

    def body(self, fields: dict[str, str]) -> Deferred[bytes | None]:
        """The stored body of the message whose hash is ``fields`` (see `message_fields`); None if gone."""
        if "body" not in fields:
            return succeed(None)
        d = self.client.execute("HGET", fields["body"], "data")
        return d.addCallback(lambda data: None if data is None else bytes(data))

    def persistence_info(self) -> Deferred[dict[str, Any]]:
        """How durable an accepted message is: ``aof_enabled``, ``appendfsync``, ``rdb`` (save points).

        ``appendfsync`` and ``rdb`` come from CONFIG GET, which managed Redis services often disable;
        they are then None and ``config_error`` says why (mtad logs it at start and shows it in /status).
        """
        return Deferred.fromCoroutine(self._persistence_info())

    async def _persistence_info(self) -> dict[str, Any]:
        info_text = await self.client.execute("INFO", "persistence")
        info: dict[str, str] = {}
        for line in _text(info_text).splitlines():
            if ":" in line and not line.startswith("#"):
                name, _, value = line.partition(":")
                info[name.strip()] = value.strip()
        result: dict[str, Any] = {
            "aof_enabled": info.get("aof_enabled") == "1",
            "appendfsync": None,
            "rdb": None,
            "rdb_last_save_time": int(info["rdb_last_save_time"]) if "rdb_last_save_time" in info else None,
        }
        try:
            appendfsync = _pairs(await self.client.execute("CONFIG", "GET", "appendfsync"))
            save = _pairs(await self.client.execute("CONFIG", "GET", "save"))
        except QueueError as e:
            result["config_error"] = str(e)
        else:
            result["appendfsync"] = appendfsync.get("appendfsync")
            result["rdb"] = save.get("save", "") or None
        return result


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _parse_claim(reply: list[Any]) -> list[ClaimedMessage]:
    raw_messages, raw_bodies = reply
    bodies: dict[str, bytes] = {}
    for i in range(0, len(raw_bodies) - 1, 2):
        bodies[_text(raw_bodies[i])] = bytes(raw_bodies[i + 1])
    claimed = []
    for raw in raw_messages:
        f = _pairs(raw)
        claimed.append(
            ClaimedMessage(
                id=int(f["id"]),
                token=f.get("token", ""),
                server_id=int(f.get("server_id", "0")),
                scope=f.get("scope", ""),
                mail_from=f.get("mail_from", ""),
                rcpt_to=f.get("rcpt_to", ""),
                pool=f.get("pool", ""),
                attempts=int(f.get("attempts", "0")),
                created_at=float(f.get("created_at", "0")),
                due_at=float(f.get("due_at", "0")),
                lease_token=f["lease_token"],
                lease_owner=f.get("lease_owner", ""),
                lease_deadline=float(f["lease_deadline"]),
                body=bodies.get(f.get("body", ""), b""),
                fields={k: v for k, v in f.items() if k not in RESERVED_FIELDS},
            )
        )
    return claimed

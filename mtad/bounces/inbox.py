"""The bounce inbox: mail the SMTP server accepted at the return path, kept in Redis until it is read.

The SMTP server accepts mail for the return path domains from anyone (DSNs come from every MTA on the
Internet, with a null sender) and hands each message to `BounceInbox.put` at the end of DATA. When
``put`` returns, the message is in Redis under its own id (from the shared message id counter, so it is
also the id it is recorded under as an incoming message), with the same persistence as accepted mail:
only then may the client be told 250 (DESIGN.md invariant 1). ``put`` raises otherwise, and the client
is told to try again (451; 452 for `InboxFull`).

`mtad.bounces.processor` claims entries with a lease (like the delivery queue), reads them and settles
each with `BounceInbox.finish`: one script that appends the entry's events to the event stream *and*
turns the entry into an ordinary stored body, pinned for the archive, in the same step. So a processor
that dies at any point before that leaves the entry to be claimed again once its lease expires, with no
event written; and after it, the entry is gone and its events are written exactly once. An entry that
cannot be read is retried later (`BounceInbox.retry`): due entries are claimed oldest due first, so a
retried entry goes to the back and never blocks the others.

Keys, under the queue's prefix (``QueueKeys``; the ids share their hash tag with the body key they
become):

=============================  ==========================================================================
``<p>bounce:{<id>}``           hash: ``data`` (the DATA octets), ``mail_from``, ``rcpt_to`` (JSON list),
                               ``received_with_ssl``, ``client_ip``, ``received_at``, ``token``,
                               ``claims`` (claims not given back as deferred), ``lease_token``,
                               ``last_error``; renamed to ``<p>body:{<id>}`` when finished
``<p>bounces:due``             ZSET id → when the entry is next due
``<p>bounces:leased``          ZSET id → lease deadline
=============================  ==========================================================================
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.accept import new_token
from mtad.events.schema import AnyEvent, encode
from mtad.queue.client import RedisClient
from mtad.queue.keys import QueueKeys, Script
from mtad.queue.model import QueueError, QueueFull

#: Entries (due and leased) beyond which `BounceInbox.put` refuses more: a flood of bounces, or a
#: processor that is not running, must not eat Redis's memory (DESIGN.md invariant 3).
DEFAULT_MAX_ENTRIES = 100_000

_COMMON = r"""
local K_NEXT, K_DUE, K_LEASED = KEYS[1], KEYS[2], KEYS[3]
local K_EVENTS, K_ARCHIVE = KEYS[4], KEYS[5]
local PREFIX = ARGV[1]
local function entry_key(id) return PREFIX .. 'bounce:{' .. id .. '}' end
local function leased_by(ekey, token) return redis.call('HGET', ekey, 'lease_token') == token end
"""

# ARGV: prefix, now, max_entries (0: no limit), token, data, mail_from, rcpt_to (JSON), ssl (0/1),
# client_ip. Answers the new entry's id, or -1 when the inbox is full.
PUT = Script.of(
    "bounce_put",
    _COMMON
    + r"""
local now, max = ARGV[2], tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', K_DUE) + redis.call('ZCARD', K_LEASED) >= max then return -1 end
local id = string.format('%d', redis.call('INCR', K_NEXT))
redis.call('HSET', entry_key(id), 'token', ARGV[4], 'data', ARGV[5], 'mail_from', ARGV[6],
           'rcpt_to', ARGV[7], 'received_with_ssl', ARGV[8], 'client_ip', ARGV[9], 'received_at', now,
           'claims', 0)
redis.call('ZADD', K_DUE, now, id)
return tonumber(id)
""",
)

# ARGV: prefix, now, limit, lease deadline, lease token base. Leases whose deadline passed are due again
# first (their holder died or hung); then up to ``limit`` due entries, oldest due first, are leased.
# Answers {id, HGETALL} pairs.
CLAIM = Script.of(
    "bounce_claim",
    _COMMON
    + r"""
local now, limit, deadline, base = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', K_LEASED, id)
  if redis.call('EXISTS', entry_key(id)) == 1 then
    redis.call('HDEL', entry_key(id), 'lease_token')
    redis.call('ZADD', K_DUE, now, id)
  end
end
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DUE, '-inf', now, 'LIMIT', 0, limit)) do
  local ekey = entry_key(id)
  redis.call('ZREM', K_DUE, id)
  if redis.call('EXISTS', ekey) == 1 then
    redis.call('HINCRBY', ekey, 'claims', 1)
    redis.call('HSET', ekey, 'lease_token', base .. ':' .. id)
    redis.call('ZADD', K_LEASED, deadline, id)
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = redis.call('HGETALL', ekey)
  end
end
return claimed
""",
)

# ARGV: prefix, id, lease token, now, server_id, then event type and data pairs. Appends the events and
# makes the entry the stored body ``body:{<id>}`` of the message recorded for it (no queued message
# points at it: refs 0; pinned for the archive, so the recorder stores it and then deletes it), in one
# step. Answers 0 (and changes nothing) when the lease is no longer this one.
FINISH = Script.of(
    "bounce_finish",
    _COMMON
    + r"""
local id, token, now = ARGV[2], ARGV[3], ARGV[4]
local ekey = entry_key(id)
if not leased_by(ekey, token) then return 0 end
redis.call('ZREM', K_LEASED, id)
redis.call('ZREM', K_DUE, id)
redis.call('HDEL', ekey, 'token', 'mail_from', 'rcpt_to', 'received_with_ssl', 'client_ip',
           'received_at', 'claims', 'lease_token', 'last_error')
local bkey = PREFIX .. 'body:{' .. id .. '}'
redis.call('RENAME', ekey, bkey)
redis.call('HSET', bkey, 'refs', 0, 'archive', '1', 'server_id', ARGV[5])
redis.call('ZADD', K_ARCHIVE, now, id)
for i = 6, #ARGV - 1, 2 do
  redis.call('XADD', K_EVENTS, '*', 'type', ARGV[i], 'data', ARGV[i + 1])
end
return 1
""",
)

# ARGV: prefix, id, lease token, due_at, counted (1: the claim counts as a failed try; 0: it does not,
# the entry only waits), error. Answers 0 when the lease is no longer this one.
RETRY = Script.of(
    "bounce_retry",
    _COMMON
    + r"""
local id, token = ARGV[2], ARGV[3]
local ekey = entry_key(id)
if not leased_by(ekey, token) then return 0 end
redis.call('ZREM', K_LEASED, id)
redis.call('HDEL', ekey, 'lease_token')
if ARGV[5] == '0' then redis.call('HINCRBY', ekey, 'claims', -1) end
redis.call('HSET', ekey, 'last_error', ARGV[6])
redis.call('ZADD', K_DUE, ARGV[4], id)
return 1
""",
)


class InboxFull(QueueFull):
    """The inbox holds `BounceInbox.max_entries` entries: the SMTP server answers 452 4.3.1."""


@attrs.frozen
class InboxEntry:
    """One message received at the return path, leased to one processor (``lease_token``).

    ``claims`` counts the claims of it that ended in a failure or in nothing (its processor died):
    the processor gives up reading an entry that keeps failing. ``id`` and ``token`` are the ones it is
    recorded under as an incoming message.
    """

    id: int
    token: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes = attrs.field(repr=False)
    received_with_ssl: bool
    client_ip: str
    received_at: float
    claims: int
    lease_token: str
    last_error: str | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _number(value: float) -> str:
    return repr(float(value))


def _entry(entry_id: Any, flat: Sequence[Any]) -> InboxEntry:
    raw = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
    text = {name: _text(value) for name, value in raw.items() if name != "data"}
    try:
        rcpt_to = json.loads(text.get("rcpt_to", "[]"))
        recipients = tuple(str(r) for r in rcpt_to) if isinstance(rcpt_to, list) else ()
    except ValueError:
        recipients = ()
    return InboxEntry(
        id=int(_text(entry_id)),
        token=text.get("token", ""),
        mail_from=text.get("mail_from", ""),
        rcpt_to=recipients,
        data=bytes(raw.get("data", b"")),
        received_with_ssl=text.get("received_with_ssl") == "1",
        client_ip=text.get("client_ip", ""),
        received_at=float(text.get("received_at", "0")),
        claims=int(text.get("claims", "0")),
        lease_token=text.get("lease_token", ""),
        last_error=text.get("last_error"),
    )


class BounceInbox:
    """The inbox in Redis: `put` for the SMTP server (it is the ``BounceSink``), the rest for processors.

    ``clock`` stamps when each message was received. Every method waits for Redis's answer; Redis that
    does not answer within the client's timeout is `~mtad.queue.model.RedisUnavailable`.
    """

    log = Logger()

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        keys: QueueKeys | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._client = client
        self._clock = clock
        self.keys = keys if keys is not None else QueueKeys()
        self.max_entries = max_entries

    def entry_key(self, entry_id: int) -> str:
        return f"{self.keys.prefix}bounce:{{{entry_id}}}"

    @property
    def due_key(self) -> str:
        return f"{self.keys.prefix}bounces:due"

    @property
    def leased_key(self) -> str:
        return f"{self.keys.prefix}bounces:leased"

    def _keys(self) -> list[str]:
        k = self.keys
        return [k.next_id, self.due_key, self.leased_key, k.events, k.archive_pending]

    async def _run(self, script: Script, args: list[str | bytes | int | float]) -> Any:
        return await self._client.run_script(script, self._keys(), [self.keys.prefix, *args])

    async def put(
        self,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        received_with_ssl: bool,
        client_ip: str,
    ) -> None:
        """Keep one message received at the return path; return only once Redis has it (see the module
        docstring). Raises `InboxFull`, or whatever Redis failed with: the client must try again."""
        await self.add(
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            data=data,
            received_with_ssl=received_with_ssl,
            client_ip=client_ip,
        )

    async def add(
        self,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        received_with_ssl: bool,
        client_ip: str,
    ) -> int:
        """`put`, answering the new entry's id."""
        if not rcpt_to:
            raise ValueError("a message at the return path has at least one recipient")
        reply = await self._run(
            PUT,
            [
                _number(self._clock.seconds()),
                self.max_entries,
                new_token(),
                bytes(data),
                mail_from,
                json.dumps(list(rcpt_to), ensure_ascii=False),
                "1" if received_with_ssl else "0",
                client_ip,
            ],
        )
        entry_id = int(reply)
        if entry_id < 0:
            raise InboxFull(f"the bounce inbox holds {self.max_entries} messages not yet processed")
        self.log.debug(
            "bounce inbox: kept {entry_id} from {client_ip} ({size} octets)",
            entry_id=entry_id,
            client_ip=client_ip,
            size=len(data),
        )
        return entry_id

    async def claim(self, now: float, limit: int, lease_seconds: float) -> list[InboxEntry]:
        """Lease up to ``limit`` due entries until ``now + lease_seconds``, oldest due first."""
        base = secrets.token_hex(8)
        reply = await self._run(CLAIM, [_number(now), limit, _number(now + lease_seconds), base])
        try:
            return [_entry(reply[i], reply[i + 1]) for i in range(0, len(reply) - 1, 2)]
        except (TypeError, ValueError, IndexError) as e:
            raise QueueError(f"unexpected claim reply from Redis: {e}") from e

    async def finish(self, entry: InboxEntry, server_id: int, events: Sequence[AnyEvent], now: float) -> bool:
        """Append ``events`` and make the entry the stored body of message ``entry.id`` of server
        ``server_id``, in one step; False (nothing done) when the lease is no longer ``entry``'s."""
        args: list[str | bytes | int | float] = [entry.id, entry.lease_token, _number(now), server_id]
        for event in events:
            args += encode(event)
        return bool(await self._run(FINISH, args))

    async def retry(self, entry: InboxEntry, due_at: float, error: str, *, counted: bool = True) -> bool:
        """Give the entry back, due again at ``due_at``; ``counted`` False when this claim was not a failed
        try (the entry waits for something). False when the lease is no longer ``entry``'s."""
        args: list[str | bytes | int | float] = [
            entry.id,
            entry.lease_token,
            _number(due_at),
            "1" if counted else "0",
            error[:1000],
        ]
        return bool(await self._run(RETRY, args))

    async def pending(self) -> int:
        """Entries not yet processed (due and leased), for ``/status``."""
        due = await self._client.execute("ZCARD", self.due_key)
        leased = await self._client.execute("ZCARD", self.leased_key)
        return int(due) + int(leased)

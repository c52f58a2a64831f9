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

Keys and scripts live in `mtad.queue.keys` (``bounce:{<id>}``, ``bounces:due``, ``bounces:leased``;
the ids share their hash tag with the body key they become), leased like webhook requests.
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
from mtad.queue.keys import (
    BOUNCE_CLAIM,
    BOUNCE_FINISH,
    BOUNCE_PUT,
    BOUNCE_RETRY,
    QueueKeys,
    Script,
)
from mtad.queue.model import QueueError, QueueFull

#: Entries (due and leased) beyond which `BounceInbox.put` refuses more: a flood of bounces, or a
#: processor that is not running, must not eat Redis's memory (DESIGN.md invariant 3).
DEFAULT_MAX_ENTRIES = 100_000


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
        return self.keys.bounce(entry_id)

    def _keys(self) -> list[str]:
        k = self.keys
        return [k.next_id, k.bounces_due, k.bounces_leased, k.events, k.archive_pending]

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
            BOUNCE_PUT,
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
        reply = await self._run(BOUNCE_CLAIM, [_number(now), limit, _number(now + lease_seconds), base])
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
        return bool(await self._run(BOUNCE_FINISH, args))

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
        return bool(await self._run(BOUNCE_RETRY, args))

    async def pending(self) -> int:
        """Entries not yet processed (due and leased), for ``/status``."""
        due = await self._client.execute("ZCARD", self.keys.bounces_due)
        leased = await self._client.execute("ZCARD", self.keys.bounces_leased)
        return int(due) + int(leased)

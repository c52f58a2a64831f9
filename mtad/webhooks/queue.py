"""Webhook requests waiting to be POSTed, in Redis: durable, leased, retried.

A request is made once per (event, webhook) by `mtad.webhooks.trigger.WebhookTrigger` and lives in Redis
until it is delivered or given up: with the embedded Redis's ``appendfsync always`` it survives ``kill -9``
of mtad, and a receiver that is down for an hour only means its requests wait. Dispatchers in any process
claim due requests with a lease (a dispatcher killed mid-POST leaves a lease that expires, and the request
is POSTed again: at least once, with the same ``uuid``). A finished request is remembered for a day, so an
event handled twice (the consumer crashed before acknowledging) does not queue it again.

Requests are due per receiver (`receiver_of`: scheme, host and port), and a claim takes each receiver's
only up to the room the claiming process has for it (`WebhookQueue.claim`), so a receiver that is slow or
has a backlog never keeps the others' requests waiting, however many of its own are due.

Scripts and key names live in `mtad.queue.keys`.
"""

from __future__ import annotations

import secrets
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed

from mtad.queue.client import RedisClient
from mtad.queue.keys import (
    WEBHOOK_DONE,
    WEBHOOK_RETRY,
    WEBHOOKS_ADD,
    WEBHOOKS_CLAIM,
    WEBHOOKS_DEPTH,
    QueueKeys,
    Script,
)

#: How long a finished request's uuid is remembered against queuing it again.
REMEMBER_SECONDS = 86400


def receiver_of(url: str) -> str:
    """The receiver a URL's requests share a cap at: ``scheme://host:port`` (the sender's per-receiver
    slots are the same); '' for a URL that has none (it is refused when sent)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return ""
    if scheme not in ("http", "https") or not parts.hostname:
        return ""
    return f"{scheme}://{parts.hostname.lower()}:{port}"


@attrs.frozen
class NewRequest:
    """A webhook request to queue: where, what, for whom."""

    uuid: str
    server_id: int
    webhook_id: int
    url: str
    event: str
    #: The exact body to POST (and sign).
    body: bytes
    #: The envelope's ``timestamp``: when the event was turned into this request.
    created_at: float
    receiver: str = attrs.field(default=attrs.Factory(lambda self: receiver_of(self.url), takes_self=True))


@attrs.frozen
class PendingRequest:
    """A claimed request: POST it, then `WebhookQueue.done` or `WebhookQueue.retry` with its token."""

    uuid: str
    server_id: int
    webhook_id: int
    url: str
    event: str
    body: bytes = attrs.field(repr=False)
    created_at: float
    #: Attempts made before this one.
    attempts: int
    lease_token: str
    #: `receiver_of` its URL ('' for a request queued before receivers were kept).
    receiver: str = ""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse(flat: Sequence[Any]) -> PendingRequest:
    raw = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
    return PendingRequest(
        uuid=_text(raw["uuid"]),
        server_id=int(raw["server_id"]),
        webhook_id=int(raw["webhook_id"]),
        url=_text(raw["url"]),
        event=_text(raw["event"]),
        body=bytes(raw["body"]),
        created_at=float(raw["created_at"]),
        attempts=int(raw["attempts"]),
        lease_token=_text(raw["lease_token"]),
        receiver=_text(raw.get("receiver", b"")),
    )


class WebhookQueue:
    """The async API over the webhook request scripts."""

    def __init__(self, client: RedisClient, keys: QueueKeys | None = None) -> None:
        self.client = client
        self.keys = keys if keys is not None else QueueKeys()

    def _run(self, script: Script, args: list[str | bytes | int | float]) -> Deferred[Any]:
        keys = [self.keys.webhooks_due, self.keys.webhooks_leased, self.keys.webhooks_receivers]
        return self.client.run_script(script, keys, [self.keys.prefix, *args])

    def add(self, requests: Sequence[NewRequest], now: float) -> Deferred[int]:
        """Queue the requests, due at ``now``, in one call; fires with how many were new."""
        if not requests:
            return succeed(0)
        args: list[str | bytes | int | float] = [repr(now), len(requests)]
        for r in requests:
            fields: list[str | bytes | int | float] = [
                "server_id",
                r.server_id,
                "webhook_id",
                r.webhook_id,
                "url",
                r.url,
                "event",
                r.event,
                "body",
                r.body,
                "created_at",
                repr(r.created_at),
            ]
            args += [r.uuid, r.receiver, len(fields) // 2, *fields]
        return self._run(WEBHOOKS_ADD, args).addCallback(int)

    def claim(
        self,
        now: float,
        limit: int,
        lease_seconds: float,
        *,
        per_receiver: int = 1_000_000,
        in_flight: Mapping[str, int] | None = None,
    ) -> Deferred[list[PendingRequest]]:
        """Lease up to ``limit`` due requests until ``now + lease_seconds``: at most ``per_receiver`` less
        ``in_flight[receiver]`` (what the caller has there already) of each receiver's, receivers whose
        requests have waited longest first."""
        args: list[str | bytes | int | float] = [
            repr(now),
            limit,
            repr(now + lease_seconds),
            secrets.token_hex(8),
            per_receiver,
        ]
        for receiver, count in (in_flight or {}).items():
            if receiver and count:
                args += [receiver, count]
        return self._run(WEBHOOKS_CLAIM, args).addCallback(lambda reply: [_parse(r) for r in reply])

    def done(self, request: PendingRequest) -> Deferred[bool]:
        """The request is delivered or given up: forget it (False when its lease was lost)."""
        args: list[str | bytes | int | float] = [request.uuid, request.lease_token, REMEMBER_SECONDS]
        return self._run(WEBHOOK_DONE, args).addCallback(bool)

    def retry(self, request: PendingRequest, at: float, attempts: int) -> Deferred[bool]:
        """Due again at ``at`` with ``attempts`` made (False when its lease was lost)."""
        args: list[str | bytes | int | float] = [request.uuid, request.lease_token, repr(at), attempts]
        return self._run(WEBHOOK_RETRY, args).addCallback(bool)

    def depth(self) -> Deferred[dict[str, int]]:
        """Requests waiting and being POSTed, for ``/status``."""
        d = self._run(WEBHOOKS_DEPTH, [])
        return d.addCallback(lambda reply: {"waiting": int(reply[0]), "sending": int(reply[1])})

"""Held messages for tests: hold one the way the delivery service does, and record the stream into SQL."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from mtad.events.recorder import record_events
from mtad.events.schema import MessageDelivery, decode_entry
from mtad.queue.client import RedisClient
from mtad.queue.events import parse_entry
from mtad.queue.keys import QueueKeys
from mtad.queue.model import Event, NewMessage
from mtad.queue.redis_queue import RedisQueue

BODY = b"From: app@mtad.test\r\nSubject: held \xf0\x9f\x98\x80\r\n\r\nHello\r\n"
DEVELOPMENT = "Server is in development mode."
WEEK = 7 * 86400.0


async def hold_message(
    queue: RedisQueue,
    now: float,
    rcpt_to: str,
    server_id: int = 7,
    mail_from: str = "app@mtad.test",
    reason: str = DEVELOPMENT,
    hold_seconds: float = WEEK,
) -> int:
    """Accept a message with a hold reason and hold it at ``now`` with a Held event, as
    `mtad.outbound.delivery.DeliveryService` does; return its id. Nothing else may be due at ``now``."""
    (message_id,) = await queue.enqueue(
        BODY,
        [
            NewMessage(
                token=f"tok{now:.0f}{rcpt_to}",
                server_id=server_id,
                scope="outgoing",
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                fields={"hold_reason": reason},
                event={"subject": f"Hello {rcpt_to}"},
            )
        ],
        now,
    )
    (claimed,) = await queue.claim(now, 1, 60.0, "test-holder")
    assert claimed.id == message_id, "another message was due"
    event = MessageDelivery(
        message_id=message_id,
        attempt=1,
        status="Held",
        details=reason,
        timestamp=now,
        hold_expiry=now + hold_seconds,
        server_id=server_id,
        token=claimed.token,
        scope="outgoing",
        mail_from=mail_from,
        rcpt_to=rcpt_to,
    )
    assert await queue.hold(message_id, claimed.lease_token, now, event)
    return message_id


async def stream_events(redis: RedisClient, keys: QueueKeys) -> list[Event]:
    """Every event in the stream, oldest first."""
    entries = await redis.execute("XRANGE", keys.events, "-", "+")
    return [event for event in (parse_entry(entry) for entry in entries) if event is not None]


async def record_stream(redis: RedisClient, keys: QueueKeys, engine: Engine, now: float) -> None:
    """Do what the recorder does with the whole stream (idempotent, so it may run again and again)."""
    events = [decode_entry(event) for event in await stream_events(redis, keys)]
    with engine.begin() as conn:
        record_events(conn, events, now)

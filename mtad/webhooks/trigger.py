"""`WebhookTrigger`: the event stream's ``webhooks`` consumer group, turning events into webhook requests.

Postal's ``WebhookRequest.trigger``: for each event that means something to webhooks
(`mtad.webhooks.payloads.webhook_event_for`), one request per enabled webhook of its server that takes
all events or that event. The requests of a batch are queued in Redis with one call
(`mtad.webhooks.queue.WebhookQueue.add`), and only then does the consumer acknowledge the batch, so an
event is never acknowledged before its webhooks are durable. Handling a batch twice queues nothing twice:
request uuids are derived from the event's stream id and the webhook's id.

The webhooks of each (server, event) are read from SQL and cached for ``cache_seconds``: a webhook added
or removed takes effect within that time.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from mtad.caching import CachedLookups
from mtad.events.recorder import UnitOfWork
from mtad.events.schema import Received
from mtad.store.webhooks import Webhook, webhooks_for_event
from mtad.webhooks.payloads import envelope, request_uuid, webhook_event_for
from mtad.webhooks.queue import NewRequest, WebhookQueue

#: The consumer group of the webhook triggers.
GROUP = "webhooks"


class WebhookTrigger:
    """The ``webhooks`` group's `~mtad.events.consumer.EventHandler`."""

    group = GROUP

    def __init__(
        self,
        database: UnitOfWork,
        queue: WebhookQueue,
        clock: IReactorTime,
        cache_seconds: float = 10.0,
    ) -> None:
        self._database = database
        self._queue = queue
        self._clock = clock
        self._webhooks: CachedLookups[tuple[int, str], tuple[Webhook, ...]] = CachedLookups(
            clock, cache_seconds
        )

    def take(self, events: Sequence[Received]) -> int:
        return len(events)

    async def handle(self, events: Sequence[Received]) -> None:
        now = self._clock.seconds()
        requests: list[NewRequest] = []
        for received in events:
            fired = webhook_event_for(received.event)
            if fired is None:
                continue
            for webhook in await self._webhooks_for(fired.server_id, fired.event):
                uuid = request_uuid(received.id, webhook.id)
                requests.append(
                    NewRequest(
                        uuid=uuid,
                        server_id=fired.server_id,
                        webhook_id=webhook.id,
                        url=webhook.url,
                        event=fired.event,
                        body=envelope(fired.event, now, uuid, fired.payload),
                        created_at=now,
                    )
                )
        await self._queue.add(requests, now)

    async def _webhooks_for(self, server_id: int, event: str) -> tuple[Webhook, ...]:
        return await self._webhooks.get((server_id, event), lambda: self._lookup(server_id, event))

    async def _lookup(self, server_id: int, event: str) -> tuple[Webhook, ...]:
        found: list[Webhook] = await self._database.run(webhooks_for_event, server_id, event)
        return tuple(found)

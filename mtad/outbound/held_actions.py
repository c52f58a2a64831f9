"""Releasing and cancelling held messages, one or many: what the operator commands and the API share.

Releasing makes a held message due now without its hold reason, so delivery sends it rather than holding
it again. Cancelling deletes it from the queue with a ``HoldCancelled`` event, which the recorder turns into
the delivery row and status in SQL (`mtad.outbound.holds`). Either is one script call on the message, so a
message that was released, cancelled, expired or delivered in the meantime is reported as not held and left
alone; acting twice is harmless.

``server_id`` scopes an action to one server's messages (the management API acts for one server): a
message of another server is treated exactly like one that is not held, so callers learn nothing about it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults

from mtad.outbound.holds import hold_cancelled_event
from mtad.queue.redis_queue import RedisQueue

#: Held messages acted on at once by `act_on_held` (pipelined on the queue's Redis connection).
CONCURRENCY = 200

#: Why a message that was to be released or cancelled was left alone.
NOT_HELD = "not held in the queue (released, cancelled, expired or delivered already, or no such message)"


class HeldAction(enum.Enum):
    """What to do with held messages; the value is the past participle for messages and summaries."""

    RELEASE = "released"
    CANCEL = "cancelled"


async def release_one(queue: RedisQueue, message_id: int, now: float, server_id: int | None = None) -> bool:
    """Make a held message due at ``now``; False when it is not held (or not ``server_id``'s)."""
    if server_id is not None:
        held = await queue.held_message(message_id)
        if held is None or held.server_id != server_id:
            return False
    return await queue.release_held(message_id, now)


async def cancel_one(queue: RedisQueue, message_id: int, now: float, server_id: int | None = None) -> bool:
    """Delete a held message with a ``HoldCancelled`` event; False when it is not held (or not
    ``server_id``'s)."""
    held = await queue.held_message(message_id)
    if held is None or (server_id is not None and held.server_id != server_id):
        return False
    return await queue.cancel_held(message_id, hold_cancelled_event(held, now))


_ACTS: dict[HeldAction, Callable[[RedisQueue, int, float, int | None], Coroutine[Any, Any, bool]]] = {
    HeldAction.RELEASE: release_one,
    HeldAction.CANCEL: cancel_one,
}


def act_on_one(
    action: HeldAction, queue: RedisQueue, message_id: int, now: float, server_id: int | None = None
) -> Coroutine[Any, Any, bool]:
    """`release_one` or `cancel_one`, as ``action`` says."""
    return _ACTS[action](queue, message_id, now, server_id)


@attrs.frozen
class HeldOutcome:
    """What `act_on_held` did: the ids acted on and those that were not held, each in the order asked."""

    done: tuple[int, ...]
    not_held: tuple[int, ...]


class HeldActionFailed(Exception):
    """The queue failed part way through `act_on_held`.

    ``done`` holds the ids already acted on, ``error`` the queue's exception. Nothing is half done (each
    message is one script call), so acting on the same ids again is safe.
    """

    def __init__(self, done: Sequence[int], error: Exception) -> None:
        super().__init__(str(error))
        self.done = tuple(done)
        self.error = error


async def act_on_held(
    action: HeldAction,
    queue: RedisQueue,
    ids: Sequence[int],
    now: float,
    *,
    server_id: int | None = None,
    concurrency: int = CONCURRENCY,
) -> HeldOutcome:
    """Release or cancel every message in ``ids`` (each once), at most ``concurrency`` at a time.

    The first queue error stops the work: the messages in flight finish, no new one starts, and
    `HeldActionFailed` says which were done.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
    wanted = list(dict.fromkeys(ids))
    pending = iter(wanted)
    results: dict[int, bool] = {}
    errors: list[Exception] = []

    async def worker() -> None:
        for message_id in pending:
            if errors:
                return
            try:
                results[message_id] = await act_on_one(action, queue, message_id, now, server_id)
            except Exception as e:
                errors.append(e)
                return

    workers = [Deferred.fromCoroutine(worker()) for _ in range(min(concurrency, len(wanted)))]
    await gatherResults(workers)
    done = [i for i in wanted if results.get(i)]
    if errors:
        raise HeldActionFailed(done, errors[0])
    return HeldOutcome(done=tuple(done), not_held=tuple(i for i in wanted if not results[i]))

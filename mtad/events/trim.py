"""`StreamTrim`: deletes the events every consumer group has acknowledged, and nothing else.

The stream used to be capped at write time (``XADD MAXLEN ~``), which drops the oldest events whether or
not the recorder or the webhook dispatcher has them: a receiver down for a day would have lost its
webhooks. Now producers never trim, and this sweep trims behind the slowest group
(`mtad.queue.events.StreamMaintenance.trim`); a stream that grows because a group is stuck shows on
``/status`` (``events.alarm``) instead. Several processes may sweep at once: the trim is one script.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.queue.events import StreamMaintenance
from mtad.sweeps import PeriodicSweep


class StreamTrim(PeriodicSweep):
    """Every ``interval`` seconds, trims the stream behind ``groups`` (all of which must exist)."""

    log = Logger()
    task = "event stream trim"

    def __init__(
        self, clock: IReactorTime, stream: StreamMaintenance, groups: Sequence[str], interval: float = 10.0
    ) -> None:
        super().__init__(clock, interval, batch=1)
        self._stream = stream
        self.groups = tuple(groups)
        #: Whether the last trim found a required group missing (logged once, not every sweep).
        self._missing = False

    async def sweep(self) -> int:
        trimmed = await self._stream.trim(self.groups)
        if trimmed < 0:
            if not self._missing:
                self.log.warn(
                    "not trimming the event stream: a consumer group of {groups} does not exist yet",
                    groups=", ".join(self.groups),
                )
            self._missing = True
            return 0
        self._missing = False
        return trimmed

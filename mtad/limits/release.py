"""`SendLimitRelease`: lets messages held by a send limit go as their server's window has room again.

Postal holds such messages until someone releases them by hand; here every ``interval`` seconds the sweep
reads which servers have limit-held messages (a Redis set the ``HOLD`` script keeps), looks up each
server's limit now (through the database's thread pool, cached like the submission policy's), and
releases the oldest messages that fit, counting them in the window (`SendWindow.release`, one script per
server). A limit removed or raised since releases them at once; a suspended server's messages stay held.
Several processes may sweep at once: each message is released once and counted once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.limits.window import SendWindow, period_of
from mtad.store.servers import Server
from mtad.sweeps import PeriodicSweep

#: Looks a server up by id (None when it was deleted): the submission policy's cached lookup.
ServerLookup = Callable[[int], Awaitable[Server | None]]


class SendLimitRelease(PeriodicSweep):
    log = Logger()
    task = "send limit release"

    def __init__(
        self,
        clock: IReactorTime,
        window: SendWindow,
        server: ServerLookup,
        interval: float = 10.0,
        batch: int = 500,
    ) -> None:
        super().__init__(clock, interval, batch)
        self._window = window
        self._server = server

    async def sweep(self) -> int:
        """Release what each server's window has room for; how many messages were released."""
        total = 0
        for server_id in await self._window.servers_holding():
            server = await self._server(server_id)
            if server is None:
                # Deleted: its messages stay held until their hold expires (HoldExpiry cancels them).
                continue
            if server.suspended:
                continue
            while not self._stopping:
                released, left = await self._window.release(
                    server.id, server.send_limit, period_of(server), self._clock.seconds(), self.batch
                )
                total += released
                if released:
                    self.log.info(
                        "released {count} messages of {server} held by its send limit ({left} still held)",
                        count=released,
                        server=server.full_permalink,
                        left=left,
                    )
                if released < self.batch or not left:
                    break
        return total

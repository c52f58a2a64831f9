"""`PeriodicSweep`: the loop shared by the services that clean up in batches every so often.

Hold expiry, raw message retention and the raw message catch-up each sweep at start and then every
``interval`` seconds on the injected clock, in batches of at most ``batch``; a failed sweep is logged and
the next one tries again, and stopping waits for the batch in hand. Only ``sweep`` differs.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtad.queue.model import RedisUnavailable


class PeriodicSweep(Service):
    """Runs `sweep` at start and every ``interval`` seconds; subclasses set ``task`` (for log lines)."""

    log = Logger()
    #: What the sweep is, in log lines: "hold expiry".
    task = "sweep"

    def __init__(self, clock: IReactorTime, interval: float, batch: int) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch!r}")
        self._clock = clock
        self.interval = interval
        self.batch = batch
        self._call: LoopingCall | None = None
        self._sweeping: Deferred[None] | None = None
        #: Set when the service stops: a sweep checks it between batches.
        self._stopping = False

    async def sweep(self) -> int:
        """One sweep, batch after batch until done or stopping; how many items it handled."""
        raise NotImplementedError

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep()
        except RedisUnavailable as e:
            self.log.warn(
                "{task}: Redis unavailable ({error}); trying again later", task=self.task, error=str(e)
            )
        except Exception:
            self.log.failure("{task} failed; trying again later", task=self.task)

    def _tick(self) -> Deferred[None]:
        self._sweeping = Deferred.fromCoroutine(self._sweep_logged())
        return self._sweeping

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        call = LoopingCall(self._tick)
        call.clock = self._clock
        self._call = call
        call.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("{task} stopped unexpectedly", f, task=self.task)
        )

    def stopService(self) -> Deferred[None]:
        """Stop sweeping; fires once a sweep in progress has finished its batch."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        call, self._call = self._call, None
        if call is not None and call.running:
            call.stop()
        sweeping = self._sweeping
        done: Deferred[None] = Deferred()
        if sweeping is None or sweeping.called:
            done.callback(None)
        else:
            sweeping.addBoth(lambda _: done.callback(None))
        return done

"""Deliver a batch of messages for one destination domain from one IP pool.

The steps (DESIGN "the flow of a message"): resolve MX → for each MX host in order and each of its
addresses: take a connection slot for a source address of the pool (per source IP and per (source IP,
MX host), all-or-none in the shared limiter) → connect bound to that address → run one SMTP session for
every message still pending (RSET between, :mod:`mtad.smtp.client`) → classify each recipient's result.

Failover follows RFC 5321 §5.1: a connection that cannot be made, a 4xx greeting/EHLO, a timeout or a
dropped session sends the messages not yet tried to the next address/MX; a reply to a message's own
commands is final for this attempt. A failed STARTTLS handshake reconnects once in plain text (RFC 7435
§3). When no slot is free anywhere, the batch is :attr:`BatchOutcome.throttled` — the queue retries it
shortly without counting an attempt.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtad.outbound.mx import MXResolver, MXResult
from mtad.outbound.pools import (
    ConnectionLimiter,
    ConnectionLimits,
    IPPool,
    SourceAddress,
    slot_keys,
    source_address_order,
)
from mtad.smtp.client import ClientTimeouts, OutgoingMessage, RecipientReply, SessionReport, SMTPClientMachine
from mtad.smtp.client_protocol import ConnectFailed, opportunistic_tls_options, run_session

Status = Literal["Sent", "SoftFail", "HardFail"]
MAX_OUTPUT = 512


@attrs.frozen
class DeliveryResult:
    """One recipient's delivery attempt, in Postal's delivery vocabulary (``deliveries`` rows).

    ``output`` is the remote server's reply (at most 512 characters); ``details`` a sentence for humans;
    ``time`` the seconds the attempt took.
    """

    status: Status
    code: int | None
    enhanced: str
    output: str
    details: str
    sent_with_ssl: bool
    time: float
    mx: str | None
    source_ip: str | None


@attrs.frozen
class RecipientResult:
    """The result for one recipient of one message."""

    message: OutgoingMessage
    recipient: str
    result: DeliveryResult


@attrs.frozen
class BatchOutcome:
    """Results for every recipient tried, and the messages to retry soon without counting an attempt."""

    results: tuple[RecipientResult, ...]
    throttled: tuple[OutgoingMessage, ...] = ()
    retry_in: float = 0.0


@attrs.frozen
class DelivererConfig:
    """Delivery settings: ``port`` is 25 in production (tests point it at sinks)."""

    port: int = 25
    timeouts: ClientTimeouts = attrs.field(factory=ClientTimeouts)
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    starttls: bool = True
    throttle_retry: float = 30.0


@attrs.frozen
class _Slot:
    source: SourceAddress
    slot_id: str
    keys: list[str]


class Deliverer:
    """Delivers batches for one domain through one pool; see the module docstring for the steps."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        resolver: MXResolver,
        limiter: ConnectionLimiter,
        config: DelivererConfig = DelivererConfig(),
        rng: random.Random | None = None,
        tls_options: Any | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._resolver = resolver
        self._limiter = limiter
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self._tls_options = tls_options if tls_options is not None else opportunistic_tls_options()

    def deliver(
        self, domain: str, messages: Sequence[OutgoingMessage], pool: IPPool
    ) -> Deferred[BatchOutcome]:
        """Deferred form of :meth:`deliver_batch` for Twisted callers."""
        return Deferred.fromCoroutine(self.deliver_batch(domain, messages, pool))

    async def deliver_batch(
        self, domain: str, messages: Sequence[OutgoingMessage], pool: IPPool
    ) -> BatchOutcome:
        """Deliver ``messages`` (all for ``domain``) from ``pool``; never raises for delivery problems."""
        start = self._clock.seconds()
        mx = await self._resolver.resolve(domain)
        if mx.failure is not None:
            failure = mx.failure
            status: Status = "HardFail" if failure.kind == "hard" else "SoftFail"
            result = DeliveryResult(
                status,
                None,
                failure.enhanced,
                "",
                f"{failure.text} ({failure.enhanced})",
                False,
                self._elapsed(start),
                None,
                None,
            )
            return BatchOutcome(tuple(_each(messages, result)))
        return await self._deliver_to(domain, mx, list(messages), pool, start)

    def _elapsed(self, start: float) -> float:
        return round(self._clock.seconds() - start, 3)

    async def _deliver_to(
        self, domain: str, mx: MXResult, pending: list[OutgoingMessage], pool: IPPool, start: float
    ) -> BatchOutcome:
        results: list[RecipientResult] = []
        tried: list[str] = []
        problems: list[str] = []
        attempted = False
        throttled = False
        for host in mx.hosts:
            host_throttled = False
            for ip in host.addresses:
                if not pending or host_throttled:
                    break
                version = 6 if ":" in ip else 4
                sources = source_address_order(pool, self._rng, version)
                if not sources:
                    continue
                slot = await self._acquire(sources, host.name)
                if slot is None:
                    self.log.info("no connection slot to {mx} from pool {pool}", mx=host.name, pool=pool.name)
                    host_throttled = throttled = True
                    continue
                attempted = True
                tried.append(f"{host.name} ({ip})")
                report, problem = await self._session(slot, host.name, ip, pending)
                if report is None:
                    problems.append(problem)
                    continue
                results += self._classify(report, host.name, ip, slot.source.ip, start)
                pending = list(report.unattempted)
                failure = report.failure
                if failure is None:
                    continue
                problems.append(f"{host.name} ({ip}): {failure.text}")
                if failure.reply is not None and failure.reply.is_permanent and not report.outcomes:
                    # a 5xx greeting or EHLO: the server refuses us; RFC 5321 §3.1 says do not insist
                    hard = DeliveryResult(
                        "HardFail",
                        failure.reply.code,
                        failure.reply.enhanced,
                        str(failure.reply)[:MAX_OUTPUT],
                        f"Permanent SMTP delivery error when sending to {host.name} ({ip})",
                        report.tls,
                        self._elapsed(start),
                        host.name,
                        slot.source.ip,
                    )
                    results += _each(pending, hard)
                    pending = []
        if not pending:
            return BatchOutcome(tuple(results))
        if throttled and not attempted:
            return BatchOutcome(tuple(results), tuple(pending), self._config.throttle_retry)
        tried_text = ", ".join(tried) if tried else "nothing"
        soft = DeliveryResult(
            "SoftFail",
            None,
            "4.4.1",
            "\n".join(problems)[:MAX_OUTPUT],
            f"No SMTP servers were available for {domain}. Tried {tried_text}",
            False,
            self._elapsed(start),
            None,
            None,
        )
        return BatchOutcome((*results, *_each(pending, soft)))

    async def _acquire(self, sources: Sequence[SourceAddress], mx_host: str) -> _Slot | None:
        limits = self._config.limits
        for source in sources:
            slot_id = uuid.uuid4().hex
            keys = slot_keys(source, mx_host, limits)
            ok = await self._limiter.acquire(keys, slot_id, self._clock.seconds(), limits.slot_ttl)
            if ok:
                return _Slot(source, slot_id, [k for k, _ in keys])
        return None

    async def _session(
        self, slot: _Slot, mx_host: str, ip: str, messages: list[OutgoingMessage]
    ) -> tuple[SessionReport | None, str]:
        """Run one session (two if STARTTLS fails) holding ``slot``; (None, why) if no connection."""
        ttl = self._config.limits.slot_ttl
        renewer = LoopingCall(self._renew, slot, ttl)
        renewer.clock = self._clock
        renewer.start(ttl / 3, now=False).addErrback(
            lambda f: self.log.failure("renewing connection slot failed", f)
        )
        try:
            starttls = self._config.starttls
            while True:
                machine = SMTPClientMachine(
                    slot.source.helo_hostname, messages, starttls=starttls, timeouts=self._config.timeouts
                )
                try:
                    report = await run_session(
                        self._reactor,
                        self._clock,
                        ip,
                        self._config.port,
                        machine,
                        bind_ip=slot.source.ip,
                        tls_options=self._tls_options if starttls else None,
                    )
                except ConnectFailed as e:
                    self.log.info("cannot connect to {mx} ({ip}): {error}", mx=mx_host, ip=ip, error=str(e))
                    return None, f"{mx_host} ({ip}): {e}"
                if report.failure is not None and report.failure.tls_failed and starttls:
                    self.log.info("STARTTLS with {mx} ({ip}) failed; retrying without TLS", mx=mx_host, ip=ip)
                    starttls = False
                    continue
                return report, ""
        finally:
            if renewer.running:
                renewer.stop()
            try:
                await self._limiter.release(slot.keys, slot.slot_id)
            except Exception:
                self.log.failure("releasing connection slot {slot_id} failed", slot_id=slot.slot_id)

    def _renew(self, slot: _Slot, ttl: float) -> Deferred[None]:
        return self._limiter.renew(slot.keys, slot.slot_id, self._clock.seconds(), ttl)

    def _classify(
        self, report: SessionReport, mx_host: str, ip: str, source_ip: str, start: float
    ) -> list[RecipientResult]:
        out = []
        for outcome in report.outcomes:
            for rr in outcome.replies:
                result = self._result(rr, mx_host, ip, source_ip, report.tls, start)
                out.append(RecipientResult(outcome.message, rr.recipient, result))
        return out

    def _result(
        self, rr: RecipientReply, mx_host: str, ip: str, source_ip: str, tls: bool, start: float
    ) -> DeliveryResult:
        reply = rr.reply
        status: Status = "Sent" if reply.is_positive else "SoftFail" if reply.is_transient else "HardFail"
        where = f"{mx_host} ({ip})"
        if status == "Sent":
            details = f"Message for {rr.recipient} accepted by {where}"
        elif not rr.remote:
            details = f"{reply.text} ({where})"
        elif status == "SoftFail":
            details = f"Temporary SMTP delivery error when sending to {where}"
        else:
            details = f"Permanent SMTP delivery error when sending to {where}"
        return DeliveryResult(
            status=status,
            code=reply.code if rr.remote else None,
            enhanced=reply.enhanced,
            output=str(reply)[:MAX_OUTPUT] if rr.remote else "",
            details=details,
            sent_with_ssl=tls,
            time=self._elapsed(start),
            mx=mx_host,
            source_ip=source_ip,
        )


def _each(messages: Sequence[OutgoingMessage], result: DeliveryResult) -> list[RecipientResult]:
    return [RecipientResult(m, r, result) for m in messages for r in m.recipients]

"""Deliverer integration: fake DNS, sink SMTP servers on 127.0.0.x, bound source addresses."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mtad.outbound.deliverer import BatchOutcome, Deliverer, DelivererConfig
from mtad.outbound.mx import MXResolver, ResolverConfig
from mtad.outbound.pools import ConnectionLimits, IPPool, SourceAddress, source_ip_mx_key
from mtad.smtp.client import ClientTimeouts, OutgoingMessage
from mtad.tls import ensure_self_signed, server_context
from tests.outbound.support import MemoryLimiter, until
from tools.fakedns import FakeDNS, start_fake_dns
from tools.sink import Sink, SinkBehaviour

reactor: Any = _reactor

POOL = IPPool("main", (SourceAddress("127.0.0.10", "out10.mtad.test"),))
POOL2 = IPPool(
    "two", (SourceAddress("127.0.0.10", "out10.mtad.test"), SourceAddress("127.0.0.11", "out11.mtad.test"))
)


def message(n: int, *rcpts: str) -> OutgoingMessage:
    body = f"From: a@mtad.test\r\nSubject: test {n}\r\n\r\nHello {n}\r\n.leading dot\r\n".encode()
    return OutgoingMessage(f"m{n}", "bounce@mtad.test", rcpts or (f"user{n}@example.test",), body)


class DelivererTests(TestCase):
    """End-to-end delivery of batches over real loopback sockets."""

    def setUp(self) -> None:
        self.zone: dict[str, Any] = {
            "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
            "mx2.example.test": {"A": ["127.0.0.3"]},
            "slow.test": "TIMEOUT",
        }
        self.dns: FakeDNS = start_fake_dns(reactor, self.zone)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.dns.stop()))
        self.limiter = MemoryLimiter()
        self.port = 0

    def sink(self, ip: str, behaviour: SinkBehaviour | None = None, tls: bool = False) -> Sink:
        """A sink on ``ip`` at the shared test port (the first sink picks it)."""
        context = None
        if tls:
            cert, key = ensure_self_signed(Path(tempfile.mkdtemp()), "sink.test")
            context = server_context(cert, key)
        sink = Sink(behaviour, context)
        listening = sink.listen(reactor, ip, self.port)
        self.port = listening.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        return sink

    def reserve_port(self) -> None:
        """Pick the shared port without a listener on 127.0.0.2 (a dead MX there refuses connections)."""
        sink = Sink()
        listening = sink.listen(reactor, "127.0.0.9", 0)
        self.port = listening.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)

    def deliverer(self, clock: Any = None, limits: ConnectionLimits | None = None, **kw: Any) -> Deliverer:
        clock = clock if clock is not None else reactor
        resolver = MXResolver(
            reactor,
            reactor,
            clock,
            ResolverConfig((self.dns.address,), timeout=3, attempts=1),
            random.Random(1),
        )
        config = DelivererConfig(port=self.port, limits=limits or ConnectionLimits(), **kw)
        return Deliverer(reactor, clock, resolver, self.limiter, config, random.Random(1))

    async def test_delivers_from_bound_source_address(self) -> None:
        """A message reaches the first MX from the pool's address, saying that address's EHLO name."""
        sink = self.sink("127.0.0.2")
        outcome = await self.deliverer().deliver(
            "example.test", [message(1, "a@example.test", "b@example.test")], POOL
        )
        self.assertEqual([r.recipient for r in outcome.results], ["a@example.test", "b@example.test"])
        result = outcome.results[0].result
        self.assertEqual(result.status, "Sent")
        self.assertEqual(result.code, 250)
        self.assertEqual((result.mx, result.source_ip), ("mx1.example.test", "127.0.0.10"))
        self.assertEqual(
            result.details, "Message for a@example.test accepted by mx1.example.test (127.0.0.2)"
        )
        self.assertIn("250", result.output)
        self.assertEqual(len(sink.messages), 1)
        received = sink.messages[0]
        self.assertEqual(received.peer_ip, "127.0.0.10")
        self.assertEqual(received.helo, "out10.mtad.test")
        self.assertEqual(received.recipients, ("a@example.test", "b@example.test"))
        self.assertIn(b"\r\n.leading dot\r\n", received.data)
        self.assertEqual(self.limiter.in_use(), 0)
        self.assertEqual(len(self.limiter.released), 1)

    async def test_connection_reuse(self) -> None:
        """Two messages go over one connection with RSET between them."""
        sink = self.sink("127.0.0.2")
        outcome = await self.deliverer().deliver("example.test", [message(1), message(2)], POOL)
        self.assertEqual([r.result.status for r in outcome.results], ["Sent", "Sent"])
        self.assertEqual(len(sink.sessions), 1)
        self.assertEqual(len(sink.messages), 2)
        verbs = [c.split(" ")[0].split(":")[0] for c in sink.sessions[0].commands]
        self.assertEqual(verbs.count("RSET"), 1)
        self.assertEqual(verbs[-1], "QUIT")

    async def test_failover_to_second_mx(self) -> None:
        """When the first MX refuses the connection the second MX gets the message."""
        self.reserve_port()
        sink2 = self.sink("127.0.0.3")
        outcome = await self.deliverer().deliver("example.test", [message(1)], POOL)
        result = outcome.results[0].result
        self.assertEqual((result.status, result.mx), ("Sent", "mx2.example.test"))
        self.assertEqual(len(sink2.messages), 1)

    async def test_no_server_available(self) -> None:
        """With every MX refusing connections the batch soft-fails naming what was tried."""
        self.reserve_port()
        outcome = await self.deliverer().deliver("example.test", [message(1)], POOL)
        result = outcome.results[0].result
        self.assertEqual(result.status, "SoftFail")
        self.assertEqual(
            result.details,
            "No SMTP servers were available for example.test. "
            "Tried mx1.example.test (127.0.0.2), mx2.example.test (127.0.0.3)",
        )

    async def test_greeting_4xx_fails_over(self) -> None:
        """A 4xx greeting sends the batch to the next MX."""
        self.sink("127.0.0.2", SinkBehaviour(fail_stage="greeting", fail_code=421))
        sink2 = self.sink("127.0.0.3")
        outcome = await self.deliverer().deliver("example.test", [message(1)], POOL)
        self.assertEqual(outcome.results[0].result.mx, "mx2.example.test")
        self.assertEqual(len(sink2.messages), 1)

    async def test_421_mid_session(self) -> None:
        """A 421 mid-session soft-fails the message it answered; untried messages go to the next MX."""
        sink1 = self.sink("127.0.0.2", SinkBehaviour(close_after_messages=1))
        sink2 = self.sink("127.0.0.3")
        outcome = await self.deliverer().deliver("example.test", [message(1), message(2), message(3)], POOL)
        by_id = {r.message.id: r.result for r in outcome.results}
        self.assertEqual((by_id["m1"].status, by_id["m1"].mx), ("Sent", "mx1.example.test"))
        self.assertEqual((by_id["m2"].status, by_id["m2"].code), ("SoftFail", 421))
        self.assertEqual(
            by_id["m2"].details, "Temporary SMTP delivery error when sending to mx1.example.test (127.0.0.2)"
        )
        self.assertEqual((by_id["m3"].status, by_id["m3"].mx), ("Sent", "mx2.example.test"))
        self.assertEqual(len(sink1.messages), 1)
        self.assertEqual([m.recipients for m in sink2.messages], [("user3@example.test",)])

    async def test_permanent_rcpt_failure(self) -> None:
        """A 5xx to RCPT hard-fails that recipient only; the other is delivered."""
        self.sink("127.0.0.2", SinkBehaviour(reject_recipients=frozenset({"bad@example.test"})))
        outcome = await self.deliverer().deliver(
            "example.test", [message(1, "bad@example.test", "ok@example.test")], POOL
        )
        statuses = {r.recipient: r.result for r in outcome.results}
        self.assertEqual(
            (statuses["bad@example.test"].status, statuses["bad@example.test"].code), ("HardFail", 550)
        )
        self.assertEqual(
            statuses["bad@example.test"].details,
            "Permanent SMTP delivery error when sending to mx1.example.test (127.0.0.2)",
        )
        self.assertEqual(statuses["bad@example.test"].enhanced, "5.0.0")
        self.assertEqual(statuses["ok@example.test"].status, "Sent")

    async def test_silent_server_times_out(self) -> None:
        """An MX that accepts TCP and never speaks times out (injected clock) and the next MX is used."""
        clock = Clock()
        sink1 = self.sink("127.0.0.2", SinkBehaviour(silent=True))
        sink2 = self.sink("127.0.0.3")
        d = self.deliverer(clock).deliver("example.test", [message(1)], POOL)
        await sink1.wait_for_sessions(1)
        await until(reactor, lambda: any(c.getTime() == 300 for c in clock.getDelayedCalls()))
        clock.advance(300)
        outcome = await d
        self.assertEqual(outcome.results[0].result.mx, "mx2.example.test")
        self.assertEqual(len(sink2.messages), 1)

    async def test_drop_after_data(self) -> None:
        """A connection dropped after the body was sent soft-fails the message (it may have arrived)."""
        sink = self.sink("127.0.0.2", SinkBehaviour(drop_after_data=True))
        sink2 = self.sink("127.0.0.3")
        outcome = await self.deliverer().deliver("example.test", [message(1)], POOL)
        result = outcome.results[0].result
        self.assertEqual(result.status, "SoftFail")
        self.assertIsNone(result.code)
        self.assertIn("Connection lost", result.details)
        self.assertEqual(len(sink.dropped), 1)
        self.assertEqual(sink2.messages, [])

    async def test_dns_timeout_soft_fails(self) -> None:
        """A DNS server that never answers gives SoftFail for every recipient."""
        clock = Clock()
        d = self.deliverer(clock).deliver("slow.test", [message(1, "x@slow.test", "y@slow.test")], POOL)
        await until(reactor, lambda: bool(clock.getDelayedCalls()))
        clock.advance(3)
        outcome = await d
        self.assertEqual([r.result.status for r in outcome.results], ["SoftFail", "SoftFail"])
        self.assertEqual(outcome.results[0].result.enhanced, "4.4.3")

    async def test_nxdomain_hard_fails(self) -> None:
        """A domain that does not exist hard-fails without any connection."""
        outcome = await self.deliverer().deliver("nowhere.test", [message(1)], POOL)
        self.assertEqual(outcome.results[0].result.status, "HardFail")
        self.assertEqual(self.limiter.acquired, [])

    async def test_limit_per_ip_and_mx_throttles(self) -> None:
        """With the only (source IP, MX) slot of every MX taken the batch is throttled, not failed."""
        sink = self.sink("127.0.0.2")
        limits = ConnectionLimits(per_source_ip=10, per_source_ip_mx=1)
        for mx in ("mx1.example.test", "mx2.example.test"):
            await self.limiter.acquire([(source_ip_mx_key("127.0.0.10", mx), 1)], f"other-{mx}", 0, 1e12)
        outcome: BatchOutcome = await self.deliverer(limits=limits).deliver(
            "example.test", [message(1)], POOL
        )
        self.assertEqual(outcome.results, ())
        self.assertEqual([m.id for m in outcome.throttled], ["m1"])
        self.assertGreater(outcome.retry_in, 0)
        self.assertEqual(sink.sessions, [])

    async def test_limit_moves_to_free_source_address(self) -> None:
        """When one source address has no free slot for the MX the other address of the pool is used."""
        sink = self.sink("127.0.0.2")
        limits = ConnectionLimits(per_source_ip=10, per_source_ip_mx=1)
        await self.limiter.acquire(
            [(source_ip_mx_key("127.0.0.10", "mx1.example.test"), 1)], "other", 0, 1e12
        )
        outcome = await self.deliverer(limits=limits).deliver("example.test", [message(1)], POOL2)
        self.assertEqual(outcome.results[0].result.source_ip, "127.0.0.11")
        self.assertEqual(sink.messages[0].peer_ip, "127.0.0.11")
        self.assertEqual(sink.messages[0].helo, "out11.mtad.test")
        self.assertEqual(self.limiter.peak[source_ip_mx_key("127.0.0.11", "mx1.example.test")], 1)

    async def test_starttls(self) -> None:
        """STARTTLS offered by the MX is used and the result records sent_with_ssl."""
        sink = self.sink("127.0.0.2", SinkBehaviour(starttls=True), tls=True)
        outcome = await self.deliverer().deliver("example.test", [message(1)], POOL)
        result = outcome.results[0].result
        self.assertEqual(result.status, "Sent")
        self.assertTrue(result.sent_with_ssl)
        self.assertTrue(sink.messages[0].tls)

    async def test_broken_tls_reconnects_plain(self) -> None:
        """A failed TLS handshake reconnects to the same MX without STARTTLS and delivers in plain text."""
        sink = self.sink("127.0.0.2", SinkBehaviour(break_tls=True))
        outcome = await self.deliverer().deliver("example.test", [message(1)], POOL)
        result = outcome.results[0].result
        self.assertEqual(
            (result.status, result.mx, result.sent_with_ssl), ("Sent", "mx1.example.test", False)
        )
        self.assertEqual(len(sink.sessions), 2)
        self.assertNotIn("STARTTLS", sink.sessions[1].commands)

    def test_slot_renewed_during_long_session(self) -> None:
        """A session longer than a third of the slot TTL renews its slot on the injected clock."""
        clock = Clock()
        sink = self.sink("127.0.0.2", SinkBehaviour(silent=True))
        limits = ConnectionLimits(slot_ttl=90)
        timeouts = ClientTimeouts(greeting=100)
        deliverer = self.deliverer(clock, limits=limits, timeouts=timeouts)

        async def run() -> None:
            d = deliverer.deliver("example.test", [message(1)], IPPool("p", POOL.addresses))
            await sink.wait_for_sessions(1)
            await until(reactor, lambda: any(c.getTime() == 100 for c in clock.getDelayedCalls()))
            clock.advance(31)
            self.assertEqual(len(self.limiter.renewed), 1)
            clock.advance(70)
            await until(reactor, lambda: len(self.limiter.acquired) >= 2)
            clock.advance(31)  # the second MX (nothing listening) fails fast in real time
            outcome = await d
            self.assertEqual(outcome.results[0].result.status, "SoftFail")
            self.assertEqual(self.limiter.in_use(), 0)

        return Deferred.fromCoroutine(run())  # type: ignore[return-value]

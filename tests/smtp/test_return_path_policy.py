"""Bounces in by SMTP: the return-path domain is accepted from anyone and goes to the bounce sink, while
every other unauthenticated recipient is still refused and authenticated relay works as before."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

import tests.smtp.test_relay_policy as relay_tests
from mtad.smtp.policy import SessionInfo
from mtad.smtp.relay_policy import (
    AUTH_REQUIRED,
    BOUNCE_RECEIVED,
    MIXED_RECIPIENTS,
    MIXED_TRANSACTION,
    RELAY_DENIED,
    TRY_AGAIN,
    RelayPolicy,
)
from mtad.smtp.reply import Reply
from mtad.smtp.server import CheckRcpt
from mtad.smtp.server_protocol import SMTPServerFactory
from mtad.store.db import Database
from mtad.submission.unavailable import LookupTimeout
from tests.smtp.test_relay_policy import MESSAGE, StalledDatabase, envelope, session
from tests.smtp.test_server_support import Driver, parse_replies
from tests.store.support import SynchronousDatabase

RETURN_PATH = "rp.mtad.test"
BOUNCE_RCPT = "b.1.2.abcdefghij@rp.mtad.test"

#: Unauthenticated recipients that must be refused however they name the return-path domain.
HIDDEN_RELAYS = (
    "user@other.test",
    "user@sub.rp.mtad.test",
    "user@mtad.test",
    "user@rp.mtad.test.",
    "user@rp.mtad.test.other.test",
    "user@rp.mtad.test@other.test",
    '"user@rp.mtad.test"@other.test',
    "user@[127.0.0.1]",
    "user@\u0280p.mtad.test",
    "postmaster",
)

#: The same attempts as an SMTP client writes them, source routes included (RFC 5321 §4.1.1.3).
HIDDEN_RELAY_PATHS = (
    b"<user@other.test>",
    b"<user@sub.rp.mtad.test>",
    b"<user@rp.mtad.test.>",
    b"<@rp.mtad.test:user@other.test>",
    b"<@rp.mtad.test,@rp.mtad.test:user@other.test>",
    b"<user@rp.mtad.test@other.test>",
    b'<"user@rp.mtad.test"@other.test>',
    b"<user@[127.0.0.1]>",
    b"<user@rp.mtad.test> <x@other.test>",
    b"user@rp.mtad.test",
    b"<user@rp.mtad.test\x00@other.test>",
)


class MemorySink:
    """A `BounceSink` that keeps what it is given; ``error`` makes it fail, ``stall`` never answer."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.stall = False

    async def put(
        self, *, mail_from: str, rcpt_to: Sequence[str], data: bytes, received_with_ssl: bool, client_ip: str
    ) -> None:
        if self.error is not None:
            raise self.error
        if self.stall:
            await Deferred()
        self.received.append(
            {
                "mail_from": mail_from,
                "rcpt_to": list(rcpt_to),
                "data": data,
                "received_with_ssl": received_with_ssl,
                "client_ip": client_ip,
            }
        )


def in_transaction(base: SessionInfo, *rcpts: str) -> SessionInfo:
    """``base`` within a transaction that has accepted ``rcpts``."""
    return SessionInfo(
        session_id=base.session_id,
        client_ip=base.client_ip,
        client_port=base.client_port,
        server_ip=base.server_ip,
        server_port=base.server_port,
        helo=base.helo,
        tls=base.tls,
        auth=base.auth,
        listener=base.listener,
        rcpt_to=rcpts,
    )


class RelayWithReturnPathTests(relay_tests.RelayPolicyTests):
    """Every relay policy test again, with a return-path domain and sink configured: relay is unchanged."""

    def make_policy(self, database: Any = None, acceptor: Any = None, **kwargs: Any) -> RelayPolicy:
        if not hasattr(self, "sink"):
            self.sink = MemorySink()
        kwargs.setdefault("return_path_domains", frozenset({RETURN_PATH}))
        kwargs.setdefault("bounce_sink", self.sink)
        kwargs.setdefault("sink_timeout", 10.0)
        return super().make_policy(database, acceptor, **kwargs)

    async def queued(self) -> int:
        return (await self.queue.stats(relay_tests.NOW)).due_now

    # -- RCPT -----------------------------------------------------------------------------------------

    async def test_return_path_needs_no_credential(self) -> None:
        """The return-path domain (any case) is accepted from anyone at RCPT, with no lookup at all: even
        with the database stalled, on a listener with AUTH and on one without."""
        policy = self.make_policy(database=StalledDatabase())
        for listener in ("submission", "mx-plain"):
            for address in (BOUNCE_RCPT, "Anything@RP.MTAD.TEST", '"odd local"@rp.mtad.test'):
                d = policy.check_rcpt(session(listener=listener), "", address)
                self.assertIsNone(self.successResultOf(d), (listener, address))

    async def test_hidden_relays_refused(self) -> None:
        """Without a credential every other recipient is refused as relay, however it names the
        return-path domain: subdomains, parents, trailing dots, a second @, quotes, literals."""
        for address in HIDDEN_RELAYS:
            self.assertIs(await self.policy.check_rcpt(session(), "", address), AUTH_REQUIRED, address)
            reply = await self.policy.check_rcpt(session(listener="mx-plain"), "", address)
            self.assertIs(reply, RELAY_DENIED, address)

    async def test_kinds_do_not_mix(self) -> None:
        """An authenticated session may relay or send to the return path, but not both in one transaction:
        the later kind is 452 4.5.3, whichever came first."""
        authenticated = await self.login()
        relayed = in_transaction(authenticated, "a@x.test")
        bounced = in_transaction(authenticated, BOUNCE_RCPT)
        self.assertIs(await self.policy.check_rcpt(relayed, "", BOUNCE_RCPT), MIXED_RECIPIENTS)
        self.assertIs(await self.policy.check_rcpt(bounced, "", "a@x.test"), MIXED_RECIPIENTS)
        self.assertIsNone(await self.policy.check_rcpt(relayed, "", "b@y.test"))
        self.assertIsNone(await self.policy.check_rcpt(bounced, "", "other@rp.mtad.test"))
        self.assertEqual((MIXED_RECIPIENTS.code, MIXED_RECIPIENTS.enhanced), (452, "4.5.3"))

    async def test_unauthenticated_relay_after_bounce_is_relay_refusal(self) -> None:
        """An unauthenticated relay recipient after a bounce recipient is refused as relay (permanent where
        AUTH is not offered), not with the "retry" of 452."""
        bounced = in_transaction(session(listener="mx-plain"), BOUNCE_RCPT)
        self.assertIs(await self.policy.check_rcpt(bounced, "", "a@x.test"), RELAY_DENIED)

    # -- DATA -----------------------------------------------------------------------------------------

    async def test_bounce_goes_to_sink(self) -> None:
        """At the end of DATA a bounce goes to the sink with its envelope, TLS state and client, is
        answered 250 2.0.0, and nothing is queued."""
        reply = await self.policy.accept_message(
            session("198.51.100.7"), envelope(BOUNCE_RCPT, "x@RP.mtad.test"), MESSAGE
        )
        self.assertIs(reply, BOUNCE_RECEIVED)
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertEqual(
            self.sink.received,
            [
                {
                    "mail_from": "sender@example.test",
                    "rcpt_to": [BOUNCE_RCPT, "x@RP.mtad.test"],
                    "data": MESSAGE,
                    "received_with_ssl": True,
                    "client_ip": "198.51.100.7",
                }
            ],
        )
        self.assertEqual(await self.queued(), 0)

    async def test_sink_failure_is_temporary(self) -> None:
        """A sink that raises is logged and answered 451 4.3.0: the sending MTA keeps the bounce."""
        self.sink.error = RuntimeError("inbox down")
        reply = await self.policy.accept_message(session(), envelope(BOUNCE_RCPT), MESSAGE)
        self.assertIs(reply, TRY_AGAIN)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(await self.queued(), 0)

    def test_sink_timeout_is_temporary(self) -> None:
        """A sink that never answers is given up after ``sink_timeout``: 451 4.3.0."""
        self.sink.stall = True
        d = self.policy.accept_message(session(), envelope(BOUNCE_RCPT), MESSAGE)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIs(self.successResultOf(d), TRY_AGAIN)
        self.assertEqual(len(self.flushLoggedErrors(LookupTimeout)), 1)

    async def test_mixed_transaction_refused_at_data(self) -> None:
        """A transaction holding both kinds (a server that ignored 452) is refused at DATA: neither sink
        nor queue gets it."""
        authenticated = await self.login()
        reply = await self.policy.accept_message(authenticated, envelope("a@x.test", BOUNCE_RCPT), MESSAGE)
        self.assertIs(reply, MIXED_TRANSACTION)
        self.assertEqual(self.sink.received, [])
        self.assertEqual(await self.queued(), 0)

    def test_domains_need_a_sink(self) -> None:
        """Return-path domains without a sink (or a sink without domains) is a wiring error."""
        submission = self.make_policy().submission
        with self.assertRaises(ValueError):
            RelayPolicy(self.clock, submission, return_path_domains={RETURN_PATH})
        with self.assertRaises(ValueError):
            RelayPolicy(self.clock, submission, bounce_sink=MemorySink())

    # -- on the wire ----------------------------------------------------------------------------------

    def connect(self, **kwargs: Any) -> tuple[Protocol, StringTransport]:
        database: Database = SynchronousDatabase(self.engine)  # type: ignore[assignment]
        factory = SMTPServerFactory(
            self.make_policy(database=database),
            hostname="mx.mtad.test",
            clock=self.clock,
            listener="mx",
            **kwargs,
        )
        address = IPv4Address("TCP", "192.0.2.5", 40000)
        proto = factory.buildProtocol(address)
        assert proto is not None
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 25), peerAddress=address)
        proto.makeConnection(transport)
        transport.clear()
        return proto, transport

    def say(self, proto: Protocol, transport: StringTransport, data: bytes) -> list[str]:
        proto.dataReceived(data)
        replies = parse_replies(transport.value())
        transport.clear()
        return [" ".join(r.split("\n")[-1].split(" ")[:2]) for r in replies]

    def test_wire_bounce_accepted_and_sunk(self) -> None:
        """An unauthenticated MTA delivers a DSN to the return path: 250 at RCPT and DATA, to the sink."""
        proto, transport = self.connect()
        codes = self.say(
            proto,
            transport,
            b"EHLO mta.example\r\nMAIL FROM:<>\r\nRCPT TO:<" + BOUNCE_RCPT.encode() + b">\r\nDATA\r\n",
        )
        self.assertEqual(codes, ["250 HELP", "250 2.1.0", "250 2.1.5", "354 End"])
        self.assertEqual(self.say(proto, transport, b"Subject: DSN\r\n\r\nfailed\r\n.\r\n"), ["250 2.0.0"])
        (received,) = self.sink.received
        self.assertEqual(
            (received["mail_from"], received["rcpt_to"], received["client_ip"]),
            ("", [BOUNCE_RCPT], "192.0.2.5"),
        )
        self.assertTrue(received["data"].startswith(b"Received: "))
        self.assertTrue(received["data"].endswith(b"Subject: DSN\r\n\r\nfailed\r\n"))

    def test_wire_hidden_relays_refused(self) -> None:
        """Every way of writing a relay as a return-path address is refused on the wire; with no recipient
        accepted DATA is refused and neither sink nor queue sees anything."""
        proto, transport = self.connect()
        self.assertEqual(self.say(proto, transport, b"EHLO mta.example\r\nMAIL FROM:<>\r\n")[1], "250 2.1.0")
        for path in HIDDEN_RELAY_PATHS:
            (code,) = self.say(proto, transport, b"RCPT TO:" + path + b"\r\n")
            self.assertFalse(code.startswith("2"), (path, code))
        self.assertEqual(self.say(proto, transport, b"DATA\r\n"), ["554 5.5.1"])
        self.assertEqual(self.sink.received, [])

    def test_wire_kinds_do_not_mix(self) -> None:
        """Over the wire, with AUTH: a return-path RCPT after a relay RCPT is 452 4.5.3 and the reverse
        too; RSET starts a transaction that may take the other kind."""
        proto, transport = self.connect(allow_plaintext_auth=True)
        plain = base64.b64encode(b"\0user\0" + self.password.encode())
        codes = self.say(proto, transport, b"EHLO app.example\r\nAUTH PLAIN " + plain + b"\r\n")
        self.assertEqual(codes[1], "235 2.7.0")
        bounce = b"RCPT TO:<" + BOUNCE_RCPT.encode() + b">\r\n"
        codes = self.say(proto, transport, b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r@x.test>\r\n" + bounce)
        self.assertEqual(codes, ["250 2.1.0", "250 2.1.5", "452 4.5.3"])
        codes = self.say(proto, transport, b"RSET\r\nMAIL FROM:<>\r\n" + bounce + b"RCPT TO:<r@x.test>\r\n")
        self.assertEqual(codes, ["250 2.0.0", "250 2.1.0", "250 2.1.5", "452 4.5.3"])


class SessionRecipientsTests(SynchronousTestCase):
    def test_rcpt_check_sees_accepted_recipients(self) -> None:
        """The policy is asked about each RCPT with the recipients accepted so far in the transaction
        (refused ones not among them), and none after RSET."""
        d = Driver(auto=False)
        d.feed(b"EHLO c.example\r\n")
        d.feed(b"MAIL FROM:<a@example.org>\r\n")
        d.answer(None)
        seen: list[tuple[str, ...]] = []
        for address, answer in (
            ("one@x.test", None),
            ("two@x.test", Reply(550, "5.1.1", "No such user")),
            ("three@x.test", None),
        ):
            d.feed(f"RCPT TO:<{address}>\r\n".encode())
            request = d.requests[-1]
            assert isinstance(request, CheckRcpt)
            seen.append(request.session.rcpt_to)
            d.answer(answer)
        d.feed(b"RSET\r\nMAIL FROM:<a@example.org>\r\n")
        d.answer(None)
        d.feed(b"RCPT TO:<four@x.test>\r\n")
        request = d.requests[-1]
        assert isinstance(request, CheckRcpt)
        seen.append(request.session.rcpt_to)
        self.assertEqual(seen, [(), ("one@x.test",), ("one@x.test",), ()])

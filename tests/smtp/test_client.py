"""The sans-I/O SMTP client state machine, driven with plain byte strings."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtad.smtp.client import (
    Action,
    ArmTimer,
    ClientTimeouts,
    Close,
    OutgoingMessage,
    Send,
    SMTPClientMachine,
    StartTLS,
    message_size,
    parse_reply,
    prepare_body,
)
from mtad.smtp.reply import Reply

BODY = b"Subject: hi\nX: y\r\n\r\n.dot line\rlast line"
MSG = OutgoingMessage("m1", "from@mtad.test", ("a@example.test", "b@example.test"), BODY)
MSG2 = OutgoingMessage("m2", "from@mtad.test", ("c@example.test",), b"second\r\n")


def sent(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


class Conversation:
    """Feeds server lines to a machine and collects what the client sent."""

    def __init__(self, machine: SMTPClientMachine, byte_by_byte: bool = False) -> None:
        self.machine = machine
        self.byte_by_byte = byte_by_byte
        self.actions: list[Action] = machine.connection_made()
        self.wire = b""

    def server(self, text: str) -> bytes:
        """Send ``text`` (lines separated by |) from the server; return what the client answered."""
        data = "".join(line + "\r\n" for line in text.split("|")).encode()
        actions: list[Action] = []
        if self.byte_by_byte:
            for i in range(len(data)):
                actions += self.machine.data_received(data[i : i + 1])
        else:
            actions = self.machine.data_received(data)
        self.actions += actions
        self.last = actions
        out = sent(actions)
        self.wire += out
        return out


class MachineTests(SynchronousTestCase):
    """One connection's conversation, branch by branch (RFC 5321 §3, §4)."""

    def full_session(self, byte_by_byte: bool) -> None:
        machine = SMTPClientMachine("out.mtad.test", [MSG])
        c = Conversation(machine, byte_by_byte)
        self.assertEqual(c.actions, [ArmTimer(300, "greeting")])
        self.assertEqual(c.server("220 mx.example.test ESMTP"), b"EHLO out.mtad.test\r\n")
        self.assertEqual(c.server("250-mx.example.test|250 8BITMIME"), b"MAIL FROM:<from@mtad.test>\r\n")
        self.assertEqual(c.server("250 2.1.0 ok"), b"RCPT TO:<a@example.test>\r\n")
        self.assertEqual(c.server("250 2.1.5 ok"), b"RCPT TO:<b@example.test>\r\n")
        self.assertEqual(c.server("550 5.1.1 no such user"), b"DATA\r\n")
        self.assertEqual(
            c.server("354 go ahead"), b"Subject: hi\r\nX: y\r\n\r\n..dot line\r\nlast line\r\n.\r\n"
        )
        self.assertEqual(c.server("250 2.0.0 queued as 42"), b"QUIT\r\n")
        self.assertEqual(c.server("221 bye"), b"")
        self.assertIsInstance(c.actions[-1], Close)
        self.assertTrue(machine.done)
        report = machine.report()
        self.assertIsNone(report.failure)
        self.assertFalse(report.tls)
        [outcome] = report.outcomes
        a, b = outcome.replies
        self.assertEqual(
            (a.recipient, a.reply, a.stage),
            ("a@example.test", Reply(250, "2.0.0", "queued as 42"), "end-of-data"),
        )
        self.assertEqual(
            (b.recipient, b.reply, b.stage), ("b@example.test", Reply(550, "5.1.1", "no such user"), "rcpt")
        )

    def test_full_session_whole(self) -> None:
        """A full session fed in whole replies gives per-recipient results and ends with QUIT."""
        self.full_session(byte_by_byte=False)

    def test_full_session_byte_by_byte(self) -> None:
        """The same session fed one byte at a time behaves identically."""
        self.full_session(byte_by_byte=True)

    def test_pipelining(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA go out in one write (RFC 2920 §3.1)."""
        machine = SMTPClientMachine("out.mtad.test", [MSG])
        c = Conversation(machine)
        c.server("220 hi")
        out = c.server("250-mx|250-PIPELINING|250 SIZE 100000")
        self.assertEqual(
            out,
            f"MAIL FROM:<from@mtad.test> SIZE={message_size(BODY)}\r\nRCPT TO:<a@example.test>\r\n"
            "RCPT TO:<b@example.test>\r\nDATA\r\n".encode(),
        )
        self.assertEqual(sum(isinstance(a, Send) for a in c.last), 1)
        self.assertTrue(c.server("250 ok|250 ok|250 ok|354 go").endswith(b"\r\n.\r\n"))
        self.assertEqual(c.server("250 done"), b"QUIT\r\n")
        self.assertEqual([r.reply.code for r in machine.report().outcomes[0].replies], [250, 250])

    def test_pipelined_all_rejected_dot(self) -> None:
        """If DATA gets 354 although every RCPT failed, the client ends the empty message with a lone dot."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        c.server("250-mx|250 PIPELINING")
        self.assertEqual(c.server("250 ok|550 5.1.1 nope|354 go"), b".\r\n")
        self.assertEqual(c.server("554 no valid recipients"), b"QUIT\r\n")
        [reply] = machine.report().outcomes[0].replies
        self.assertEqual((reply.reply.code, reply.stage), (550, "rcpt"))

    def test_mail_failure_applies_to_all(self) -> None:
        """A refused MAIL FROM is the result of every recipient of that message."""
        machine = SMTPClientMachine("h", [MSG, MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        c.server("250 mx")
        self.assertEqual(c.server("451 4.7.1 greylisted, try again in 5 minutes"), b"RSET\r\n")
        self.assertEqual(c.server("250 ok"), b"MAIL FROM:<from@mtad.test>\r\n")
        outcome = machine.report().outcomes[0]
        self.assertEqual({r.reply.code for r in outcome.replies}, {451})
        self.assertEqual({r.stage for r in outcome.replies}, {"mail"})

    def test_rset_between_messages(self) -> None:
        """A second message on the connection is preceded by RSET (RFC 5321 §4.1.1.5)."""
        machine = SMTPClientMachine("h", [MSG2, MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        c.server("250 mx")
        c.server("250 ok")
        c.server("250 ok")
        c.server("354 go")
        self.assertEqual(c.server("250 queued"), b"RSET\r\n")
        self.assertEqual(c.server("250 reset"), b"MAIL FROM:<from@mtad.test>\r\n")
        self.assertEqual(machine.report().unattempted, ())

    def test_helo_fallback(self) -> None:
        """A server that rejects EHLO with 5xx gets HELO and no extensions are used (RFC 5321 §3.2)."""
        machine = SMTPClientMachine("out.mtad.test", [MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        self.assertEqual(c.server("502 what"), b"HELO out.mtad.test\r\n")
        self.assertEqual(c.server("250 hello"), b"MAIL FROM:<from@mtad.test>\r\n")

    def test_starttls(self) -> None:
        """STARTTLS when offered: 220 → StartTLS action, EHLO again, extensions relearnt (RFC 3207 §4.2)."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        self.assertEqual(c.server("250-mx|250-PIPELINING|250 STARTTLS"), b"STARTTLS\r\n")
        before = len(c.actions)
        self.assertEqual(c.server("220 go ahead"), b"EHLO h\r\n")
        self.assertIsInstance(c.actions[before], StartTLS)
        self.assertEqual(c.server("250 mx"), b"MAIL FROM:<from@mtad.test>\r\n")  # no PIPELINING any more
        self.assertTrue(machine.report().tls)

    def test_starttls_refused_continues_plain(self) -> None:
        """A 454 to STARTTLS carries on without TLS (opportunistic, RFC 3207 §4)."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        c.server("250-mx|250 STARTTLS")
        self.assertEqual(c.server("454 4.7.0 not now"), b"MAIL FROM:<from@mtad.test>\r\n")
        self.assertFalse(machine.report().tls)

    def test_starttls_disabled(self) -> None:
        """With starttls=False the offer is ignored."""
        machine = SMTPClientMachine("h", [MSG2], starttls=False)
        c = Conversation(machine)
        c.server("220 hi")
        self.assertEqual(c.server("250-mx|250 STARTTLS"), b"MAIL FROM:<from@mtad.test>\r\n")

    def test_tls_handshake_failure(self) -> None:
        """A connection lost during the TLS handshake is reported as tls_failed with nothing attempted."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        c.server("220 hi")
        c.server("250-mx|250 STARTTLS")
        c.server("220 go ahead")
        self.assertEqual(machine.connection_lost("handshake failure"), [Close()])
        report = machine.report()
        assert report.failure is not None
        self.assertTrue(report.failure.tls_failed)
        self.assertFalse(report.tls)
        self.assertEqual(report.unattempted, (MSG2,))

    def test_size_too_big(self) -> None:
        """A message larger than the advertised SIZE fails locally with 5.3.4 and no MAIL is sent."""
        machine = SMTPClientMachine("h", [MSG])
        c = Conversation(machine)
        c.server("220 hi")
        self.assertEqual(c.server("250-mx|250 SIZE 10"), b"QUIT\r\n")
        [outcome] = machine.report().outcomes
        self.assertEqual(
            {(r.reply.code, r.reply.enhanced, r.remote) for r in outcome.replies}, {(552, "5.3.4", False)}
        )

    def test_8bitmime_and_smtputf8_params(self) -> None:
        """8-bit bodies get BODY=8BITMIME and non-ASCII addresses SMTPUTF8 when offered."""
        msg = OutgoingMessage("u", "jörg@mtad.test", ("ü@example.test",), "Subject: é\r\n\r\nü\r\n".encode())
        machine = SMTPClientMachine("h", [msg])
        c = Conversation(machine)
        c.server("220 hi")
        out = c.server("250-mx|250-8BITMIME|250 SMTPUTF8")
        self.assertEqual(out, "MAIL FROM:<jörg@mtad.test> BODY=8BITMIME SMTPUTF8\r\n".encode())

    def test_smtputf8_missing(self) -> None:
        """Non-ASCII addresses to a server without SMTPUTF8 fail permanently with 5.6.7 (RFC 6531 §3.2)."""
        msg = OutgoingMessage("u", "a@mtad.test", ("ü@example.test",), b"x\r\n")
        machine = SMTPClientMachine("h", [msg])
        c = Conversation(machine)
        c.server("220 hi")
        self.assertEqual(c.server("250 mx"), b"QUIT\r\n")
        [reply] = machine.report().outcomes[0].replies
        self.assertEqual((reply.reply.code, reply.reply.enhanced), (553, "5.6.7"))

    def test_timeouts_per_stage(self) -> None:
        """Each wait arms the RFC 5321 §4.5.3.2 timeout of its command."""
        timeouts = ClientTimeouts(
            greeting=1, ehlo=2, mail=3, rcpt=4, data=5, data_block=6, end_of_data=7, quit=8
        )
        machine = SMTPClientMachine("h", [MSG2], timeouts=timeouts)
        c = Conversation(machine)
        for line in ["220 hi", "250 mx", "250 ok", "250 ok", "354 go", "250 ok"]:
            c.server(line)
        timers = [a.seconds for a in c.actions if isinstance(a, ArmTimer)]
        self.assertEqual(timers, [1, 2, 3, 4, 5, 13, 8])

    def test_timeout_mid_transaction(self) -> None:
        """A timeout waiting for RCPT soft-fails the message locally and ends the session."""
        machine = SMTPClientMachine("h", [MSG2, MSG])
        c = Conversation(machine)
        c.server("220 hi")
        c.server("250 mx")
        c.server("250 ok")
        self.assertEqual(machine.timed_out(), [Close()])
        report = machine.report()
        assert report.failure is not None
        self.assertEqual(report.failure.stage, "timeout")
        [reply] = report.outcomes[0].replies
        self.assertEqual((reply.reply.code, reply.remote, reply.stage), (451, False, "timeout"))
        self.assertEqual(report.unattempted, (MSG,))

    def test_421_at_greeting(self) -> None:
        """A 421 greeting ends the session with that reply and leaves every message untried."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        c.server("421 4.3.2 too busy")
        report = machine.report()
        assert report.failure is not None
        self.assertEqual(report.failure.reply, Reply(421, "4.3.2", "too busy"))
        self.assertEqual(report.outcomes, ())
        self.assertEqual(report.unattempted, (MSG2,))
        self.assertTrue(machine.done)

    def test_connection_lost_after_data(self) -> None:
        """A connection lost while waiting for the end-of-data reply gives a local 4.4.2 for the message."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        for line in ["220 hi", "250 mx", "250 ok", "250 ok", "354 go"]:
            c.server(line)
        machine.connection_lost("reset by peer")
        [reply] = machine.report().outcomes[0].replies
        self.assertEqual((reply.reply.code, reply.reply.enhanced, reply.remote), (451, "4.4.2", False))

    def test_garbage_reply(self) -> None:
        """An unparsable reply line is a protocol error that closes the session."""
        machine = SMTPClientMachine("h", [MSG2])
        c = Conversation(machine)
        c.server("hello there")
        report = machine.report()
        assert report.failure is not None
        self.assertEqual(report.failure.stage, "protocol")


class ParsingTests(SynchronousTestCase):
    """Reply parsing and body preparation."""

    def test_multiline_enhanced(self) -> None:
        """Enhanced codes are lifted off every line of a multi-line reply (RFC 2034)."""
        reply = parse_reply([(550, "5.7.1 Blocked"), (550, "5.7.1 see https://x")])
        self.assertEqual(reply, Reply(550, "5.7.1", "Blocked\nsee https://x"))

    def test_no_enhanced(self) -> None:
        """A reply without an enhanced code keeps its text whole and enhanced empty."""
        self.assertEqual(parse_reply([(250, "ok 1.2")]), Reply(250, "", "ok 1.2"))

    def test_prepare_body(self) -> None:
        """Bodies get CRLF line endings, dot-stuffing and the terminating dot (RFC 5321 §4.5.2)."""
        self.assertEqual(prepare_body(b"a\n.b\r..c\r\nd"), b"a\r\n..b\r\n...c\r\nd\r\n.\r\n")
        self.assertEqual(prepare_body(b"a\r\n"), b"a\r\n.\r\n")
        self.assertEqual(message_size(b"a\nb"), 6)

"""The sans-I/O ESMTP server machine: sequence, syntax, limits, smuggling, AUTH, STARTTLS, DATA and BDAT."""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from mtad.smtp.policy import AuthIdentity
from mtad.smtp.reply import Reply
from mtad.smtp.server import (
    AcceptMessage,
    CheckMailFrom,
    CheckRcpt,
    ServerSettings,
    ServerTimeouts,
    received_header,
)
from tests.smtp.test_server_support import NOW, Driver

HOST = "mx.mtad.test"


def settings(**kw: object) -> ServerSettings:
    return ServerSettings(hostname=HOST, listener="test", **kw)  # type: ignore[arg-type]


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


SESSION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<alice@example.org> BODY=8BITMIME\r\n"
    b"RCPT TO:<bob@example.test>\r\n"
    b"RCPT TO:<carol@example.test>\r\n"
    b"RCPT TO:<dave@example.test>\r\n"
    b"DATA\r\n"
)
BODY = b"Subject: hi\r\n\r\n..leading dot\r\n.x\r\nlast line\r\n.\r\n"
EXPECTED_BODY = b"Subject: hi\r\n\r\n.leading dot\r\nx\r\nlast line\r\n"


class GreetingTests(SynchronousTestCase):
    def test_greeting_has_no_enhanced_code(self) -> None:
        """The 220 greeting names the host and carries no enhanced code (RFC 2034 §3)."""
        d = Driver()
        self.assertEqual(bytes(d.out), b"220 mx.mtad.test ESMTP mtad ready\r\n")

    def test_ehlo_advertises_extensions(self) -> None:
        """EHLO lists PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING, no plain AUTH."""
        d = Driver(settings(starttls=True, max_message_size=1000))
        d.feed(b"EHLO client.example\r\n")
        [ehlo] = d.take()
        self.assertEqual(
            ehlo.split("\n"),
            [
                "250-mx.mtad.test greets client.example",
                "250-PIPELINING",
                "250-SIZE 1000",
                "250-8BITMIME",
                "250-ENHANCEDSTATUSCODES",
                "250-SMTPUTF8",
                "250-CHUNKING",
                "250-STARTTLS",
                "250 HELP",
            ],
        )

    def test_auth_offered_under_tls_only(self) -> None:
        """AUTH is advertised under TLS (no STARTTLS then), or in plain text only if the listener allows."""
        d = Driver(settings(starttls=True), tls=True)
        d.feed(b"EHLO c.example\r\n")
        lines = d.take()[0].split("\n")
        self.assertIn("250-AUTH PLAIN LOGIN", lines)
        self.assertNotIn("250-STARTTLS", lines)
        d = Driver(settings(allow_plaintext_auth=True))
        d.feed(b"EHLO c.example\r\n")
        self.assertIn("250-AUTH PLAIN LOGIN", d.take()[0].split("\n"))

    def test_helo_plain_reply(self) -> None:
        """HELO gets a one-line 250 and no extensions; ESMTP parameters after HELO are refused (555)."""
        d = Driver()
        d.feed(b"HELO c.example\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(
            d.take(), ["250 mx.mtad.test", "555 5.5.4 Unsupported MAIL parameter", "250 2.1.0 Sender OK"]
        )

    def test_bad_helo_argument(self) -> None:
        """EHLO without an argument or with junk is 501 5.5.4."""
        d = Driver()
        d.feed(b"EHLO\r\nEHLO a b\r\nEHLO (x)\r\nEHLO [192.0.2.1]\r\n")
        codes = d.codes()
        self.assertEqual(codes[:3], ["501 5.5.4", "501 5.5.4", "501 5.5.4"])
        self.assertEqual(codes[3], "250 HELP")


class TransactionTests(SynchronousTestCase):
    def check_session(self, d: Driver) -> None:
        self.assertEqual(
            d.replies()[1:],
            [
                "250 2.1.0 Sender OK",
                "250 2.1.5 Recipient OK",
                "250 2.1.5 Recipient OK",
                "250 2.1.5 Recipient OK",
                "354 End data with <CR><LF>.<CR><LF>",
                "250 2.0.0 Queued as q3",
            ],
        )
        [accepted] = d.accepted
        self.assertEqual(accepted.envelope.mail_from, "alice@example.org")
        self.assertEqual(
            accepted.envelope.rcpt_to, ("bob@example.test", "carol@example.test", "dave@example.test")
        )
        self.assertTrue(accepted.envelope.body_8bit)
        self.assertFalse(accepted.envelope.smtputf8)
        self.assertTrue(accepted.message.startswith(b"Received: from client.example ([192.0.2.1])\r\n"))
        self.assertTrue(accepted.message.endswith(b"\r\n" + EXPECTED_BODY))
        self.assertEqual(accepted.envelope.size, len(accepted.message))
        self.assertEqual(accepted.session.helo, "client.example")
        self.assertEqual(accepted.session.listener, "test")

    def test_whole_session(self) -> None:
        """A pipelined transaction fed in one piece is answered in order, the message unstuffed (§4.5.2)."""
        d = Driver()
        d.feed(SESSION + BODY)
        self.check_session(d)

    def test_bytewise_session(self) -> None:
        """The same session fed one byte at a time gives the same replies and message."""
        d = Driver()
        d.feed(SESSION + BODY, bytewise=True)
        self.check_session(d)

    def test_every_split(self) -> None:
        """Splitting the pipelined burst and body at every boundary never changes replies or message."""
        whole = Driver()
        whole.feed(SESSION + BODY)
        data = SESSION + BODY
        for i in range(len(data) + 1):
            d = Driver()
            d.feed(data[:i])
            d.feed(data[i:])
            self.assertEqual(d.replies(), whole.replies(), f"split at {i}")
            self.assertEqual([a.message for a in d.accepted], [a.message for a in whole.accepted])

    def test_received_header(self) -> None:
        """The Received field follows RFC 5321 §4.4 with the clock's date and the single recipient."""
        header = received_header(
            helo="c.example",
            client_ip="192.0.2.1",
            hostname=HOST,
            protocol="ESMTPSA",
            session_id="abc",
            recipient="bob@example.test",
            when=NOW,
        )
        self.assertEqual(
            header,
            b"Received: from c.example ([192.0.2.1])\r\n\tby mx.mtad.test with ESMTPSA id abc\r\n"
            b"\tfor <bob@example.test>; Tue, 14 Nov 2023 22:13:20 +0000\r\n",
        )
        six = received_header(
            helo="c",
            client_ip="::1",
            hostname=HOST,
            protocol="SMTP",
            session_id="x",
            recipient=None,
            when=NOW,
        )
        self.assertIn(b"([IPv6:::1])", six)
        self.assertNotIn(b"for <", six)

    def test_message_after_message(self) -> None:
        """After the end of data a new transaction can start; the second message is accepted too."""
        d = Driver()
        msg = b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\n"
        d.feed(b"EHLO c.example\r\n" + msg + msg)
        self.assertEqual(len(d.accepted), 2)
        self.assertEqual(d.accepted[0].envelope.mail_from, "")
        self.assertEqual(d.accepted[0].envelope.rcpt_to, ("postmaster",))

    def test_source_route_ignored(self) -> None:
        """A source route in a path is accepted and ignored (RFC 5321 §4.1.1.3)."""
        d = Driver()
        d.feed(b"EHLO c.example\r\nMAIL FROM:<@relay.example:a@example.org>\r\n")
        self.assertEqual(d.codes()[-1], "250 2.1.0")
        self.assertEqual(d.requests[-1], CheckMailFrom(d.machine.session, "a@example.org"))

    def test_policy_rejections(self) -> None:
        """Policy replies are sent as given; a refused recipient is not added, a refused sender nothing."""
        d = Driver()
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<blocked@example.org>\r\nRCPT TO:<a@example.test>\r\n"
            b"MAIL FROM:<ok@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<y@needs-auth.test>\r\n"
            b"DATA\r\n"
        )
        self.assertEqual(
            d.codes()[1:],
            ["550 5.7.1", "503 5.5.1", "250 2.1.0", "554 5.7.1", "530 5.7.0", "554 5.5.1"],
        )

    def test_rset_noop_vrfy_help_quit(self) -> None:
        """RSET ends the transaction, NOOP/VRFY(252)/HELP(214) answer, QUIT says 221 and closes."""
        d = Driver()
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRSET\r\nRCPT TO:<b@example.test>\r\nNOOP\r\n"
            b"VRFY bob\r\nHELP\r\nQUIT\r\nNOOP\r\n"
        )
        self.assertEqual(
            d.codes()[1:],
            ["250 2.1.0", "250 2.0.0", "503 5.5.1", "250 2.0.0", "252 2.5.0", "214 2.0.0", "221 2.0.0"],
        )
        self.assertTrue(d.closed)

    def test_smtputf8(self) -> None:
        """UTF-8 addresses are accepted with SMTPUTF8 (RFC 6531) and refused without (553 5.6.7)."""
        d = Driver()
        d.feed("EHLO c.example\r\nMAIL FROM:<jörg@example.org>\r\n".encode())
        self.assertEqual(d.codes()[-1], "553 5.6.7")
        d.feed(
            "MAIL FROM:<jörg@example.org> SMTPUTF8\r\nRCPT TO:<anna@bücher.test>\r\n"
            "DATA\r\nx\r\n.\r\n".encode()
        )
        self.assertEqual(d.codes(), ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"])
        [accepted] = d.accepted
        self.assertTrue(accepted.envelope.smtputf8)
        self.assertEqual(accepted.envelope.rcpt_to, ("anna@bücher.test",))
        self.assertIn(b"with UTF8SMTP id", accepted.message)

    def test_8bit_flag(self) -> None:
        """BODY=7BIT is the default; BINARYMIME is not offered (555 5.5.4)."""
        d = Driver()
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"
            b"MAIL FROM:<a@example.org> BODY=7BIT\r\n"
        )
        self.assertEqual(d.codes()[1:], ["555 5.5.4", "250 2.1.0"])
        d.feed(b"RCPT TO:<b@example.test>\r\nDATA\r\n\xc3\xa9\r\n.\r\n")
        self.assertFalse(d.accepted[0].envelope.body_8bit)


class SequenceTests(SynchronousTestCase):
    def test_out_of_sequence(self) -> None:
        """Out-of-order commands get 503 5.5.1; DATA with no accepted recipient 554 5.5.1 (RFC 5321 §3.3)."""
        d = Driver()
        d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        self.assertEqual(d.codes(), ["503 5.5.1", "503 5.5.1", "503 5.5.1"])
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nMAIL FROM:<a@example.org>\r\nDATA\r\n")
        self.assertEqual(d.codes(), ["250 HELP", "250 2.1.0", "503 5.5.1", "554 5.5.1"])

    def test_unknown_and_unimplemented(self) -> None:
        """Unknown verbs are 500 5.5.1, known-but-unimplemented ones 502 5.5.1, an empty line 500."""
        d = Driver()
        d.feed(b"FOO bar\r\nEXPN list\r\n\r\nX-1\r\n")
        self.assertEqual(d.codes(), ["500 5.5.1", "502 5.5.1", "500 5.5.1", "500 5.5.1"])

    def test_syntax_errors(self) -> None:
        """Bad paths are 501 5.1.7 (sender) / 501 5.1.3 (recipient); unknown parameters 555 5.5.4."""
        d = Driver(settings(max_bad_commands=50))
        d.feed(
            b"EHLO c.example\r\n"
            b"MAIL FROM:a@example.org\r\n"
            b"MAIL FROM:<a@@example.org>\r\n"
            b"MAIL TO:<a@example.org>\r\n"
            b"MAIL FROM:<a@example.org> RET=FULL\r\n"
            b"MAIL FROM:<a@example.org> SIZE=big\r\n"
            b"MAIL FROM:<a@example.org> SMTPUTF8=yes\r\n"
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.test\r\n"
            b"RCPT TO:<b c@example.test>\r\n"
            b"RCPT TO:<b@example.test> NOTIFY=NEVER\r\n"
            b"RCPT TO:<" + b"x" * 65 + b"@example.test>\r\n"
        )
        self.assertEqual(
            d.codes()[1:],
            [
                "501 5.1.7",
                "501 5.1.7",
                "501 5.5.2",
                "555 5.5.4",
                "501 5.5.4",
                "501 5.5.4",
                "250 2.1.0",
                "501 5.1.3",
                "501 5.1.3",
                "555 5.5.4",
                "501 5.1.3",
            ],
        )

    def test_pipelined_replies_wait_for_policy(self) -> None:
        """While a policy answer is pending nothing after it is answered; then the rest follows in order."""
        d = Driver(auto=False)
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\nRCPT TO:<b@example.test>\r\nNOOP\r\n")
        self.assertEqual(d.codes(), ["250 HELP"])
        self.assertTrue(d.machine.waiting)
        self.assertIsNone(d.machine.idle_timeout())
        d.answer(None)
        self.assertEqual(d.codes(), ["250 2.1.0", "250 2.0.0"])
        self.assertIsInstance(d.requests[-1], CheckRcpt)
        d.answer(Reply(250, "2.1.5", "Fine"))
        self.assertEqual(d.take(), ["250 2.1.5 Fine", "250 2.0.0 OK"])
        self.assertEqual(d.machine.idle_timeout(), 300.0)

    def test_policy_failure(self) -> None:
        """A failed policy call is answered 451 4.3.0 (454 4.7.0 for AUTH) and the session goes on."""
        d = Driver(settings(allow_plaintext_auth=True), auto=False)
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
        d.take()
        d.run(d.machine.policy_failed())
        self.assertEqual(d.take(), ["451 4.3.0 Temporary failure, try again later", "250 2.0.0 OK"])
        d.feed(f"AUTH PLAIN {b64(chr(0) + 'user' + chr(0) + 'secret')}\r\n".encode())
        d.run(d.machine.policy_failed())
        self.assertEqual(d.codes(), ["454 4.7.0"])

    def test_too_many_errors(self) -> None:
        """The Nth protocol error is answered, then 421 4.7.0 and the close; later input is ignored."""
        d = Driver(settings(max_bad_commands=3))
        d.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        self.assertEqual(d.codes(), ["500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"])
        self.assertTrue(d.closed)
        d.feed(b"NOOP\r\n")
        self.assertEqual(d.take(), [])

    def test_too_many_recipients(self) -> None:
        """Recipients past the limit get 452 4.5.3 (RFC 5321 §4.5.3.1.10); the message goes to the others."""
        d = Driver(settings(max_recipients=2))
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\n"
            b"DATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(
            d.codes()[1:], ["250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "354 End", "250 2.0.0"]
        )
        self.assertEqual(d.accepted[0].envelope.rcpt_to, ("b@example.test", "c@example.test"))

    def test_timeouts(self) -> None:
        """Idle limits are the command and data timeouts; mid-DATA timeout: 421 4.4.2, nothing accepted."""
        d = Driver(settings(timeouts=ServerTimeouts(command=301, data=302)))
        self.assertEqual(d.machine.idle_timeout(), 301)
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhalf")
        self.assertEqual(d.machine.idle_timeout(), 302)
        d.run(d.machine.timed_out())
        self.assertEqual(d.codes()[-1], "421 4.4.2")
        self.assertTrue(d.closed)
        self.assertEqual(d.accepted, [])
        self.assertIsNone(d.machine.idle_timeout())

    def test_disconnect_mid_data(self) -> None:
        """A client that disconnects mid-DATA has nothing handed to the policy."""
        d = Driver()
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
            b"DATA\r\nSubject: x\r\n"
        )
        d.machine.connection_lost()
        d.feed(b".\r\n")
        self.assertEqual(d.accepted, [])
        self.assertEqual(d.machine.policy_answered(None), [])


class BadInputTests(SynchronousTestCase):
    def test_command_line_too_long(self) -> None:
        """A command over 512 octets is 500 5.5.6 once it ends; its bytes are not buffered meanwhile."""
        d = Driver()
        d.feed(b"NOOP " + b"x" * 507 + b"\r\n")  # exactly 514 octets
        d.feed(b"NOOP " + b"x" * 505 + b"\r\n")  # exactly 512 octets
        self.assertEqual(d.codes(), ["500 5.5.6", "250 2.0.0"])
        d.feed(b"NOOP " + b"y" * 100_000)
        self.assertLess(len(d.machine._buffer), 1000)
        self.assertEqual(d.take(), [])
        d.feed(b"yyy\r\nNOOP\r\n")
        self.assertEqual(d.codes(), ["500 5.5.6", "250 2.0.0"])

    def test_nul_bytes(self) -> None:
        """A NUL in a command is 500 5.5.2."""
        d = Driver()
        d.feed(b"NO\0OP\r\nEHLO c\0.example\r\n")
        self.assertEqual(d.codes(), ["500 5.5.2", "500 5.5.2"])

    def test_bare_lf_and_cr_in_commands(self) -> None:
        """Commands end in CRLF only: a bare LF or CR is 500 5.5.2 and never starts a command."""
        d = Driver()
        d.feed(b"NOOP\nNOOP\rRSET\r\nNOOP\r\n")
        self.assertEqual(d.codes(), ["500 5.5.2", "500 5.5.2", "250 2.0.0"])

    def test_invalid_utf8(self) -> None:
        """A command that is not UTF-8 is 500 5.5.2."""
        d = Driver()
        d.feed(b"EHLO \xff\r\n")
        self.assertEqual(d.codes(), ["500 5.5.2"])

    def data_session(self, d: Driver, body: bytes) -> list[str]:
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n" + body)
        return d.codes()[3:]

    def test_declared_size_too_big(self) -> None:
        """A SIZE= over the limit is refused at MAIL with 552 5.3.4 (RFC 1870 §6.1), the policy unasked."""
        d = Driver(settings(max_message_size=100))
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org> SIZE=101\r\nMAIL FROM:<a@example.org> SIZE=100\r\n"
        )
        self.assertEqual(d.codes()[1:], ["552 5.3.4", "250 2.1.0"])
        self.assertEqual(len(d.requests), 1)

    def test_undeclared_oversize(self) -> None:
        """An oversize body is discarded as it streams and refused at its end with 552 5.3.4."""
        d = Driver(settings(max_message_size=1000))
        self.assertEqual(self.data_session(d, b""), ["354 End"])
        for _ in range(1000):
            d.feed(b"z" * 60 + b"\r\n")
        txn = d.machine._txn
        assert txn is not None
        self.assertLess(sum(len(part) for part in txn.parts), 2000)
        d.feed(b".\r\nNOOP\r\n")
        self.assertEqual(d.codes(), ["552 5.3.4", "250 2.0.0"])
        self.assertEqual(d.accepted, [])

    def test_size_limit_is_inclusive(self) -> None:
        """A message of exactly the limit (unstuffed, before our Received field) is accepted."""
        d = Driver(settings(max_message_size=10))
        self.assertEqual(self.data_session(d, b"12345678\r\n.\r\n"), ["354 End", "250 2.0.0"])

    def test_long_text_line(self) -> None:
        """A text line over 1000 octets with CRLF refuses the message with 500 5.5.6; 1000 is fine."""
        d = Driver()
        self.assertEqual(self.data_session(d, b"a" * 998 + b"\r\n.\r\n"), ["354 End", "250 2.0.0"])
        d = Driver()
        self.assertEqual(self.data_session(d, b"a" * 999 + b"\r\n.\r\n"), ["354 End", "500 5.5.6"])
        d = Driver()
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        for _ in range(100):
            d.feed(b"b" * 1000)
        self.assertLess(len(d.machine._buffer), 1001)
        d.feed(b"\r\n.\r\n")
        self.assertEqual(d.codes()[-1], "500 5.5.6")
        self.assertEqual(d.accepted, [])

    def test_overlong_line_ending_with_split_crlf(self) -> None:
        """An overlong line whose CRLF is split across reads still ends there; the terminator is seen."""
        d = Driver()
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        d.feed(b"c" * 2000 + b"\r")
        d.feed(b"\n.\r\nNOOP\r\n")
        self.assertEqual(d.codes()[-2:], ["500 5.5.6", "250 2.0.0"])

    def test_smuggling_terminators_do_not_end_data(self) -> None:
        """LF.LF, CR.CR and LF.CRLF never end DATA; what follows them is not run as commands; 550 5.6.0."""
        for fake_end in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"):
            d = Driver()
            smuggled = (
                b"x"
                + fake_end
                + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.test>\r\nDATA\r\nevil\r\n"
            )
            codes = self.data_session(d, smuggled)
            self.assertEqual(codes, ["354 End"], fake_end)
            d.feed(b".\r\n")
            self.assertEqual(d.codes(), ["550 5.6.0"], fake_end)
            self.assertEqual(d.accepted, [])
            self.assertEqual([r for r in d.requests if isinstance(r, CheckMailFrom)][1:], [])

    def test_bare_newline_in_body(self) -> None:
        """Any bare LF or CR in a message refuses it at the end of data with 550 5.6.0."""
        for body in (b"a\nb\r\n", b"a\rb\r\n", b"abc\r\r\n", b"\n\r\n"):
            d = Driver()
            self.assertEqual(self.data_session(d, body + b".\r\n"), ["354 End", "550 5.6.0"], body)

    def test_data_bytewise_terminator(self) -> None:
        """The terminator split byte by byte, even right after DATA, ends the message exactly once."""
        d = Driver()
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        d.feed(b".\r\nNOOP\r\n", bytewise=True)
        self.assertEqual(d.codes()[-2:], ["250 2.0.0", "250 2.0.0"])
        self.assertTrue(d.accepted[0].message.endswith(b"+0000\r\n"))


class AuthTests(SynchronousTestCase):
    def driver(self) -> Driver:
        d = Driver(settings(starttls=True), tls=True)
        d.feed(b"EHLO c.example\r\n")
        d.take()
        return d

    def test_plain_initial_response(self) -> None:
        """AUTH PLAIN with an initial response authenticates (235 2.7.0) and the policy sees who."""
        d = self.driver()
        d.feed(f"AUTH PLAIN {b64(chr(0) + 'user' + chr(0) + 'secret')}\r\n".encode())
        self.assertEqual(d.codes(), ["235 2.7.0"])
        self.assertEqual(d.machine.session.auth, AuthIdentity("user", 7, 3))

    def test_plain_challenge(self) -> None:
        """AUTH PLAIN without initial response gets an empty 334 challenge first (RFC 4954 §4)."""
        d = self.driver()
        d.feed(b"AUTH PLAIN\r\n")
        self.assertEqual(bytes(d.out), b"334 \r\n")
        d.take()
        d.feed(f"{b64('user' + chr(0) + 'user' + chr(0) + 'secret')}\r\n".encode())
        self.assertEqual(d.codes(), ["235 2.7.0"])

    def test_login(self) -> None:
        """AUTH LOGIN asks Username: and Password: in base64; UTF-8 credentials work."""
        d = self.driver()
        d.feed(b"AUTH LOGIN\r\n")
        self.assertEqual(bytes(d.out), b"334 VXNlcm5hbWU6\r\n")
        d.take()
        d.feed(f"{b64('üser')}\r\n".encode())
        self.assertEqual(bytes(d.out), b"334 UGFzc3dvcmQ6\r\n")
        d.take()
        d.feed(f"{b64('pässword')}\r\n".encode())
        self.assertEqual(d.codes(), ["235 2.7.0"])

    def test_login_initial_response(self) -> None:
        """AUTH LOGIN with the username as initial response goes straight to Password:."""
        d = self.driver()
        d.feed(f"AUTH LOGIN {b64('user')}\r\n{b64('wrong')}\r\n".encode())
        self.assertEqual(d.take(), ["334 UGFzc3dvcmQ6", "535 5.7.8 Authentication credentials invalid"])

    def test_bad_base64_and_cancel(self) -> None:
        """Bad base64 is 501 5.5.2, '*' cancels with 501 5.0.0, and the session is back in command mode."""
        d = self.driver()
        d.feed(b"AUTH PLAIN !!!notbase64\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN\r\nAAA\r\nNOOP\r\n")
        self.assertEqual(
            d.codes(), ["501 5.5.2", "334 VXNlcm5hbWU6", "501 5.0.0", "334 ", "501 5.5.2", "250 2.0.0"]
        )

    def test_auth_sequence_rules(self) -> None:
        """AUTH needs EHLO, is refused during a transaction and after success (503 5.5.1)."""
        d = Driver(settings(), tls=True)
        d.feed(b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\nHELO c.example\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\n")
        self.assertEqual(d.codes(), ["503 5.5.1", "250 mx.mtad.test", "503 5.5.1"])
        d = self.driver()
        d.feed(b"MAIL FROM:<a@example.org>\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\nRSET\r\n")
        d.feed(b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\n")
        self.assertEqual(d.codes(), ["250 2.1.0", "503 5.5.1", "250 2.0.0", "235 2.7.0", "503 5.5.1"])

    def test_auth_refused_in_plain_text(self) -> None:
        """Without TLS and without allow_plaintext_auth, AUTH is 538 5.7.11 and the policy is not asked."""
        d = Driver(settings(starttls=True))
        d.feed(b"EHLO c.example\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\n")
        self.assertEqual(d.codes()[1:], ["538 5.7.11"])
        self.assertEqual(d.requests, [])

    def test_unknown_mechanism_and_plain_authzid(self) -> None:
        """Unknown mechanisms are 504 5.5.4; PLAIN acting as another user fails 535; malformed PLAIN 501."""
        d = self.driver()
        d.feed(b"AUTH CRAM-MD5\r\nAUTH\r\n")
        d.feed(f"AUTH PLAIN {b64('other' + chr(0) + 'user' + chr(0) + 'secret')}\r\n".encode())
        d.feed(f"AUTH PLAIN {b64('user' + chr(0) + 'secret')}\r\n".encode())
        self.assertEqual(d.codes(), ["504 5.5.4", "501 5.5.4", "535 5.7.8", "501 5.5.2"])

    def test_relay_needs_auth(self) -> None:
        """The test policy relays only for an authenticated session; Received then says ESMTPSA."""
        d = self.driver()
        d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nRSET\r\n")
        self.assertEqual(d.codes(), ["250 2.1.0", "554 5.7.1", "250 2.0.0"])
        d.feed(
            b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"
        )
        d.feed(b"DATA\r\nhello\r\n.\r\n")
        self.assertEqual(d.codes(), ["235 2.7.0", "250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"])
        [accepted] = d.accepted
        self.assertIn(b"with ESMTPSA id sess1", accepted.message)
        self.assertEqual(accepted.session.auth, AuthIdentity("user", 7, 3))

    def test_auth_line_limit(self) -> None:
        """AUTH lines may be longer than 512 octets (RFC 4954 §4) but not unbounded."""
        d = self.driver()
        d.feed(b"AUTH PLAIN " + b"A" * 4000 + b"\r\n")
        self.assertEqual(d.codes(), ["501 5.5.2"])
        d.feed(b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")
        self.assertEqual(d.codes(), ["500 5.5.6"])


class StartTLSTests(SynchronousTestCase):
    def test_starttls_resets_and_discards_pipelined_input(self) -> None:
        """After 220 the TLS switch is requested, buffered plain text is discarded and state is pre-EHLO."""
        d = Driver(settings(starttls=True))
        d.feed(b"EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        self.assertEqual(d.codes(), ["250 HELP", "220 2.0.0"])
        self.assertEqual(d.tls_started, 1)
        self.assertEqual(d.requests, [])
        session = d.machine.session
        self.assertTrue(session.tls)
        self.assertIsNone(session.helo)
        d.feed(b"MAIL FROM:<a@example.org>\r\nEHLO c.example\r\nSTARTTLS\r\n")
        replies = d.take()
        self.assertEqual(replies[0], "503 5.5.1 Send EHLO or HELO first")
        self.assertIn("250-AUTH PLAIN LOGIN", replies[1])
        self.assertNotIn("STARTTLS", replies[1])
        self.assertEqual(replies[2], "503 5.5.1 TLS already active")

    def test_starttls_with_junk(self) -> None:
        """STARTTLS with parameters is 501 5.5.4 and TLS is not started."""
        d = Driver(settings(starttls=True))
        d.feed(b"EHLO c.example\r\nSTARTTLS now\r\n")
        self.assertEqual(d.codes()[1:], ["501 5.5.4"])
        self.assertEqual(d.tls_started, 0)

    def test_starttls_not_offered(self) -> None:
        """STARTTLS on a listener without TLS is 502 5.5.1; before EHLO it is 503 5.5.1."""
        d = Driver()
        d.feed(b"EHLO c.example\r\nSTARTTLS\r\n")
        self.assertEqual(d.codes()[1:], ["502 5.5.1"])
        d = Driver(settings(starttls=True))
        d.feed(b"STARTTLS\r\n")
        self.assertEqual(d.codes(), ["503 5.5.1"])


class ChunkingTests(SynchronousTestCase):
    def start(self, d: Driver) -> None:
        d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
        d.take()

    def test_bdat_chunks(self) -> None:
        """BDAT chunks are taken verbatim (no dot-unstuffing) and LAST hands the message over (RFC 3030)."""
        d = Driver()
        self.start(d)
        d.feed(b"BDAT 8\r\n.a\r\n.\r\nbBDAT 3 LAST\r\nc\r\n")
        self.assertEqual(d.take(), ["250 2.0.0 8 octets received", "250 2.0.0 Queued as q1"])
        self.assertTrue(d.accepted[0].message.endswith(b"+0000\r\n.a\r\n.\r\nbc\r\n"))

    def test_bdat_bytewise(self) -> None:
        """A pipelined BDAT session fed byte by byte gives the same result."""
        d = Driver()
        d.feed(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
            b"BDAT 4\r\nab\r\nBDAT 0 LAST\r\n",
            bytewise=True,
        )
        self.assertEqual(d.codes()[-2:], ["250 2.0.0", "250 2.0.0"])
        self.assertTrue(d.accepted[0].message.endswith(b"+0000\r\nab\r\n"))

    def test_bdat_out_of_sequence_consumes_chunk(self) -> None:
        """BDAT without a transaction is 503 but its chunk is still read, so the session stays in step."""
        d = Driver()
        d.feed(b"EHLO c.example\r\nBDAT 6\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual(d.codes()[1:], ["503 5.5.1", "250 2.0.0"])
        d.feed(b"BDAT x\r\n")
        self.assertEqual(d.codes(), ["501 5.5.4"])

    def test_bdat_oversize(self) -> None:
        """A chunk that takes the message over the limit is 552 5.3.4 and ends the transaction."""
        d = Driver(settings(max_message_size=10))
        self.start(d)
        d.feed(b"BDAT 8\r\n12345678BDAT 8 LAST\r\n12345678")
        self.assertEqual(d.codes(), ["250 2.0.0", "552 5.3.4"])
        d.feed(b"BDAT 1 LAST\r\nx")
        self.assertEqual(d.codes(), ["503 5.5.1"])
        self.assertEqual(d.accepted, [])

    def test_bdat_rules(self) -> None:
        """DATA after BDAT is 503; a BDAT message with bare LF or an overlong line is refused."""
        d = Driver()
        self.start(d)
        d.feed(b"BDAT 2\r\nabDATA\r\nRCPT TO:<c@example.test>\r\nBDAT 2 LAST\r\nx\n")
        self.assertEqual(d.codes(), ["250 2.0.0", "503 5.5.1", "503 5.5.1", "550 5.6.0"])
        self.start(d)
        d.feed(b"BDAT 1001 LAST\r\n" + b"a" * 999 + b"\r\n")
        self.assertEqual(d.codes(), ["500 5.5.6"])
        self.assertEqual(d.accepted, [])

    def test_accept_request(self) -> None:
        """The accept request carries the session as it is at the end of data."""
        d = Driver(auto=False)
        d.feed(b"EHLO c.example\r\n")
        d.feed(b"MAIL FROM:<a@example.org>\r\n")
        d.answer(None)
        d.feed(b"RCPT TO:<b@example.test>\r\n")
        d.answer(None)
        d.feed(b"BDAT 1 LAST\r\nx")
        request = d.requests[-1]
        assert isinstance(request, AcceptMessage)
        self.assertEqual(request.session.helo, "c.example")
        d.answer(Reply(451, "4.3.0", "Storage unavailable"))
        self.assertEqual(d.take()[-1], "451 4.3.0 Storage unavailable")

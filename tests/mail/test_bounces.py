"""Reading bounces: RFC 3464 DSNs, RFC 5965 complaints, other MTAs' formats, auto-replies, garbage."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtad.mail.bounces import MAX_PARSE, BounceRecipient, BounceReport, parse_bounce

SAMPLES = Path(__file__).parent / "bounce_samples"


def sample(name: str) -> bytes:
    """A sample message, with CRLF line ends as it arrives over SMTP."""
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def only(report: BounceReport) -> BounceRecipient:
    assert len(report.recipients) == 1, report.recipients
    return report.recipients[0]


class DSNTests(SynchronousTestCase):
    def test_gmail_no_such_user(self) -> None:
        """Gmail's DSN: the recipient, 5.1.1, the whole folded diagnostic, the remote MTA without its
        comment, and the quoted original's Message-ID and X-Postal-MsgID."""
        report = parse_bounce(sample("gmail_dsn_no_such_user.eml"))
        self.assertEqual(report.kind, "dsn")
        self.assertEqual(report.reporting_mta, "googlemail.com")
        self.assertEqual(report.from_address, "mailer-daemon@googlemail.com")
        recipient = only(report)
        self.assertEqual(recipient.final_recipient, "nosuchuser.4471@gmail.com")
        self.assertEqual(recipient.address, "nosuchuser.4471@gmail.com")
        self.assertEqual(recipient.action, "failed")
        self.assertEqual(recipient.status, "5.1.1")
        self.assertEqual(recipient.diagnostic_type, "smtp")
        assert recipient.diagnostic is not None
        self.assertTrue(recipient.diagnostic.startswith("550-5.1.1 The email account that you tried"))
        self.assertIn("?p=NoSuchUser", recipient.diagnostic)
        self.assertEqual(recipient.smtp_code, 550)
        self.assertEqual(recipient.remote_mta, "gmail-smtp-in.l.google.com")
        self.assertEqual(recipient.last_attempt_date, "Mon, 10 Jun 2024 02:14:07 -0700 (PDT)")
        self.assertTrue(recipient.hard)
        assert report.original is not None
        self.assertEqual(report.original.message_id, "a91f2c77@mail.mtad.test")
        self.assertEqual(report.original.postal_msgid, "Qz81kPw0aB3c")
        self.assertEqual(report.original.subject, "Your order has shipped")
        self.assertEqual(report.original.header("TO"), "nosuchuser.4471@gmail.com")
        self.assertEqual(report.postal_msgids, ("Qz81kPw0aB3c",))

    def test_exchange_online_ndr(self) -> None:
        """Exchange Online's NDR: Original-Recipient as we sent it, 5.1.10, and headers-only original."""
        report = parse_bounce(sample("outlook_ndr_recipient_not_found.eml"))
        self.assertEqual(report.kind, "dsn")
        self.assertEqual(report.reporting_mta, "BN8PR12MB3587.namprd12.prod.outlook.com")
        recipient = only(report)
        self.assertEqual(recipient.original_recipient, "Jane.Doe@contoso.com")
        self.assertEqual(recipient.final_recipient, "jane.doe@contoso.com")
        self.assertEqual(recipient.address, "Jane.Doe@contoso.com")
        self.assertEqual(recipient.status, "5.1.10")
        self.assertEqual(
            recipient.diagnostic,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        )
        self.assertIsNone(recipient.remote_mta)
        self.assertTrue(recipient.hard)
        assert report.original is not None
        self.assertEqual(report.original.message_id, "b22e91@mail.mtad.test")
        self.assertEqual(report.original.postal_msgid, "Hw7Rk2Lp9sZe")

    def test_postfix_user_unknown(self) -> None:
        """Postfix's DSN: Postfix-folded diagnostic unfolded, and an 8-bit, RFC 2047 original decoded."""
        report = parse_bounce(sample("postfix_dsn_user_unknown.eml"))
        self.assertEqual(report.kind, "dsn")
        self.assertEqual(report.from_address, "MAILER-DAEMON@mail.example.net")
        self.assertEqual(report.subject, "Undelivered Mail Returned to Sender")
        recipient = only(report)
        self.assertEqual(recipient.address, "max.mustermann@example.net")
        self.assertEqual(
            recipient.diagnostic,
            "550 5.1.1 <max.mustermann@example.net>: Recipient address rejected: "
            "User unknown in virtual mailbox table",
        )
        self.assertEqual(recipient.remote_mta, "mx.example.net")
        self.assertTrue(recipient.hard)
        assert report.original is not None
        self.assertEqual(report.original.subject, "Ihre Bestellung ☕")
        self.assertEqual(report.original.header("from"), "Café Müller <hallo@cafe.test>")
        self.assertEqual(report.original.postal_msgid, "Cf3Mu9Ll2rTq")

    def test_postfix_two_recipients(self) -> None:
        """Each per-recipient block is one recipient, with its own status and diagnostic type."""
        report = parse_bounce(sample("postfix_dsn_mixed.eml"))
        full, nowhere = report.recipients
        self.assertEqual(
            (full.address, full.status, full.diagnostic_type), ("full@example.org", "5.2.2", "smtp")
        )
        self.assertEqual(
            (nowhere.address, nowhere.status, nowhere.diagnostic_type),
            ("someone@no-such-domain.test", "5.4.4", "X-Postfix"),
        )
        self.assertIsNone(nowhere.smtp_code)
        self.assertTrue(nowhere.hard)
        assert report.original is not None
        self.assertEqual(report.original.postal_msgid, "Ss5x1Zz0Mm7n")

    def test_postfix_delayed_is_soft(self) -> None:
        """A delay warning is a DSN whose recipient is "delayed" with a 4.x.x status: not hard."""
        report = parse_bounce(sample("postfix_dsn_delayed.eml"))
        recipient = only(report)
        self.assertEqual((recipient.action, recipient.status), ("delayed", "4.4.1"))
        self.assertFalse(recipient.hard)
        self.assertEqual(
            recipient.diagnostic, "connect to mx.example.com[192.0.2.80]:25: Connection timed out"
        )
        assert report.original is not None
        self.assertEqual(report.original.message_id, "d1ge57@mail.mtad.test")
        self.assertIsNone(report.original.postal_msgid)

    def test_exim_dsn(self) -> None:
        """Exim's DSN (its generic 5.0.0 status, the remote reply in the diagnostic) is read as a DSN."""
        report = parse_bounce(sample("exim_bounce.eml"))
        self.assertEqual(report.kind, "dsn")
        recipient = only(report)
        self.assertEqual((recipient.address, recipient.status), ("ghost@exim.test", "5.0.0"))
        self.assertEqual(recipient.smtp_code, 550)
        assert report.original is not None
        self.assertEqual(report.original.postal_msgid, "Ex1mB0unce42")

    def test_lf_line_ends(self) -> None:
        """A sample stored with bare LF line ends reads the same as with CRLF."""
        crlf = parse_bounce(sample("postfix_dsn_mixed.eml"))
        lf = parse_bounce((SAMPLES / "postfix_dsn_mixed.eml").read_bytes())
        self.assertEqual(crlf, lf)

    def test_field_variants(self) -> None:
        """Fields as odd MTAs write them: no address type, angle brackets, a comment on the action,
        OpenSMTPD's "error", X-Actual-Recipient, a status with words around it, no status at all."""
        report = parse_bounce(
            dsn(
                b"Final-Recipient: <a@x.test>\r\nAction: failed (bad mailbox)\r\n"
                b"Status: 5.1.1 (unknown)\r\n\r\n"
                b"Final-Recipient: rfc822; b@x.test\r\nX-Actual-Recipient: rfc822; B@X.test\r\n"
                b"Action: error\r\nDiagnostic-Code: smtp; 550 no such user\r\n\r\n"
                b"Final-Recipient: RFC822; c@x.test\r\nAction: relayed\r\nStatus: 2.0.0\r\n"
            )
        )
        a, b, c = report.recipients
        self.assertEqual(
            (a.final_recipient, a.action, a.status, a.hard), ("a@x.test", "failed", "5.1.1", True)
        )
        self.assertEqual(
            (b.address, b.action, b.status, b.smtp_code, b.hard), ("B@X.test", "failed", None, 550, True)
        )
        self.assertEqual((c.address, c.action, c.hard), ("c@x.test", "relayed", False))

    def test_failed_with_transient_status_is_soft(self) -> None:
        """ "failed" after retries ran out (4.4.7) says nothing about the address: not hard."""
        report = parse_bounce(
            dsn(b"Final-Recipient: rfc822; a@x.test\r\nAction: failed\r\nStatus: 4.4.7\r\n")
        )
        self.assertFalse(only(report).hard)

    def test_global_delivery_status(self) -> None:
        """RFC 6533's message/global-delivery-status (SMTPUTF8 mail) is read like delivery-status."""
        report = parse_bounce(
            dsn(
                "Final-Recipient: utf-8; jürgen@bücher.test\r\nAction: failed\r\nStatus: 5.1.1\r\n".encode(),
                kind=b"global-delivery-status",
            )
        )
        recipient = only(report)
        self.assertEqual(recipient.final_recipient, "jürgen@bücher.test")
        self.assertEqual(recipient.status, "5.1.1")

    def test_report_without_recipients_is_not_a_dsn(self) -> None:
        """A delivery-status part without per-recipient blocks is no DSN; its sender makes it a bounce."""
        report = parse_bounce(dsn(b""))
        self.assertEqual(report.kind, "unrecognised_bounce")
        self.assertEqual(report.recipients, ())


def dsn(blocks: bytes, kind: bytes = b"delivery-status") -> bytes:
    return (
        b"From: MAILER-DAEMON@mx.x.test\r\nSubject: failure\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/report; report-type=" + kind + b'; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
        b"--B\r\nContent-Type: message/"
        + kind
        + b"\r\n\r\nReporting-MTA: dns; mx.x.test\r\n\r\n"
        + blocks
        + b"\r\n--B--\r\n"
    )


class OtherFormatTests(SynchronousTestCase):
    def test_exim_plain_text(self) -> None:
        """Exim's plain bounce: the X-Failed-Recipients address, Exim's reason, the inline original."""
        report = parse_bounce(sample("exim_plain_bounce.eml"))
        self.assertEqual(report.kind, "unrecognised_bounce")
        recipient = only(report)
        self.assertEqual(recipient.final_recipient, "former.employee@oldexim.test")
        self.assertEqual((recipient.action, recipient.diagnostic), ("failed", "Unrouteable address"))
        self.assertTrue(recipient.hard)
        assert report.original is not None
        self.assertEqual(report.original.message_id, "pay5l1p@mail.mtad.test")
        self.assertEqual(report.original.postal_msgid, "Old3x1mT0ken")
        self.assertEqual(report.original.subject, "Your payslip")

    def test_qmail(self) -> None:
        """qmail's QSBMF: each address with its own paragraph's reason (qmail's own, or the remote reply)."""
        report = parse_bounce(sample("qmail_bounce.eml"))
        self.assertEqual(report.kind, "unrecognised_bounce")
        nobody, remote = report.recipients
        self.assertEqual(nobody.final_recipient, "nobody@qmail.test")
        self.assertEqual(nobody.status, "5.1.1")
        self.assertEqual(nobody.diagnostic, "Sorry, no mailbox here by that name. (#5.1.1)")
        self.assertEqual(remote.final_recipient, "remote@far.test")
        self.assertEqual(remote.status, "5.7.1")
        self.assertEqual(remote.diagnostic, "550 5.7.1 <remote@far.test>: Relay access denied")
        assert report.original is not None
        self.assertEqual(report.original.postal_msgid, "Qm4ilT0kenX1")

    def test_yahoo_failure_notice(self) -> None:
        """Yahoo's "Failure Notice": the address and the "550: 5.2.1" reply quoted under it."""
        report = parse_bounce(sample("yahoo_failure_notice.eml"))
        self.assertEqual(report.kind, "unrecognised_bounce")
        recipient = only(report)
        self.assertEqual(recipient.final_recipient, "closed.account@example.com")
        self.assertEqual(recipient.status, "5.2.1")
        self.assertEqual(recipient.smtp_code, 550)
        self.assertEqual(report.postal_msgids, ("Yh00Fail9Ntc",))

    def test_daemon_sender_without_addresses(self) -> None:
        """Mail from MAILER-DAEMON or postmaster is a bounce even when no address can be read from it."""
        for sender in (
            b"MAILER-DAEMON@mx.test",
            b"Mail Delivery System <bounces@mx.test>",
            b"postmaster@mx.test",
        ):
            raw = b"From: " + sender + b"\r\nSubject: Returned mail\r\n\r\nSomething went wrong.\r\n"
            report = parse_bounce(raw)
            self.assertEqual(report.kind, "unrecognised_bounce", sender)
            self.assertEqual(report.recipients, ())

    def test_null_sender(self) -> None:
        """A null envelope sender (given, or in Return-Path) with nothing else to go on is a bounce."""
        raw = b"From: someone@mx.test\r\nSubject: hello\r\n\r\nYour mail.\r\n"
        self.assertEqual(parse_bounce(raw).kind, "not_a_bounce")
        self.assertEqual(parse_bounce(raw, mail_from="").kind, "unrecognised_bounce")
        self.assertEqual(parse_bounce(raw, mail_from="<>").kind, "unrecognised_bounce")
        self.assertEqual(parse_bounce(b"Return-Path: <>\r\n" + raw).kind, "unrecognised_bounce")
        self.assertEqual(parse_bounce(raw, mail_from="app@shop.test").kind, "not_a_bounce")


class ComplaintTests(SynchronousTestCase):
    def test_yahoo_arf(self) -> None:
        """Yahoo's feedback loop report: type, agent, envelope, source IP, domain and original headers."""
        report = parse_bounce(sample("yahoo_arf.eml"))
        self.assertEqual(report.kind, "complaint")
        complaint = report.complaint
        assert complaint is not None
        self.assertEqual(complaint.feedback_type, "abuse")
        self.assertEqual(complaint.user_agent, "Yahoo!-Mail-Feedback/2.0")
        self.assertEqual(complaint.version, "0.1")
        self.assertEqual(complaint.original_mail_from, "b.4r.4.j5m7p9r2t4@rp.mtad.test")
        self.assertEqual(complaint.original_rcpt_to, ("reader@yahoo.com",))
        self.assertEqual(complaint.arrival_date, "Fri, 21 Jun 2024 18:29:55 +0000")
        self.assertEqual(complaint.source_ip, "192.0.2.25")
        self.assertEqual(complaint.reported_domain, "shop.test")
        self.assertEqual(complaint.incidents, 1)
        assert report.original is not None
        self.assertEqual(report.original.message_id, "june2024-yh@mail.mtad.test")
        self.assertEqual(report.original.postal_msgid, "Yh00Cmplnt01")
        self.assertEqual(report.recipients, ())

    def test_aol_redacted(self) -> None:
        """AOL's report leaves out the envelope: those fields are empty, the original still identifies."""
        report = parse_bounce(sample("aol_arf.eml"))
        complaint = report.complaint
        assert complaint is not None
        self.assertEqual((complaint.feedback_type, complaint.user_agent), ("abuse", "AOL SComp"))
        self.assertIsNone(complaint.original_mail_from)
        self.assertEqual(complaint.original_rcpt_to, ())
        assert report.original is not None
        self.assertEqual(report.original.message_id, "4f1d2c@mail.mtad.test")
        self.assertEqual(report.original.postal_msgid, "Ao1Fbl00Tkn9")

    def test_headers_only_and_fraud(self) -> None:
        """Another feedback type, several recipients, a headers-only original (RFC 5965 §2 allows both)."""
        raw = (
            b"From: fbl@isp.test\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\r\n\r\n'
            b"--F\r\nContent-Type: text/plain\r\n\r\nA report.\r\n"
            b"--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: Fraud\r\n"
            b"User-Agent: ISP-FBL/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <a@isp.test>\r\n"
            b"Original-Rcpt-To: b@isp.test\r\nReporting-MTA: dns; fbl.isp.test\r\n\r\n"
            b"--F\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <m1@mail.mtad.test>\r\n"
            b"X-Postal-MsgID: Tok3n\r\nSubject: Verify your account\r\n\r\n--F--\r\n"
        )
        report = parse_bounce(raw)
        complaint = report.complaint
        assert complaint is not None
        self.assertEqual(complaint.feedback_type, "fraud")
        self.assertEqual(complaint.original_rcpt_to, ("a@isp.test", "b@isp.test"))
        self.assertEqual(complaint.reporting_mta, "fbl.isp.test")
        assert report.original is not None
        self.assertEqual(report.original.postal_msgid, "Tok3n")


class AutoReplyTests(SynchronousTestCase):
    def test_outlook_out_of_office(self) -> None:
        """Exchange's out-of-office reply is an auto-reply, not a bounce."""
        report = parse_bounce(sample("outlook_out_of_office.eml"))
        self.assertEqual(report.kind, "auto_reply")
        self.assertEqual(report.recipients, ())
        self.assertEqual(report.from_address, "jane.doe@contoso.com")

    def test_fields(self) -> None:
        """RFC 3834's Auto-Submitted and the vendor fields each mark an auto-reply; Auto-Submitted: no
        does not."""
        base = b"From: jane@corp.test\r\nSubject: Re: your mail\r\n"
        for field in (
            b"Auto-Submitted: auto-replied",
            b"Auto-Submitted: auto-replied; owner-email=jane@corp.test",
            b"X-Autoreply: yes",
            b"X-Autorespond: Jane is away",
            b"Precedence: auto_reply",
            b"X-Autogenerated: Reply",
        ):
            report = parse_bounce(base + field + b"\r\n\r\nI am away.\r\n", mail_from="")
            self.assertEqual(report.kind, "auto_reply", field)
        self.assertEqual(parse_bounce(base + b"Auto-Submitted: no\r\n\r\nHi.\r\n").kind, "not_a_bounce")

    def test_subjects(self) -> None:
        """Out-of-office subjects in several languages (8-bit and RFC 2047 alike) mark an auto-reply."""
        for subject in (
            b"Out of Office: Invoice",
            b"Automatic reply: Invoice",
            b"Abwesenheitsnotiz: Rechnung",
            "Réponse automatique : Facture".encode(),
            b"=?utf-8?q?Respuesta_autom=C3=A1tica=3A_Factura?=",
            b"AutoReply: I'm on vacation",
        ):
            report = parse_bounce(b"From: jane@corp.test\r\nSubject: " + subject + b"\r\n\r\nAway.\r\n")
            self.assertEqual(report.kind, "auto_reply", subject)

    def test_read_receipt(self) -> None:
        """An RFC 8098 read receipt (sent with a null sender) is an automatic reply, not a bounce."""
        raw = (
            b"From: jane@corp.test\r\nSubject: Read: Invoice\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=disposition-notification; boundary="M"\r\n\r\n'
            b"--M\r\nContent-Type: text/plain\r\n\r\nYour message was read.\r\n"
            b"--M\r\nContent-Type: message/disposition-notification\r\n\r\n"
            b"Final-Recipient: rfc822; jane@corp.test\r\n"
            b"Disposition: manual-action/MDN-sent-manually; displayed\r\n"
            b"\r\n--M--\r\n"
        )
        self.assertEqual(parse_bounce(raw, mail_from="").kind, "auto_reply")

    def test_bounce_wins_over_auto_submitted(self) -> None:
        """DSNs carry Auto-Submitted: auto-replied too (Postfix, Exim): they stay DSNs."""
        self.assertEqual(parse_bounce(sample("postfix_dsn_user_unknown.eml")).kind, "dsn")


class RobustnessTests(SynchronousTestCase):
    def test_not_a_bounce(self) -> None:
        """An ordinary message is not a bounce, and says what it is."""
        report = parse_bounce(b"From: Ann <ann@x.test>\r\nSubject: Lunch?\r\n\r\nNoon?\r\n")
        self.assertEqual(report.kind, "not_a_bounce")
        self.assertEqual((report.subject, report.from_address), ("Lunch?", "ann@x.test"))

    def test_degenerate_inputs(self) -> None:
        """Empty input, a lone blank line, NULs, 8-bit noise and headers without a body never raise."""
        for raw in (
            b"",
            b"\r\n",
            b"\x00" * 100,
            b"\xff\xfe" * 1000,
            b"Subject: x",
            b":\r\n:\r\n",
            b"\r\n\r\n\r\n",
        ):
            self.assertEqual(parse_bounce(raw).kind, "not_a_bounce", raw[:20])

    def test_eight_bit_headers(self) -> None:
        """Raw UTF-8 and Latin-1 bytes in headers are decoded (invalid bytes replaced), not fatal."""
        raw = (
            b"From: M\xc3\xbcller <MAILER-DAEMON@mx.test>\r\nSubject: Unzustellbar: Gr\xfc\xdfe\r\n\r\nx\r\n"
        )
        report = parse_bounce(raw)
        self.assertEqual(report.kind, "unrecognised_bounce")
        self.assertEqual(report.subject, "Unzustellbar: Gr\ufffd\ufffde")

    def test_truncated_dsn(self) -> None:
        """A DSN cut off anywhere never raises, and once its recipient block is complete it is a DSN."""
        raw = sample("postfix_dsn_user_unknown.eml")
        block_end = raw.index(b"Diagnostic-Code:")
        for end in range(0, len(raw), 7):
            report = parse_bounce(raw[:end])
            if end > block_end:
                self.assertEqual(report.kind, "dsn", end)

    def test_deep_nesting(self) -> None:
        """MIME nested thousands deep (the stdlib parser recurses) still gives what the headers say."""
        nested = b"".join(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(3000)
        )
        report = parse_bounce(b"From: MAILER-DAEMON@mx.test\r\n" + nested + b"X-Postal-MsgID: deep1\r\n")
        self.assertEqual(report.kind, "unrecognised_bounce")
        self.assertEqual(report.postal_msgids, ("deep1",))

    def test_huge(self) -> None:
        """A bounce far over MAX_PARSE is read from its start; tokens are found in all of it."""
        raw = sample("postfix_dsn_user_unknown.eml")
        filler = (b"y" * 76 + b"\r\n") * (MAX_PARSE // 78 + 1000)
        report = parse_bounce(raw.replace(b"Gr\xc3\xbc\xc3\x9fe", filler) + b"\r\nX-Postal-MsgID: Late1\r\n")
        self.assertEqual(report.kind, "dsn")
        self.assertEqual(report.postal_msgids, ("Cf3Mu9Ll2rTq", "Late1"))

    def test_bad_transfer_encodings(self) -> None:
        """Broken base64, unknown encodings and a charset nobody has never raise."""
        raw = (
            b"From: MAILER-DAEMON@mx.test\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            b"--B\r\nContent-Type: text/plain; charset=x-nonesuch\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            b"!!!not base64===\r\n"
            b"--B\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
            b"begin 644 x\r\n!!!\r\n"
            b"--B\r\nContent-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Message-ID: <=ZZ@x>\r\n--B--\r\n"
        )
        report = parse_bounce(raw)
        self.assertIn(report.kind, ("dsn", "unrecognised_bounce"))

    @settings(deadline=None, max_examples=300, database=None)
    @given(st.binary(max_size=4096))
    def test_random_bytes(self, raw: bytes) -> None:
        """Random bytes never make the parser raise."""
        self.assertIsInstance(parse_bounce(raw), BounceReport)

    @settings(deadline=None, max_examples=300, database=None)
    @given(
        name=st.sampled_from(sorted(p.name for p in SAMPLES.glob("*.eml"))),
        edits=st.lists(
            st.tuples(
                st.sampled_from(("flip", "delete", "insert", "cut")),
                st.floats(0, 1),
                st.binary(min_size=1, max_size=8),
            ),
            min_size=1,
            max_size=8,
        ),
    )
    def test_mutated_samples(self, name: str, edits: list[tuple[str, float, bytes]]) -> None:
        """Random edits of the real samples (bytes changed, removed, inserted, cut off) never raise."""
        raw = bytearray(sample(name))
        for op, where, data in edits:
            at = int(where * len(raw))
            if op == "flip" and raw:
                raw[min(at, len(raw) - 1)] = data[0]
            elif op == "delete":
                del raw[at : at + len(data)]
            elif op == "insert":
                raw[at:at] = data
            else:
                del raw[at:]
        self.assertIsInstance(parse_bounce(bytes(raw)), BounceReport)

    @settings(deadline=None, max_examples=100, database=None)
    @given(
        st.lists(
            st.sampled_from(
                (
                    b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n",
                    b"Content-Type: message/delivery-status\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"Content-Type: message/feedback-report\r\n",
                    b"Content-Type: text/rfc822-headers\r\n",
                    b"Content-Transfer-Encoding: base64\r\n",
                    b"From: MAILER-DAEMON@x\r\n",
                    b"Final-Recipient: rfc822; a@b\r\n",
                    b"Action: failed\r\n",
                    b"Status: 5.1.1\r\n",
                    b"Diagnostic-Code: smtp; 550\r\n",
                    b"\r\n",
                    b"--B\r\n",
                    b"--B--\r\n",
                    b"X-Postal-MsgID: t\r\n",
                    b"\xff\xfe\r\n",
                    b" folded\r\n",
                )
            ),
            max_size=40,
        )
    )
    def test_shuffled_report_pieces(self, pieces: list[bytes]) -> None:
        """Report lines in any order and number (boundaries, parts, fields, blank lines) never raise."""
        self.assertIsInstance(parse_bounce(b"".join(pieces)), BounceReport)

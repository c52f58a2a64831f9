"""The refusal rules table: every row with a reply seen in the wild, the order between rows, the inputs."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtad.mail.bounces import BounceRecipient
from mtad.outbound.classify import RULES, Classification, classify, classify_bounce, classify_reply
from mtad.outbound.deliverer import DeliveryResult

# (rule, basic code, enhanced code, text, where the text comes from). Texts are as the servers send them
# (multi-line replies joined with newlines, as mtad.smtp.client gives them), with addresses and IPs
# replaced by documentation ones.
EXAMPLES: tuple[tuple[str, int | None, str | None, str, str], ...] = (
    (
        "gmail-no-such-user",
        550,
        "5.1.1",
        "The email account that you tried to reach does not exist. Please try\ndouble-checking the "
        "recipient's email address for typos or\nunnecessary spaces. Learn more at\n"
        "https://support.google.com/mail/?p=NoSuchUser d2e1a72fcca58-7065e4a3a3csi123456b3a.12 - gsmtp",
        "Gmail",
    ),
    (
        "gmail-account-disabled",
        550,
        "5.2.1",
        "The email account that you tried to reach is disabled. Learn more at\n"
        "https://support.google.com/mail/?p=DisabledUser - gsmtp",
        "Gmail",
    ),
    (
        "gmail-over-quota",
        452,
        "4.2.2",
        "The email account that you tried to reach is over quota. Please direct\nthe recipient to\n"
        "https://support.google.com/mail/?p=OverQuotaTemp - gsmtp",
        "Gmail",
    ),
    (
        "gmail-recipient-rate",
        452,
        "4.2.1",
        "The user you are trying to contact is receiving mail at a rate that\nprevents additional messages "
        "from being delivered. Please resend your\nmessage at a later time. - gsmtp",
        "Gmail",
    ),
    (
        "gmail-unusual-rate",
        421,
        "4.7.28",
        "Gmail has detected an unusual rate of unsolicited mail originating from your DKIM domain "
        "[shop.test 12]. To protect our users from spam, mail sent from your domain has been temporarily "
        "rate limited. https://support.google.com/mail/?p=UnsolicitedRateLimitError - gsmtp",
        "Gmail",
    ),
    (
        "gmail-low-reputation",
        550,
        "5.7.1",
        "[192.0.2.25] Our system has detected that this message is likely\nsuspicious due to the very low "
        "reputation of the sending IP address.\nTo best protect our users from spam, the message has been "
        "blocked. - gsmtp",
        "Gmail",
    ),
    (
        "gmail-unauthenticated",
        550,
        "5.7.26",
        "This mail is unauthenticated, which poses a security risk to the sender and Gmail users, and has "
        "been blocked. The sender must authenticate with at least one of SPF or DKIM. - gsmtp",
        "Gmail",
    ),
    (
        "gmail-likely-unsolicited",
        550,
        "5.7.1",
        "Our system has detected that this message is likely unsolicited\nmail. To reduce the amount of "
        "spam sent to Gmail, this message has been\nblocked. - gsmtp",
        "Gmail",
    ),
    (
        "gmail-security-issue",
        552,
        "5.7.0",
        "This message was blocked because its content presents a potential\nsecurity issue. "
        "https://support.google.com/mail/?p=BlockedMessage - gsmtp",
        "Gmail",
    ),
    (
        "microsoft-banned-ip",
        550,
        "5.7.606",
        "Access denied, banned sending IP [192.0.2.25]. To request removal from this list please visit "
        "https://sender.office.com/ and follow the directions.",
        "Exchange Online",
    ),
    (
        "microsoft-banned-sender",
        550,
        "5.7.511",
        "Access denied, banned sender[192.0.2.25]. To request removal from this list please forward this "
        "message to delist@microsoft.com.",
        "Exchange Online",
    ),
    (
        "microsoft-block-list",
        550,
        "5.7.1",
        "Unfortunately, messages from [192.0.2.25] weren't sent. Please contact your Internet service "
        "provider since part of their network is on our block list (S3150). You can also refer your "
        "provider to http://mail.live.com/mail/troubleshooting.aspx#errors.",
        "Outlook.com",
    ),
    (
        "microsoft-recipient-not-found",
        550,
        "5.1.10",
        "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "Exchange Online",
    ),
    (
        "microsoft-mailbox-unavailable",
        550,
        "5.5.0",
        "Requested action not taken: mailbox unavailable (S2017062302). "
        "[AM4PEPF00027A5F.eurprd04.prod.outlook.com]",
        "Outlook.com",
    ),
    (
        "microsoft-recipient-access-denied",
        550,
        "5.4.1",
        "Recipient address rejected: Access denied. AS(201806281) "
        "[DB5PEPF00014B9E.eurprd02.prod.outlook.com]",
        "Exchange Online",
    ),
    (
        "microsoft-quota",
        554,
        "5.2.2",
        "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
        "Exchange Online",
    ),
    (
        "yahoo-ts-deferral",
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.25 temporarily deferred due to unexpected volume or user complaints "
        "- 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        "Yahoo",
    ),
    (
        "yahoo-no-account",
        554,
        None,
        "delivery error: dd This user doesn't have a yahoo.com account (reader@yahoo.com) [0] - "
        "mta4003.mail.gq1.yahoo.com",
        "Yahoo",
    ),
    (
        "yahoo-mailbox-disabled",
        554,
        None,
        "delivery error: dd Sorry your message to reader@yahoo.com cannot be delivered. This mailbox is "
        "disabled (554.30). - mta1234.mail.bf1.yahoo.com",
        "Yahoo",
    ),
    (
        "greylisted",
        450,
        "4.2.0",
        "<max@example.net>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/example.net.html",
        "Postfix with postgrey",
    ),
    (
        "connection-failure",
        None,
        "4.4.1",
        "mx.example.com (192.0.2.80): Connection refused",
        "mtad's deliverer (no SMTP server reachable)",
    ),
    (
        "block-list",
        554,
        "5.7.1",
        "Service unavailable; Client host [192.0.2.25] blocked using zen.spamhaus.org; "
        "https://www.spamhaus.org/query/ip/192.0.2.25",
        "Postfix reject_rbl_client",
    ),
    (
        "reputation",
        554,
        None,
        "Your access to this mail system has been rejected due to the sending MTA's poor reputation. If you "
        "believe that this failure is in error, please contact the intended recipient via alternate means.",
        "Proofpoint",
    ),
    (
        "rate-limit",
        421,
        None,
        "mx.example.net Error: too many connections from 192.0.2.25",
        "Postfix smtpd_client_connection_count_limit",
    ),
    (
        "authentication",
        550,
        "5.7.1",
        "Email rejected per DMARC policy for shop.test",
        "Comcast",
    ),
    (
        "sender-rejected",
        450,
        "4.1.8",
        "<b.4h.2.s3d5f7g9h2@rp.mtad.test>: Sender address rejected: Domain not found",
        "Postfix reject_unknown_sender_domain",
    ),
    (
        "mailbox-full",
        452,
        None,
        "<full@example.org>: Mailbox full: user is over quota",
        "Dovecot LMTP behind Postfix",
    ),
    (
        "message-too-large",
        552,
        None,
        "Message size exceeds fixed limit",
        "Postfix message_size_limit",
    ),
    (
        "spam-content",
        550,
        None,
        "High probability of spam",
        "Mimecast",
    ),
    (
        "null-mx",
        None,
        "5.1.10",
        "Domain parked.test does not accept mail (null MX, RFC 7505) (5.1.10)",
        "mtad's resolver (mtad.outbound.mx)",
    ),
    (
        "dns",
        None,
        "5.1.2",
        "Domain no-such-domain.test does not exist (5.1.2)",
        "mtad's resolver (mtad.outbound.mx)",
    ),
    (
        "no-such-mailbox",
        550,
        "5.1.1",
        "<max@example.net>: Recipient address rejected: User unknown in virtual mailbox table",
        "Postfix",
    ),
    (
        "policy-words",
        554,
        "5.7.1",
        "<remote@far.test>: Relay access denied",
        "Postfix",
    ),
    ("enhanced-bad-mailbox", 550, "5.1.1", "Bad destination mailbox address", "RFC 3463 wording, Exim"),
    ("enhanced-bad-domain", 550, "5.1.2", "Bad destination system address", "RFC 3463 wording"),
    (
        "enhanced-bad-sender",
        553,
        "5.1.8",
        "<b@rp.mtad.test>... Domain of sender address b@rp.mtad.test does not exist",
        "Sendmail",
    ),
    ("enhanced-mailbox-disabled", 550, "5.2.1", "The mailbox is closed", "Yahoo"),
    ("enhanced-mailbox-full", 552, "5.2.2", "storage exceeded", "Sendmail"),
    ("enhanced-too-large", 554, "5.3.4", "Message exceeds the allowed length", "Fastmail"),
    ("enhanced-routing", 550, "5.4.4", "Unable to route", "Exchange"),
    (
        "enhanced-policy",
        530,
        "5.7.0",
        "Must issue a STARTTLS command first",
        "Postfix smtpd_tls_security_level=encrypt",
    ),
    ("enhanced-transient", 451, "4.3.0", "Temporary lookup failure", "Postfix"),
    ("basic-not-a-failure", 250, "2.0.0", "Ok: queued as 4VyQ2b0Hc2z9sT7", "Postfix"),
    ("basic-transient", 421, None, "Service not available, closing transmission channel", "RFC 5321"),
    ("basic-user-not-local", 551, None, "User not local; please try <someone@elsewhere.test>", "RFC 5321"),
    ("basic-storage-exceeded", 552, None, "Requested mail action aborted: exceeded storage", "RFC 5321"),
)

CATEGORY = {rule.name: rule.category for rule in RULES}


class TableTests(SynchronousTestCase):
    def test_every_row_with_a_real_reply(self) -> None:
        """Each example is decided by its own row, in its row's category."""
        for name, code, enhanced, text, source in EXAMPLES:
            found = classify(code, enhanced, text)
            self.assertEqual((found.rule, found.category), (name, CATEGORY[name]), f"{source}: {text}")

    def test_every_row_has_an_example(self) -> None:
        """No row of the table goes untested, and rule names are unique."""
        names = [rule.name for rule in RULES]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual({e[0] for e in EXAMPLES}, set(names))

    def test_reputation_is_not_bad_mailbox(self) -> None:
        """A block-list refusal that says 5.7.1, "spam" and "blocked", or even 5.1.1, is a policy block:
        never a bad mailbox (which would suppress a good recipient) nor spam content."""
        spamhaus = (
            "Service unavailable, Client host [192.0.2.25] blocked using Spamhaus. To request removal "
            "from this list see https://www.spamhaus.org/query/ip/192.0.2.25 AS(1450)"
        )
        self.assertEqual(classify(550, "5.7.1", spamhaus), Classification("policy_block", True, "block-list"))
        self.assertEqual(classify(550, "5.1.1", spamhaus).category, "policy_block")
        listed = "Message rejected: sending IP 192.0.2.25 is listed on spam blocklist"
        self.assertEqual(classify(550, "5.7.1", listed).category, "policy_block")

    def test_gmail_blocked_rows(self) -> None:
        """Gmail's 5.7.1 "blocked": reputation is policy, its content filter is spam content."""
        self.assertEqual(
            classify(550, "5.7.1", "the very low reputation of the sending domain ... blocked").category,
            "policy_block",
        )
        self.assertEqual(
            classify(550, "5.7.1", "likely unsolicited mail ... has been blocked").category, "spam_content"
        )

    def test_resolver_null_mx_against_microsoft_5_1_10(self) -> None:
        """5.1.10 from our resolver (null MX) is a DNS failure; Microsoft's 5.1.10 is a bad mailbox."""
        self.assertEqual(
            classify(None, "5.1.10", "Domain x.test does not accept mail (null MX)").category, "dns_failure"
        )
        self.assertEqual(classify(550, "5.1.10", "RESOLVER.ADR.RecipientNotFound").category, "bad_mailbox")
        self.assertEqual(classify(550, "5.1.10", "").category, "bad_mailbox")

    def test_sender_problems_are_not_the_recipient(self) -> None:
        """ "Sender address rejected: Domain not found" concerns our return path, not the recipient."""
        found = classify(450, "4.1.8", "<b@rp.mtad.test>: Sender address rejected: Domain not found")
        self.assertEqual(found.category, "policy_block")
        self.assertEqual(classify(553, None, "sending quota exceeded").category, "policy_block")

    def test_greylisting_before_recipient_wording(self) -> None:
        """Postgrey's "Recipient address rejected: Greylisted" is transient, not a bad mailbox."""
        found = classify(450, "4.2.0", "Recipient address rejected: Greylisted for 300 seconds")
        self.assertEqual(found, Classification("transient", False, "greylisted"))

    def test_transient_bad_mailbox_is_soft(self) -> None:
        """A 450 "user unknown" (Postfix's unknown_local_recipient_reject_code) is a soft bad mailbox."""
        found = classify(
            450, "4.1.1", "<a@x.test>: Recipient address rejected: User unknown in local recipient table"
        )
        self.assertEqual(found, Classification("bad_mailbox", False, "no-such-mailbox"))

    def test_unknown(self) -> None:
        """A 5xx that says nothing we know is unknown (and hard); nothing at all is unknown and soft."""
        self.assertEqual(
            classify(554, None, "Transaction failed"), Classification("unknown", True, "default")
        )
        self.assertEqual(classify(None, None, ""), Classification("unknown", False, "default"))


class InputTests(SynchronousTestCase):
    def test_hard_from_codes(self) -> None:
        """Hard follows the basic code's class, or the enhanced code's when there is no basic code."""
        self.assertTrue(classify(550, "4.7.1", "blocked").hard)
        self.assertFalse(classify(421, "5.7.1", "blocked").hard)
        self.assertTrue(classify(None, "5.7.1", "blocked").hard)
        self.assertFalse(classify(None, "4.7.1", "blocked").hard)

    def test_codes_read_from_text(self) -> None:
        """A reply given only as text ("550 5.1.1 ...", "550-5.1.1 ...", "5.2.2 ...") gives its codes."""
        self.assertEqual(
            classify(None, None, "550 5.1.1 Bad destination mailbox address"), classify(550, "5.1.1", "x")
        )
        self.assertEqual(classify(None, None, "550-5.1.2 no").rule, "enhanced-bad-domain")
        self.assertEqual(classify(None, None, "5.2.2 storage").rule, "enhanced-mailbox-full")
        self.assertTrue(classify(None, None, "550 nope").hard)

    def test_ip_addresses_are_not_codes(self) -> None:
        """Dotted numbers inside the text (an IP, a version) are not taken for enhanced codes."""
        self.assertEqual(classify(None, None, "host 192.4.2.25 said nothing useful").rule, "default")
        self.assertEqual(classify(550, None, "Exim 4.97.1 says no").rule, "default")

    def test_continuation_prefixes_do_not_split_phrases(self) -> None:
        """A multi-line reply quoted whole, "550-5.1.1" prefixes and all, matches phrases across lines."""
        text = "550-5.1.1 The email account that you tried to reach does\n550-5.1.1 not exist. Please try"
        self.assertEqual(classify(None, None, text).rule, "gmail-no-such-user")


def delivery(code: int | None, enhanced: str, output: str, details: str) -> DeliveryResult:
    status = "HardFail" if (code or 0) >= 500 or enhanced.startswith("5") else "SoftFail"
    return DeliveryResult(status, code, enhanced, output, details, False, 0.1, None, None)  # type: ignore[arg-type]


class DeliveryResultTests(SynchronousTestCase):
    def test_remote_reply(self) -> None:
        """A remote refusal is classified from its output (the reply as received)."""
        result = delivery(
            550,
            "5.1.1",
            "550 5.1.1 <a@x.test>: Recipient address rejected: User unknown",
            "Permanent SMTP delivery error when sending to mx.x.test (192.0.2.9)",
        )
        self.assertEqual(classify_reply(result), Classification("bad_mailbox", True, "no-such-mailbox"))

    def test_resolver_failures(self) -> None:
        """mtad's own DNS results (no code, no output, the details) are DNS failures, hard or soft."""
        hard = delivery(None, "5.1.2", "", "Domain no-such.test does not exist (5.1.2)")
        self.assertEqual(classify_reply(hard), Classification("dns_failure", True, "dns"))
        null = delivery(None, "5.1.10", "", "Domain x.test does not accept mail (null MX, RFC 7505) (5.1.10)")
        self.assertEqual(classify_reply(null).category, "dns_failure")
        soft = delivery(None, "4.4.3", "", "DNS lookup of MX records for x.test failed: timeout (4.4.3)")
        self.assertEqual(classify_reply(soft), Classification("dns_failure", False, "dns"))

    def test_local_refusals_and_connection_failures(self) -> None:
        """The client's own SIZE refusal is too large; no reachable server and timeouts are transient."""
        size = delivery(
            None,
            "5.3.4",
            "",
            "Message size 30000000 bytes exceeds the 26214400 bytes the server accepts (mx)",
        )
        self.assertEqual(classify_reply(size).category, "message_too_large")
        unreachable = delivery(
            None, "4.4.1", "connection refused", "No SMTP servers were available for x.test."
        )
        self.assertEqual(
            classify_reply(unreachable), Classification("transient", False, "connection-failure")
        )
        internal = delivery(None, "4.3.0", "", "Internal error while delivering: KeyError: 'x'")
        self.assertEqual(classify_reply(internal).category, "transient")


class BounceTests(SynchronousTestCase):
    def test_dsn_recipient(self) -> None:
        """A DSN recipient is classified from its status and diagnostic; hard comes from the DSN."""
        recipient = BounceRecipient(
            final_recipient="a@x.test",
            action="failed",
            status="5.1.1",
            diagnostic_type="smtp",
            diagnostic="550-5.1.1 The email account that you tried to reach does not exist.",
        )
        self.assertEqual(
            classify_bounce(recipient), Classification("bad_mailbox", True, "gmail-no-such-user")
        )

    def test_delayed_is_never_hard(self) -> None:
        """A "delayed" report quoting a 5xx is not hard: the reporting MTA is still trying."""
        recipient = BounceRecipient(
            action="delayed", status="4.4.1", diagnostic="550 5.7.1 blocked using zen.spamhaus.org"
        )
        self.assertEqual(classify_bounce(recipient), Classification("policy_block", False, "block-list"))

    def test_status_only(self) -> None:
        """With no diagnostic the status alone decides."""
        recipient = BounceRecipient(action="failed", status="5.2.2")
        self.assertEqual(
            classify_bounce(recipient), Classification("mailbox_full", True, "enhanced-mailbox-full")
        )

    def test_generic_status_gives_way_to_the_quoted_code(self) -> None:
        """Exim's 5.0.0 status with a quoted "550 5.1.1" reply is classified by the 5.1.1."""
        recipient = BounceRecipient(
            action="failed", status="5.0.0", diagnostic="550 5.1.1 Bad destination mailbox"
        )
        self.assertEqual(classify_bounce(recipient).rule, "enhanced-bad-mailbox")

"""What a refusal means: one rules table for SMTP replies at delivery time and DSN statuses alike.

A 5xx is not one thing. "550 5.1.1 user unknown" says the address is bad, and suppressing it protects
the sender's reputation; "550 5.7.1 blocked using Spamhaus" says the receiver dislikes our sending IP,
and suppressing the recipient would punish a good address for our reputation (postalserver/postal#1243,
#712: Postal suppresses on any 5xx). So each failure gets a category, and only ``bad_mailbox`` speaks
about the recipient.

The table is data: rows tried in order, the first whose conditions all hold wins, and its name is
recorded (``Classification.rule``) so a delivery row or a log line says why. The order is the design:

1. provider texts (Gmail, Microsoft, Yahoo) that contradict or refine their own codes;
2. general texts, reputation and block lists first, so "550 5.7.1 ... blocked using zen.spamhaus.org"
   is a policy block although it says 5.7.1, "spam" and "blocked";
3. RFC 3463 enhanced codes (RFC 5248's registry);
4. the basic RFC 5321 code alone.

Whether a failure is *hard* (permanent) comes from the codes, not the row: the basic code's class,
or the enhanced code's when there is no basic code (RFC 3463 §3.1: 5 is permanent failure).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from mtad.mail.bounces import BounceRecipient
    from mtad.outbound.deliverer import DeliveryResult

Category = Literal[
    "bad_mailbox",
    "mailbox_full",
    "message_too_large",
    "policy_block",
    "spam_content",
    "dns_failure",
    "transient",
    "unknown",
]

MAX_TEXT = 4096  # diagnostics quote whole transcripts; the words that matter come first


@attrs.frozen
class Classification:
    """A failure's category, whether it is permanent, and the name of the table row that decided."""

    category: Category
    hard: bool
    rule: str


def _ignoring_case(pattern: str | None) -> re.Pattern[str] | None:
    return None if pattern is None else re.compile(pattern, re.IGNORECASE)


def _exact(pattern: str | None) -> re.Pattern[str] | None:
    return None if pattern is None else re.compile(pattern)


@attrs.frozen
class Rule:
    """One row: every condition given must hold. ``text`` is searched (ignoring case) in the reply text;
    ``enhanced`` and ``code`` must match the whole enhanced code ("5.1.1") or basic code ("550")."""

    name: str
    category: Category
    text: re.Pattern[str] | None = attrs.field(default=None, converter=_ignoring_case)
    enhanced: re.Pattern[str] | None = attrs.field(default=None, converter=_exact)
    code: re.Pattern[str] | None = attrs.field(default=None, converter=_exact)

    def matches(self, code: str, enhanced: str, text: str) -> bool:
        return (
            (self.text is None or self.text.search(text) is not None)
            and (self.enhanced is None or self.enhanced.fullmatch(enhanced) is not None)
            and (self.code is None or self.code.fullmatch(code) is not None)
        )


RULES: tuple[Rule, ...] = (
    # -- 1. provider texts --------------------------------------------------------------------------------
    # Gmail (https://support.google.com/a/answer/3726730 lists them).
    Rule("gmail-no-such-user", "bad_mailbox", r"account that you tried to reach does not exist"),
    Rule("gmail-account-disabled", "bad_mailbox", r"account that you tried to reach is (disabled|inactive)"),
    Rule("gmail-over-quota", "mailbox_full", r"account that you tried to reach is over quota|OverQuota"),
    Rule("gmail-recipient-rate", "transient", r"receiving mail at a rate that prevents additional messages"),
    Rule("gmail-unusual-rate", "policy_block", r"unusual rate of (unsolicited )?mail"),
    Rule("gmail-low-reputation", "policy_block", r"low reputation of the send"),
    Rule(
        "gmail-unauthenticated",
        "policy_block",
        r"this mail is unauthenticated|unauthenticated email from|does not have authentication information"
        r"|fails to pass authentication checks|due to (the )?domain's DMARC policy",
    ),
    # Content, not reputation: Gmail's wording for a message its filter judged (it says "blocked" too).
    Rule("gmail-likely-unsolicited", "spam_content", r"likely unsolicited mail"),
    Rule("gmail-security-issue", "spam_content", r"content presents a potential security issue"),
    # Microsoft: Outlook.com and Exchange Online (learn.microsoft.com "Email non-delivery reports
    # and SMTP errors in Exchange Online").
    Rule("microsoft-banned-ip", "policy_block", enhanced=r"5\.7\.(60[6-9]|6[1-4][0-9])"),
    Rule("microsoft-banned-sender", "policy_block", r"banned sending IP|banned sender"),
    Rule(
        "microsoft-block-list",
        "policy_block",
        r"\b(S3140|S3150|SC-00[1-4]|DY-00[1-2]|OU-00[1-2])\b|part of their network is on our block list",
    ),
    Rule(
        "microsoft-recipient-not-found",
        "bad_mailbox",
        r"RESOLVER\.ADR\.(Ex)?Recip(ient)?NotFound|Recipient not found by SMTP address lookup",
    ),
    Rule("microsoft-mailbox-unavailable", "bad_mailbox", r"Requested action not taken: mailbox unavailable"),
    # Directory-based edge blocking: Exchange Online has no such recipient (a 5.4.1, not a policy).
    Rule("microsoft-recipient-access-denied", "bad_mailbox", r"Recipient address rejected: Access denied"),
    Rule("microsoft-quota", "mailbox_full", r"QuotaExceeded"),
    # Yahoo and AOL (https://senders.yahooinc.com/smtp-error-codes).
    Rule("yahoo-ts-deferral", "policy_block", r"\[TSS?\d\d\]"),
    Rule("yahoo-no-account", "bad_mailbox", r"This user doesn't have an? \S+ account"),
    Rule("yahoo-mailbox-disabled", "bad_mailbox", r"This mailbox is disabled"),
    # -- 2. general texts ---------------------------------------------------------------------------------
    # Greylisting says "Recipient address rejected" too (postgrey): it is a plain "come back later".
    Rule("greylisted", "transient", r"gr[ea]ylist"),
    # A connection that failed is no verdict on anything: "refused" here is not a policy word.
    Rule(
        "connection-failure",
        "transient",
        r"connection (refused|reset|timed out|closed)|timed out|network is unreachable|no route to host",
    ),
    Rule(
        "block-list",
        "policy_block",
        r"spamhaus|spamcop|barracuda|\bsorbs\b|uceprotect|abuseat|\bdnsbl\b|\brbl\b|blocked using"
        r"|\b(block|black|deny) ?list(ed)?\b|\blisted (at|in|on|by)\b|\bis listed\b",
    ),
    Rule("reputation", "policy_block", r"reputation|(user|spam) complaints|complaints from"),
    Rule(
        "rate-limit",
        "policy_block",
        r"rate[ -]?limit|too many (concurrent |simultaneous )?(smtp )?(connections|sessions|messages"
        r"|e-?mails)|throttl|sending (quota|limit|rate)|unexpected volume"
        r"|exceeded the (message|connection) rate",
    ),
    Rule(
        "authentication",
        "policy_block",
        r"unauthenticated|\b(spf|dkim|dmarc)\b[^.;]{0,40}\b(fail|policy|reject|check|invalid|alignment)"
        r"|authentication (failed|required|checks)",
    ),
    Rule(
        "sender-rejected",
        "policy_block",
        r"sender address rejected|sender (verify|verification) failed|helo command rejected"
        r"|client host rejected|reverse (dns|lookup)|\bptr\b",
    ),
    Rule(
        "mailbox-full",
        "mailbox_full",
        r"mailbox (is )?full|full mailbox|over ?quota|quota (exceeded|exceed)"
        r"|exceeded (storage|the storage|his|her|their|its) (allocation|quota)"
        r"|insufficient (disk )?(space|storage) (for|in) (the )?(mailbox|user)|mailbox size limit",
    ),
    Rule(
        "message-too-large",
        "message_too_large",
        r"message (size|length) (exceeds|is over|too)|exceeds? (the |our )?(fixed )?(maximum|max)\b"
        r"[^.;]{0,20}\bsize|message (is )?too (large|big)|size limits?\b|too large|maximum message size",
    ),
    Rule(
        "spam-content",
        "spam_content",
        r"\bspam\b|unsolicited|\bjunk\b|\bphish|\bmalware\b|\bvirus\b|content (filter|rejected|policy)"
        r"|message content|\bUBE\b|bulk (e-?)?mail|high probability of|suspicious (content|url|link)",
    ),
    Rule("null-mx", "dns_failure", r"null ?MX|does not accept mail"),
    Rule(
        "dns",
        "dns_failure",
        r"host or domain name not found|name service error|domain (name )?not found"
        r"|(domain|host) \S+ (does not exist|not found)|has no MX|no (mx|mail exchanger)\b"
        r"|mx records point to non-existent|unrouteable mail domain|mail servers for \S+ have no addresses"
        r"|dns lookup of|unable to resolve|could not resolve",
    ),
    Rule(
        "no-such-mailbox",
        "bad_mailbox",
        r"user unknown|unknown user|no such (user|mailbox|recipient|address|account|person)"
        r"|(recipient|user|mailbox|address|account)( address)? (does not|doesn't|did not) exist"
        r"|(recipient|user|mailbox|address|account) (not found|unknown|invalid)"
        r"|invalid (recipient|mailbox|address|user)|unknown (recipient|mailbox|address|local part)"
        r"|unrouteable address|mailbox unavailable|mailbox (is )?(disabled|not available|inactive)"
        r"|account (is |has been )?(disabled|inactive|deactivated|closed|expired)"
        r"|recipient address rejected|recipient rejected|undeliverable address|no mailbox here"
        r"|is not a valid (mailbox|recipient|address)|not our customer",
    ),
    Rule(
        "policy-words",
        "policy_block",
        r"\b(blocked|banned|denied|refused|prohibited|not authori[sz]ed|policy (reasons|violation))\b",
    ),
    # -- 3. enhanced codes (RFC 3463 §3, RFC 5248) --------------------------------------------------------
    # X.1.10 is RFC 7505's null MX, but servers send it for "no such recipient" (Exchange Online); mtad's
    # own null MX result says so in its text (row "null-mx" above). X.1.2 is the destination *system*
    # (the domain): a DNS failure, not a mailbox.
    Rule("enhanced-bad-mailbox", "bad_mailbox", enhanced=r"[45]\.1\.(1|3|6|10)"),
    Rule("enhanced-bad-domain", "dns_failure", enhanced=r"[45]\.1\.2"),
    Rule("enhanced-bad-sender", "policy_block", enhanced=r"[45]\.1\.[78]"),
    Rule("enhanced-mailbox-disabled", "bad_mailbox", enhanced=r"5\.2\.1"),
    Rule("enhanced-mailbox-full", "mailbox_full", enhanced=r"[45]\.2\.2"),
    Rule("enhanced-too-large", "message_too_large", enhanced=r"[45]\.(2\.3|3\.4)"),
    Rule("enhanced-routing", "dns_failure", enhanced=r"[45]\.4\.[34]"),
    Rule("enhanced-policy", "policy_block", enhanced=r"[45]\.7\.\d{1,3}"),
    Rule("enhanced-transient", "transient", enhanced=r"4\.\d{1,3}\.\d{1,3}"),
    # -- 4. basic codes (RFC 5321 §4.2.2, §4.2.3) ---------------------------------------------------------
    Rule("basic-not-a-failure", "unknown", code=r"[23]\d\d"),
    Rule("basic-transient", "transient", code=r"4\d\d"),
    Rule("basic-user-not-local", "bad_mailbox", code=r"551"),
    Rule("basic-storage-exceeded", "mailbox_full", code=r"552"),
)

_LEADING = re.compile(r"\s*([2-5]\d\d)(?:[ -]+([245]\.\d{1,3}\.\d{1,3})(?![\d.]))?(?![\d])")
_LEADING_ENHANCED = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
# "550-5.1.1 " continuation prefixes of a multi-line reply quoted in one string.
_CONTINUATION = re.compile(
    r"(?<![^\s])[2-5]\d\d(?:-(?:[245]\.\d{1,3}\.\d{1,3}(?=\s))?|\s[245]\.\d{1,3}\.\d{1,3}(?=\s))\s*"
)


def classify(code: int | None, enhanced: str | None, text: str) -> Classification:
    """The category of a refusal with basic ``code``, ``enhanced`` code and reply ``text``.

    Either code may be missing (a peer that sends no enhanced codes; a DSN that quotes only a status);
    a missing one is read from the start of ``text`` when it is there ("550 5.1.1 ...").
    """
    text = text[:MAX_TEXT]
    leading = _LEADING.match(text)
    if leading is not None:
        code = code if code is not None else int(leading.group(1))
        enhanced = enhanced or leading.group(2)
    elif not enhanced and (bare := _LEADING_ENHANCED.match(text)) is not None:
        enhanced = bare.group(1)
    words = " ".join(_CONTINUATION.sub(" ", text).split())
    code_text = "" if code is None else str(code)
    enhanced_text = enhanced or ""
    if code is not None:
        hard = 500 <= code < 600
    else:
        hard = enhanced_text.startswith("5.")
    for rule in RULES:
        if rule.matches(code_text, enhanced_text, words):
            return Classification(rule.category, hard, rule.name)
    return Classification("unknown", hard, "default")


def classify_reply(result: DeliveryResult) -> Classification:
    """`classify` for a delivery attempt: the remote reply, or mtad's own account when there was none.

    ``output`` is the remote server's reply as received; when mtad made the result up itself (DNS,
    connection, SIZE refusal) ``code`` is None, ``output`` empty and ``details`` says what happened.
    """
    return classify(result.code, result.enhanced or None, result.output or result.details)


def classify_bounce(recipient: BounceRecipient) -> Classification:
    """`classify` for one recipient of a bounce: its DSN status and diagnostic.

    A DSN's hard/soft comes from the DSN (``failed`` with a 5.x.x status, `BounceRecipient.hard`),
    not from the code the diagnostic quotes; a "delayed" report is never hard. A generic X.0.0 status
    gives way to the specific code the diagnostic quotes.
    """
    diagnostic = recipient.diagnostic or ""
    status = recipient.status
    quoted = _LEADING.match(diagnostic)
    if quoted is not None and quoted.group(2) and (status is None or status[1:] == ".0.0"):
        status = quoted.group(2)  # Exim's DSNs say 5.0.0 and quote the server's 5.1.1
    found = classify(recipient.smtp_code, status, diagnostic)
    return attrs.evolve(found, hard=recipient.hard)

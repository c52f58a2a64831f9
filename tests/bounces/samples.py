"""Messages that come back to a return path, as MTAs and feedback loops write them."""

from __future__ import annotations

ORIGINAL_HEADERS = (
    "From: app@example.org\r\n"
    "To: {rcpt}\r\n"
    "Subject: Welcome\r\n"
    "Message-ID: <welcome-1@example.org>\r\n"
    "{extra}"
)


def dsn(
    to: str,
    rcpt: str = "user@example.com",
    *,
    action: str = "failed",
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 <user@example.com>: Recipient address rejected: User unknown",
    quoted_extra: str = "",
    subject: str = "Undelivered Mail Returned to Sender",
) -> bytes:
    """An RFC 3464 DSN from mx.example.com about ``rcpt``, sent to ``to`` (our return path)."""
    original = ORIGINAL_HEADERS.format(rcpt=rcpt, extra=quoted_extra)
    return (
        "From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <dsn-1@mx.example.com>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"\r\n'
        "\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: dns; mailstore.example.com\r\n"
        f"Diagnostic-Code: {diagnostic}\r\n"
        "\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        f"{original}"
        "\r\n"
        "--BOUNDARY--\r\n"
    ).encode()


def arf(to: str, original_mail_from: str, rcpt: str = "user@example.com", quoted_extra: str = "") -> bytes:
    """An RFC 5965 abuse report from a feedback loop, quoting the original with our envelope sender."""
    original = ORIGINAL_HEADERS.format(rcpt=rcpt, extra=quoted_extra)
    return (
        "From: Feedback Loop <fbl@isp.example.net>\r\n"
        f"To: {to}\r\n"
        "Subject: FW: Welcome\r\n"
        "Message-ID: <arf-1@isp.example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\r\n'
        "\r\n"
        "--B\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "This is an email abuse report.\r\n"
        "\r\n"
        "--B\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        "Feedback-Type: abuse\r\n"
        "User-Agent: ISP-FBL/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Mail-From: <{original_mail_from}>\r\n"
        f"Original-Rcpt-To: <{rcpt}>\r\n"
        "Source-IP: 192.0.2.10\r\n"
        "\r\n"
        "--B\r\n"
        "Content-Type: message/rfc822\r\n"
        "\r\n"
        f"Return-Path: <{original_mail_from}>\r\n"
        f"{original}"
        "\r\n"
        "Hello!\r\n"
        "\r\n"
        "--B--\r\n"
    ).encode()


def auto_reply(to: str) -> bytes:
    """An out-of-office answer (RFC 3834) that quotes the original's headers."""
    return (
        "From: User <user@example.com>\r\n"
        f"To: {to}\r\n"
        "Subject: Out of Office: Welcome\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "Message-ID: <ooo-1@example.com>\r\n"
        "\r\n"
        "I am away until Monday.\r\n"
    ).encode()

"""Building messages from fields: structure, encodings, folding, and header injection."""

from __future__ import annotations

import email.parser
import email.policy
import re
from email.message import EmailMessage

from twisted.trial.unittest import SynchronousTestCase

from mtad.mail.compose import (
    _POLICY,
    Attachment,
    Draft,
    Mailbox,
    _body,
    _single_text_part,
    address_field,
    address_problem,
    clean_text,
    compose,
    format_date,
    parse_mailbox,
    received_value,
    single_line,
    strip_name,
    unstructured_field,
)

NOW = 1_700_000_000.0
FROM = Mailbox("sender@example.test", "Sender")


def build(**changes: object) -> bytes:
    values: dict[str, object] = {"from_": FROM, "to": (Mailbox("rcpt@example.com"),), "plain_body": "hello"}
    values.update(changes)
    return compose(Draft(**values), message_id="id.1@mx.test", timestamp=NOW)  # type: ignore[arg-type]


def parse(message: bytes) -> EmailMessage:
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(message)
    assert isinstance(parsed, EmailMessage)
    return parsed


def text(part: EmailMessage) -> str:
    """A text part's content with the wire's CRLF line ends as newlines."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def field_names(message: bytes) -> list[str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    return [line.split(":", 1)[0] for line in head.split("\r\n") if line[:1] not in (" ", "\t")]


class DateTests(SynchronousTestCase):
    def test_format_date_per_second(self) -> None:
        """RFC 5322 dates in UTC, truncated to the second; consecutive seconds each get their own text."""
        self.assertEqual(format_date(1_700_000_000.9), "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertEqual(format_date(1_700_000_001.0), "Tue, 14 Nov 2023 22:13:21 +0000")
        self.assertEqual(format_date(1_700_000_000.0), "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertEqual(format_date(0), "Thu, 01 Jan 1970 00:00:00 +0000")


class StructureTests(SynchronousTestCase):
    def test_plain_only(self) -> None:
        """A plain body alone is a single text/plain part."""
        parsed = parse(build())
        self.assertEqual(parsed.get_content_type(), "text/plain")
        self.assertEqual(text(parsed), "hello\n")

    def test_html_only(self) -> None:
        """An HTML body alone is a single text/html part."""
        parsed = parse(build(plain_body=None, html_body="<b>hi</b>"))
        self.assertEqual(parsed.get_content_type(), "text/html")

    def test_alternative(self) -> None:
        """Both bodies make multipart/alternative, plain first (RFC 2046 §5.1.4: preferred last)."""
        parsed = parse(build(html_body="<b>hi</b>"))
        self.assertEqual(parsed.get_content_type(), "multipart/alternative")
        self.assertEqual([p.get_content_type() for p in parsed.iter_parts()], ["text/plain", "text/html"])

    def test_mixed_with_attachments(self) -> None:
        """Attachments make multipart/mixed around the bodies, each base64 with its filename."""
        attachments = (
            Attachment("a.pdf", "application/pdf", b"%PDF"),
            Attachment("b.txt", "text/plain", b"b"),
        )
        parsed = parse(build(html_body="<b>hi</b>", attachments=attachments))
        self.assertEqual(parsed.get_content_type(), "multipart/mixed")
        parts = list(parsed.iter_parts())
        self.assertEqual(parts[0].get_content_type(), "multipart/alternative")
        self.assertEqual(
            [(p.get_filename(), p.get_content_type(), p["Content-Transfer-Encoding"]) for p in parts[1:]],
            [("a.pdf", "application/pdf", "base64"), ("b.txt", "text/plain", "base64")],
        )

    def test_odd_content_types(self) -> None:
        """Invalid, multipart and message content types of attachments become application/octet-stream."""
        for content_type in ("nonsense", "multipart/mixed", "message/rfc822", "text/"):
            parsed = parse(build(attachments=(Attachment("x", content_type, b"x"),)))
            (attachment,) = parsed.iter_attachments()
            self.assertEqual(attachment.get_content_type(), "application/octet-stream")
        parsed = parse(build(attachments=(Attachment("x", "Image/PNG; name=x", b"x"),)))
        self.assertEqual(next(parsed.iter_attachments()).get_content_type(), "image/png")

    def test_fields_and_order(self) -> None:
        """Trace field first, then Date, From … Message-ID, custom fields, MIME-Version."""
        message = compose(
            Draft(
                from_=FROM,
                sender=Mailbox("s@example.test"),
                reply_to=(Mailbox("r@example.test"),),
                to=(Mailbox("t@example.com"),),
                cc=(Mailbox("c@example.com"),),
                subject="Hi",
                plain_body="x",
                headers=(("X-One", "1"),),
            ),
            message_id="id.1@mx.test",
            timestamp=NOW,
            received=received_value("192.0.2.1", "mx.test", NOW),
        )
        self.assertEqual(
            field_names(message)[:10],
            ["Received", "Date", "From", "Sender", "Reply-To", "To", "Cc", "Subject", "Message-ID", "X-One"],
        )
        self.assertEqual(parse(message)["Message-ID"], "<id.1@mx.test>")
        self.assertEqual(parse(message)["Date"], format_date(NOW))

    def test_wire_form(self) -> None:
        """Every line ends in CRLF, is at most 998 octets, and the message is 7-bit."""
        message = build(
            subject="Ünïcödé " * 40,
            plain_body="ä" * 5000 + "\nline\rcr\r\nafter",
            html_body="<p>" + "x" * 3000 + "</p>",
            attachments=(Attachment("b.bin", "application/octet-stream", bytes(range(256)) * 50),),
        )
        message.decode("ascii")
        self.assertIsNone(re.search(rb"(?<!\r)\n|\r(?!\n)", message))
        self.assertTrue(all(len(line) <= 998 for line in message.split(b"\r\n")))

    def test_bodies_round_trip(self) -> None:
        """UTF-8 bodies come back as sent, quoted-printable or base64 on the wire."""
        plain = "Grüße 😀\nZeile zwei"
        html = "<p>日本語のテキスト</p>"
        parsed = parse(build(plain_body=plain, html_body=html))
        plain_part, html_part = parsed.iter_parts()
        self.assertEqual(text(plain_part), plain + "\n")
        self.assertEqual(text(html_part), html + "\n")
        self.assertIn(plain_part["Content-Transfer-Encoding"], ("quoted-printable", "base64"))
        self.assertIn(html_part["Content-Transfer-Encoding"], ("quoted-printable", "base64"))


class HeaderTests(SynchronousTestCase):
    def test_injection_impossible(self) -> None:
        """CR, LF and other controls in any value become spaces: no value can start a field."""
        evil = "x\r\nBcc: victim@evil.test\nX-A: 1\rX-B: 2\x00\x0b\u2028end"
        message = build(
            from_=Mailbox("sender@example.test", evil),
            to=(Mailbox("rcpt@example.com", evil),),
            reply_to=(parse_mailbox(f"{evil} <r@example.test>"),),
            subject=evil,
            headers=(("X-Custom", evil),),
            attachments=(Attachment(evil, "text/plain", b"x"),),
        )
        self.assertEqual(
            field_names(message),
            [
                "Date",
                "From",
                "Reply-To",
                "To",
                "Subject",
                "Message-ID",
                "X-Custom",
                "MIME-Version",
                "Content-Type",
            ],
        )
        parsed = parse(message)
        self.assertEqual(parsed["Subject"], "x  Bcc: victim@evil.test X-A: 1 X-B: 2   end")
        self.assertEqual([a.addr_spec for a in parsed["To"].addresses], ["rcpt@example.com"])

    def test_invalid_field_names_dropped(self) -> None:
        """Custom fields with names that are not RFC 5322 field names are never written."""
        message = build(headers=(("X-A\r\nBcc", "v"), ("X A", "v"), ("X:A", "v"), ("", "v"), ("X-Ok", "v")))
        self.assertEqual(field_names(message).count("X-Ok"), 1)
        self.assertNotIn("Bcc", field_names(message))
        self.assertNotIn(b"X A", message)

    def test_own_fields_win(self) -> None:
        """Custom From, Message-ID, Date, MIME-Version and Content-* fields are dropped."""
        headers = (
            ("From", "evil@evil.test"),
            ("message-id", "<x@evil>"),
            ("Date", "yesterday"),
            ("MIME-Version", "2.0"),
            ("Content-Type", "text/evil"),
            ("Content-Transfer-Encoding", "8bit"),
        )
        parsed = parse(build(headers=headers))
        self.assertEqual(parsed.get_all("From"), ["Sender <sender@example.test>"])
        self.assertEqual(parsed.get_all("Message-ID"), ["<id.1@mx.test>"])
        self.assertEqual(len(parsed.get_all("Date") or []), 1)
        self.assertEqual(parsed.get_content_type(), "text/plain")

    def test_custom_to_kept_without_to(self) -> None:
        """A custom To is kept when no To is given (Bcc-only sends), replaced when one is."""
        headers = (("To", "undisclosed-recipients:;"), ("Subject", "custom"))
        parsed = parse(build(to=(), headers=headers))
        self.assertEqual(parsed["To"], "undisclosed-recipients:;")
        self.assertEqual(parsed["Subject"], "custom")
        parsed = parse(build(headers=headers, subject="given"))
        self.assertEqual(parsed.get_all("To"), ["rcpt@example.com"])
        self.assertEqual(parsed.get_all("Subject"), ["given"])

    def test_long_ascii_value_folded_not_encoded(self) -> None:
        """A long ASCII value folds at spaces and is never encoded, so a URL stays a URL."""
        url = "<https://example.com/unsubscribe/" + "a" * 150 + ">"
        field = unstructured_field("List-Unsubscribe", f"{url}, <mailto:u@example.com?subject={'b' * 60}>")
        self.assertNotIn("=?", field)
        self.assertEqual(field.split("\r\n")[0], f"List-Unsubscribe: {url},")
        self.assertEqual(
            field.replace("\r\n", ""), f"List-Unsubscribe: {url}, <mailto:u@example.com?subject={'b' * 60}>"
        )
        lines = unstructured_field("Subject", "word " * 40).split("\r\n")
        self.assertTrue(all(len(line) <= 78 for line in lines))
        self.assertTrue(all(line.strip() for line in lines))

    def test_word_over_998_octets_encoded(self) -> None:
        """An ASCII word too long for any line is written as encoded words rather than a broken line."""
        field = unstructured_field("X-Long", "x" * 2000)
        self.assertTrue(all(len(line) <= 78 for line in field.split("\r\n")))
        parsed = parse(f"{field}\r\n\r\n".encode())
        self.assertEqual(parsed["X-Long"], "x" * 2000)

    def test_non_ascii_encoded_words(self) -> None:
        """Non-ASCII values are RFC 2047 encoded words of at most 75 characters that decode back."""
        subject = "🎉 Grüße aus Köln " * 10
        field = unstructured_field("Subject", subject)
        field.encode("ascii")
        self.assertTrue(all(len(w) <= 75 for w in re.findall(r"=\?[^?]+\?[bBqQ]\?[^?]*\?=", field)))
        self.assertEqual(parse(f"{field}\r\n\r\n".encode())["Subject"], subject.strip())

    def test_display_names(self) -> None:
        """Names with specials are quoted, non-ASCII names encoded; both parse back."""
        field = address_field(
            "To",
            [
                Mailbox("a@x.test", 'Doe, "J" \\ Jr.'),
                Mailbox("b@x.test", "Jörg"),
                Mailbox("c@x.test", "Plain Name"),
            ],
        )
        field.encode("ascii")
        parsed = parse(f"{field}\r\n\r\n".encode())
        self.assertEqual(
            [(a.display_name, a.addr_spec) for a in parsed["To"].addresses],
            [('Doe, "J" \\ Jr.', "a@x.test"), ("Jörg", "b@x.test"), ("Plain Name", "c@x.test")],
        )

    def test_long_address_lists_fold_between_addresses(self) -> None:
        """A long address list folds at spaces, never inside an address."""
        mailboxes = [Mailbox(f"recipient{i}@example.com") for i in range(30)]
        field = address_field("To", mailboxes)
        self.assertTrue(all(len(line) <= 78 for line in field.split("\r\n")))
        parsed = parse(f"{field}\r\n\r\n".encode())
        self.assertEqual([a.addr_spec for a in parsed["To"].addresses], [m.address for m in mailboxes])

    def test_international_addresses(self) -> None:
        """IDN domains become A-labels; a non-ASCII local part stays UTF-8 (RFC 6532)."""
        self.assertEqual(address_field("To", [Mailbox("a@bücher.de")]), "To: a@xn--bcher-kva.de")
        self.assertEqual(address_field("To", [Mailbox("jörg@example.de")]), "To: jörg@example.de")

    def test_lone_surrogates_replaced(self) -> None:
        """Lone UTF-16 surrogates (possible in JSON) become U+FFFD instead of breaking the build."""
        parsed = parse(build(subject="a\ud800b", plain_body="c\udc00d"))
        self.assertEqual(parsed["Subject"], "a\ufffdb")
        self.assertEqual(text(parsed), "c\ufffdd\n")

    def test_received_value(self) -> None:
        """The trace field has Postal's shape, with an RFC 5321 address literal for IPv6."""
        self.assertEqual(
            received_value("192.0.2.1", "mx.test", NOW),
            "from api ([192.0.2.1]) by mx.test with HTTP; Tue, 14 Nov 2023 22:13:20 +0000",
        )
        self.assertTrue(
            received_value("2001:db8::1", "mx.test", NOW).startswith("from api ([IPv6:2001:db8::1])")
        )

    def test_attachment_filenames(self) -> None:
        """Non-ASCII filenames use RFC 2231 and decode back; an empty one is named ``attachment``."""
        parsed = parse(
            build(
                attachments=(
                    Attachment("résumé 📄.txt", "text/plain", b"x"),
                    Attachment(" ", "text/plain", b"y"),
                )
            )
        )
        self.assertEqual(
            [a.get_filename() for a in parsed.iter_attachments()], ["résumé 📄.txt", "attachment"]
        )


class AddressTests(SynchronousTestCase):
    def test_strip_name(self) -> None:
        """The address of ``Name <address>`` the way Postal's helper takes it."""
        cases = {
            "a@b.test": "a@b.test",
            "Name <a@b.test>": "a@b.test",
            '"Doe, J" <a@b.test>': "a@b.test",
            "<<a@b.test>> trailing": "a@b.test",
            " a@b.test (comment) ": "a@b.test",
        }
        for text, address in cases.items():
            self.assertEqual(strip_name(text), address, text)

    def test_parse_mailbox(self) -> None:
        """Display names are unquoted and unescaped; bare addresses have no name."""
        self.assertEqual(parse_mailbox('"Doe, \\"J\\"" <a@b.test>'), Mailbox("a@b.test", 'Doe, "J"'))
        self.assertEqual(parse_mailbox("Jane Doe<a@b.test>"), Mailbox("a@b.test", "Jane Doe"))
        self.assertEqual(parse_mailbox("a@b.test"), Mailbox("a@b.test"))

    def test_address_problems(self) -> None:
        """Addresses need a local part and a domain, without spaces or delimiters, within RFC 5321 sizes."""
        for good in ("a@b.test", "first.last+tag@sub.example.com", "jörg@bücher.de", "x@[192.0.2.1]"):
            self.assertIsNone(address_problem(good), good)
        for bad in (
            "",
            "a",
            "@b.test",
            "a@",
            "a b@c.test",
            "a@b@c.test",
            "a<b@c.test",
            "x" * 65 + "@b.test",
            "a@" + "b" * 256,
        ):
            self.assertIsNotNone(address_problem(bad), bad)

    def test_single_line(self) -> None:
        """Every control character but TAB becomes a space."""
        self.assertEqual(single_line("a\r\nb\tc\x00d\x7fe\x85f"), "a  b\tc d e f")


class SingleTextPartTests(SynchronousTestCase):
    """The fast path for one text body writes exactly what the stdlib MIMEPart path writes."""

    TEXTS = (
        "",
        "hello",
        "hello\nworld\n",
        "line with trailing space \nand tab\t\n",
        "x" * 77,
        "x" * 78,
        "x" * 79 + "\n" + "y" * 200,
        "Grüße aus Köln 🎉\n" * 3,
        "Grüße\n" * 12,
        "日本語のテキスト" * 40,
        "日本語\n" * 15,
        ".leading dot\nFrom the start\n",
        "\n\n\nblank lines first",
        "mixed\r\nline\rends\n",
    )

    def test_same_bytes_as_the_stdlib(self) -> None:
        """For plain and HTML bodies of every shape, the fast path's bytes equal MIMEPart's."""
        for text in self.TEXTS:
            for field in ("plain_body", "html_body"):
                draft = Draft(from_=Mailbox("a@b.test", ""), **{field: text})
                subtype = "plain" if field == "plain_body" else "html"
                if not text.strip():
                    continue
                expected = _body(draft).as_bytes(policy=_POLICY)
                self.assertEqual(_single_text_part(clean_text(text), subtype), expected, (field, text))

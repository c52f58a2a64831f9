"""Reading header fields without the stdlib parser: the From domain a message is signed for."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtad.mail.headers import from_domain, read_fields


class FromDomainTests(SynchronousTestCase):
    def test_plain_and_named_addresses(self) -> None:
        """The domain of a bare address or a named one, lower-cased."""
        self.assertEqual(from_domain(b"From: app@Sender.TEST\r\n\r\nx"), "sender.test")
        self.assertEqual(from_domain(b'From: "App, Inc." <app@sender.test>\r\n\r\nx'), "sender.test")

    def test_encoded_name_and_folding(self) -> None:
        """An RFC 2047 display name and a From folded over two lines still give the address's domain."""
        message = (
            b"Subject: x\r\nFrom: =?utf-8?Q?Gr=C3=BC=C3=9Fe?=\r\n <app@sender.test>\r\n\r\nFrom: a@b.test\r\n"
        )
        self.assertEqual(from_domain(message), "sender.test")

    def test_missing_or_unusable(self) -> None:
        """No From field, or one without an address, gives None."""
        self.assertIsNone(from_domain(b"To: a@b.test\r\n\r\nFrom: x@y.test\r\n"))
        self.assertIsNone(from_domain(b"From: undisclosed\r\n\r\n"))

    def test_read_fields_in_order_unfolded(self) -> None:
        """Wanted fields come back unfolded, in order, whatever the case of their names."""
        section = b"X-Tag: one\r\nSubject: a\r\n b\r\nx-tag: two\r\n"
        self.assertEqual(
            read_fields(section, (b"x-tag", b"subject")),
            {b"x-tag": [b" one", b" two"], b"subject": [b" a b"]},
        )

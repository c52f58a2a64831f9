"""Parameter parsing of the legacy API, without HTTP: sources, shapes and Postal's conventions."""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from admin_api.params import (
    EXPANSIONS,
    ParameterError,
    decode_base64,
    expansions,
    is_blank,
    is_true,
    message_id,
    parse_send_message,
    parse_send_raw,
    request_params,
)
from mtad.mail.compose import Mailbox


class RequestParamsTests(SynchronousTestCase):
    def test_json_body(self) -> None:
        """A JSON content type (any parameters, any case) makes the body the parameters."""
        self.assertEqual(
            request_params("Application/JSON; charset=UTF-8", b'{"a": 1}', b'{"b": 2}'), {"a": 1}
        )

    def test_empty_json_body(self) -> None:
        """An empty JSON body is no parameters, not an error."""
        self.assertEqual(request_params("application/json", b"  ", None), {})

    def test_params_field(self) -> None:
        """Without a JSON content type the ``params`` field is parsed as JSON."""
        self.assertEqual(request_params("application/x-www-form-urlencoded", b"", b'{"b": 2}'), {"b": 2})

    def test_json_object_body_without_content_type(self) -> None:
        """A body that is a JSON object is read even without a JSON content type."""
        self.assertEqual(request_params(None, b' {"c": 3}', None), {"c": 3})

    def test_nothing(self) -> None:
        """No JSON anywhere means no parameters."""
        self.assertEqual(request_params("text/plain", b"hello", None), {})

    def test_errors(self) -> None:
        """Malformed JSON, non-objects and non-UTF-8 bodies are parameter errors."""
        for args in (
            ("application/json", b"{", None),
            ("application/json", b"[]", None),
            ("application/json", b'{"a": "\xff"}', None),
            (None, b"", b"nope"),
        ):
            with self.assertRaises(ParameterError):
                request_params(*args)


class ValueTests(SynchronousTestCase):
    def test_base64_forms(self) -> None:
        """Base64 with line breaks, spaces or missing padding decodes; other characters are errors."""
        data = bytes(range(200))
        encoded = base64.b64encode(data).decode()
        self.assertEqual(decode_base64(encoded), data)
        self.assertEqual(decode_base64(base64.encodebytes(data).decode()), data)
        self.assertEqual(decode_base64(encoded.rstrip("=")), data)
        self.assertEqual(decode_base64(" " + encoded[:10] + "\r\n" + encoded[10:]), data)
        for bad in ("a*b=", "é", "abcde"):
            with self.assertRaises(ValueError):
                decode_base64(bad)

    def test_blank(self) -> None:
        """Ruby's blank?: None, False, whitespace strings and empty containers; not 0."""
        for value in (None, False, "", "  \n", [], {}):
            self.assertTrue(is_blank(value), value)
        for value in (0, "x", [0], True):
            self.assertFalse(is_blank(value), value)

    def test_true(self) -> None:
        """Flags: true, 1, "true" and "1" are true; anything else is false."""
        self.assertEqual(
            [is_true(v) for v in (True, 1, "true", " 1 ", False, 0, "false", None, 2)],
            [True] * 4 + [False] * 5,
        )

    def test_message_id(self) -> None:
        """``id`` as a number or a string of digits; other values name no message; blank is missing."""
        self.assertEqual(message_id({"id": 5}), (5, 5))
        self.assertEqual(message_id({"id": "5"}), ("5", 5))
        self.assertEqual(message_id({"id": 5.0}), (5.0, 5))
        self.assertEqual(message_id({"id": "x"}), ("x", None))
        self.assertEqual(message_id({"id": "５"}), ("５", None))
        self.assertEqual(message_id({"id": True}), (True, None))
        self.assertEqual(message_id({"id": 2**63}), (2**63, None))
        self.assertEqual(message_id({"id": -1}), (-1, None))
        for params in ({}, {"id": None}, {"id": " "}):
            with self.assertRaises(ParameterError) as raised:
                message_id(params)
            self.assertEqual(raised.exception.message, "`id` parameter is required but is missing")

    def test_expansions(self) -> None:
        """``true`` is every expansion, a list names some, anything else none."""
        self.assertEqual(expansions({"_expansions": True}), frozenset(EXPANSIONS))
        self.assertEqual(expansions({"_expansions": ["status", "bogus", 1]}), {"status"})
        self.assertEqual(expansions({"_expansions": "status"}), frozenset())


class SendParamsTests(SynchronousTestCase):
    def test_addresses_parsed(self) -> None:
        """Address lists keep display names; blanks and nulls in them are skipped."""
        parsed = parse_send_message(
            {"to": ['"Doe, J" <j@x.test>', None, " ", "k@x.test"], "from": "F <f@x.test>"}
        )
        self.assertEqual(parsed.to, (Mailbox("j@x.test", "Doe, J"), Mailbox("k@x.test")))
        self.assertEqual(parsed.from_, Mailbox("f@x.test", "F"))

    def test_attachment_without_name_not_decoded(self) -> None:
        """Data of an attachment without a name is not decoded, so Postal's missing-name error comes first."""
        parsed = parse_send_message({"attachments": [{"name": "", "data": "***"}]})
        self.assertIsNone(parsed.attachments[0].data)

    def test_header_values(self) -> None:
        """Custom values may be strings, numbers or booleans; null drops the field."""
        parsed = parse_send_message({"headers": {"X-A": 1, "X-B": True, "X-C": None, "X-D": "d"}})
        self.assertEqual(parsed.headers, (("X-A", "1"), ("X-B", "true"), ("X-D", "d")))

    def test_raw_rcpt_to_entries(self) -> None:
        """send/raw recipients must be address strings."""
        with self.assertRaises(ParameterError):
            parse_send_raw({"rcpt_to": [1], "mail_from": "a@b.test", "data": "eA=="})
        parsed = parse_send_raw({"rcpt_to": [" a@b.test "], "mail_from": "a@b.test", "data": "eA=="})
        self.assertEqual((parsed.rcpt_to, parsed.data), (("a@b.test",), b"x"))

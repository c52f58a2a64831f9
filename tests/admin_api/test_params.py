"""Parameter parsing of the legacy API, without HTTP: sources, shapes and Postal's conventions."""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from admin_api.params import (
    EXPANSIONS,
    MAX_FIELD_DEPTH,
    ParameterError,
    decode_base64,
    expansions,
    form_fields,
    is_blank,
    is_true,
    message_id,
    nested_params,
    parse_send_message,
    parse_send_raw,
    request_params,
)
from mtad.mail.compose import Mailbox


class RequestParamsTests(SynchronousTestCase):
    def test_json_body(self) -> None:
        """A JSON content type (any parameters, any case) makes the body the parameters; a ``params``
        query field is then no more than one more field."""
        self.assertEqual(request_params("Application/JSON; charset=UTF-8", b'{"a": 1}'), {"a": 1})
        self.assertEqual(
            request_params("application/json", b'{"a": 1}', b"params=%7B%22b%22%3A2%7D"),
            {"a": 1, "params": '{"b":2}'},
        )

    def test_json_body_with_query_fields(self) -> None:
        """Query fields join a JSON body's parameters and win over its keys, as Rails merges them."""
        self.assertEqual(
            request_params("application/json", b'{"a": 1, "b": 2}', b"b=x&c[]=y"),
            {"a": 1, "b": "x", "c": ["y"]},
        )

    def test_empty_json_body(self) -> None:
        """An empty JSON body is no parameters, not an error."""
        self.assertEqual(request_params("application/json", b"  "), {})

    def test_params_field(self) -> None:
        """Without a JSON content type a ``params`` form or query field is parsed as JSON, and is all
        the parameters (other fields are ignored, as in Postal); the query one wins."""
        form = "application/x-www-form-urlencoded"
        self.assertEqual(request_params(form, b"params=%7B%22b%22%3A+2%7D&to=x"), {"b": 2})
        self.assertEqual(request_params(form, b"", b"params=%7B%22b%22:2%7D"), {"b": 2})
        self.assertEqual(request_params(form, b"params={%22a%22:1}", b"params={%22b%22:2}"), {"b": 2})

    def test_form_fields(self) -> None:
        """Plain form fields are the parameters, UTF-8 decoded, ``+`` as space; the query joins them and
        wins on a shared name."""
        params = request_params(
            "application/x-www-form-urlencoded; charset=utf-8",
            b"to=a%40example.org&subject=%C3%9Cber+%F0%9F%8E%89&bounce=1&id=",
            b"bounce=0",
        )
        self.assertEqual(params, {"to": "a@example.org", "subject": "Über 🎉", "bounce": "0", "id": ""})

    def test_query_fields_with_any_method_or_type(self) -> None:
        """Query fields count without a form body (a GET), and a body that is neither form nor JSON is
        not read."""
        self.assertEqual(
            request_params(None, b"", b"id=7&_expansions[]=status"), {"id": "7", "_expansions": ["status"]}
        )
        self.assertEqual(request_params("text/plain", b"to=x", b""), {})

    def test_multipart_fields(self) -> None:
        """A multipart/form-data body's fields are read in order, nested like form fields."""
        body = (
            b"".join(
                b'--B\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value + b"\r\n"
                for name, value in (
                    (b"attachments[][name]", b"a.txt"),
                    (b"attachments[][data]", b"YQ=="),
                    (b"attachments[][name]", b"b.txt"),
                    (b"attachments[][data]", b"Yg=="),
                    (b"subject", "Grüße".encode()),
                )
            )
            + b"--B--\r\n"
        )
        self.assertEqual(
            request_params('multipart/form-data; boundary="B"', body),
            {
                "attachments": [{"name": "a.txt", "data": "YQ=="}, {"name": "b.txt", "data": "Yg=="}],
                "subject": "Grüße",
            },
        )

    def test_json_object_body_without_content_type(self) -> None:
        """A body that is a JSON object is read even without a JSON content type, or as a form
        (``curl -d '{...}'``)."""
        self.assertEqual(request_params(None, b' {"c": 3}'), {"c": 3})
        self.assertEqual(request_params("application/x-www-form-urlencoded", b'{"c": 3}'), {"c": 3})

    def test_nothing(self) -> None:
        """No JSON and no fields anywhere means no parameters."""
        self.assertEqual(request_params("text/plain", b"hello"), {})

    def test_errors(self) -> None:
        """Malformed JSON, non-objects and non-UTF-8 bodies are parameter errors."""
        for args in (
            ("application/json", b"{", b""),
            ("application/json", b"[]", b""),
            ("application/json", b'{"a": "\xff"}', b""),
            (None, b"", b"params=nope"),
            (None, b"", b"params[a]=1"),
            ("multipart/form-data; boundary=B", b"not multipart", b""),
        ):
            with self.assertRaises(ParameterError):
                request_params(*args)

    def test_bad_utf8_names_the_field(self) -> None:
        """A percent-escape that is not UTF-8 is a parameter error naming its field, in a value or in a
        name, in the body or the query (never an exception of another kind)."""
        cases = [
            (b"subject=%C3%28", b"", "`subject` parameter is not valid UTF-8"),
            (b"to=a%40b.test&headers[X-A]=%FF", b"", "`headers[X-A]` parameter is not valid UTF-8"),
            (b"", b"params=%E2%82", "`params` parameter is not valid UTF-8"),
            (b"sub%FFject=x", b"", 'The form field name "sub\ufffdject" is not valid UTF-8'),
        ]
        for body, query, message in cases:
            with self.assertRaises(ParameterError) as raised:
                request_params("application/x-www-form-urlencoded", body, query)
            self.assertEqual(raised.exception.message, message)


class FormFieldTests(SynchronousTestCase):
    def test_decoding(self) -> None:
        """Fields in order; ``+`` is a space, escapes are bytes, a malformed escape stays as written,
        a field without ``=`` has no value, and empty pieces are skipped."""
        self.assertEqual(
            form_fields(b"a=1+2&&b%5B%5D=%2B%26%3D&c&d=100%&d=%zz&=e"),
            [(b"a", b"1 2"), (b"b[]", b"+&="), (b"c", None), (b"d", b"100%"), (b"d", b"%zz"), (b"", b"e")],
        )


class NestedParamsTests(SynchronousTestCase):
    def nested(self, query: bytes) -> dict[str, Any]:
        return nested_params(form_fields(query))

    def test_plain_fields(self) -> None:
        """A plain name is a string, the last one given wins; a name without ``=`` is null; an empty name
        is skipped."""
        self.assertEqual(self.nested(b"a=1&b=2&a=3&c&=x"), {"a": "3", "b": "2", "c": None})

    def test_lists(self) -> None:
        """``name[]`` makes a list, in the order given."""
        self.assertEqual(self.nested(b"to[]=x&to[]=y&to[]="), {"to": ["x", "y", ""]})

    def test_objects(self) -> None:
        """``name[key]`` makes an object, to any depth."""
        self.assertEqual(
            self.nested(b"headers[X-Foo]=bar&headers[X-Baz]=qux&a[b][c]=1&a[b][d][]=2"),
            {"headers": {"X-Foo": "bar", "X-Baz": "qux"}, "a": {"b": {"c": "1", "d": ["2"]}}},
        )

    def test_list_of_objects(self) -> None:
        """``name[][key]`` adds to the last object until a key repeats, which begins the next one."""
        self.assertEqual(
            self.nested(
                b"attachments[][name]=a.txt&attachments[][content_type]=text/plain&attachments[][data]=YQ=="
                b"&attachments[][name]=b.txt&attachments[][data]=Yg=="
            ),
            {
                "attachments": [
                    {"name": "a.txt", "content_type": "text/plain", "data": "YQ=="},
                    {"name": "b.txt", "data": "Yg=="},
                ]
            },
        )
        self.assertEqual(
            self.nested(b"x[][a][b]=1&x[][a][c]=2&x[][a][b]=3"),
            {"x": [{"a": {"b": "1", "c": "2"}}, {"a": {"b": "3"}}]},
        )

    def test_rack_edge_cases(self) -> None:
        """Names Rack reads its own way: a leading bracket is part of a plain name, an unclosed one is
        kept whole as a key, and ``a[][]`` nests a list."""
        self.assertEqual(self.nested(b"[a]=1"), {"[a]": "1"})
        self.assertEqual(self.nested(b"a[=1"), {"a[": "1"})
        self.assertEqual(self.nested(b"a[b=1"), {"a": {"[b": "1"}})
        self.assertEqual(self.nested(b"a[][]=1"), {"a": [["1"]]})

    def test_conflicts_name_the_field(self) -> None:
        """A field that contradicts an earlier one's shape is a parameter error naming it."""
        cases = [
            (b"to=x&to[]=y", "`to[]` parameter makes `to` an array, but an earlier field made it a string"),
            (
                b"to[]=x&to[a]=y",
                "`to[a]` parameter makes `to` an object, but an earlier field made it an array",
            ),
            (
                b"h[a]=x&h[a][b]=y",
                "`h[a][b]` parameter makes `a` an object, but an earlier field made it a string",
            ),
        ]
        for query, message in cases:
            with self.assertRaises(ParameterError) as raised:
                self.nested(query)
            self.assertEqual(raised.exception.message, message)

    def test_depth_limit(self) -> None:
        """Names nested deeper than Rack's limit are refused, naming the field."""
        found: Any = self.nested(b"a" + b"[b]" * (MAX_FIELD_DEPTH - 1) + b"=1")["a"]
        for _ in range(MAX_FIELD_DEPTH - 2):
            found = found["b"]
        self.assertEqual(found, {"b": "1"})
        with self.assertRaises(ParameterError) as raised:
            self.nested(b"a" + b"[b]" * MAX_FIELD_DEPTH + b"=1")
        self.assertIn(f"nests deeper than {MAX_FIELD_DEPTH} levels", raised.exception.message)


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
        """``true`` (or a form's "true"/"1") is every expansion, a list or one name names some (also as
        form indices), anything else none."""
        for every in (True, "true", "1"):
            self.assertEqual(expansions({"_expansions": every}), frozenset(EXPANSIONS))
        self.assertEqual(expansions({"_expansions": ["status", "bogus", 1]}), {"status"})
        self.assertEqual(expansions({"_expansions": "status"}), {"status"})
        self.assertEqual(expansions({"_expansions": {"1": "details", "0": "status"}}), {"status", "details"})
        for nothing in ("false", "bogus", False, 0, None, {"a": "status"}):
            self.assertEqual(expansions({"_expansions": nothing}), frozenset())


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

    def test_form_shaped_lists(self) -> None:
        """Where a list is expected, one string is a list (of comma-separated addresses), and an object
        keyed 0, 1, 2... is a list in key order (``to[0]=a&to[1]=b``, ``attachments[0][name]=x``)."""
        parsed = parse_send_message(
            {
                "to": "a@x.test",
                "cc": {"1": "c@x.test", "0": "b@x.test", "10": "d@x.test"},
                "attachments": {"0": {"name": "a.txt", "data": "YQ=="}},
            }
        )
        self.assertEqual([m.address for m in parsed.to], ["a@x.test"])
        self.assertEqual([m.address for m in parsed.cc], ["b@x.test", "c@x.test", "d@x.test"])
        self.assertEqual([(a.name, a.data) for a in parsed.attachments], [("a.txt", b"a")])
        raw = parse_send_raw({"rcpt_to": "a@b.test", "mail_from": "a@b.test", "data": "eA=="})
        self.assertEqual(raw.rcpt_to, ("a@b.test",))
        with self.assertRaises(ParameterError):
            parse_send_message({"to": {"a": "x@y.test"}})

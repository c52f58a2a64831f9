"""The /api/v1 legacy API end to end: Postal's wire format against real SQLite and a real Redis."""

from __future__ import annotations

import hashlib
import json
import os
from io import BytesIO
from typing import Any

import attrs
import treq
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from admin_api.legacy_api import SEND_ERRORS, ruby_base64
from mtad.accept import AcceptedMessage, Acceptor
from mtad.caching import SharedLookups
from mtad.events.schema import MessageQueued, decode_entry
from mtad.queue.events import parse_entry
from mtad.queue.redis_queue import RedisQueue
from mtad.store import credentials as cs
from mtad.store import servers as ss
from mtad.store.messages import (
    DeliveryAttempt,
    Message,
    MessageStatus,
    Scope,
    record_delivery,
    record_messages,
)
from mtad.store.servers import Server
from mtad.submission.answers import HoldReason
from tests.admin_api.support import (
    BASE,
    HOSTNAME,
    MAX_MESSAGE_SIZE,
    NOW,
    LegacyAPITestCase,
    b64,
    parse,
    settled,
    text,
)
from tests.redis_server import connect

SEND = "/api/v1/send/message"
RAW = "/api/v1/send/raw"
MESSAGE = "/api/v1/messages/message"
DELIVERIES = "/api/v1/messages/deliveries"
PATHS = (SEND, RAW, MESSAGE, DELIVERIES)


def send_params(**changes: Any) -> dict[str, Any]:
    """Postal's own spec request (spec/apis/legacy_api/send/message_spec.rb), on our domain."""
    params: dict[str, Any] = {
        "to": ["test@example.com"],
        "cc": ["cc@example.com"],
        "bcc": ["bcc@example.com"],
        "from": "test@example.test",
        "sender": "sender@example.test",
        "tag": "test-tag",
        "reply_to": "reply@example.com",
        "plain_body": "plain text",
        "html_body": "<p>html</p>",
        "attachments": [
            {"name": "test1.txt", "content_type": "text/plain", "data": b64("hello world 1")},
            {"name": "test2.txt", "content_type": "text/plain", "data": b64("hello world 2")},
        ],
        "headers": {"x-test-header-1": "111", "x-test-header-2": "222"},
        "bounce": False,
        "subject": "Test",
    }
    params.update(changes)
    return params


RAW_MESSAGE = (
    b"From: Test <test@example.test>\r\n"
    b"To: test1@example.com\r\n"
    b"Subject: test\r\n"
    b"Message-ID: <raw.1@example.test>\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"X-Postal-Tag: raw-tag\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"\r\n"
    b"plain text\r\n"
    b"--b1\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\n'
    b"\r\n"
    b"<p>html</p>\r\n"
    b"--b1--\r\n"
)


def raw_params(**changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mail_from": "test@example.test",
        "rcpt_to": ["test1@example.com", "test2@example.com"],
        "data": b64(RAW_MESSAGE),
        "bounce": False,
    }
    params.update(changes)
    return params


@implementer(IBodyProducer)
@attrs.define
class ChunkedBody:
    """A request body of unknown length, so the HTTP client sends it chunked (RFC 9112 §7.1)."""

    chunks: list[bytes]
    length: object = UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for chunk in self.chunks:
            consumer.write(chunk)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class TransferEncodingRecorder(Resource):
    """Serves ``inner`` and notes each request's Transfer-Encoding, to prove a body came chunked."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[Any] = []

    def render(self, request: Any) -> Any:
        self.seen.append(request.requestHeaders.getRawHeaders(b"transfer-encoding"))
        return self.inner.render(request)


class FailingAcceptor(Acceptor):
    """An acceptor with a bug: the API must answer an error envelope, never success."""

    async def accept(self, *args: Any, **kwargs: Any) -> list[AcceptedMessage]:
        raise RuntimeError("bug in the accept path")


class StalledAcceptor(Acceptor):
    """An acceptor whose Redis write never answers, so the request is still in flight when cut off."""

    entered = 0

    async def accept(self, *args: Any, **kwargs: Any) -> list[AcceptedMessage]:
        self.entered += 1
        return await Deferred()


class AuthenticationTests(LegacyAPITestCase):
    async def test_no_key_is_access_denied(self) -> None:
        """Without X-Server-API-Key every endpoint answers AccessDenied with Postal's text, in HTTP 200."""
        for path in PATHS:
            envelope = await self.request(path)
            self.assertError(envelope, "AccessDenied", "Must be authenticated as a server.")

    async def test_blank_key_is_access_denied(self) -> None:
        """A key of only spaces counts as missing (Ruby's blank?)."""
        self.assertError(await self.request(SEND, key="   "), "AccessDenied")

    async def test_unknown_key(self) -> None:
        """An unknown key is InvalidServerAPIKey with Postal's text and the token echoed."""
        for path in PATHS:
            envelope = await self.request(path, key="invalid")
            self.assertError(
                envelope, "InvalidServerAPIKey", "The API token provided in X-Server-API-Key was not valid."
            )
            self.assertEqual(envelope["data"]["token"], "invalid")

    async def test_smtp_password_is_not_an_api_key(self) -> None:
        """An SMTP credential's password does not authenticate the HTTP API."""
        made = self.transaction(cs.create_credential, self.server.id, cs.CredentialType.SMTP, NOW)
        self.assertError(await self.request(SEND, key=made.secret), "InvalidServerAPIKey")

    async def test_suspended_server(self) -> None:
        """A suspended server's key gets ServerSuspended on every endpoint, and nothing is queued."""
        self.transaction(ss.suspend_server, self.server.id, "unpaid", NOW)
        for path in PATHS:
            self.assertError(await self.call(path, send_params()), "ServerSuspended")
        self.assertEqual(await self.queued_ids(), [])

    async def test_authentication_before_parameters(self) -> None:
        """Authentication is checked first: a bad key with a broken body is InvalidServerAPIKey."""
        envelope = await self.request(
            SEND, key="invalid", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        self.assertError(envelope, "InvalidServerAPIKey")

    async def test_warm_send_needs_no_sql(self) -> None:
        """Once the credential and domain answers are cached, a send makes no database call at all."""
        self.assertEqual((await self.call(SEND, send_params()))["status"], "success")
        calls = self.database.calls
        self.assertEqual((await self.call(SEND, send_params()))["status"], "success")
        self.assertEqual(self.database.calls, calls)
        self.assertEqual(len(await self.queued_ids()), 6)

    async def test_revoked_key_works_until_cache_expiry(self) -> None:
        """A deleted credential keeps working only until ``cache_seconds`` have passed."""
        self.assertEqual((await self.call(SEND, send_params()))["status"], "success")
        (credential,) = [
            c
            for c in self.transaction(cs.list_credentials, self.server.id)
            if c.type is cs.CredentialType.API
        ]
        self.transaction(cs.delete_credential, credential.id)
        self.clock.advance(59)
        self.assertEqual((await self.call(SEND, send_params()))["status"], "success")
        self.clock.advance(1)
        self.assertError(await self.call(SEND, send_params()), "InvalidServerAPIKey")

    async def test_suspension_takes_effect_after_cache_expiry(self) -> None:
        """Suspending a server refuses its cached key once the cache entry expires."""
        self.assertEqual((await self.call(SEND, send_params()))["status"], "success")
        self.transaction(ss.suspend_server, self.server.id, "abuse", NOW)
        self.clock.advance(60)
        self.assertError(await self.call(SEND, send_params()), "ServerSuspended")

    async def test_unknown_key_remembered_briefly(self) -> None:
        """A wrong key retried in a loop costs one database lookup per 5 seconds, not one per request."""
        await self.request(SEND, key="wrong-key-0123456789")
        calls = self.database.calls
        for _ in range(3):
            self.assertError(await self.request(SEND, key="wrong-key-0123456789"), "InvalidServerAPIKey")
        self.assertEqual(self.database.calls, calls)
        self.clock.advance(5)
        await self.request(SEND, key="wrong-key-0123456789")
        self.assertEqual(self.database.calls, calls + 1)

    async def test_new_key_works_after_unknown_window(self) -> None:
        """A key refused as unknown works once it exists and the 5-second memory has passed."""
        self.assertError(await self.call(MESSAGE, {"id": 1}, key="k" * 24), "InvalidServerAPIKey")
        self.new_key(self.server, key="k" * 24)
        self.clock.advance(5)
        self.assertError(await self.call(MESSAGE, {"id": 1}, key="k" * 24), "MessageNotFound")

    async def test_last_use_recorded_once_per_cache_period(self) -> None:
        """The credential's last use is written on first use and then at most once per cache period."""

        def last_used() -> float | None:
            api = [
                c
                for c in self.transaction(cs.list_credentials, self.server.id)
                if c.type is cs.CredentialType.API
            ]
            return api[0].last_used_at

        self.assertIsNone(last_used())
        await self.call(MESSAGE, {"id": 1})
        self.assertEqual(last_used(), NOW)
        self.clock.advance(10)
        await self.call(MESSAGE, {"id": 1})
        self.assertEqual(last_used(), NOW)
        self.clock.advance(60)
        await self.call(MESSAGE, {"id": 1})
        self.assertEqual(last_used(), NOW + 70)

    async def test_shared_lookups(self) -> None:
        """Concurrent lookups of one key share a single lookup and all get its result."""
        lookups = SharedLookups[str, int]()
        pending: Deferred[int] = Deferred()
        started = []

        async def lookup() -> int:
            started.append(1)
            return await pending

        first = Deferred.fromCoroutine(lookups.run("k", lookup))
        second = Deferred.fromCoroutine(lookups.run("k", lookup))
        other = Deferred.fromCoroutine(lookups.run("other", lambda: succeed(7)))
        self.assertEqual(self.successResultOf(other), 7)
        self.assertEqual(len(started), 1)
        pending.callback(42)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (42, 42))

    async def test_shared_lookup_failure_reaches_everyone(self) -> None:
        """When a shared lookup fails, every waiting caller gets the failure and the next call retries."""
        lookups = SharedLookups[str, int]()
        pending: Deferred[int] = Deferred()
        first = Deferred.fromCoroutine(lookups.run("k", lambda: pending))
        second = Deferred.fromCoroutine(lookups.run("k", lambda: pending))
        pending.errback(ValueError("down"))
        self.failureResultOf(first, ValueError)
        self.failureResultOf(second, ValueError)
        self.assertEqual(
            self.successResultOf(Deferred.fromCoroutine(lookups.run("k", lambda: succeed(1)))), 1
        )


class TransportTests(LegacyAPITestCase):
    """Parameters arrive as Postal's clients send them, with any of the four methods."""

    async def assertSent(self, envelope: dict[str, Any]) -> None:
        self.assertEqual(envelope["status"], "success", envelope)
        self.assertEqual(
            set(envelope["data"]["messages"]), {"test@example.com", "cc@example.com", "bcc@example.com"}
        )

    async def test_client_gone(self) -> None:
        """A client that hangs up mid-request is an info line, not a logged failure and InternalError."""
        acceptor = StalledAcceptor(self.queue, self.clock, default_pool="main", timeout=5.0)
        self.use(self.make_api(acceptor=acceptor))
        events: list[dict[str, Any]] = []
        self.api.log = Logger(observer=events.append)
        request = DummyRequest([b"api", b"v1", b"send", b"message"])
        request.method = b"POST"
        request.path = b"/api/v1/send/message"
        request.requestHeaders.setRawHeaders(b"x-server-api-key", [self.key.encode()])
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.content = BytesIO(json.dumps(send_params()).encode())
        d = Deferred.fromCoroutine(self.api.send_message_route(request))
        self.assertEqual(acceptor.entered, 1)
        d.cancel()  # what Klein does when the connection is lost
        self.failureResultOf(d, CancelledError)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])
        self.assertIn("closed the connection", events[0]["log_format"])

    async def test_json_body(self) -> None:
        """A JSON body with an application/json content type is the parameters."""
        await self.assertSent(await self.call(SEND, send_params()))

    async def test_form_field(self) -> None:
        """A form field ``params`` holding JSON is the parameters (Moonrope's convention)."""
        envelope = await self.request(SEND, key=self.key, data={"params": json.dumps(send_params())})
        await self.assertSent(envelope)

    async def test_form_fields(self) -> None:
        """Plain form fields send a message as Rails reads them: UTF-8 subject, ``to`` given once, lists
        as ``cc[]``, ``headers[X-Foo]``, ``attachments[][name]``, a "true" flag; with PUT as with POST."""
        fields = [
            ("to", "Jane <test@example.com>"),
            ("cc[]", "cc@example.com"),
            ("cc[]", "cc2@example.com"),
            ("from", "Test <test@example.test>"),
            ("subject", "Grüße aus Köln 🎉"),
            ("plain_body", "Grüße"),
            ("headers[X-Foo]", "bär"),
            ("attachments[][name]", "a.txt"),
            ("attachments[][content_type]", "text/plain"),
            ("attachments[][data]", b64("first")),
            ("attachments[][name]", "b.txt"),
            ("attachments[][data]", b64("second")),
            ("bounce", "true"),
        ]
        for method in ("POST", "PUT"):
            envelope = await self.request(SEND, method=method, key=self.key, data=fields)
            self.assertEqual(envelope["status"], "success", envelope)
            messages = envelope["data"]["messages"]
            self.assertEqual(list(messages), ["test@example.com", "cc@example.com", "cc2@example.com"])
            id = messages["test@example.com"]["id"]
            self.assertEqual((await self.queue.message_fields(id))["mail_from"], "")
            parsed = parse(await self.body_of(id))
            self.assertEqual(parsed["Subject"], "Grüße aus Köln 🎉")
            self.assertEqual(parsed["X-Foo"], "bär")
            self.assertEqual(parsed["To"].addresses[0].display_name, "Jane")
            self.assertEqual(
                [(a.get_filename(), a.get_payload(decode=True)) for a in parsed.iter_attachments()],
                [("a.txt", b"first"), ("b.txt", b"second")],
            )

    async def test_query_fields(self) -> None:
        """Plain query fields are parameters too, here ``id`` and one expansion with GET."""
        envelope = await self.request(
            MESSAGE, method="GET", key=self.key, params={"id": "99", "_expansions[]": "status"}
        )
        self.assertError(envelope, "MessageNotFound")
        self.assertEqual(envelope["data"]["id"], "99")

    async def test_form_field_not_utf8(self) -> None:
        """A form or query field whose percent-escapes are not UTF-8 is a parameter error naming it."""
        envelope = await self.request(
            SEND,
            key=self.key,
            data=b"to=test%40example.com&subject=%C3%28",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(envelope["data"], {"message": "`subject` parameter is not valid UTF-8"})
        envelope = await self.request(MESSAGE + "?id=%FF", method="GET", key=self.key)
        self.assertEqual(envelope["data"], {"message": "`id` parameter is not valid UTF-8"})

    async def test_query_string(self) -> None:
        """A query-string ``params`` holding JSON is the parameters, here with GET."""
        envelope = await self.request(
            MESSAGE, method="GET", key=self.key, params={"params": json.dumps({"id": 99})}
        )
        self.assertError(envelope, "MessageNotFound")
        self.assertEqual(envelope["data"]["id"], 99)

    async def test_all_methods(self) -> None:
        """GET, POST, PUT and PATCH all send; PUT and PATCH form bodies are read too."""
        for method in ("GET", "POST", "PUT", "PATCH"):
            await self.assertSent(await self.call(SEND, send_params(), method=method))
        for method in ("PUT", "PATCH"):
            envelope = await self.request(
                SEND, method=method, key=self.key, data={"params": json.dumps(send_params())}
            )
            await self.assertSent(envelope)

    async def test_chunked_body(self) -> None:
        """A chunked JSON body (no Content-Length) is read whole."""
        recorder = TransferEncodingRecorder(self.api.app.resource())
        agent = RequestTraversalAgent(recorder)
        text = json.dumps(send_params()).encode()
        body = ChunkedBody([text[i : i + 100] for i in range(0, len(text), 100)])
        headers = Headers({b"X-Server-API-Key": [self.key.encode()], b"Content-Type": [b"application/json"]})
        response = await settled(agent.flush, agent.request(b"POST", (BASE + SEND).encode(), headers, body))
        envelope = json.loads(await settled(agent.flush, treq.content(response)))
        self.assertEqual(recorder.seen, [[b"chunked"]])
        await self.assertSent(envelope)

    async def test_json_without_content_type(self) -> None:
        """A JSON object body sent without a JSON content type (``curl -d``) is still read."""
        envelope = await self.request(
            SEND,
            key=self.key,
            data=json.dumps(send_params()).encode(),
            headers={"Content-Type": "text/plain"},
        )
        await self.assertSent(envelope)

    async def test_invalid_json(self) -> None:
        """A body that is not JSON is a parameter error saying so."""
        envelope = await self.request(
            SEND, key=self.key, data=b"{to: nobody", headers={"Content-Type": "application/json"}
        )
        self.assertParameterError(envelope, "The request body is not valid JSON")

    async def test_json_not_an_object(self) -> None:
        """A JSON array is not a parameter set."""
        envelope = await self.request(SEND, key=self.key, json=[1, 2])
        self.assertParameterError(envelope, "The request body must be a JSON object")

    async def test_invalid_params_field(self) -> None:
        """A ``params`` field that is not JSON is a parameter error naming it."""
        envelope = await self.request(SEND, key=self.key, data={"params": "{oops"})
        self.assertParameterError(envelope, "The `params` parameter is not valid JSON")

    async def test_no_parameters(self) -> None:
        """No body and no ``params`` field means no parameters: ``id`` is missing."""
        envelope = await self.request(MESSAGE, key=self.key)
        self.assertParameterError(envelope, "`id` parameter is required but is missing")

    async def test_unknown_path_is_not_the_api(self) -> None:
        """Only Postal's four paths exist."""
        response = await settled(self.stub.flush, self.stub.post(BASE + "/api/v1/send/other"))
        self.assertEqual(response.code, 404)


class SendMessageTests(LegacyAPITestCase):
    async def test_one_message_per_recipient(self) -> None:
        """Each of To, Cc and Bcc gets its own queued message; the map gives each its id and token."""
        envelope = await self.call(SEND, send_params())
        self.assertEqual(envelope["status"], "success", envelope)
        data = envelope["data"]
        messages = data["messages"]
        self.assertEqual(list(messages), ["test@example.com", "cc@example.com", "bcc@example.com"])
        self.assertEqual(sorted(m["id"] for m in messages.values()), sorted(await self.queued_ids()))
        bodies = set()
        for rcpt, entry in messages.items():
            self.assertEqual(set(entry), {"id", "token"})
            self.assertIsInstance(entry["id"], int)
            self.assertRegex(entry["token"], r"^[A-Za-z0-9]{12}$")
            fields = await self.queue.message_fields(entry["id"])
            self.assertEqual(fields["token"], entry["token"])
            self.assertEqual(fields["rcpt_to"], rcpt)
            self.assertEqual(fields["mail_from"], "test@example.test")
            self.assertEqual(fields["server_id"], str(self.server.id))
            self.assertEqual(fields["scope"], "outgoing")
            self.assertEqual(fields["tag"], "test-tag")
            self.assertEqual(fields["message_id"], data["message_id"])
            self.assertNotIn("hold_reason", fields)
            bodies.add(fields["body"])
        self.assertEqual(len(bodies), 1)
        self.assertRegex(data["message_id"], rf"^[0-9a-f-]{{36}}@{HOSTNAME}$")

    async def test_built_message(self) -> None:
        """The message carries Postal's fields: Received ``from api``, custom fields, no Bcc, bodies."""
        envelope = await self.call(SEND, send_params())
        message_id = envelope["data"]["messages"]["test@example.com"]["id"]
        raw = await self.body_of(message_id)
        self.assertNotIn(b"bcc@example.com", raw)
        parsed = parse(raw)
        self.assertRegex(
            parsed["Received"], rf"^from api \(\[127\.0\.0\.1\]\) by {HOSTNAME} with HTTP; Tue, 14 Nov 2023"
        )
        self.assertEqual(parsed["Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertEqual(parsed["From"], "test@example.test")
        self.assertEqual(parsed["Sender"], "sender@example.test")
        self.assertEqual(parsed["To"], "test@example.com")
        self.assertEqual(parsed["Cc"], "cc@example.com")
        self.assertEqual(parsed["Reply-To"], "reply@example.com")
        self.assertEqual(parsed["Subject"], "Test")
        self.assertEqual(parsed["Message-ID"], f"<{envelope['data']['message_id']}>")
        self.assertEqual((parsed["x-test-header-1"], parsed["x-test-header-2"]), ("111", "222"))
        self.assertIsNone(parsed["Bcc"])
        self.assertEqual(text(parsed.get_body(("plain",))), "plain text\n")  # type: ignore[union-attr]
        self.assertEqual(text(parsed.get_body(("html",))), "<p>html</p>\n")  # type: ignore[union-attr]
        attachments = [
            (a.get_filename(), a.get_content_type(), a.get_content()) for a in parsed.iter_attachments()
        ]
        self.assertEqual(
            attachments,
            [("test1.txt", "text/plain", "hello world 1"), ("test2.txt", "text/plain", "hello world 2")],
        )

    async def test_large_attachments_built_in_a_thread(self) -> None:
        """A message with over 256 kB of attachments is built by ``in_thread``; small ones inline."""
        calls: list[int] = []

        async def in_thread(fn: Any) -> bytes:
            calls.append(1)
            result: bytes = await deferToThread(fn)
            return result

        self.use(self.make_api(in_thread=in_thread, max_message_size=1_000_000))
        small = await self.call(SEND, send_params())
        self.assertEqual((small["status"], calls), ("success", []))
        big = send_params()
        data = os.urandom(300 * 1024)
        big["attachments"] = [
            {"name": "big.bin", "content_type": "application/octet-stream", "data": b64(data)}
        ]
        envelope = await self.call(SEND, big)
        self.assertEqual((envelope["status"], calls), ("success", [1]), envelope)
        message_id = envelope["data"]["messages"]["test@example.com"]["id"]
        parsed = parse(await self.body_of(message_id))
        (attachment,) = list(parsed.iter_attachments())
        self.assertEqual(attachment.get_content(), data)

    async def test_nulls_and_empty_arrays(self) -> None:
        """JSON nulls and empty arrays are simply absent: only To and a plain body are needed."""
        params = {
            "to": ["test@example.com"],
            "cc": None,
            "bcc": [],
            "from": "test@example.test",
            "sender": None,
            "reply_to": None,
            "subject": None,
            "plain_body": "hi",
            "html_body": None,
            "tag": None,
            "headers": None,
            "attachments": None,
            "bounce": None,
        }
        envelope = await self.call(SEND, params)
        self.assertEqual(envelope["status"], "success", envelope)
        raw = await self.body_of(envelope["data"]["messages"]["test@example.com"]["id"])
        parsed = parse(raw)
        self.assertIsNone(parsed["Subject"])
        self.assertIsNone(parsed["Sender"])
        self.assertEqual(parsed.get_content_type(), "text/plain")

    async def test_string_address_lists(self) -> None:
        """A string of comma-separated addresses is split as Postal splits it."""
        envelope = await self.call(
            SEND, send_params(to="a@example.com,b@example.com, C <c@example.com>", cc=None, bcc=None)
        )
        self.assertEqual(
            list(envelope["data"]["messages"]), ["a@example.com", "b@example.com", "c@example.com"]
        )

    async def test_duplicate_recipient_gets_one_message(self) -> None:
        """An address in both To and Cc is sent to once."""
        envelope = await self.call(SEND, send_params(cc=["test@example.com"], bcc=None))
        self.assertEqual(list(envelope["data"]["messages"]), ["test@example.com"])
        self.assertEqual(len(await self.queued_ids()), 1)

    async def test_names_stripped_for_envelope(self) -> None:
        """``Name <address>`` recipients are queued for the address and keyed by it in the answer."""
        envelope = await self.call(
            SEND, send_params(to=['"Doe, Jane" <jane@example.com>'], cc=None, bcc=None)
        )
        (entry,) = envelope["data"]["messages"].values()
        self.assertEqual(list(envelope["data"]["messages"]), ["jane@example.com"])
        raw = await self.body_of(entry["id"])
        self.assertEqual(parse(raw)["To"].addresses[0].display_name, "Doe, Jane")

    async def test_postal_errors(self) -> None:
        """Each of Postal's send errors, with its code and its text."""
        many = [f"r{i}@example.com" for i in range(51)]
        cases = [
            ("NoRecipients", send_params(to=[], cc=[], bcc=[])),
            ("TooManyToAddresses", send_params(to=many)),
            ("TooManyCCAddresses", send_params(cc=many)),
            ("TooManyBCCAddresses", send_params(bcc=many)),
            ("NoContent", send_params(plain_body=None, html_body=None)),
            ("NoContent", send_params(plain_body="  ", html_body="\n")),
            ("FromAddressMissing", send_params(**{"from": None})),
            ("FromAddressMissing", send_params(**{"from": " "})),
            ("UnauthenticatedFromAddress", send_params(**{"from": "test@another.com"})),
            ("AttachmentMissingName", send_params(attachments=[{"name": None, "data": b64("x")}])),
            ("AttachmentMissingData", send_params(attachments=[{"name": "a.txt", "data": None}])),
            ("AttachmentMissingData", send_params(attachments=[{"name": "a.txt"}])),
        ]
        for code, params in cases:
            envelope = await self.call(SEND, params)
            self.assertError(envelope, code, SEND_ERRORS[code])
            self.assertEqual(set(envelope["data"]), {"code", "message"})
        self.assertEqual(await self.queued_ids(), [])

    async def test_fifty_recipients_allowed(self) -> None:
        """Fifty To addresses are the most Postal allows, and they are allowed."""
        envelope = await self.call(
            SEND, send_params(to=[f"r{i}@example.com" for i in range(50)], cc=[], bcc=[])
        )
        self.assertEqual(len(envelope["data"]["messages"]), 50)

    async def test_error_order(self) -> None:
        """When several checks fail, Postal's first one is reported."""
        envelope = await self.call(SEND, send_params(to=[], cc=[], bcc=[], plain_body=None, html_body=None))
        self.assertError(envelope, "NoRecipients")
        envelope = await self.call(SEND, send_params(plain_body=None, html_body=None, **{"from": None}))
        self.assertError(envelope, "NoContent")
        envelope = await self.call(
            SEND, send_params(attachments=[{"name": "a", "data": None}, {"name": None, "data": b64("x")}])
        )
        self.assertError(envelope, "AttachmentMissingData")

    async def test_non_object_attachments_ignored(self) -> None:
        """Attachment entries that are not objects are skipped, as in Postal."""
        envelope = await self.call(SEND, send_params(attachments=[123, "string"]))
        raw = await self.body_of(envelope["data"]["messages"]["test@example.com"]["id"])
        self.assertEqual(list(parse(raw).iter_attachments()), [])

    async def test_attachment_base64_forms(self) -> None:
        """Attachment data may be base64 with line breaks (Ruby's encode64), on one line, or unpadded."""
        data = bytes(range(256)) * 3
        wrapped = ruby_base64(data)
        self.assertIn("\n", wrapped)
        attachments = [
            {"name": "wrapped.bin", "content_type": "application/octet-stream", "data": wrapped},
            {"name": "flat.bin", "data": b64(data)},
            {"name": "unpadded.txt", "content_type": "text/plain", "data": b64("ab").rstrip("=")},
        ]
        envelope = await self.call(SEND, send_params(attachments=attachments))
        raw = await self.body_of(envelope["data"]["messages"]["test@example.com"]["id"])
        found = [
            (a.get_filename(), a.get_content_type(), a.get_payload(decode=True))
            for a in parse(raw).iter_attachments()
        ]
        self.assertEqual(
            found,
            [
                ("wrapped.bin", "application/octet-stream", data),
                ("flat.bin", "application/octet-stream", data),
                ("unpadded.txt", "text/plain", b"ab"),
            ],
        )

    async def test_bad_base64(self) -> None:
        """Attachment data that is not base64 is a parameter error naming the attachment."""
        envelope = await self.call(SEND, send_params(attachments=[{"name": "a.txt", "data": "not*base64!"}]))
        self.assertParameterError(envelope, "`attachments[0]` parameter: `data` is not valid base64")
        self.assertEqual(await self.queued_ids(), [])

    async def test_invalid_addresses(self) -> None:
        """An address without a domain, or with spaces, is a parameter error naming its list."""
        for name, value in (
            ("to", ["Bob"]),
            ("cc", ["a b@example.com"]),
            ("bcc", ["x@"]),
            ("from", "nobody"),
        ):
            envelope = await self.call(SEND, send_params(**{name: value}))
            self.assertParameterError(envelope, f"`{name}` parameter has an invalid address")

    async def test_wrong_types(self) -> None:
        """Parameters of the wrong JSON type are parameter errors naming the parameter."""
        cases = [
            ({"to": {"a": 1}}, "`to` parameter must be an array of strings"),
            ({"to": [1]}, "`to` parameter must be an array of strings"),
            ({"subject": ["x"]}, "`subject` parameter must be a string"),
            ({"headers": ["x"]}, "`headers` parameter must be an object"),
            ({"headers": {"X-A": {"b": 1}}}, '`headers` parameter: the value of "X-A" must be a string'),
            ({"attachments": {"name": "x"}}, "`attachments` parameter must be an array"),
            ({"tag": "t" * 256}, "`tag` parameter must be at most 255 characters"),
        ]
        for changes, message in cases:
            self.assertParameterError(await self.call(SEND, send_params(**changes)), message)

    async def test_header_injection_through_subject_and_names(self) -> None:
        """CR/LF in the subject, display names or custom values never start a new header field."""
        injected = "\r\nBcc: victim@evil.test\r\nX-Injected: yes"
        params = send_params(
            subject="Hello" + injected,
            to=[f"Jane{injected} <jane@example.com>"],
            cc=None,
            bcc=None,
            reply_to=f"Reply{injected} <reply@example.com>",
            headers={
                "X-Custom": "value" + injected,
                "X-Bare-LF": "a\nBcc: b@evil.test",
                "X-Bare-CR": "a\rBcc: c@evil.test",
            },
        )
        params["from"] = f"Sender{injected} <test@example.test>"
        envelope = await self.call(SEND, params)
        self.assertEqual(envelope["status"], "success", envelope)
        self.assertEqual(list(envelope["data"]["messages"]), ["jane@example.com"])
        raw = await self.body_of(envelope["data"]["messages"]["jane@example.com"]["id"])
        head = raw.split(b"\r\n\r\n", 1)[0]
        names = [
            line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")
        ]
        self.assertNotIn(b"bcc", names)
        self.assertNotIn(b"x-injected", names)
        self.assertEqual(names.count(b"to"), 1)
        parsed = parse(raw)
        self.assertIsNone(parsed["Bcc"])
        self.assertEqual(parsed["Subject"], "Hello  Bcc: victim@evil.test  X-Injected: yes")
        self.assertEqual([a.addr_spec for a in parsed["To"].addresses], ["jane@example.com"])
        self.assertEqual([a.addr_spec for a in parsed["From"].addresses], ["test@example.test"])

    async def test_header_injection_through_field_name(self) -> None:
        """A custom field name with CR/LF, a colon or a space is refused, naming the field."""
        for name in ("X-A\r\nBcc", "X-A: b", "X A", ""):
            envelope = await self.call(SEND, send_params(headers={name: "v"}))
            self.assertParameterError(envelope, "`headers` parameter has an invalid field name")
        self.assertEqual(await self.queued_ids(), [])

    async def test_non_ascii_everywhere(self) -> None:
        """Non-ASCII in every field comes out 7-bit on the wire and decodes back to what was sent."""
        subject = "Grüße aus Köln 🎉 " * 8
        params = send_params(
            to=["Jürgen Groß <juergen@example.com>"],
            cc=["Zoë <zoe@bücher.example>"],
            bcc=None,
            subject=subject,
            reply_to="Ræply Ünit <reply@example.com>",
            plain_body="Schöne Grüße 😀\nZweite Zeile",
            html_body="<p>Schöne Grüße 😀</p>",
            headers={"X-Note": "Ça va? ✓"},
            attachments=[
                {"name": "résumé 📄.txt", "content_type": "text/plain", "data": b64("daté".encode())}
            ],
            tag="étiquette",
        )
        params["from"] = "Émile Zola <test@example.test>"
        envelope = await self.call(SEND, params)
        self.assertEqual(envelope["status"], "success", envelope)
        self.assertEqual(list(envelope["data"]["messages"]), ["juergen@example.com", "zoe@bücher.example"])
        (first, second) = envelope["data"]["messages"].values()
        raw = await self.body_of(first["id"])
        raw.decode("ascii")  # nothing 8-bit on the wire
        self.assertTrue(all(len(line) <= 78 for line in raw.split(b"\r\n")))
        parsed = parse(raw)
        self.assertEqual(parsed["Subject"], subject.strip())
        self.assertEqual(parsed["From"].addresses[0].display_name, "Émile Zola")
        self.assertEqual(parsed["To"].addresses[0].display_name, "Jürgen Groß")
        self.assertEqual(parsed["Cc"].addresses[0].domain, "xn--bcher-kva.example")
        self.assertEqual(parsed["Reply-To"].addresses[0].display_name, "Ræply Ünit")
        self.assertEqual(parsed["X-Note"], "Ça va? ✓")
        self.assertEqual(text(parsed.get_body(("plain",))), "Schöne Grüße 😀\nZweite Zeile\n")  # type: ignore[union-attr]
        self.assertEqual(text(parsed.get_body(("html",))), "<p>Schöne Grüße 😀</p>\n")  # type: ignore[union-attr]
        (attachment,) = parsed.iter_attachments()
        self.assertEqual(attachment.get_filename(), "résumé 📄.txt")
        self.assertEqual(attachment.get_payload(decode=True), "daté".encode())
        self.assertEqual((await self.queue.message_fields(second["id"]))["tag"], "étiquette")

    async def test_lone_surrogates(self) -> None:
        """JSON may carry lone UTF-16 surrogates; they become U+FFFD instead of breaking the build."""
        text = (
            '{"to": ["a@example.com"], "from": "test@example.test", '
            '"subject": "x\\ud800y", "plain_body": "p\\udc00"}'
        )
        envelope = await self.request(
            SEND, key=self.key, data=text.encode(), headers={"Content-Type": "application/json"}
        )
        self.assertEqual(envelope["status"], "success", envelope)
        raw = await self.body_of(envelope["data"]["messages"]["a@example.com"]["id"])
        self.assertEqual(parse(raw)["Subject"], "x\ufffdy")

    async def test_sender_domain_only_when_allowed(self) -> None:
        """A From on a foreign domain is authenticated by Sender only where the server allows Sender."""
        params = send_params(sender="sender@example.test", **{"from": "someone@foreign.test"})
        self.assertError(await self.call(SEND, params), "UnauthenticatedFromAddress")
        self.use(self.make_api(sender_allowed=lambda server: server.id == self.server.id))
        self.assertEqual((await self.call(SEND, params))["status"], "success")

    async def test_domain_check_cached(self) -> None:
        """The sending-domain answer is cached per server and domain for ``cache_seconds``."""
        await self.call(SEND, send_params())
        await self.call(SEND, send_params())
        self.assertEqual(self.domain_checks, [(self.server.id, "example.test")])
        self.sending_domains.clear()
        self.clock.advance(60)
        self.assertError(await self.call(SEND, send_params()), "UnauthenticatedFromAddress")
        self.assertEqual(len(self.domain_checks), 2)

    async def test_domain_compared_case_insensitively(self) -> None:
        """The From domain is checked in lower case (RFC 5321 §2.4)."""
        envelope = await self.call(SEND, send_params(**{"from": "Test <Test@Example.TEST>"}))
        self.assertEqual(envelope["status"], "success", envelope)

    async def test_domain_check_failure_is_temporary(self) -> None:
        """A domain check that fails is a TemporaryFailure, not an authentication refusal."""

        async def broken(server: Server, domain: str) -> bool:
            raise RuntimeError("database gone")

        self.use(self.make_api(sending_domain_check=broken))
        self.assertError(await self.call(SEND, send_params()), "TemporaryFailure")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_held_credential(self) -> None:
        """Messages sent with a credential on hold are queued held, with Postal's reason."""
        key = self.new_key(self.server, hold=True)
        envelope = await self.call(SEND, send_params(), key=key)
        for entry in envelope["data"]["messages"].values():
            fields = await self.queue.message_fields(entry["id"])
            self.assertEqual(fields["hold_reason"], HoldReason.CREDENTIAL.value)

    async def test_bounce_uses_null_reverse_path(self) -> None:
        """``bounce: true`` queues the message with the null reverse-path ``<>`` (RFC 5321 §4.5.5), and
        its ``message.queued`` event says it is a bounce, for Postal's ``bounce`` column."""
        envelope = await self.call(SEND, send_params(bounce=True, cc=None, bcc=None))
        (entry,) = envelope["data"]["messages"].values()
        self.assertEqual((await self.queue.message_fields(entry["id"]))["mail_from"], "")
        await self.call(SEND, send_params(cc=None, bcc=None))
        raw = await self.redis.execute("XRANGE", self.keys.events, "-", "+")
        queued = [decode_entry(e).event for e in (parse_entry(r) for r in raw) if e is not None]
        self.assertEqual(
            [(q.id, q.bounce) for q in queued if isinstance(q, MessageQueued)],
            [(entry["id"], True), (entry["id"] + 1, False)],
        )

    async def test_tag_defaults_to_header(self) -> None:
        """Without ``tag``, the X-Postal-Tag custom field gives the tag, as in Postal."""
        envelope = await self.call(
            SEND, send_params(tag=None, cc=None, bcc=None, headers={"X-Postal-Tag": "hdr"})
        )
        (entry,) = envelope["data"]["messages"].values()
        self.assertEqual((await self.queue.message_fields(entry["id"]))["tag"], "hdr")

    async def test_message_too_large(self) -> None:
        """A message over the maximum size is refused with MessageTooLarge and nothing is queued."""
        big = b64(b"x" * MAX_MESSAGE_SIZE)
        envelope = await self.call(SEND, send_params(attachments=[{"name": "big.bin", "data": big}]))
        self.assertError(envelope, "MessageTooLarge")
        self.assertIn(f"the largest accepted is {MAX_MESSAGE_SIZE} bytes", envelope["data"]["message"])
        self.assertEqual(await self.queued_ids(), [])

    async def test_request_too_large(self) -> None:
        """A request body far over the maximum message size is refused before it is parsed."""
        body = b" " * (2 * MAX_MESSAGE_SIZE + 1024 * 1024 + 1)
        envelope = await self.request(
            SEND, key=self.key, data=body, headers={"Content-Type": "application/json"}
        )
        self.assertError(envelope, "MessageTooLarge")
        self.assertIn("The request body is", envelope["data"]["message"])

    async def test_redis_unavailable(self) -> None:
        """With Redis gone the answer is QueueUnavailable, never success."""
        client = await connect()
        await client.disconnect()
        queue = RedisQueue(client, self.keys)
        self.use(self.make_api(acceptor=Acceptor(queue, self.clock, timeout=5.0)))
        envelope = await self.call(SEND, send_params())
        self.assertError(envelope, "QueueUnavailable")
        self.assertIn("try again later", envelope["data"]["message"])

    async def test_redis_out_of_memory(self) -> None:
        """When Redis refuses writes for lack of memory the answer is QueueFull and nothing is queued."""
        await self.call(MESSAGE, {"id": 1})  # fill the caches first
        old = await self.redis.execute("CONFIG", "GET", "maxmemory")
        self.addCleanup(lambda: self.redis.execute("CONFIG", "SET", "maxmemory", old[1]))
        await self.redis.execute("CONFIG", "SET", "maxmemory", "1")
        envelope = await self.call(SEND, send_params())
        await self.redis.execute("CONFIG", "SET", "maxmemory", old[1])
        self.assertError(envelope, "QueueFull")
        self.assertEqual(await self.queued_ids(), [])

    async def test_unexpected_error(self) -> None:
        """A bug in the accept path is an InternalError envelope in HTTP 200, and is logged."""
        self.use(self.make_api(acceptor=FailingAcceptor(self.queue, self.clock)))
        self.assertError(await self.call(SEND, send_params()), "InternalError")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SendRawTests(LegacyAPITestCase):
    async def test_raw_message_queued_unchanged(self) -> None:
        """send/raw queues the decoded message as given, once per recipient, with its Message-ID."""
        envelope = await self.call(RAW, raw_params())
        self.assertEqual(envelope["status"], "success", envelope)
        data = envelope["data"]
        self.assertEqual(data["message_id"], "raw.1@example.test")
        self.assertEqual(list(data["messages"]), ["test1@example.com", "test2@example.com"])
        for rcpt, entry in data["messages"].items():
            fields = await self.queue.message_fields(entry["id"])
            self.assertEqual(
                (fields["rcpt_to"], fields["mail_from"], fields["token"]),
                (rcpt, "test@example.test", entry["token"]),
            )
            self.assertEqual(fields["tag"], "raw-tag")
            self.assertEqual(await self.body_of(entry["id"]), RAW_MESSAGE)

    async def test_date_and_message_id_added(self) -> None:
        """A raw message without Date and Message-ID is queued with both (the Date the accept time, the
        Message-ID on the installation's hostname); send/raw answers and messages/message report the added
        Message-ID."""
        self.use(self.make_api(acceptor=Acceptor(self.queue, self.clock, hostname=HOSTNAME)))
        bare = b"From: test@example.test\r\nTo: a@example.com\r\nSubject: bare\r\n\r\nHello\r\n"
        envelope = await self.call(RAW, raw_params(rcpt_to=["a@example.com"], data=b64(bare)))
        self.assertEqual(envelope["status"], "success", envelope)
        id = envelope["data"]["messages"]["a@example.com"]["id"]
        head, body = (await self.body_of(id)).split(b"\r\n\r\n", 1)
        self.assertEqual(body, b"Hello\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[:4], [*bare.split(b"\r\n")[:3], b"Date: Tue, 14 Nov 2023 22:13:20 +0000"])
        self.assertRegex(lines[4], rb"^Message-ID: <[0-9a-f-]{36}@mx\.mtad\.test>$")
        details = (await self.call(MESSAGE, {"id": id, "_expansions": ["details"]}))["data"]["details"]
        self.assertEqual(f"Message-ID: <{details['message_id']}>".encode(), lines[4])
        self.assertEqual(f"Message-ID: <{envelope['data']['message_id']}>".encode(), lines[4])

    async def test_params_field(self) -> None:
        """send/raw takes its parameters from a ``params`` form field too (Postal's spec)."""
        envelope = await self.request(RAW, key=self.key, data={"params": json.dumps(raw_params())})
        self.assertEqual(list(envelope["data"]["messages"]), ["test1@example.com", "test2@example.com"])

    async def test_missing_parameters(self) -> None:
        """rcpt_to (an array or a string), mail_from and data are required, with Postal's texts, in that
        order."""
        cases = [
            ({"rcpt_to": None}, "rcpt_to"),
            ({"rcpt_to": {"to": "test1@example.com"}}, "rcpt_to"),
            ({"mail_from": ""}, "mail_from"),
            ({"mail_from": None, "data": None}, "mail_from"),
            ({"data": None}, "data"),
            ({"data": "  "}, "data"),
        ]
        for changes, name in cases:
            envelope = await self.call(RAW, raw_params(**changes))
            self.assertEqual(envelope["data"]["message"], f"`{name}` parameter is required but is missing")
            self.assertEqual(envelope["status"], "parameter-error")

    async def test_rcpt_to_string(self) -> None:
        """A string rcpt_to is its comma-separated addresses (Postal wants an array and calls a string
        missing; a form field given once is a string)."""
        envelope = await self.call(RAW, raw_params(rcpt_to="a@example.com, b@example.com"))
        self.assertEqual(list(envelope["data"]["messages"]), ["a@example.com", "b@example.com"])

    async def test_no_recipients(self) -> None:
        """An empty rcpt_to is success with no messages and a null message_id (Postal's answer)."""
        envelope = await self.call(RAW, raw_params(rcpt_to=[]))
        self.assertEqual(envelope["status"], "success")
        self.assertEqual(envelope["data"], {"message_id": None, "messages": {}})
        self.assertEqual(await self.queued_ids(), [])

    async def test_unauthenticated_from(self) -> None:
        """The From field must be on a sending domain of the server; a missing From never is."""
        foreign = RAW_MESSAGE.replace(b"test@example.test", b"test@another.com")
        self.assertError(await self.call(RAW, raw_params(data=b64(foreign))), "UnauthenticatedFromAddress")
        no_from = b"To: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
        self.assertError(await self.call(RAW, raw_params(data=b64(no_from))), "UnauthenticatedFromAddress")
        two = b"From: a@example.test, b@another.com\r\n\r\nbody\r\n"
        self.assertError(await self.call(RAW, raw_params(data=b64(two))), "UnauthenticatedFromAddress")
        self.assertEqual(await self.queued_ids(), [])

    async def test_sender_field_when_allowed(self) -> None:
        """Where the server allows it, an authenticated Sender field stands in for From."""
        message = b"From: a@another.com\r\nSender: s@example.test\r\n\r\nbody\r\n"
        self.assertError(await self.call(RAW, raw_params(data=b64(message))), "UnauthenticatedFromAddress")
        self.use(self.make_api(sender_allowed=lambda server: True))
        self.assertEqual((await self.call(RAW, raw_params(data=b64(message))))["status"], "success")

    async def test_bad_base64(self) -> None:
        """``data`` that is not base64 is a parameter error."""
        envelope = await self.call(RAW, raw_params(data="%%%"))
        self.assertParameterError(envelope, "`data` parameter is not valid base64")

    async def test_invalid_envelope_addresses(self) -> None:
        """Envelope addresses are checked and named."""
        self.assertParameterError(
            await self.call(RAW, raw_params(rcpt_to=["nobody"])), "`rcpt_to` parameter has an invalid address"
        )
        self.assertParameterError(
            await self.call(RAW, raw_params(mail_from="a b@c")),
            "`mail_from` parameter has an invalid address",
        )

    async def test_duplicates_and_size(self) -> None:
        """A repeated rcpt_to gets one message; a message over the maximum size is refused."""
        envelope = await self.call(RAW, raw_params(rcpt_to=["a@example.com", "a@example.com"]))
        self.assertEqual(list(envelope["data"]["messages"]), ["a@example.com"])
        big = RAW_MESSAGE + b"x" * MAX_MESSAGE_SIZE
        self.assertError(await self.call(RAW, raw_params(data=b64(big))), "MessageTooLarge")


class MessagesTests(LegacyAPITestCase):
    def record(self, id: int, server: Server | None = None, **changes: Any) -> Message:
        values: dict[str, Any] = {
            "id": id,
            "token": f"token{id}",
            "server_id": (server or self.server).id,
            "scope": Scope.OUTGOING,
            "rcpt_to": "john@example.com",
            "mail_from": "test@example.test",
            "subject": "An example message",
            "message_id": f"m{id}@example.test",
            "size": 1234,
            "status": MessageStatus.PENDING,
            "held": False,
            "hold_expiry": None,
            "last_delivery_attempt": None,
            "tag": None,
            "timestamp": NOW,
        }
        values.update(changes)
        message = Message(**values)
        self.transaction(record_messages, [message], NOW)
        return message

    async def sent(self, **changes: Any) -> dict[str, Any]:
        envelope = await self.call(SEND, send_params(cc=None, bcc=None, **changes))
        entry: dict[str, Any] = envelope["data"]["messages"]["test@example.com"]
        return entry

    async def test_id_required(self) -> None:
        """Both endpoints need ``id``: Postal's parameter error when it is missing or blank."""
        for path in (MESSAGE, DELIVERIES):
            for params in ({}, {"id": None}, {"id": ""}):
                envelope = await self.call(path, params)
                self.assertParameterError(envelope, "`id` parameter is required but is missing")

    async def test_not_found(self) -> None:
        """An unknown id is MessageNotFound with Postal's text and the id as given."""
        for path in (MESSAGE, DELIVERIES):
            for given in (123, "123", "abc", 1.5):
                envelope = await self.call(path, {"id": given})
                self.assertError(envelope, "MessageNotFound", "No message found matching provided ID")
                self.assertEqual(envelope["data"]["id"], given)

    async def test_other_servers_message_not_found(self) -> None:
        """A message of another server is not found, whether recorded or still queued."""
        self.record(5, server=self.other_server)
        self.assertError(await self.call(MESSAGE, {"id": 5}), "MessageNotFound")
        self.assertError(await self.call(DELIVERIES, {"id": 5}), "MessageNotFound")
        entry = await self.sent()
        self.assertError(await self.call(MESSAGE, {"id": entry["id"]}, key=self.other_key), "MessageNotFound")
        self.assertError(
            await self.call(DELIVERIES, {"id": entry["id"]}, key=self.other_key), "MessageNotFound"
        )

    def record_delivery_first(
        self,
        message_id: int,
        token: str,
        mail_from: str,
        rcpt_to: str,
        status: MessageStatus,
        output: str,
        details: str,
    ) -> None:
        """Record one delivery attempt (at NOW + 5) of this server's message before the message itself,
        as a recorder that commits first does: the row it leaves is a stand-in."""
        attempt = DeliveryAttempt(
            event_id="e1",
            message_id=message_id,
            attempt=1,
            status=status,
            output=output,
            details=details,
            sent_with_ssl=False,
            timestamp=NOW + 5,
            server_id=self.server.id,
            token=token,
            scope=Scope.OUTGOING,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
        )
        self.transaction(record_delivery, attempt, NOW)

    async def test_delivery_recorded_before_message(self) -> None:
        """A message whose delivery is recorded but not the message (its queued event is late, or lost) is
        found by its server alone, with the delivery's status, the envelope it names and its attempt."""
        self.record_delivery_first(
            8, "token8", "test@example.test", "john@example.com", MessageStatus.SENT, "250 OK", "sent"
        )
        envelope = await self.call(MESSAGE, {"id": 8, "_expansions": ["status", "details"]})
        self.assertEqual(envelope["status"], "success")
        data = envelope["data"]
        self.assertEqual((data["token"], data["status"]["status"]), ("token8", "Sent"))
        self.assertEqual(
            (data["details"]["rcpt_to"], data["details"]["subject"], data["details"]["size"]),
            ("john@example.com", None, "0"),
        )
        [delivery] = (await self.call(DELIVERIES, {"id": 8}))["data"]
        self.assertEqual((delivery["status"], delivery["details"]), ("Sent", "sent"))
        self.assertError(await self.call(MESSAGE, {"id": 8}, key=self.other_key), "MessageNotFound")
        self.assertError(await self.call(DELIVERIES, {"id": 8}, key=self.other_key), "MessageNotFound")
        # Once recorded, the message has its own details and keeps the delivery's status.
        self.record(8)
        data = (await self.call(MESSAGE, {"id": 8, "_expansions": ["status", "details"]}))["data"]
        self.assertEqual(
            (data["status"]["status"], data["details"]["subject"], data["details"]["size"]),
            ("Sent", "An example message", "1234"),
        )

    async def test_no_expansions(self) -> None:
        """Without expansions the answer is just id and token."""
        self.record(7)
        envelope = await self.call(MESSAGE, {"id": 7})
        self.assertEqual(envelope["status"], "success")
        self.assertEqual(envelope["data"], {"id": 7, "token": "token7"})

    async def test_string_id(self) -> None:
        """An id sent as a string of digits finds the message (Postal answers HTTP 500)."""
        self.record(7)
        self.assertEqual((await self.call(MESSAGE, {"id": "7"}))["data"], {"id": 7, "token": "token7"})
        self.assertEqual((await self.call(DELIVERIES, {"id": " 7 "}))["data"], [])

    async def test_recorded_message_expansions(self) -> None:
        """Status, details, inspection and activity of a recorded message in Postal's shapes."""
        self.record(
            7,
            status=MessageStatus.HELD,
            held=True,
            hold_expiry=NOW + 600,
            last_delivery_attempt=NOW + 1,
            tag="t",
        )
        envelope = await self.call(
            MESSAGE, {"id": 7, "_expansions": ["status", "details", "inspection", "activity_entries"]}
        )
        self.assertEqual(
            envelope["data"],
            {
                "id": 7,
                "token": "token7",
                "status": {
                    "status": "Held",
                    "last_delivery_attempt": NOW + 1,
                    "held": True,
                    "hold_expiry": NOW + 600,
                },
                "details": {
                    "rcpt_to": "john@example.com",
                    "mail_from": "test@example.test",
                    "subject": "An example message",
                    "message_id": "m7@example.test",
                    "timestamp": NOW,
                    "direction": "outgoing",
                    "size": "1234",
                    "bounce": False,
                    "bounce_for_id": 0,
                    "tag": "t",
                    "received_with_ssl": False,
                },
                "inspection": {
                    "inspected": False,
                    "spam": False,
                    "spam_score": 0.0,
                    "threat": False,
                    "threat_details": None,
                },
                "activity_entries": {"loads": [], "clicks": []},
            },
        )

    async def test_all_expansions_of_a_queued_message(self) -> None:
        """``_expansions: true`` on a message still queued gives bodies, attachments, headers and raw."""
        entry = await self.sent()
        self.record(entry["id"], token=entry["token"])
        raw = await self.body_of(entry["id"])
        envelope = await self.call(MESSAGE, {"id": entry["id"], "_expansions": True})
        data = envelope["data"]
        self.assertEqual(
            set(data),
            {
                "id",
                "token",
                "status",
                "details",
                "inspection",
                "plain_body",
                "html_body",
                "attachments",
                "headers",
                "raw_message",
                "activity_entries",
            },
        )
        self.assertEqual(data["token"], entry["token"])
        self.assertEqual(data["plain_body"], "plain text\n")
        self.assertEqual(data["html_body"], "<p>html</p>\n")
        self.assertEqual(
            data["attachments"],
            [
                {
                    "filename": f"test{i}.txt",
                    "content_type": "text/plain",
                    "data": ruby_base64(f"hello world {i}".encode()),
                    "size": 13,
                    "hash": hashlib.sha1(f"hello world {i}".encode()).hexdigest(),
                }
                for i in (1, 2)
            ],
        )
        self.assertEqual(data["headers"]["x-test-header-1"], ["111"])
        self.assertEqual(data["headers"]["to"], ["test@example.com"])
        self.assertEqual(data["headers"]["sender"], ["sender@example.test"])
        self.assertTrue(data["headers"]["received"][0].startswith("from api"))
        self.assertEqual(data["raw_message"], ruby_base64(raw))

    async def test_queued_not_yet_recorded(self) -> None:
        """A message accepted but not yet recorded in SQL is found in the queue, Pending."""
        entry = await self.sent()
        envelope = await self.call(MESSAGE, {"id": entry["id"], "_expansions": ["status", "details"]})
        data = envelope["data"]
        self.assertEqual(
            data["status"],
            {"status": "Pending", "last_delivery_attempt": None, "held": False, "hold_expiry": None},
        )
        self.assertEqual(data["details"]["rcpt_to"], "test@example.com")
        self.assertEqual(data["details"]["subject"], "Test")
        self.assertEqual(data["details"]["timestamp"], NOW)
        self.assertEqual(data["details"]["tag"], "test-tag")
        self.assertEqual(data["details"]["size"], str(len(await self.body_of(entry["id"]))))
        self.assertEqual((await self.call(DELIVERIES, {"id": entry["id"]}))["data"], [])

    async def test_stand_in_completed_from_the_queue(self) -> None:
        """A message still queued (here: to be retried) whose delivery was recorded before the message
        itself: its details come from the queue, its status from the recorded attempt."""
        entry = await self.sent()
        self.record_delivery_first(
            entry["id"],
            entry["token"],
            "sender@example.test",
            "test@example.com",
            MessageStatus.SOFT_FAIL,
            "451 try later",
            "retrying",
        )
        data = (await self.call(MESSAGE, {"id": entry["id"], "_expansions": ["status", "details"]}))["data"]
        self.assertEqual(
            (data["status"]["status"], data["status"]["last_delivery_attempt"]), ("SoftFail", NOW + 5)
        )
        self.assertEqual(
            (data["details"]["subject"], data["details"]["tag"], data["details"]["size"]),
            ("Test", "test-tag", str(len(await self.body_of(entry["id"])))),
        )

    async def test_raw_expansions_without_raw_message(self) -> None:
        """A recorded message out of the queue without a raw message (deleted under retention, or recorded
        before raw messages were kept) gets Postal's expansions for a purged raw message."""
        self.record(7)
        wanted = ["plain_body", "html_body", "attachments", "headers", "raw_message"]
        envelope = await self.call(MESSAGE, {"id": 7, "_expansions": wanted})
        self.assertEqual(
            envelope["data"],
            {
                "id": 7,
                "token": "token7",
                "plain_body": None,
                "html_body": None,
                "attachments": [],
                "headers": {},
                "raw_message": "DQoNCg==\n",
            },
        )

    async def test_unknown_expansions_ignored(self) -> None:
        """Unknown expansion names and values other than true, a name or a list ask for nothing more."""
        self.record(7)
        for expansions in (["nope"], "nope", "false", 0, False, None, {"a": "status"}):
            self.assertEqual(
                (await self.call(MESSAGE, {"id": 7, "_expansions": expansions}))["data"],
                {"id": 7, "token": "token7"},
            )

    async def test_deliveries(self) -> None:
        """Delivery attempts in order, in Postal's shape, output stripped."""
        self.record(7)
        for i, (status, details, output, ssl, log_id, time) in enumerate(
            [
                (MessageStatus.SOFT_FAIL, "no server found", "404\n", True, "1234", 1.2),
                (MessageStatus.SENT, "sent successfully", " 200 ", False, "5678", 2.2),
            ]
        ):
            attempt = DeliveryAttempt(
                event_id=f"e{i}",
                message_id=7,
                attempt=i + 1,
                status=status,
                output=output,
                details=details,
                sent_with_ssl=ssl,
                timestamp=NOW + i,
                log_id=log_id,
                time=time,
            )
            self.transaction(record_delivery, attempt, NOW)
        envelope = await self.call(DELIVERIES, {"id": 7})
        self.assertEqual(envelope["status"], "success")
        for delivery in envelope["data"]:
            self.assertIsInstance(delivery.pop("id"), int)
        self.assertEqual(
            envelope["data"],
            [
                {
                    "status": "SoftFail",
                    "details": "no server found",
                    "output": "404",
                    "sent_with_ssl": True,
                    "log_id": "1234",
                    "time": 1.2,
                    "timestamp": NOW,
                },
                {
                    "status": "Sent",
                    "details": "sent successfully",
                    "output": "200",
                    "sent_with_ssl": False,
                    "log_id": "5678",
                    "time": 2.2,
                    "timestamp": NOW + 1,
                },
            ],
        )

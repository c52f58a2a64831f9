"""`WebhookSender`: one signed POST to a webhook URL, with Postal's timeout, status codes and no redirects.

Postal's ``Postal::HTTP.post(url, sign: true, json: payload, timeout: 5)`` (``lib/postal/http.rb``) is the
model. A POST carries the three signature headers (`mtad.webhooks.signing`), ``Content-Type:
application/json`` and a ``User-Agent``; credentials in the URL (``https://user:secret@host/``, the way
django-anymail's ``WEBHOOK_SECRET`` is given) become Basic authentication. The outcome is 2xx or a failure;
a failure before any HTTP status has Postal's pseudo status codes and wording, which Postal's UI and the
request log show:

* ``-1`` "Timed out after 5s": no complete answer within the timeout (connecting included);
* ``-2`` the error's text: DNS failure, connection refused, reset, unreachable, closed without an answer;
* ``-3`` "Invalid SSL certificate": any TLS failure (Postal verifies with ``VERIFY_PEER``);
* ``-4`` "Destination '…' (…) is not permitted: …": the SSRF guard (`mtad.webhooks.guard`, Postal 3.3.7).

Redirects are not followed (a 3xx is a failure, as in Postal): following one would let a receiver send a
signed body on to a place its owner chose, and send our request past the guard's judgement of the URL.

Two limits keep one receiver from hurting the others. A per-receiver cap (scheme, host and port) on
requests in flight: the rest wait in that receiver's queue while every other receiver's requests go ahead,
so a slow receiver costs its own webhooks latency, not everyone's. And a cap on the response excerpt kept
for the request log (1 KiB): reading stops there and the connection is closed, so a receiver answering
with a large body costs no memory. Connections are not kept alive: a POST is not idempotent, so a request on
a pooled connection the receiver has just closed would fail with nothing to tell whether it arrived.
"""

from __future__ import annotations

import codecs
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http.cookiejar import DefaultCookiePolicy
from typing import Protocol

import attrs
from OpenSSL import SSL
from service_identity.exceptions import CertificateError, VerificationError
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IConsumer, IHostnameResolver, IReactorTCP, IReactorTime, ITransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, RequestTransmissionFailed, ResponseFailed
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from mtad import __version__
from mtad.webhooks.guard import DestinationRefused, GuardedEndpointFactory, IPNetwork

#: Postal's pseudo status codes for attempts that got no HTTP status.
TIMED_OUT = -1
CONNECTION_FAILED = -2
INVALID_CERTIFICATE = -3
DESTINATION_REFUSED = -4

USER_AGENT = f"mtad/{__version__}"


class BodySigner(Protocol):
    """What the sender needs of `mtad.webhooks.signing.WebhookSigner`."""

    def sign(self, body: bytes) -> dict[str, str]: ...


class NotStarted(Exception):
    """A POST given a ``start_by`` got its receiver's slot too late, and was not sent at all."""


#: Runs a function in a worker thread: ``in_thread(fn)`` fires with ``fn()``'s result.
InThread = Callable[[Callable[[], dict[str, str]]], Awaitable[dict[str, str]]]


@attrs.frozen
class SendResult:
    """The outcome of one POST, as the request log records it."""

    #: The HTTP status, or one of Postal's pseudo codes (`TIMED_OUT`, ...) when there was none.
    status_code: int
    #: The start of the response body (at most `SenderSettings.excerpt_bytes`), or the failure's text.
    body_excerpt: str
    #: Seconds from the first byte of the attempt to its outcome (waiting for a slot not included).
    duration: float
    #: What went wrong, for failures that are not an HTTP status.
    error: str | None = None

    @property
    def ok(self) -> bool:
        """2xx is delivered (Postal: ``code >= 200 && code < 300``); everything else is retried."""
        return 200 <= self.status_code < 300


@attrs.frozen
class SenderSettings:
    #: Seconds for the whole attempt, connecting and reading the answer included (Postal: 5).
    timeout: float = 5.0
    #: Requests in flight to one receiver (scheme, host, port); the rest wait their turn.
    per_url_concurrency: int = 4
    #: Response bytes kept for the request log; reading stops there.
    excerpt_bytes: int = 1024


def guarded_agent(
    reactor: IReactorTCP,
    resolver: IHostnameResolver,
    allowed_networks: Sequence[IPNetwork] = (),
    tls_policy: IPolicyForHTTPS | None = None,
) -> IAgent:
    """The Agent webhooks go through: every connection judged by the SSRF guard, none kept alive.

    ``reactor`` must also provide ``IReactorTime`` (the connection pool asks for it); in the daemon it is the
    reactor, and ``resolver`` its ``nameResolver``.
    """
    factory: IAgentEndpointFactory = GuardedEndpointFactory(
        reactor, resolver, allowed_networks, tls_policy=tls_policy
    )
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    agent: IAgent = Agent.usingEndpointFactory(reactor, factory, pool=pool)  # type: ignore[no-untyped-call]
    return agent


@implementer(IBodyProducer)
class _BytesProducer:
    """A body already in memory, written in one go (treq's default wraps bytes in a `FileBodyProducer`,
    whose cooperator runs on the global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Excerpt(TwistedProtocol):
    """Keeps the first ``limit`` bytes of a response body, then stops reading (closing the connection)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        transport: ITransport | None = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._data += data[: self._limit - len(self._data)]
        if len(self._data) >= self._limit:
            self.done.callback(bytes(self._data))
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The status line decided the outcome; a body cut short only shortens the excerpt.
        if not self.done.called:
            self.done.callback(bytes(self._data))


def _decode_excerpt(data: bytes) -> str:
    """UTF-8 text of an excerpt, a character cut in half at its end dropped, bad bytes replaced."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)


@attrs.frozen
class _Target:
    """A webhook URL taken apart: what to request, with which credentials, and which receiver it is."""

    url: str
    auth: tuple[str, str] | None
    receiver: tuple[str, str, int]

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{url!r} is not an http or https URL")
        host = parts.hostname
        if not host:
            raise ValueError(f"{url!r} has no host")
        port = parts.port or (443 if scheme == "https" else 80)  # ValueError for a bad port
        netloc = parts.netloc.rpartition("@")[2]
        auth = None
        if parts.username is not None:
            auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        bare = urllib.parse.urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        return cls(bare, auth, (scheme, host.lower(), port))


def _causes(exception: BaseException) -> list[BaseException]:
    """The exception and, for the Agent's wrappers (`ResponseFailed` and kin), the failures inside."""
    if isinstance(exception, ResponseFailed | RequestTransmissionFailed):
        return [exception] + [cause for reason in exception.reasons for cause in _causes(reason.value)]
    return [exception]


#: Failures that are the network's or the receiver's doing (-2), as opposed to a bug of ours.
_NETWORK_ERRORS = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionClosed,
    ResponseFailed,
    RequestTransmissionFailed,
    OSError,
)


def _failure_outcome(
    exception: BaseException, time_limit: float, timed_out: bool
) -> tuple[int, str, str] | None:
    """(pseudo status code, body text as Postal logs it, error detail) for an attempt that got no status;
    ``None`` for a failure that is no network's doing (a bug: logged, and reported as -2)."""
    causes = _causes(exception)
    if timed_out or any(isinstance(c, error.TimeoutError) for c in causes):
        text = f"Timed out after {time_limit:g}s"
        return TIMED_OUT, text, text
    for cause in causes:
        if isinstance(cause, DestinationRefused):
            return DESTINATION_REFUSED, str(cause), str(cause)
    for cause in causes:
        # OpenSSL's handshake errors, and service_identity's when the certificate is not for the host.
        if isinstance(cause, SSL.Error | VerificationError | CertificateError):
            return INVALID_CERTIFICATE, "Invalid SSL certificate", f"TLS failed: {cause}"
    detail = str(causes[-1]) or type(causes[-1]).__name__
    if not any(isinstance(c, _NETWORK_ERRORS) for c in causes):
        return None
    return CONNECTION_FAILED, detail, detail


class WebhookSender:
    """POSTs signed bodies to webhook URLs (and HTTP endpoints), one `SendResult` per attempt."""

    log = Logger()

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        signer: BodySigner,
        settings: SenderSettings = SenderSettings(),
        in_thread: InThread | None = None,
    ) -> None:
        """``agent`` is `guarded_agent` in the daemon. ``in_thread`` signs off the reactor thread: the two
        RSA signatures of a POST take about 1.5 ms (`mtad.webhooks.signing`); without it they run inline."""
        if settings.per_url_concurrency < 1:
            raise ValueError("per_url_concurrency must be at least 1")
        self._clock = clock
        self._signer = signer
        self._settings = settings
        self._in_thread = in_thread
        # Cookies a receiver sets are neither kept nor sent to anyone.
        jar = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._http = HTTPClient(agent, cookiejar=jar, data_to_body_producer=_BytesProducer)
        self._slots: dict[tuple[str, str, int], DeferredSemaphore] = {}

    @property
    def timeout(self) -> float:
        """Seconds an attempt may take once it has its receiver's slot (`SenderSettings.timeout`)."""
        return self._settings.timeout

    @property
    def per_receiver(self) -> int:
        """Requests one receiver gets at once from this process (`SenderSettings.per_url_concurrency`)."""
        return self._settings.per_url_concurrency

    def post(
        self, url: str, body: bytes, timeout: float | None = None, *, start_by: float | None = None
    ) -> Deferred[SendResult]:
        """POST ``body`` (the exact bytes signed) to ``url``; ``timeout`` overrides the settings' (an HTTP
        endpoint has its own). Never fails: every outcome is a `SendResult`, except cancellation and, when
        ``start_by`` (clock seconds) is given and the receiver's slot comes later, `NotStarted`: nothing was
        sent. The dispatcher uses it so a request that waited too long behind a slow receiver's others is
        not sent after its lease ran out, when another process may be sending it already."""
        return Deferred.fromCoroutine(
            self._post(url, body, self._settings.timeout if timeout is None else timeout, start_by)
        )

    def in_flight(self, url: str) -> int:
        """Requests to ``url``'s receiver holding a slot now (for tests and /status)."""
        slot = self._slots.get(_Target.parse(url).receiver)
        return 0 if slot is None else slot.limit - slot.tokens

    async def _post(self, url: str, body: bytes, time_limit: float, start_by: float | None) -> SendResult:
        try:
            target = _Target.parse(url)
        except ValueError as e:
            return SendResult(CONNECTION_FAILED, str(e), 0.0, f"invalid URL: {e}")
        headers = await self._sign(body)
        slot = self._slots.get(target.receiver)
        if slot is None:
            slot = self._slots[target.receiver] = DeferredSemaphore(self._settings.per_url_concurrency)
        try:
            await self._acquire(slot, start_by)
        except BaseException:
            self._forget_if_idle(target.receiver, slot)
            raise
        try:
            return await self._attempt(target, body, headers, time_limit)
        finally:
            slot.release()
            self._forget_if_idle(target.receiver, slot)

    async def _acquire(self, slot: DeferredSemaphore, start_by: float | None) -> None:
        """Wait for a slot of the receiver; `NotStarted` (out of the queue) if none is free by
        ``start_by``."""
        acquired = slot.acquire()
        if start_by is None or acquired.called:
            await acquired
            if start_by is not None and self._clock.seconds() > start_by:
                slot.release()  # signing took that long
                raise NotStarted(f"not signed by {start_by}")
            return
        late = False

        def give_up() -> None:
            nonlocal late
            late = True
            acquired.cancel()

        timer = self._clock.callLater(max(0.0, start_by - self._clock.seconds()), give_up)
        try:
            await acquired
        except CancelledError:
            if late:
                raise NotStarted(f"no free slot by {start_by}") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _forget_if_idle(self, receiver: tuple[str, str, int], slot: DeferredSemaphore) -> None:
        """Drop an unused receiver's queue, so the table holds only receivers with requests."""
        if slot.tokens == slot.limit and not slot.waiting and self._slots.get(receiver) is slot:
            del self._slots[receiver]

    async def _sign(self, body: bytes) -> dict[str, str]:
        if self._in_thread is None:
            return self._signer.sign(body)
        return await self._in_thread(lambda: self._signer.sign(body))

    async def _attempt(
        self, target: _Target, body: bytes, signature: Mapping[str, str], time_limit: float
    ) -> SendResult:
        started = self._clock.seconds()
        exchange = Deferred.fromCoroutine(self._exchange(target, body, signature))
        # Not Deferred.addTimeout: the Agent reports a cancelled request as ResponseNeverReceived, which
        # addTimeout would not recognise as its own doing.
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            exchange.cancel()

        timer = self._clock.callLater(time_limit, time_out)
        try:
            status, excerpt = await exchange
        except Exception as e:
            if not timed_out and any(isinstance(c, CancelledError) for c in _causes(e)):
                raise CancelledError() from e  # our caller cancelled: no outcome to report
            duration = self._clock.seconds() - started
            outcome = _failure_outcome(e, time_limit, timed_out)
            if outcome is None:
                self.log.failure("unexpected failure posting to {receiver}", receiver=target.receiver)
                detail = f"{type(e).__name__}: {e}"
                return SendResult(CONNECTION_FAILED, detail, duration, detail)
            status, text, detail = outcome
            self.log.info(
                "webhook POST to {receiver} failed ({status}): {detail}",
                receiver=target.receiver,
                status=status,
                detail=detail,
            )
            return SendResult(status, text, duration, detail)
        finally:
            if timer.active():
                timer.cancel()
        return SendResult(status, excerpt, self._clock.seconds() - started)

    async def _exchange(self, target: _Target, body: bytes, signature: Mapping[str, str]) -> tuple[int, str]:
        headers: dict[bytes | str, list[bytes | str]] = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [USER_AGENT.encode("ascii")],
        }
        for name, value in signature.items():
            headers[name.encode("ascii")] = [value.encode("ascii")]
        response: IResponse = await self._http.request(
            "POST",
            target.url,
            headers=headers,
            data=body,
            auth=target.auth,
            allow_redirects=False,
            unbuffered=True,
        )
        excerpt = _Excerpt(self._settings.excerpt_bytes)
        response.deliverBody(excerpt)  # type: ignore[no-untyped-call]
        data = await excerpt.done
        return response.code, _decode_excerpt(data)

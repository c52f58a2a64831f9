"""The HTTP side of the daemon as one `Site`: each Klein app answers the paths it routes.

The apps route absolute paths (``/status``, ``/api/v1/...``), so the root is a leaf that hands the whole
request to the app owning its path prefix; Klein then sees the full path, as when it is the root itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import Request, Site

#: Request bodies larger than this are refused unless the site is told otherwise.
DEFAULT_MAX_BODY = 64 * 1024 * 1024


class BoundedRequest(Request):
    """A request whose body may not exceed ``max_body`` octets: ``413`` and the connection closed.

    Twisted reads the whole body (into a temporary file past 100 kB) before any resource sees it, so an
    endless chunked body would fill the disk; the bound has to be applied while it arrives.
    """

    max_body = DEFAULT_MAX_BODY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._received = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)  # type: ignore[no-untyped-call]
        if length is not None and length > self.max_body:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Twisted decides whether a POST body is a form by parsing Content-Type with the stdlib email
        # package: about a tenth of the CPU of a send API request. A type that does not even mention
        # "form" (application/json, the usual case) cannot be one, so skip the parse; form bodies are
        # still parsed exactly as before.
        content_type = self.requestHeaders.getRawHeaders(b"content-type")
        if not content_type or b"form" not in content_type[0].lower():
            self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if not self._refused:
            super().process()  # type: ignore[no-untyped-call]

    def _refuse(self) -> None:
        self._refused = True
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(self._reason()), self._reason())
        )
        transport.loseConnection()

    def _reason(self) -> bytes:
        return b"request body larger than %d bytes\n" % self.max_body


class PrefixRouter(Resource):
    """Dispatches on the request path's prefix, longest first; 404 for anything no app owns."""

    isLeaf = True

    def __init__(self, routes: Sequence[tuple[bytes, IResource]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._routes = sorted(routes, key=lambda route: len(route[0]), reverse=True)

    def render(self, request: IRequest) -> bytes | int:
        path = request.path  # type: ignore[attr-defined]
        for prefix, resource in self._routes:
            if path == prefix.rstrip(b"/") or path.startswith(prefix):
                return resource.render(request)  # type: ignore[no-untyped-call,no-any-return]
        return NoResource().render(request)  # type: ignore[no-untyped-call,no-any-return]


ACCESS_LOG_NAMESPACE = "mtad.http.access"


class AccessLogSite(Site):
    """A `Site` whose access log is one structured event per request (namespace ``mtad.http.access``).

    Twisted's own access log formats a combined-log line and writes it through the legacy ``log.logfile``
    shim, which turns it back into an event: twice the work for a line per send request, and the fields
    are lost to observers that want them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # Set per instance: a Logger in the class body would be a descriptor that renames its namespace
        # after the class (admin_api.site.AccessLogSite).
        self.access_log = Logger(namespace=ACCESS_LOG_NAMESPACE)

    def log(self, request: http.Request) -> None:
        address = request.getClientAddress()  # type: ignore[no-untyped-call]
        client = getattr(address, "host", "-")
        method, uri, protocol = _text(request.method), _text(request.uri), _text(request.clientproto)
        code, length = request.code, request.sentLength or "-"
        referrer = _text(request.getHeader(b"referer") or b"-")
        agent = _text(request.getHeader(b"user-agent") or b"-")
        # The line is built here and logged as one field: Twisted's formatter parses the format string of
        # every event, and with eight fields that took 16 of the 37 microseconds an access line cost. The
        # fields stay in the event for observers that want them (JSON logs).
        self.access_log.info(
            "{line}",
            line=f'{client} "{method} {uri} {protocol}" {code} {length} "{referrer}" "{agent}"',
            client=client,
            method=method,
            uri=uri,
            protocol=protocol,
            code=code,
            length=length,
            referrer=referrer,
            agent=agent,
        )


def _text(value: bytes) -> str:
    """Header or request-line bytes as log text: control characters and quotes escaped, never raw."""
    text = value.decode("latin-1")
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def make_site(routes: Sequence[tuple[bytes, IResource]], max_body: int = DEFAULT_MAX_BODY) -> Site:
    """A `Site` serving ``routes`` (path prefix, resource), refusing bodies over ``max_body`` octets."""
    site = AccessLogSite(PrefixRouter(routes))  # type: ignore[no-untyped-call]
    site.noisy = False

    class SiteRequest(BoundedRequest):
        pass

    SiteRequest.max_body = max_body
    site.requestFactory = SiteRequest
    return site

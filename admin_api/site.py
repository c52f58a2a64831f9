"""The HTTP side of the daemon as one `Site`: each Klein app answers the paths it routes.

The apps route absolute paths (``/status``, ``/api/v1/...``), so the root is a leaf that hands the whole
request to the app owning its path prefix; Klein then sees the full path, as when it is the root itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import Site


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


def make_site(routes: Sequence[tuple[bytes, IResource]]) -> Site:
    """A `Site` serving ``routes`` (path prefix, resource), with no per-request access log noise."""
    site = Site(PrefixRouter(routes))  # type: ignore[no-untyped-call]
    site.noisy = False
    return site

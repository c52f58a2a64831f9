"""``GET /.well-known/jwks.json``: the public half of the webhook signing key, for receivers to verify with.

Postal serves the same document, unauthenticated (``WellKnownController#jwks``); a receiver reads the
``X-Postal-Signature-KID`` of a request and picks the key with that ``kid`` (RFC 7517 §4.5).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from klein import Klein
from twisted.web.iweb import IRequest


class KeySet(Protocol):
    def jwks(self) -> dict[str, Any]: ...


class JWKSApp:
    """Serves the signer's JWK set; the document is built once, the key does not change while running."""

    app = Klein()

    def __init__(self, signer: KeySet) -> None:
        # Compact, in the key's member order, as Postal's ``to_json`` writes it.
        self._document = json.dumps(signer.jwks(), separators=(",", ":")).encode("utf-8")

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request: IRequest) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return self._document

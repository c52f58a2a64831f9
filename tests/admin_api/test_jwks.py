"""``GET /.well-known/jwks.json``: the webhook signing key's JWK set, as Postal serves it."""

from __future__ import annotations

import json
from pathlib import Path

from treq.testing import StubTreq
from twisted.trial import unittest

from admin_api.jwks import JWKSApp
from mtad.webhooks.signing import WebhookSigner


class JWKSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.signer = WebhookSigner.load_or_create(Path(self.mktemp()) / "signing.key")
        self.stub = StubTreq(JWKSApp(self.signer).app.resource())

    async def test_serves_the_key_set(self) -> None:
        """GET answers 200 application/json with the signer's JWK set, compact as Postal writes it."""
        response = await self.stub.get("http://mtad.test/.well-known/jwks.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = await response.content()
        self.assertEqual(json.loads(body), self.signer.jwks())
        self.assertEqual(json.loads(body)["keys"][0]["kid"], self.signer.kid)
        self.assertNotIn(b" ", body)

    async def test_only_get_on_that_path(self) -> None:
        """Other methods are 405 and other paths 404: the app serves one document."""
        post = await self.stub.post("http://mtad.test/.well-known/jwks.json", data=b"{}")
        self.assertEqual(post.code, 405)
        other = await self.stub.get("http://mtad.test/.well-known/other")
        self.assertEqual(other.code, 404)

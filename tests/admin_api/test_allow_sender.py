"""A server's ``allow_sender`` setting in the legacy send API, wired as the daemon wires it
(``sender_allowed=lambda server: server.allow_sender``): with it, an authenticated Sender stands in for a
From that is not one of the server's sending domains; without it, that is ``UnauthenticatedFromAddress``."""

from __future__ import annotations

from typing import Any

from mtad.store import servers as ss
from tests.admin_api.support import NOW, LegacyAPITestCase, b64

SEND = "/api/v1/send/message"
RAW = "/api/v1/send/raw"
UNAUTHENTICATED = "UnauthenticatedFromAddress"


class AllowSenderTests(LegacyAPITestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.use(self.make_api(sender_allowed=lambda server: server.allow_sender))
        self.allowing = self.transaction(ss.create_server, "acme", "Allowing", NOW, allow_sender=True)
        self.allowing_key = self.new_key(self.allowing)

    async def send(self, key: str, **params: Any) -> dict[str, Any]:
        params = {"to": ["rcpt@example.com"], "subject": "Hi", "plain_body": "x", **params}
        return await self.call(SEND, params, key=key)

    async def send_raw(self, key: str, headers: str) -> dict[str, Any]:
        message = f"{headers}\r\nSubject: Hi\r\n\r\nbody\r\n"
        params = {"mail_from": "app@foreign.test", "rcpt_to": ["rcpt@example.com"], "data": b64(message)}
        return await self.call(RAW, params, key=key)

    async def test_send_message(self) -> None:
        """send/message from a foreign domain with an authenticated sender succeeds only for the server
        with allow_sender; a foreign sender never authenticates."""
        given = {"from": "app@foreign.test", "sender": "relay@example.test"}
        self.assertError(await self.send(self.key, **given), UNAUTHENTICATED)
        self.assertEqual((await self.send(self.allowing_key, **given))["status"], "success")
        self.assertError(
            await self.send(self.allowing_key, **{"from": "app@foreign.test", "sender": "s@other.test"}),
            UNAUTHENTICATED,
        )
        self.assertError(await self.send(self.allowing_key, **{"from": "app@foreign.test"}), UNAUTHENTICATED)

    async def test_send_raw(self) -> None:
        """send/raw: the Sender field authenticates a foreign From only for the server with
        allow_sender."""
        headers = "From: app@foreign.test\r\nSender: relay@example.test"
        self.assertError(await self.send_raw(self.key, headers), UNAUTHENTICATED)
        self.assertEqual((await self.send_raw(self.allowing_key, headers))["status"], "success")
        self.assertError(await self.send_raw(self.allowing_key, "From: app@foreign.test"), UNAUTHENTICATED)

    async def test_setting_changed(self) -> None:
        """Turning allow_sender on or off for a server takes effect once its cached credential expires."""
        given = {"from": "app@foreign.test", "sender": "relay@example.test"}
        self.assertError(await self.send(self.key, **given), UNAUTHENTICATED)
        self.transaction(ss.set_allow_sender, self.server.id, True, NOW)
        self.transaction(ss.set_allow_sender, self.allowing.id, False, NOW)
        self.clock.advance(60)
        self.assertEqual((await self.send(self.key, **given))["status"], "success")
        self.assertError(await self.send(self.allowing_key, **given), UNAUTHENTICATED)

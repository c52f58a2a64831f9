"""May-send-as: whether a message's From (or Sender) is a sending domain of its server.

Postal's rule (``Server#find_authenticated_domain_from_headers`` for SMTP and ``send/raw``, and
``OutgoingMessagePrototype``'s ``find_domain`` for ``send/message``): the From domain must be one the
server may send as; where the server has ``allow_sender``, the Sender domain may stand in for it. Which
domains a server may send as is the injected ``check(server, domain)`` (the daemon's is backed by
``mtad.store.domains.find_sending_domain``); its answers are cached per server and domain for
``cache_seconds``, concurrent checks of one domain share one, and each check is bounded by ``timeout``.
Domains are compared in lower case (RFC 5321 §2.4).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.accept import headers_authenticated
from mtad.caching import CachedLookups
from mtad.mail.compose import domain_of
from mtad.store.servers import Server
from mtad.submission.unavailable import bounded

#: What `PolicyUnavailable` names when the check fails (the API's ``TemporaryFailure`` text).
SENDING_DOMAIN_CHECK = "The sending domain check"

SendingDomainCheck = Callable[[Server, str], Awaitable[bool]]


def server_allows_sender(server: Server) -> bool:
    """Postal's per-server ``allow_sender``."""
    return server.allow_sender


class SendingDomains:
    """Answers may-send-as for a server; ``sender_allowed(server)`` says whether Sender may stand in."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        check: SendingDomainCheck,
        *,
        cache_seconds: float = 60.0,
        timeout: float = 30.0,
        sender_allowed: Callable[[Server], bool] = server_allows_sender,
    ) -> None:
        self.clock = clock
        self.check = check
        self.timeout = timeout
        self.sender_allowed = sender_allowed
        self._answers: CachedLookups[tuple[int, str], bool] = CachedLookups(clock, cache_seconds)

    async def address_allowed(self, server: Server, address: str) -> bool:
        """Whether ``server`` may send as ``address``'s domain; an address without one never may."""
        domain = domain_of(address)
        return "@" in address and bool(domain) and await self.domain_allowed(server, domain)

    async def domain_allowed(self, server: Server, domain: str) -> bool:
        """``check``'s answer, cached; `PolicyUnavailable` when it fails or takes more than ``timeout``."""

        async def check() -> bool:
            allowed = await bounded(
                self.check(server, domain),
                self.clock,
                self.timeout,
                SENDING_DOMAIN_CHECK,
                self.log,
                domain=domain,
                server=server.full_permalink,
            )
            return bool(allowed)

        return await self._answers.get((server.id, domain), check)

    async def mailboxes_allowed(self, server: Server, from_address: str, sender_address: str | None) -> bool:
        """``send/message``'s rule: the From address, else (where allowed) the Sender address."""
        if await self.address_allowed(server, from_address):
            return True
        return (
            sender_address is not None
            and self.sender_allowed(server)
            and await self.address_allowed(server, sender_address)
        )

    async def headers_allowed(self, server: Server, message: bytes) -> bool:
        """SMTP's and ``send/raw``'s rule (`mtad.accept.headers_authenticated`): every From address, else
        (where allowed) every Sender address."""
        return await headers_authenticated(
            message,
            lambda address: self.address_allowed(server, address),
            allow_sender=self.sender_allowed(server),
        )

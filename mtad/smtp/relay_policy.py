"""The SMTP policy for sending: who may relay, as which server, and handing messages to the acceptor.

mtad routes no domains yet (inbound routes come later), so every recipient is relay, and DESIGN invariant 4
applies to each: it is accepted only for a session that authenticated with an SMTP credential (RFC 4954)
or that connects from the network of an SMTP-IP credential, as in Postal. As in Postal too, the message
itself must come from its server: every From address in a sending domain of the server, or, where the
server has ``allow_sender``, every Sender address (`mtad.accept.headers_authenticated`, the check the send
API makes); otherwise the message is refused at the end of DATA.

Nothing is kept per session. What a session maps to follows from what `SessionInfo` carries every time
(the `AuthIdentity` our `authenticate` returned, or the client address), looked up through short-lived
caches of credentials, servers and the SMTP-IP list. So no state can outlive a session, however it ends,
and a revoked credential or a suspended server takes effect within ``cache_seconds``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.accept import Acceptor, ServerSuspended, headers_authenticated
from mtad.caching import CachedLookups, ExpiringCache
from mtad.mail.compose import domain_of
from mtad.queue.model import QueueFull, RedisUnavailable
from mtad.smtp.policy import AuthIdentity, Envelope, SessionInfo, SMTPPolicy
from mtad.smtp.reply import Reply
from mtad.store.credentials import (
    Credential,
    IPNetwork,
    authenticate_smtp_key,
    find_credential,
    find_ip_credentials,
    touch_credential,
)
from mtad.store.db import Database
from mtad.store.messages import Scope
from mtad.store.servers import Server, find_server

P = ParamSpec("P")
T = TypeVar("T")

#: RFC 4954 §6: relaying needs authentication, and this session can still authenticate.
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
#: RFC 3463 §3.8 (X.7.1, delivery not authorized): relaying is refused and AUTH would not help here.
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
#: Postal's words for a suspended server; X.7.1 since the refusal is policy, not the message.
SERVER_SUSPENDED = Reply(554, "5.7.1", "Mail server has been suspended")
#: The credential the session authenticated with has been deleted since.
CREDENTIAL_REVOKED = Reply(554, "5.7.1", "Credential is no longer valid")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
#: Postal's reply, code included, for a message whose From (or Sender) is not its server's to send as:
#: Postal clients and the applications behind them see the same 530. RFC 4954 §6 gives 530 to "authenticate
#: first"; either way it is permanent, and X.7.1 (RFC 3463: delivery not authorized) says why.
FROM_NOT_ALLOWED = Reply(
    530, "5.7.1", "From/Sender name is not valid: not a verified sending domain of this mail server"
)
#: RFC 3463 X.3.0: the system (database or queue) failed; the client keeps the message and retries.
TRY_AGAIN = Reply(451, "4.3.0", "Temporary failure, try again later")
QUEUE_UNAVAILABLE = Reply(451, "4.3.0", "Queue temporarily unavailable, try again later")
#: RFC 3463 X.3.1 "mail system full"; 452 per RFC 5321 §4.2.2 (insufficient system storage).
QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")

#: Postal's delivery details for a message held because its credential says so.
CREDENTIAL_HOLD = "Credential is configured to hold all messages authenticated by it."

#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; long id lists become a range.
_MAX_IDS_TEXT = 400


class DatabaseTimeout(Exception):
    """A unit of work did not finish within the policy's ``timeout``."""


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address to match SMTP-IP networks; an IPv4-mapped IPv6 address as its IPv4 self."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def queued_reply(ids: Sequence[int]) -> Reply:
    """``250 2.0.0 Ok: queued as 17 18``: the ids the client can quote to find its messages."""
    text = "Ok: queued as " + " ".join(str(i) for i in ids)
    if len(text) > _MAX_IDS_TEXT:
        text = f"Ok: queued as {ids[0]} to {ids[-1]} ({len(ids)} messages)"
    return Reply(250, "2.0.0", text)


class RelayPolicy:
    """`~mtad.smtp.policy.SMTPPolicy` for authenticated and IP-trusted sending.

    ``sending_domain_check(server, domain)`` says whether ``server`` may send as ``domain`` (the daemon
    gives one backed by ``mtad.store.domains.find_sending_domain``, as to the send API). Every database
    call and domain check is bounded by ``timeout`` on ``clock``. Credentials, servers, the SMTP-IP list
    and domain check answers are cached for ``cache_seconds``. ``listeners_without_auth`` names listeners
    that never offer AUTH (no TLS, no STARTTLS and no plaintext AUTH): a refused relay there is
    ``554 5.7.1``, not ``530 5.7.0``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        database: Database,
        acceptor: Acceptor,
        *,
        sending_domain_check: Callable[[Server, str], Awaitable[bool]],
        cache_seconds: float = 60.0,
        timeout: float = 30.0,
        listeners_without_auth: Collection[str] = (),
    ) -> None:
        self.clock = clock
        self.database = database
        self.acceptor = acceptor
        self.sending_domain_check = sending_domain_check
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.listeners_without_auth = frozenset(listeners_without_auth)
        self._credentials: ExpiringCache[int, Credential] = ExpiringCache(clock, cache_seconds)
        self._servers: ExpiringCache[int, Server] = ExpiringCache(clock, cache_seconds)
        self._domains: CachedLookups[tuple[int, str], bool] = CachedLookups(clock, cache_seconds)
        self._ip_credentials: list[tuple[IPNetwork, Credential]] = []
        self._ip_credentials_expire = float("-inf")
        #: When each SMTP-IP credential's last use was last written (bounded by the number of them).
        self._ip_touched: dict[int, float] = {}

    # -- SMTPPolicy ---------------------------------------------------------------------------------

    def authenticate(
        self, session: SessionInfo, username: str, password: str
    ) -> Deferred[AuthIdentity | None]:
        """The SMTP credential whose key is ``password`` (any username, as in Postal).

        A suspended server's credential is refused like a wrong one (535 5.7.8): the Protocol has no
        other negative answer. A database failure or timeout fails the Deferred, which the server answers
        ``454 4.7.0`` (RFC 4954 §6, temporary), so a database outage never tells clients their password
        is wrong, nor counts against them in the failed-AUTH limiter.
        """
        return Deferred.fromCoroutine(self._authenticate(session, username, password))

    def check_mail_from(self, session: SessionInfo, address: str) -> Deferred[Reply | None]:
        """Any sender the server parsed, including the null reverse-path ``<>`` (RFC 5321 §4.5.5)."""
        if address:
            local, at, domain = address.rpartition("@")
            if not (local and at and domain):
                return succeed(BAD_SENDER)
        return succeed(None)

    def check_rcpt(self, session: SessionInfo, mail_from: str, address: str) -> Deferred[Reply | None]:
        """Relay control (DESIGN invariant 4): only for a credential's session; see `relay_refusal`."""
        return Deferred.fromCoroutine(self._check_rcpt(session, address))

    def accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Deferred[Reply]:
        """Queue the message for the session's server; 250 only once Redis has stored it."""
        return Deferred.fromCoroutine(self._accept_message(session, envelope, message))

    # -- decisions ----------------------------------------------------------------------------------

    def relay_refusal(self, session: SessionInfo) -> Reply:
        """The answer to a relay attempt by a session with no credential.

        RFC 4954 §6: ``530 5.7.0 Authentication required`` is for a command refused because
        authentication is required and not in force, so it is the answer when this session can still
        authenticate: it has not, and its listener offers AUTH (now, or after STARTTLS). Where AUTH is
        never offered, or the session already authenticated, 530 would send the client after something it
        cannot get: the answer is then ``554 5.7.1 Relay access denied`` (RFC 3463 X.7.1, delivery not
        authorized), Postfix's reply for the same case.
        """
        if session.auth is None and session.listener not in self.listeners_without_auth:
            return AUTH_REQUIRED
        return RELAY_DENIED

    async def _authenticate(self, session: SessionInfo, username: str, password: str) -> AuthIdentity | None:
        if not password:
            return None
        found = await self._db(authenticate_smtp_key, password, self.clock.seconds(), self.cache_seconds)
        if found is None:
            return None
        credential, server = found
        self._credentials.put(credential.id, credential)
        self._servers.put(server.id, server)
        if server.suspended:
            self.log.info(
                "smtp auth refused in {session_id}: server {server} is suspended",
                session_id=session.session_id,
                server=server.full_permalink,
            )
            return None
        return AuthIdentity(username=username, credential_id=credential.id, server_id=server.id)

    async def _check_rcpt(self, session: SessionInfo, address: str) -> Reply | None:
        try:
            credential = await self._session_credential(session)
            server = None if credential is None else await self._server(credential.server_id)
        except Exception:
            self.log.failure("smtp relay check failed in {session_id}", session_id=session.session_id)
            return TRY_AGAIN
        refusal = self._refusal(session, credential, server)
        if refusal is not None:
            self.log.info(
                "smtp relay to {address} refused for {client_ip} in {session_id}: {reply}",
                address=address,
                client_ip=session.client_ip,
                session_id=session.session_id,
                reply=str(refusal),
            )
            return refusal
        if session.auth is None and credential is not None:
            await self._touch_ip_credential(credential)
        return None

    def _refusal(
        self, session: SessionInfo, credential: Credential | None, server: Server | None
    ) -> Reply | None:
        if credential is None:
            return CREDENTIAL_REVOKED if session.auth is not None else self.relay_refusal(session)
        if server is None:
            return CREDENTIAL_REVOKED
        if server.suspended:
            return SERVER_SUSPENDED
        return None

    async def _accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Reply:
        try:
            credential = await self._session_credential(session)
            server = None if credential is None else await self._server(credential.server_id)
        except Exception:
            self.log.failure("smtp message lookup failed in {session_id}", session_id=session.session_id)
            return TRY_AGAIN
        refusal = self._refusal(session, credential, server)
        if refusal is not None or credential is None or server is None:
            return refusal or RELAY_DENIED
        try:
            allowed = await headers_authenticated(
                message,
                lambda address: self._address_allowed(server, address),
                allow_sender=server.allow_sender,
            )
        except Exception:
            self.log.failure(
                "smtp sending domain check failed in {session_id}", session_id=session.session_id
            )
            return TRY_AGAIN
        if not allowed:
            self.log.info(
                "smtp message in {session_id} refused: From/Sender not a sending domain of {server}",
                session_id=session.session_id,
                server=server.full_permalink,
            )
            return FROM_NOT_ALLOWED
        try:
            accepted = await self.acceptor.accept(
                server,
                Scope.OUTGOING.value,
                envelope.mail_from,
                envelope.rcpt_to,
                message,
                hold_reason=CREDENTIAL_HOLD if credential.hold else None,
                received_with_ssl=session.tls,
            )
        except ServerSuspended:
            return SERVER_SUSPENDED
        except QueueFull as e:
            self.log.warn(
                "smtp message in {session_id} not queued: {error}",
                session_id=session.session_id,
                error=str(e),
            )
            return QUEUE_FULL
        except RedisUnavailable as e:
            self.log.warn(
                "smtp message in {session_id} not queued: {error}",
                session_id=session.session_id,
                error=str(e),
            )
            return QUEUE_UNAVAILABLE
        except Exception:
            self.log.failure("smtp message in {session_id} not queued", session_id=session.session_id)
            return TRY_AGAIN
        return queued_reply([m.id for m in accepted])

    # -- lookups ------------------------------------------------------------------------------------

    async def _db(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a unit of work, failing with `DatabaseTimeout` after ``timeout`` seconds."""
        d = self.database.run(fn, *args, **kwargs)
        d.addTimeout(self.timeout, self.clock)
        try:
            return await d
        except DeferredTimeoutError:
            raise DatabaseTimeout(f"database did not answer within {self.timeout} s") from None

    async def _session_credential(self, session: SessionInfo) -> Credential | None:
        """The credential a session sends with: the one it authenticated with, else its SMTP-IP one."""
        if session.auth is not None:
            return await self._credential(session.auth.credential_id)
        address = _address(session.client_ip)
        if address is None:
            return None
        for network, credential in await self._ip_credential_list():
            if address.version == network.version and address in network:
                return credential
        return None

    async def _credential(self, id: int) -> Credential | None:
        credential = self._credentials.get(id)
        if credential is None:
            credential = await self._db(find_credential, id)
            if credential is not None:
                self._credentials.put(id, credential)
        return credential

    async def _server(self, id: int) -> Server | None:
        server = self._servers.get(id)
        if server is None:
            server = await self._db(find_server, id)
            if server is not None:
                self._servers.put(id, server)
        return server

    async def _address_allowed(self, server: Server, address: str) -> bool:
        domain = domain_of(address)
        return "@" in address and bool(domain) and await self._domain_allowed(server, domain)

    async def _domain_allowed(self, server: Server, domain: str) -> bool:
        """``sending_domain_check``'s answer, cached; concurrent checks of one domain share one."""

        async def check() -> bool:
            d = Deferred.fromCoroutine(self._check_domain(server, domain))
            d.addTimeout(self.timeout, self.clock)
            try:
                return await d
            except DeferredTimeoutError:
                raise DatabaseTimeout(
                    f"sending domain check did not answer within {self.timeout} s"
                ) from None

        return await self._domains.get((server.id, domain), check)

    async def _check_domain(self, server: Server, domain: str) -> bool:
        return bool(await self.sending_domain_check(server, domain))

    async def _ip_credential_list(self) -> list[tuple[IPNetwork, Credential]]:
        if self._ip_credentials_expire <= self.clock.seconds():
            self._ip_credentials = await self._db(find_ip_credentials)
            self._ip_credentials_expire = self.clock.seconds() + self.cache_seconds
            known = {credential.id for _, credential in self._ip_credentials}
            for gone in [id for id in self._ip_touched if id not in known]:
                del self._ip_touched[gone]
        return self._ip_credentials

    async def _touch_ip_credential(self, credential: Credential) -> None:
        """Record the use of an SMTP-IP credential, at most once per ``cache_seconds``; errors are logged.

        Best effort: the operator's "last used" is informational and must not refuse mail.
        """
        now = self.clock.seconds()
        if self._ip_touched.get(credential.id, float("-inf")) > now - self.cache_seconds:
            return
        self._ip_touched[credential.id] = now
        try:
            await self._db(touch_credential, credential.id, now)
        except Exception:
            self.log.failure(
                "could not record use of credential {credential_id}", credential_id=credential.id
            )


if TYPE_CHECKING:

    def _implements_policy(policy: RelayPolicy) -> SMTPPolicy:
        return policy  # mypy checks that RelayPolicy satisfies the Protocol

"""DKIM-signing outgoing messages once, just before delivery (DESIGN: "prepare once: DKIM sign").

Signing at delivery rather than at accept keeps the accept path to one Redis write, and lets a key
rotated after a message was queued sign it. The keys of a (server, From domain) pair are read from SQL at
most once per ``cache_seconds`` (and once for concurrent lookups), so a burst from one sender costs one
query. The signature itself (0.3-0.6 ms per 5 KB message on the benchmark machines) is made in a
worker process of `mtad.outbound.signing_pool` when there is one, else inline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.engine import Connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.caching import ExpiringCache, SharedLookups
from mtad.events.recorder import UnitOfWork
from mtad.mail.dkim import DKIMKey, DKIMKeyError, DKIMSigner, UnsignableMessageError
from mtad.mail.headers import from_domain
from mtad.outbound.signing_pool import SigningFailed, SigningUnavailable
from mtad.store.domains import find_sending_domain, signing_keys
from mtad.store.servers import find_server

#: Signs in another process: ``sign_elsewhere(message, keys, now)`` fires with what
#: `DKIMSigner.sign` returns, or fails with `SigningUnavailable` (then the message is signed inline).
SignElsewhere = Callable[[bytes, Sequence[DKIMKey], float], Awaitable[bytes]]


def keys_for(conn: Connection, server_id: int, domain: str) -> tuple[DKIMKey, ...]:
    """The active DKIM keys mail from ``domain`` by server ``server_id`` is signed with (none if the
    domain is not a verified sending domain of the server or its organization)."""
    server = find_server(conn, server_id)
    if server is None:
        return ()
    found = find_sending_domain(conn, server.id, server.organization_id, domain)
    if found is None:
        return ()
    return tuple(
        DKIMKey(
            domain=found.name,
            selector=key.selector,
            private_key_pem=key.private_key_pem,
            algorithm=key.algorithm,
        )
        for key in signing_keys(conn, found.id)
    )


class MessageSigner:
    """Signs a message body for its server with the keys of its From domain; unsigned if it has none."""

    log = Logger()

    def __init__(
        self,
        database: UnitOfWork,
        clock: IReactorTime,
        signer: DKIMSigner | None = None,
        cache_seconds: float = 60.0,
        fallback: DKIMKey | None = None,
        sign_elsewhere: SignElsewhere | None = None,
    ) -> None:
        """``fallback`` (the installation key) signs mail whose From domain has no key of its own, so every
        message carries a signature a receiver can verify, aligned or not (Postal does the same)."""
        self._fallback = fallback
        self._sign_elsewhere = sign_elsewhere
        self._database = database
        self._clock = clock
        self._signer = signer if signer is not None else DKIMSigner()
        self._keys: ExpiringCache[tuple[int, str], tuple[DKIMKey, ...]] = ExpiringCache(clock, cache_seconds)
        self._lookups: SharedLookups[tuple[int, str], tuple[DKIMKey, ...]] = SharedLookups()

    async def keys(self, server_id: int, domain: str) -> Sequence[DKIMKey]:
        key = (server_id, domain)
        cached = self._keys.get(key)
        if cached is not None:
            return cached

        async def lookup() -> tuple[DKIMKey, ...]:
            found: tuple[DKIMKey, ...] = await self._database.run(keys_for, server_id, domain)
            self._keys.put(key, found)
            return found

        return await self._lookups.run(key, lookup)

    async def sign(self, server_id: int, message_id: int, body: bytes) -> bytes:
        """``body`` with a DKIM-Signature per active key of its From domain (else the fallback) prepended.

        A database failure propagates (the caller retries the delivery later); a message that cannot be
        signed (no From, a broken key) goes out unsigned with a warning rather than not at all.
        """
        domain = from_domain(body)
        keys: Sequence[DKIMKey] = await self.keys(server_id, domain) if domain is not None else ()
        if not keys:
            if self._fallback is None:
                return body
            keys = (self._fallback,)
        now = self._clock.seconds()
        chosen = tuple(keys)
        try:
            if self._sign_elsewhere is not None:
                try:
                    return await self._sign_elsewhere(body, chosen, now)
                except SigningUnavailable:
                    pass
                except SigningFailed as e:
                    # The fault may be the worker's alone (its environment, code changed on disk since
                    # the daemon started): signing here either works or raises the same bug as before.
                    self.log.warn(
                        "signing worker failed on message {message_id}: {error}; signing it here",
                        message_id=message_id,
                        error=str(e),
                    )
            return self._signer.sign(body, chosen, now=now)
        except (UnsignableMessageError, DKIMKeyError) as e:
            self.log.warn(
                "message {message_id} from {domain} sent unsigned: {error}",
                message_id=message_id,
                domain=domain,
                error=str(e),
            )
            return body

"""DKIM-signing outgoing messages once, just before delivery (DESIGN: "prepare once: DKIM sign").

Signing at delivery rather than at accept keeps the accept path to one Redis write, and lets a key
rotated after a message was queued sign it. The keys of a (server, From domain) pair are read from SQL at
most once per ``cache_seconds`` (and once for concurrent lookups), so a burst from one sender costs one
query; the RSA signature itself costs about 0.3 ms per message (see `mtad.mail.dkim`), done inline.
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
from mtad.store.domains import find_sending_domain, signing_keys
from mtad.store.servers import find_server


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


#: Runs a function in a worker thread: ``in_thread(fn)`` fires with ``fn()``'s result.
InThread = Callable[[Callable[[], bytes]], Awaitable[bytes]]


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
        in_thread: InThread | None = None,
    ) -> None:
        """``fallback`` (the installation key) signs mail whose From domain has no key of its own, so every
        message carries a signature a receiver can verify, aligned or not (Postal does the same)."""
        self._fallback = fallback
        # OpenSSL releases the GIL while it signs: in a worker thread, a batch of 100 messages (33 ms of
        # RSA) neither stalls the reactor nor waits for it, and uses the second core.
        self._in_thread = in_thread
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
            if self._in_thread is not None:
                return await self._in_thread(lambda: self._signer.sign(body, chosen, now=now))
            return self._signer.sign(body, chosen, now=now)
        except (UnsignableMessageError, DKIMKeyError) as e:
            self.log.warn(
                "message {message_id} from {domain} sent unsigned: {error}",
                message_id=message_id,
                domain=domain,
                error=str(e),
            )
            return body

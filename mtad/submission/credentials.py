"""Credential lookups for submission, with the caches and timeouts that keep them off the hot path.

Three kinds of credential, as in Postal: an API key (the send API's ``X-Server-API-Key``), an SMTP
password (SMTP AUTH, RFC 4954) and an SMTP-IP network (relay without AUTH from a trusted network).
Credentials and servers are cached for ``cache_seconds`` by the clock, so once warm a submission needs no
SQL; a revoked credential, a suspended server or a new SMTP-IP network take effect within
``cache_seconds``. Concurrent lookups of one API key share one query, and an unknown key is remembered
briefly so a client retrying a wrong key in a loop costs one query per `UNKNOWN_KEY_SECONDS`. Every query
is bounded by ``timeout`` (`mtad.submission.unavailable.bounded`).

Recording a credential's last use is a write: it happens at most once per ``cache_seconds`` per
credential and never refuses mail when it fails (the operator's "last used" is informational).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import Connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.caching import ExpiringCache, SharedLookups
from mtad.store.credentials import (
    Credential,
    CredentialType,
    IPNetwork,
    authenticate_smtp_key,
    find_credential,
    find_credential_by_key,
    find_ip_credentials,
    hash_secret,
    touch_credential,
)
from mtad.store.db import Database
from mtad.store.servers import Server, find_server
from mtad.submission.answers import Submitter
from mtad.submission.unavailable import PolicyUnavailable, bounded

P = ParamSpec("P")
T = TypeVar("T")

#: How long an unknown API key is remembered as unknown: long enough to spare the database a client
#: retrying a wrong key in a loop, short enough that a key just created works almost at once.
UNKNOWN_KEY_SECONDS = 5.0

#: What `PolicyUnavailable` names when SQL fails (the API's ``TemporaryFailure`` text begins with it).
DATABASE = "The database"


def find_api_credential(conn: Connection, key: str) -> tuple[Credential, Server] | None:
    """The API credential whose key is ``key`` and its server, read in one transaction; None if unknown."""
    credential = find_credential_by_key(conn, CredentialType.API, key)
    if credential is None:
        return None
    server = find_server(conn, credential.server_id)
    return None if server is None else (credential, server)


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address to match SMTP-IP networks; an IPv4-mapped IPv6 address as its IPv4 self."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Credentials:
    """Finds who submits, by API key, SMTP password, credential id or client address."""

    log = Logger()

    def __init__(
        self, clock: IReactorTime, database: Database, *, cache_seconds: float = 60.0, timeout: float = 30.0
    ) -> None:
        self.clock = clock
        self.database = database
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._by_id: ExpiringCache[int, Credential] = ExpiringCache(clock, cache_seconds)
        self._servers: ExpiringCache[int, Server] = ExpiringCache(clock, cache_seconds)
        self._by_key: ExpiringCache[str, Submitter] = ExpiringCache(clock, cache_seconds)
        self._unknown_keys: ExpiringCache[str, bool] = ExpiringCache(
            clock, min(cache_seconds, UNKNOWN_KEY_SECONDS)
        )
        self._key_lookups: SharedLookups[str, tuple[Credential, Server] | None] = SharedLookups()
        self._ip_credentials: list[tuple[IPNetwork, Credential]] = []
        self._ip_credentials_expire = float("-inf")
        #: Credentials whose last use was written less than ``cache_seconds`` ago (one write per period).
        self._touched: ExpiringCache[int, bool] = ExpiringCache(clock, cache_seconds)

    async def _db(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a unit of work, bounded by ``timeout``; `PolicyUnavailable` if it fails."""
        return await bounded(
            self.database.run(fn, *args, **kwargs), self.clock, self.timeout, DATABASE, self.log
        )

    # -- by secret ----------------------------------------------------------------------------------

    async def by_api_key(self, key: str) -> Submitter | None:
        """The API credential whose key is ``key``, with its server; None if there is none."""
        digest = hash_secret(key)
        found = self._by_key.get(digest)
        if found is not None:
            return found
        if self._unknown_keys.get(digest):
            return None
        pair = await self._key_lookups.run(digest, lambda: self._db(find_api_credential, key))
        if pair is None:
            self._unknown_keys.put(digest, True)
            return None
        submitter = Submitter(credential=pair[0], server=pair[1])
        self._by_key.put(digest, submitter)
        return submitter

    async def by_smtp_password(self, password: str) -> Submitter | None:
        """The SMTP credential whose password is ``password`` (any username, as in Postal); None if none.

        One unit of work that also records the use (`authenticate_smtp_key`); the credential and server
        found fill the caches the session's later RCPT and DATA read.
        """
        if not password:
            return None
        found = await self._db(authenticate_smtp_key, password, self.clock.seconds(), self.cache_seconds)
        if found is None:
            return None
        credential, server = found
        self._by_id.put(credential.id, credential)
        self._servers.put(server.id, server)
        return Submitter(credential=credential, server=server)

    # -- by id and address --------------------------------------------------------------------------

    async def by_id(self, id: int) -> Credential | None:
        credential = self._by_id.get(id)
        if credential is None:
            credential = await self._db(find_credential, id)
            if credential is not None:
                self._by_id.put(id, credential)
        return credential

    async def server(self, id: int) -> Server | None:
        server = self._servers.get(id)
        if server is None:
            server = await self._db(find_server, id)
            if server is not None:
                self._servers.put(id, server)
        return server

    async def by_client_ip(self, ip: str) -> Credential | None:
        """The SMTP-IP credential whose network holds ``ip`` (the most specific one); None if none."""
        address = client_address(ip)
        if address is None:
            return None
        for network, credential in await self._ip_credential_list():
            if address.version == network.version and address in network:
                return credential
        return None

    async def _ip_credential_list(self) -> list[tuple[IPNetwork, Credential]]:
        if self._ip_credentials_expire <= self.clock.seconds():
            self._ip_credentials = await self._db(find_ip_credentials)
            self._ip_credentials_expire = self.clock.seconds() + self.cache_seconds
        return self._ip_credentials

    # -- last use -----------------------------------------------------------------------------------

    def _due_for_touch(self, credential: Credential) -> bool:
        now = self.clock.seconds()
        recent = credential.last_used_at is not None and credential.last_used_at > now - self.cache_seconds
        if recent or self._touched.get(credential.id):
            return False
        self._touched.put(credential.id, True)
        return True

    def record_use_beside(self, credential: Credential) -> None:
        """Write the credential's last use without waiting for it (the send API's requests never wait on
        a write); at most once per ``cache_seconds``; a failure is logged."""
        if not self._due_for_touch(credential):
            return
        d = self.database.run(touch_credential, credential.id, self.clock.seconds())
        d.addErrback(
            lambda f: self.log.failure(
                "could not record use of credential {credential_id}", f, credential_id=credential.id
            )
        )

    async def record_use(self, credential: Credential) -> None:
        """Write the credential's last use and wait for it (at most ``timeout``), at most once per
        ``cache_seconds``; a failure is logged, never raised."""
        if not self._due_for_touch(credential):
            return
        try:
            await self._db(touch_credential, credential.id, self.clock.seconds())
        except PolicyUnavailable:
            pass  # logged where it failed

"""`DNSErrorNotice`: the ``DomainDNSError`` event of a domain whose automatic DNS check failed.

Postal triggers its ``DomainDNSError`` webhook from ``check_dns(:auto)`` when the domain is not
``dns_ok?`` and a server owns it; a domain of an organization fires nothing (no one server's webhooks
could be chosen for it). `DomainDNSChecker` calls its ``on_dns_error`` hook at the same point; this is
that hook. It appends a `mtad.events.schema.DomainDNSError` to the event stream rather than queueing
requests itself, so the webhooks consumer group turns it into requests as it does every other event
(durable, at least once, one request uuid per event and webhook).

A notice that cannot be written (the server is gone, Redis or SQL is down) is logged and dropped, never
raised into the checker: the domain's check result is already stored, and the next automatic check, an
hour later, fires again while the records are still wrong.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.domains.dns_check import UnitOfWork
from mtad.events.schema import AnyEvent, DomainDNSError, server_fields
from mtad.store.domains import Domain
from mtad.store.servers import Server, find_server


class EventAppender(Protocol):
    """Somewhere typed events are appended to the event stream; fires with the entry's id."""

    def append(self, event: AnyEvent) -> Deferred[str]: ...


class DNSErrorNotice:
    """`DomainDNSChecker`'s ``on_dns_error``: a ``DomainDNSError`` event for a server-owned domain.

    Calling it returns a Deferred that fires (with None, never with a failure) once the event is in the
    stream, or once it has been given up and logged; the checker waits for it.
    """

    log = Logger()

    def __init__(self, database: UnitOfWork, events: EventAppender, clock: IReactorTime) -> None:
        self._database = database
        self._events = events
        self._clock = clock

    def __call__(self, domain: Domain) -> Deferred[None]:
        return Deferred.fromCoroutine(self._notice(domain))

    async def _notice(self, domain: Domain) -> None:
        if domain.server_id is None:
            return  # an organization's domain: Postal fires nothing for it
        try:
            server: Server | None = await self._database.run(find_server, domain.server_id)
            if server is None:
                self.log.warn(
                    "no DomainDNSError for {domain}: its server {server_id} no longer exists",
                    domain=domain.name,
                    server_id=domain.server_id,
                )
                return
            event = dns_error_event(domain, server, self._clock.seconds())
            stream_id = await self._events.append(event)
        except Exception:
            self.log.failure(
                "DomainDNSError for {domain} (server {server_id}) could not be written",
                domain=domain.name,
                server_id=domain.server_id,
            )
            return
        self.log.info(
            "DomainDNSError for {domain} of server {server}: event {stream_id}",
            domain=domain.name,
            server=server.full_permalink,
            stream_id=stream_id,
        )


def dns_error_event(domain: Domain, server: Server, now: float) -> DomainDNSError:
    """The ``domain.dns_error`` event of ``domain``'s stored check, owned by ``server``, at ``now``."""
    checks: dict[str, Any] = {
        "spf_status": domain.spf_status,
        "spf_error": domain.spf_error,
        "dkim_status": domain.dkim_status,
        "dkim_error": domain.dkim_error,
        "mx_status": domain.mx_status,
        "mx_error": domain.mx_error,
        "return_path_status": domain.return_path_status,
        "return_path_error": domain.return_path_error,
    }
    return DomainDNSError(
        **server_fields(server),
        domain=domain.name,
        domain_uuid=domain.uuid,
        dns_checked_at=domain.dns_checked_at if domain.dns_checked_at is not None else now,
        timestamp=now,
        **checks,
    )

"""The DNS side of sending domains: the records a domain's owner publishes, and checking that they did.

Record formats, statuses and error texts follow Postal (``app/models/domain.rb``,
``app/models/concerns/has_dns_checks.rb``):

- verification: TXT at the domain, ``postal-verification <token>``;
- SPF: one TXT ``v=spf1 …`` at the domain including ``include:<spf_include>``
  (suggested: ``v=spf1 a mx include:<spf_include> ~all``);
- DKIM: TXT at ``<selector>._domainkey.<domain>`` publishing the key, for each key not retired;
- return path: CNAME ``psrp.<domain>`` → ``<return_path_domain>`` (bounces then go to
  ``<server token>@psrp.<domain>``);
- MX (inbound, optional): the domain's MX records naming every ``mx_records`` host.

Where Postal is wrong we differ and say so: an SPF ``include`` with a ``-``, ``~`` or ``?`` qualifier does
not authorize us, and two SPF records are ``Invalid`` (both are errors for receivers, RFC 7208 §4.6.2 and
§4.5); a DKIM record is compared by its tags rather than as a string; a lookup that fails (timeout,
SERVFAIL) leaves the previous status alone instead of turning into ``Missing``. Lookups go to the
configured resolvers (Postal asks the domain's authoritative servers unless
``use_local_ns_for_domain_verification``; a recursive resolver may answer from a cache for up to the
record's TTL).

All checks are coroutines over anything with ``query(name, rdtype)``: `mtad.outbound.mx.MXResolver` in the
daemon (asynchronous, on the reactor), `BlockingResolver` in the ``mtad`` command line tool.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.rrset
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtad.config import DomainsConfig
from mtad.mail.dkim_keys import dkim_record_problem, dkim_txt_value, txt_strings
from mtad.outbound.mx import DNSTemporaryError
from mtad.store import domains as domain_store
from mtad.store.domains import ACTIVE, INVALID, MISSING, OK, RETIRED, DNSCheck, Domain, DomainKey, RecordCheck

T = TypeVar("T")


@attrs.frozen
class DNSRecord:
    """One record a domain's owner must publish."""

    #: ``verification``, ``spf``, ``dkim``, ``return-path`` or ``mx``.
    purpose: str
    name: str
    type: str
    #: The TXT text, CNAME target or MX host (without trailing dot).
    value: str
    #: MX preference.
    priority: int | None = None

    def zone_line(self) -> str:
        """The record as a zone file line (RFC 1035 §5.1), long TXT values split into 255-octet strings."""
        if self.type == "TXT":
            rdata = " ".join(f'"{_zone_escape(part)}"' for part in txt_strings(self.value))
        elif self.type == "MX":
            rdata = f"{self.priority} {self.value}."
        else:
            rdata = f"{self.value}."
        return f"{self.name}. IN {self.type} {rdata}"


def _zone_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def verification_value(domain: Domain, settings: DomainsConfig) -> str:
    return f"{settings.verification_prefix} {domain.verification_token}"


def spf_value(settings: DomainsConfig) -> str:
    """Postal's suggested SPF record."""
    return f"v=spf1 a mx include:{settings.spf_include} ~all"


def dkim_record_name(domain: Domain, key: DomainKey) -> str:
    return f"{key.selector}._domainkey.{domain.name}"


def return_path_name(domain: Domain, settings: DomainsConfig) -> str:
    return f"{settings.return_path_prefix}.{domain.name}"


def records_to_publish(domain: Domain, keys: Sequence[DomainKey], settings: DomainsConfig) -> list[DNSRecord]:
    """Every record the domain needs: verification, SPF, one DKIM record per key that is active or waiting
    to be (retired keys' records may go once mail signed with them has been delivered), return path, MX."""
    records = [
        DNSRecord("verification", domain.name, "TXT", verification_value(domain, settings)),
        DNSRecord("spf", domain.name, "TXT", spf_value(settings)),
    ]
    records.extend(
        DNSRecord("dkim", dkim_record_name(domain, key), "TXT", dkim_txt_value(key.algorithm, key.public_key))
        for key in keys
        if key.state != RETIRED
    )
    records.append(
        DNSRecord("return-path", return_path_name(domain, settings), "CNAME", settings.return_path_domain)
    )
    records.extend(
        DNSRecord("mx", domain.name, "MX", host, settings.mx_priority) for host in settings.mx_records
    )
    return records


class DNSQuerier(Protocol):
    """What the checks need of a resolver (`mtad.outbound.mx.MXResolver` has it): one query, answered with
    NOERROR or NXDOMAIN, or `DNSTemporaryError`."""

    async def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message: ...


class _LookupFailed(Exception):
    """A lookup got no usable answer; the message says which and why."""


async def _answers(resolver: DNSQuerier, name: str, rdtype: dns.rdatatype.RdataType) -> list[dns.rrset.RRset]:
    try:
        response = await resolver.query(name, rdtype)
    except (DNSTemporaryError, dns.exception.DNSException) as e:
        raise _LookupFailed(
            f"DNS lookup of {dns.rdatatype.to_text(rdtype)} records for {name} failed: {e}"
        ) from e
    if response.rcode() == dns.rcode.NXDOMAIN:
        return []
    return [rrset for rrset in response.answer if rrset.rdtype == rdtype]


async def txt_records(resolver: DNSQuerier, name: str) -> list[str]:
    """The TXT records at ``name`` (following CNAMEs), each one's strings joined (RFC 6376 §3.6.2.2)."""
    found = []
    for rrset in await _answers(resolver, name, dns.rdatatype.TXT):
        for rdata in rrset:
            assert isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
            found.append(b"".join(rdata.strings).decode("utf-8", "replace").strip())
    return found


def _host(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


async def mx_hosts(resolver: DNSQuerier, name: str) -> list[str]:
    """The MX host names of ``name``, lower-case, in preference order."""
    found: list[tuple[int, str]] = []
    for rrset in await _answers(resolver, name, dns.rdatatype.MX):
        for rdata in rrset:
            assert isinstance(rdata, dns.rdtypes.ANY.MX.MX)
            found.append((rdata.preference, _host(rdata.exchange)))
    return [host for _, host in sorted(found)]


async def cname_targets(resolver: DNSQuerier, name: str) -> list[str]:
    """The targets of CNAME records at ``name`` itself (not further along a chain), lower-case."""
    qname = dns.name.from_text(name)
    found = []
    for rrset in await _answers(resolver, name, dns.rdatatype.CNAME):
        if rrset.name == qname:
            for rdata in rrset:
                assert isinstance(rdata, dns.rdtypes.ANY.CNAME.CNAME)
                found.append(_host(rdata.target))
    return found


def _same_host(a: str, b: str) -> bool:
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def _sentence(words: Sequence[str]) -> str:
    """Rails' ``to_sentence``, which Postal's MX error uses: ``a``, ``a and b``, ``a, b, and c``."""
    if len(words) <= 2:
        return " and ".join(words)
    return f"{', '.join(words[:-1])}, and {words[-1]}"


async def check_verification(resolver: DNSQuerier, domain: Domain, settings: DomainsConfig) -> RecordCheck:
    """``OK`` if the verification TXT record is at the domain; ``Missing`` saying what to publish if not."""
    expected = verification_value(domain, settings)
    try:
        records = await txt_records(resolver, domain.name)
    except _LookupFailed as e:
        return RecordCheck(None, str(e))
    if any(" ".join(record.split()) == expected for record in records):
        return RecordCheck(OK)
    return RecordCheck(MISSING, f'There is no TXT record "{expected}" at {domain.name}')


_SPF_VERSION = re.compile(r"v=spf1(\s|$)", re.IGNORECASE)


async def check_spf(resolver: DNSQuerier, domain: Domain, settings: DomainsConfig) -> RecordCheck:
    try:
        records = await txt_records(resolver, domain.name)
    except _LookupFailed as e:
        return RecordCheck(None, str(e))
    spf = [record for record in records if _SPF_VERSION.match(record)]
    if not spf:
        return RecordCheck(MISSING, "No SPF record exists for this domain")
    if len(spf) > 1:
        return RecordCheck(
            INVALID, f"There are {len(spf)} SPF records for {domain.name}. There should only be one."
        )
    # Only a "+" (or no) qualifier passes mail from the included hosts (RFC 7208 §4.6.2).
    include = re.compile(rf"\+?include:{re.escape(settings.spf_include.rstrip('.'))}\.?", re.IGNORECASE)
    if not any(include.fullmatch(term) for term in spf[0].split()[1:]):
        return RecordCheck(INVALID, f"An SPF record exists but it doesn't include {settings.spf_include}")
    return RecordCheck(OK)


async def check_dkim_key(resolver: DNSQuerier, domain: Domain, key: DomainKey) -> RecordCheck:
    """Whether ``key``'s record is published at its selector."""
    name = dkim_record_name(domain, key)
    try:
        records = await txt_records(resolver, name)
    except _LookupFailed as e:
        return RecordCheck(None, str(e))
    if not records:
        return RecordCheck(MISSING, f"No TXT records were returned for {name}")
    if len(records) > 1:
        return RecordCheck(INVALID, f"There are {len(records)} records at {name}. There should only be one.")
    problem = dkim_record_problem(key.algorithm, key.public_key, records[0])
    if problem is not None:
        return RecordCheck(
            INVALID,
            f"The DKIM record at {name} does not match the record we have provided. "
            f"Please check it has been copied correctly ({problem}).",
        )
    return RecordCheck(OK)


def _dkim_summary(checks: Sequence[RecordCheck]) -> RecordCheck:
    """The domain's DKIM status from its active keys' checks: the worst of them."""
    if not checks:
        return RecordCheck(MISSING, "The domain has no active DKIM key")
    for status in (INVALID, MISSING, None):
        for check in checks:
            if check.status == status:
                return check
    return RecordCheck(OK)


async def check_mx(resolver: DNSQuerier, domain: Domain, settings: DomainsConfig) -> RecordCheck:
    try:
        hosts = await mx_hosts(resolver, domain.name)
    except _LookupFailed as e:
        return RecordCheck(None, str(e))
    if not hosts:
        return RecordCheck(MISSING, f"There are no MX records for {domain.name}")
    missing = [m for m in settings.mx_records if not any(_same_host(m, h) for h in hosts)]
    if not missing:
        return RecordCheck(OK)
    if len(missing) == len(settings.mx_records):
        return RecordCheck(MISSING, "You have MX records but none of them point to us.")
    noun = "record" if len(missing) == 1 else "records"
    return RecordCheck(INVALID, f"MX {noun} for {_sentence(missing)} are missing and are required.")


async def check_return_path(resolver: DNSQuerier, domain: Domain, settings: DomainsConfig) -> RecordCheck:
    name = return_path_name(domain, settings)
    try:
        targets = await cname_targets(resolver, name)
    except _LookupFailed as e:
        return RecordCheck(None, str(e))
    if not targets:
        return RecordCheck(MISSING, f"There is no return path record at {name}")
    if len(targets) == 1 and _same_host(targets[0], settings.return_path_domain):
        return RecordCheck(OK)
    return RecordCheck(
        INVALID,
        f"There is a CNAME record at {name} but it points to {targets[0]} which is incorrect. "
        f"It should point to {settings.return_path_domain}.",
    )


async def check_domain(
    resolver: DNSQuerier, domain: Domain, keys: Sequence[DomainKey], settings: DomainsConfig
) -> DNSCheck:
    """Check every record of ``domain``: SPF, each non-retired key's DKIM record, MX and return path.

    The domain's DKIM status sums up its active keys; a key waiting for activation is checked on its own
    (`DNSCheck.keys`) so that a rotation in progress does not mark the domain's DKIM as failing.
    """
    key_checks = [(key, await check_dkim_key(resolver, domain, key)) for key in keys if key.state != RETIRED]
    return DNSCheck(
        spf=await check_spf(resolver, domain, settings),
        dkim=_dkim_summary([check for key, check in key_checks if key.state == ACTIVE]),
        mx=await check_mx(resolver, domain, settings),
        return_path=await check_return_path(resolver, domain, settings),
        keys=tuple((key.id, check) for key, check in key_checks),
    )


class BlockingResolver:
    """`DNSQuerier` for the command line tool: dnspython's blocking UDP (TCP when truncated) queries.

    Its coroutines never suspend, so `run_blocking` drives a check to its end without a reactor. Never use it
    in the daemon: it blocks the thread for up to ``timeout`` seconds per server and attempt.
    """

    def __init__(
        self, nameservers: Sequence[tuple[str, int]], timeout: float = 5.0, attempts: int = 2
    ) -> None:
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.attempts = attempts

    async def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        problems: list[str] = []
        for _attempt in range(max(self.attempts, 1)):
            for host, port in self.nameservers:
                query = dns.message.make_query(dns.name.from_text(name), rdtype, use_edns=0, payload=1232)
                try:
                    response, _ = dns.query.udp_with_fallback(
                        query, host, timeout=self.timeout, port=port, ignore_trailing=True
                    )
                except (dns.exception.DNSException, OSError) as e:
                    problems.append(f"{host}:{port}: {e or type(e).__name__}")
                    continue
                if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                problems.append(f"{host}:{port} answered {dns.rcode.to_text(response.rcode())}")
        raise DNSTemporaryError("; ".join(dict.fromkeys(problems)))


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (one over `BlockingResolver`) and return its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the coroutine waited for something: it needs a reactor")


class UnitOfWork(Protocol):
    """What the checker needs of `mtad.store.db.Database`: run a sync function in a transaction."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class DomainDNSChecker(Service):
    """Re-checks every domain's DNS records every ``settings.check_interval`` seconds (Postal: hourly), and
    verifies unverified domains whose verification record has appeared.

    Every ``poll_interval`` seconds it takes the domains whose last check is older than the interval
    (never-checked first), so checks spread over time instead of all running at the top of the hour.
    ``on_dns_error`` is called with each domain whose automatic check finds it not ``dns_ok`` (where Postal
    sends its ``DomainDNSError`` webhook); when it returns a Deferred or coroutine, the check waits for it,
    so a pass (and `stopService`) ends only once what it does is done.

    With several mtad processes on one database, run the checker in one of them: it is harmless but
    wasteful in more.
    """

    log = Logger()

    def __init__(
        self,
        db: UnitOfWork,
        resolver: DNSQuerier,
        clock: IReactorTime,
        settings: DomainsConfig,
        *,
        poll_interval: float = 300.0,
        batch_size: int = 100,
        concurrency: int = 10,
        on_dns_error: Callable[[Domain], Awaitable[object] | object] | None = None,
    ) -> None:
        self._db = db
        self._resolver = resolver
        self._clock = clock
        self.settings = settings
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self._semaphore = DeferredSemaphore(concurrency)
        self._on_dns_error = on_dns_error
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[LoopingCall] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self.poll_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop polling; fires when a pass in progress has finished (no check is cut off half-way)."""
        super().stopService()  # type: ignore[no-untyped-call]
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is None or done is None:
            return succeed(None)
        if loop.running:
            loop.stop()  # waits for a pass in progress: ``done`` fires when it has finished
        return done.addCallback(lambda _: None)

    def _tick(self) -> Deferred[int]:
        d = Deferred.fromCoroutine(self.run_once())

        def failed(failure: Any) -> int:
            self.log.failure("domain DNS check pass failed", failure)
            return 0

        return d.addErrback(failed)

    async def run_once(self) -> int:
        """Check the domains that are due (at most ``batch_size``); return how many were checked."""
        checked_before = self._clock.seconds() - self.settings.check_interval
        due: list[Domain] = await self._db.run(
            domain_store.domains_due_for_check, checked_before, self.batch_size
        )

        async def one(domain: Domain) -> None:
            try:
                await self.check(domain, automatic=True)
            except Exception:
                self.log.failure("DNS check of {domain} failed", domain=domain.name)

        await gatherResults(
            [self._semaphore.run(lambda d: Deferred.fromCoroutine(one(d)), domain) for domain in due]
        )
        return len(due)

    async def check(self, domain: Domain, automatic: bool = False) -> Domain:
        """Check ``domain`` now (verifying it first if its verification record has appeared); store and
        return the result."""
        if not domain.verified:
            verification = await check_verification(self._resolver, domain, self.settings)
            if verification.status == OK:
                domain = await self._db.run(domain_store.verify_domain, domain.id, self._clock.seconds())
                self.log.info("domain {domain} verified by its DNS record", domain=domain.name)
        keys: list[DomainKey] = await self._db.run(domain_store.list_keys, domain.id)
        result = await check_domain(self._resolver, domain, keys, self.settings)
        stored: Domain = await self._db.run(
            domain_store.record_dns_check, domain.id, result, self._clock.seconds()
        )
        if not stored.dns_ok:
            self.log.info(
                "DNS of {domain}: SPF {spf}, DKIM {dkim}, MX {mx}, return path {return_path}",
                domain=stored.name,
                spf=stored.spf_status,
                dkim=stored.dkim_status,
                mx=stored.mx_status,
                return_path=stored.return_path_status,
            )
            if automatic and self._on_dns_error is not None:
                noticed = self._on_dns_error(stored)
                if inspect.isawaitable(noticed):
                    await noticed
        return stored

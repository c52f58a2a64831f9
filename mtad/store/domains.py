"""Sending domains: the domains a server may put in From, each with its DKIM keys and DNS check results.

As in Postal, a domain belongs to a server or to an organization (then every server of the organization may
use it), must be verified (a TXT record ``postal-verification <token>`` at the domain) before mail from it
is accepted, and is checked periodically for its SPF, DKIM, MX and return-path records.

Unlike Postal, a domain has several DKIM keys, each with its own selector, so keys can be rotated without
a window in which signatures fail to verify (RFC 6376 §3.1 selectors exist for exactly this):

1. `rotate_key` makes a new key in state ``published``: its record is to be put in DNS; nothing signs
   with it yet.
2. Once the record is in DNS (and has had time to reach resolvers' caches), `activate_key` makes it
   ``active`` and the previous active key of the same algorithm ``retired``, in one transaction: every
   message is signed by exactly one key of each algorithm at every moment.
3. A retired key's record stays published for a few days, until mail signed with it has been delivered
   and verified; then the operator removes it from DNS.

Keys of two algorithms may be active at once (RSA and Ed25519, RFC 8463 §4 dual signing): `signing_keys`
gives one per algorithm.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

import attrs
import idna
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.mail.dkim_keys import ALGORITHMS, RSA, generate_key
from mtad.store.db import AlreadyExists, NotFound, StoreError
from mtad.store.tables import domain_keys, domains, organizations, servers

# DNS check statuses (Postal's words, stored as they are).
OK = "OK"
MISSING = "Missing"
INVALID = "Invalid"

# Key states.
PUBLISHED = "published"
ACTIVE = "active"
RETIRED = "retired"

#: Postal's DNS verification tokens: 32 random letters and digits.
VERIFICATION_TOKEN_ALPHABET = string.ascii_letters + string.digits
VERIFICATION_TOKEN_LENGTH = 32

#: Selectors are ``<prefix>-<6 random characters>`` (Postal: ``postal-XXXXXX``).
SELECTOR_ALPHABET = string.ascii_lowercase + string.digits
SELECTOR_RANDOM_LENGTH = 6

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@attrs.frozen
class Domain:
    id: int
    #: Lower-case ASCII (A-labels for internationalized names), no trailing dot.
    name: str
    server_id: int | None
    organization_id: int | None
    verification_token: str
    verified_at: float | None
    use_for_any: bool
    #: ``OK``, ``Missing`` or ``Invalid`` (``None`` before the first check), each with the reason.
    spf_status: str | None
    spf_error: str | None
    dkim_status: str | None
    dkim_error: str | None
    mx_status: str | None
    mx_error: str | None
    return_path_status: str | None
    return_path_error: str | None
    dns_checked_at: float | None
    created_at: float
    #: Names the domain to webhook receivers (Postal's ``uuid``).
    uuid: str = ""

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    @property
    def dns_ok(self) -> bool:
        """Postal's ``dns_ok?``: SPF and DKIM are right; MX and return path are right or absent."""
        return (
            self.spf_status == OK
            and self.dkim_status == OK
            and self.mx_status in (OK, MISSING)
            and self.return_path_status in (OK, MISSING)
        )


@attrs.frozen
class DomainKey:
    id: int
    domain_id: int
    #: DNS label; the record is at ``<selector>._domainkey.<domain>``.
    selector: str
    #: ``rsa`` or ``ed25519``.
    algorithm: str
    private_key_pem: bytes = attrs.field(repr=False)
    #: Base64, as in the ``p=`` tag.
    public_key: str
    #: ``active`` (signs), ``published`` (to be activated) or ``retired`` (signed before; record may stay).
    state: str
    created_at: float
    #: Last DNS check of this key's record: ``OK``, ``Missing``, ``Invalid`` or ``None`` (never checked).
    dns_status: str | None = None
    dns_error: str | None = None
    activated_at: float | None = None
    retired_at: float | None = None


@attrs.frozen
class RecordCheck:
    """The outcome of checking one DNS record: a status and why, or ``status=None`` when the lookup itself
    failed (timeout, SERVFAIL), in which case the stored status is left as it was."""

    status: str | None
    error: str | None = None


@attrs.frozen
class DNSCheck:
    """The outcome of a domain's DNS check, as `record_dns_check` stores it; ``keys`` maps key ids to the
    check of that key's record."""

    spf: RecordCheck
    dkim: RecordCheck
    mx: RecordCheck
    return_path: RecordCheck
    keys: tuple[tuple[int, RecordCheck], ...] = ()


def normalize_domain_name(name: str) -> str:
    """``name`` as stored: lower-case, no trailing dot, A-labels (RFC 5890) for Unicode; `StoreError` if it
    is not a host name with at least two labels."""
    text = name.strip().rstrip(".")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise StoreError(f"invalid domain name {name!r}: {e}") from None
    text = text.lower()
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise StoreError(f"invalid domain name {name!r}")
    return text


def check_selector_prefix(prefix: str) -> str:
    """``prefix`` if it makes valid selectors (letters, digits and inner hyphens); `StoreError` otherwise."""
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?", prefix):
        raise StoreError(
            f"invalid DKIM selector prefix {prefix!r}: use lowercase letters, digits and hyphens"
        )
    return prefix


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise StoreError(f"unknown DKIM key algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    return algorithm


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


_DOMAIN_COLUMNS = (
    domains.c.id,
    domains.c.name,
    domains.c.server_id,
    domains.c.organization_id,
    domains.c.verification_token,
    domains.c.verified_at,
    domains.c.use_for_any,
    domains.c.spf_status,
    domains.c.spf_error,
    domains.c.dkim_status,
    domains.c.dkim_error,
    domains.c.mx_status,
    domains.c.mx_error,
    domains.c.return_path_status,
    domains.c.return_path_error,
    domains.c.dns_checked_at,
    domains.c.created_at,
    domains.c.uuid,
)


def _domain(row: sa.Row[*tuple[Any, ...]]) -> Domain:
    return Domain(
        id=row.id,
        name=row.name,
        server_id=row.server_id,
        organization_id=row.organization_id,
        verification_token=row.verification_token,
        verified_at=row.verified_at,
        use_for_any=bool(row.use_for_any),
        spf_status=row.spf_status,
        spf_error=row.spf_error,
        dkim_status=row.dkim_status,
        dkim_error=row.dkim_error,
        mx_status=row.mx_status,
        mx_error=row.mx_error,
        return_path_status=row.return_path_status,
        return_path_error=row.return_path_error,
        dns_checked_at=row.dns_checked_at,
        created_at=row.created_at,
        uuid=row.uuid,
    )


def _key(row: sa.Row[*tuple[Any, ...]]) -> DomainKey:
    return DomainKey(
        id=row.id,
        domain_id=row.domain_id,
        selector=row.selector,
        algorithm=row.algorithm,
        private_key_pem=row.private_key_pem.encode("ascii"),
        public_key=row.public_key,
        state=row.state,
        created_at=row.created_at,
        dns_status=row.dns_status,
        dns_error=row.dns_error,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
    )


def _new_selector(conn: Connection, domain_id: int | None, prefix: str, taken: set[str]) -> str:
    # 36**6 ≈ 2.2 billion: a clash within one domain is very unlikely, but check (the unique key is the
    # backstop).
    existing = set(taken)
    if domain_id is not None:
        existing |= {
            s
            for (s,) in conn.execute(
                sa.select(domain_keys.c.selector).where(domain_keys.c.domain_id == domain_id)
            )
        }
    while True:
        selector = f"{prefix}-{_random(SELECTOR_ALPHABET, SELECTOR_RANDOM_LENGTH)}"
        if selector not in existing:
            return selector


def _insert_key(
    conn: Connection,
    domain_id: int,
    selector: str,
    algorithm: str,
    key_pair: tuple[bytes, str],
    state: str,
    now: float,
) -> DomainKey:
    private_key_pem, public_key = key_pair
    activated_at = now if state == ACTIVE else None
    result = conn.execute(
        domain_keys.insert().values(
            domain_id=domain_id,
            selector=selector,
            algorithm=algorithm,
            private_key_pem=private_key_pem.decode("ascii"),
            public_key=public_key,
            state=state,
            activated_at=activated_at,
            created_at=now,
            updated_at=now,
        )
    )
    (id_,) = result.inserted_primary_key or (None,)
    assert id_ is not None
    return DomainKey(
        id=int(id_),
        domain_id=domain_id,
        selector=selector,
        algorithm=algorithm,
        private_key_pem=private_key_pem,
        public_key=public_key,
        state=state,
        created_at=now,
        activated_at=activated_at,
    )


def create_domain(
    conn: Connection,
    name: str,
    now: float,
    *,
    server_id: int | None = None,
    organization_id: int | None = None,
    algorithms: Sequence[str] = (RSA,),
    selector_prefix: str = "postal",
    rsa_bits: int = 2048,
    use_for_any: bool = False,
) -> Domain:
    """Add a domain to a server or an organization (exactly one), unverified, with a verification token
    and one active DKIM key per algorithm, each with its own selector."""
    name = normalize_domain_name(name)
    if (server_id is None) == (organization_id is None):
        raise StoreError("a domain belongs to either a server or an organization")
    algorithms = list(dict.fromkeys(_check_algorithm(a) for a in algorithms))
    if not algorithms:
        raise StoreError("a domain needs at least one DKIM key algorithm")
    check_selector_prefix(selector_prefix)
    if server_id is not None:
        if conn.execute(sa.select(servers.c.id).where(servers.c.id == server_id)).first() is None:
            raise NotFound(f"no server with id {server_id}")
        owner = domains.c.server_id == server_id
    else:
        if (
            conn.execute(sa.select(organizations.c.id).where(organizations.c.id == organization_id)).first()
            is None
        ):
            raise NotFound(f"no organization with id {organization_id}")
        owner = domains.c.organization_id == organization_id
    if conn.execute(sa.select(domains.c.id).where(owner, domains.c.name == name)).first() is not None:
        raise AlreadyExists(f"domain {name} has already been added")
    # Key generation (RSA takes a noticeable fraction of a second) before the first write, so SQLite's write
    # lock is not held meanwhile.
    try:
        key_pairs = [(algorithm, generate_key(algorithm, rsa_bits)) for algorithm in algorithms]
    except ValueError as e:
        raise StoreError(str(e)) from None
    result = conn.execute(
        domains.insert().values(
            name=name,
            server_id=server_id,
            organization_id=organization_id,
            verification_token=_random(VERIFICATION_TOKEN_ALPHABET, VERIFICATION_TOKEN_LENGTH),
            use_for_any=use_for_any,
            created_at=now,
            updated_at=now,
        )
    )
    (id_,) = result.inserted_primary_key or (None,)
    assert id_ is not None
    taken: set[str] = set()
    for algorithm, key_pair in key_pairs:
        selector = _new_selector(conn, None, selector_prefix, taken)
        taken.add(selector)
        _insert_key(conn, int(id_), selector, algorithm, key_pair, ACTIVE, now)
    return get_domain(conn, int(id_))


def find_domain(conn: Connection, id: int) -> Domain | None:
    row = conn.execute(sa.select(*_DOMAIN_COLUMNS).where(domains.c.id == id)).one_or_none()
    return None if row is None else _domain(row)


def get_domain(conn: Connection, id: int) -> Domain:
    """The domain with ``id``; `NotFound` if there is none."""
    domain = find_domain(conn, id)
    if domain is None:
        raise NotFound(f"no domain with id {id}")
    return domain


def find_domains_by_name(conn: Connection, name: str) -> list[Domain]:
    """Every domain called ``name`` (any case), whoever owns it: one name may be added by several owners."""
    try:
        name = normalize_domain_name(name)
    except StoreError:
        return []
    query = sa.select(*_DOMAIN_COLUMNS).where(domains.c.name == name).order_by(domains.c.id)
    return [_domain(row) for row in conn.execute(query)]


def get_domain_by_name(conn: Connection, name: str) -> Domain:
    """The domain named as operators name them: its name if only one owner has added it, or its id;
    `NotFound` or `StoreError` (ambiguous) otherwise."""
    if name.isdigit():
        return get_domain(conn, int(name))
    found = find_domains_by_name(conn, name)
    if not found:
        raise NotFound(f"no domain {name!r}")
    if len(found) > 1:
        ids = ", ".join(str(d.id) for d in found)
        raise StoreError(f"domain name {name!r} is ambiguous (ids {ids}); use the id")
    return found[0]


def list_domains(
    conn: Connection, server_id: int | None = None, organization_id: int | None = None
) -> list[Domain]:
    """Domains owned by the server or by the organization given (either); all domains if neither is."""
    query = sa.select(*_DOMAIN_COLUMNS)
    owners = []
    if server_id is not None:
        owners.append(domains.c.server_id == server_id)
    if organization_id is not None:
        owners.append(domains.c.organization_id == organization_id)
    if owners:
        query = query.where(sa.or_(*owners))
    return [_domain(row) for row in conn.execute(query.order_by(domains.c.name, domains.c.id))]


def find_sending_domain(conn: Connection, server_id: int, organization_id: int, domain: str) -> Domain | None:
    """The verified domain that authorizes server ``server_id`` to send mail from ``domain``, or ``None``.

    Postal's rule (``Server#authenticated_domain_for_address``): the domain itself, owned by the server
    (preferred) or by its organization; else a domain of the server's flagged ``use_for_any`` (then of the
    organization's), alphabetically first. No subdomain inheritance: ``a.example.com`` is not authorized
    by ``example.com``.
    """
    try:
        name = normalize_domain_name(domain)
    except StoreError:
        return None
    query = sa.select(*_DOMAIN_COLUMNS).where(
        domains.c.verified_at.is_not(None),
        sa.or_(domains.c.server_id == server_id, domains.c.organization_id == organization_id),
        sa.or_(domains.c.name == name, domains.c.use_for_any.is_(True)),
    )
    candidates = [_domain(row) for row in conn.execute(query)]

    def rank(d: Domain) -> tuple[bool, bool, str]:
        return (d.name != name, d.server_id != server_id, d.name)

    return min(candidates, key=rank, default=None)


def verify_domain(conn: Connection, domain_id: int, now: float) -> Domain:
    """Mark the domain verified (its verification record was found); verifying again keeps the first time."""
    conn.execute(
        domains.update()
        .where(domains.c.id == domain_id, domains.c.verified_at.is_(None))
        .values(verified_at=now, updated_at=now)
    )
    return get_domain(conn, domain_id)


def set_use_for_any(conn: Connection, domain_id: int, use_for_any: bool, now: float) -> Domain:
    """Allow (or stop allowing) the domain to sign mail from any From domain of its owner's."""
    result = conn.execute(
        domains.update().where(domains.c.id == domain_id).values(use_for_any=use_for_any, updated_at=now)
    )
    if result.rowcount == 0:
        raise NotFound(f"no domain with id {domain_id}")
    return get_domain(conn, domain_id)


def list_keys(conn: Connection, domain_id: int) -> list[DomainKey]:
    """Every key of the domain, oldest first, whatever its state."""
    query = sa.select(domain_keys).where(domain_keys.c.domain_id == domain_id).order_by(domain_keys.c.id)
    return [_key(row) for row in conn.execute(query)]


def _algorithm_order(key: DomainKey) -> int:
    return ALGORITHMS.index(key.algorithm) if key.algorithm in ALGORITHMS else len(ALGORITHMS)


def signing_keys(conn: Connection, domain_id: int) -> list[DomainKey]:
    """The keys mail from the domain is signed with now: the active ones, one per algorithm, RSA first."""
    query = sa.select(domain_keys).where(domain_keys.c.domain_id == domain_id, domain_keys.c.state == ACTIVE)
    return sorted((_key(row) for row in conn.execute(query)), key=_algorithm_order)


def _lock_domain(conn: Connection, domain_id: int) -> Domain:
    # Row lock (PostgreSQL, MySQL) so that two concurrent rotations of one domain run one after the other;
    # SQLite has a single writer anyway.
    row = conn.execute(
        sa.select(*_DOMAIN_COLUMNS).where(domains.c.id == domain_id).with_for_update()
    ).one_or_none()
    if row is None:
        raise NotFound(f"no domain with id {domain_id}")
    return _domain(row)


def rotate_key(
    conn: Connection,
    domain_id: int,
    now: float,
    *,
    algorithm: str = RSA,
    selector_prefix: str = "postal",
    rsa_bits: int = 2048,
) -> DomainKey:
    """Make a new key for the domain under a new selector, in state ``published``: its record is to be put
    in DNS before `activate_key` switches signing to it. One key per algorithm may wait at a time."""
    _check_algorithm(algorithm)
    check_selector_prefix(selector_prefix)
    try:
        key_pair = generate_key(algorithm, rsa_bits)
    except ValueError as e:
        raise StoreError(str(e)) from None
    domain = _lock_domain(conn, domain_id)
    waiting = conn.execute(
        sa.select(domain_keys.c.selector).where(
            domain_keys.c.domain_id == domain_id,
            domain_keys.c.algorithm == algorithm,
            domain_keys.c.state == PUBLISHED,
        )
    ).first()
    if waiting is not None:
        raise AlreadyExists(
            f"{domain.name} already has a new {algorithm} key waiting to be activated (selector {waiting[0]})"
        )
    selector = _new_selector(conn, domain_id, selector_prefix, set())
    key = _insert_key(conn, domain_id, selector, algorithm, key_pair, PUBLISHED, now)
    conn.execute(domains.update().where(domains.c.id == domain_id).values(updated_at=now))
    return key


def activate_key(conn: Connection, domain_id: int, selector: str, now: float) -> DomainKey:
    """Sign with the key ``selector`` from now on and retire the key of its algorithm that signed until now,
    in one transaction, so that there is no moment without an active key.

    A retired key may be activated again (to roll back a rotation while its record is still published).
    Whether the record is in DNS is the caller's to check (the CLI does, unless forced).
    """
    domain = _lock_domain(conn, domain_id)
    row = conn.execute(
        sa.select(domain_keys).where(
            domain_keys.c.domain_id == domain_id, domain_keys.c.selector == selector.strip().lower()
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"{domain.name} has no DKIM key with selector {selector!r}")
    key = _key(row)
    if key.state == ACTIVE:
        return key
    conn.execute(
        domain_keys.update()
        .where(
            domain_keys.c.domain_id == domain_id,
            domain_keys.c.algorithm == key.algorithm,
            domain_keys.c.state == ACTIVE,
        )
        .values(state=RETIRED, retired_at=now, updated_at=now)
    )
    conn.execute(
        domain_keys.update()
        .where(domain_keys.c.id == key.id)
        .values(state=ACTIVE, activated_at=now, retired_at=None, updated_at=now)
    )
    conn.execute(domains.update().where(domains.c.id == domain_id).values(updated_at=now))
    return _key(conn.execute(sa.select(domain_keys).where(domain_keys.c.id == key.id)).one())


def record_dns_check(conn: Connection, domain_id: int, check: DNSCheck, now: float) -> Domain:
    """Store the outcome of a DNS check; a record whose lookup failed (``status=None``) keeps its status."""
    values: dict[str, Any] = {"dns_checked_at": now, "updated_at": now}
    for field in ("spf", "dkim", "mx", "return_path"):
        outcome: RecordCheck = getattr(check, field)
        if outcome.status is not None:
            values[f"{field}_status"] = outcome.status
            values[f"{field}_error"] = outcome.error
    result = conn.execute(domains.update().where(domains.c.id == domain_id).values(**values))
    if result.rowcount == 0:
        raise NotFound(f"no domain with id {domain_id}")
    for key_id, outcome in check.keys:
        if outcome.status is not None:
            conn.execute(
                domain_keys.update()
                .where(domain_keys.c.id == key_id, domain_keys.c.domain_id == domain_id)
                .values(dns_status=outcome.status, dns_error=outcome.error)
            )
    return get_domain(conn, domain_id)


def domains_due_for_check(conn: Connection, checked_before: float, limit: int | None = None) -> list[Domain]:
    """Domains never checked or last checked before ``checked_before``, least recently checked first."""
    query = (
        sa.select(*_DOMAIN_COLUMNS)
        .where(sa.or_(domains.c.dns_checked_at.is_(None), domains.c.dns_checked_at < checked_before))
        .order_by(domains.c.dns_checked_at.is_not(None), domains.c.dns_checked_at, domains.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [_domain(row) for row in conn.execute(query)]

"""Routes and endpoints: which incoming addresses a server accepts, and where their mail goes.

Postal's model (``../shared/reference/postal.md`` §3), in fewer tables: an endpoint is a place mail is
handed to (an HTTP URL, an SMTP server, or an address it is forwarded to), in one ``endpoints`` table whose
columns for the other kinds are NULL; a route belongs to a server and one of its verified domains (or is
the server's return-path route) and names a local part, ``*`` for the whole domain, and a mode. A route
in ``Endpoint`` mode has one or more endpoints (``route_endpoints``, in order), each of which gets its own
copy of every message.

One route per address across all servers (the RCPT decides by the address alone, and a domain name may
be added to two servers; Postal has the same rule). `route_for` is the lookup the SMTP server makes per
RCPT: the local part without its ``+tag`` (plus-addressing: ``local+tag`` matches route ``local``), else
the domain's ``*`` route. Each route also has a forwarding address, ``<token>@<route domain>``
(`route_by_token`).

Bad input is a `RouteError` naming the field, for the API's JSON errors and the CLI's messages.
"""

from __future__ import annotations

import enum
import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mtad.store.db import AlreadyExists, FieldError, NotFound
from mtad.store.domains import normalize_domain_name
from mtad.store.servers import get_server
from mtad.store.tables import domains, endpoints, route_endpoints, routes
from mtad.store.webhooks import WebhookError, check_url


class RouteError(FieldError):
    """A route's or an endpoint's input is wrong; ``field`` names it."""


class EndpointKind(enum.StrEnum):
    HTTP = "HTTP"
    SMTP = "SMTP"
    ADDRESS = "Address"


class Encoding(enum.StrEnum):
    """How an HTTP endpoint gets the message: a JSON body, or form fields (Postal's two)."""

    JSON = "BodyAsJSON"
    FORM = "FormData"


class Format(enum.StrEnum):
    """What an HTTP endpoint gets: the parsed message (``Hash``) or the raw message, base64."""

    HASH = "Hash"
    RAW = "RawMessage"


class TLSMode(enum.StrEnum):
    """How an SMTP endpoint is reached: in the clear, STARTTLS if offered (unverified), STARTTLS required
    (certificate and name verified), or TLS from the first byte (verified)."""

    NONE = "None"
    AUTO = "Auto"
    STARTTLS = "STARTTLS"
    TLS = "TLS"


class RouteMode(enum.StrEnum):
    #: Deliver to the route's endpoints.
    ENDPOINT = "Endpoint"
    #: Accept and keep (delivery ``Processed``).
    ACCEPT = "Accept"
    #: Accept and hold.
    HOLD = "Hold"
    #: Accept, then send the sender a DSN.
    BOUNCE = "Bounce"
    #: Refuse at RCPT (550 5.7.1).
    REJECT = "Reject"


class SpamMode(enum.StrEnum):
    #: Add the X-Postal-Spam headers and deliver.
    MARK = "Mark"
    #: Hold what is spam.
    QUARANTINE = "Quarantine"
    #: Refuse what is spam.
    FAIL = "Fail"


#: The return-path route's name: bounces that match no message of ours go to its endpoint.
RETURN_PATH = "__returnpath__"
WILDCARD = "*"
#: Postal's route names: letters, digits, hyphens and dots (lower-case), or the two special names.
_LOCAL_PART = re.compile(r"[a-z0-9][a-z0-9\-.]*")
#: Postal's route tokens: eight lower-case letters and digits.
TOKEN_ALPHABET = string.ascii_lowercase + string.digits
TOKEN_LENGTH = 8
#: Postal's HTTP endpoint timeout: 5 s by default, 5 to 60.
DEFAULT_TIMEOUT = 5
MIN_TIMEOUT, MAX_TIMEOUT = 5, 60
_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


@attrs.frozen
class Endpoint:
    id: int
    uuid: str
    server_id: int
    kind: EndpointKind
    name: str
    url: str | None = None
    encoding: Encoding | None = None
    format: Format | None = None
    strip_replies: bool = False
    include_attachments: bool = True
    timeout: int | None = None
    hostname: str | None = None
    port: int | None = None
    tls_mode: TLSMode | None = None
    address: str | None = None

    def describe(self) -> str:
        """One line for people: where it goes."""
        if self.kind is EndpointKind.HTTP:
            return f"{self.url} ({self.encoding}, {self.format})"
        if self.kind is EndpointKind.SMTP:
            return f"smtp://{self.hostname}:{self.port} (TLS {self.tls_mode})"
        return f"forward to {self.address}"


@attrs.frozen
class Route:
    id: int
    uuid: str
    server_id: int
    domain_id: int | None
    #: None for the return-path route.
    domain: str | None
    name: str
    mode: RouteMode
    spam_mode: SpamMode
    token: str
    #: The endpoints in order (empty unless the mode is ``Endpoint``).
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def address(self) -> str:
        """``name@domain`` (``*@domain`` for a wildcard), or ``__returnpath__``."""
        return self.name if self.domain is None else f"{self.name}@{self.domain}"


@attrs.frozen
class RouteMatch:
    """The route an incoming address is for, and the ``+tag`` it carried (kept for the endpoint)."""

    route: Route
    tag: str | None


def _choice(enum_type: type[enum.StrEnum], value: object, field: str) -> Any:
    for member in enum_type:
        if isinstance(value, str) and value.strip().lower() == member.value.lower():
            return member
    choices = ", ".join(m.value for m in enum_type)
    raise RouteError(field, f"`{field}` is {value!r}; it must be one of {choices}")


def _check_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise RouteError(field, f"`{field}` must be a non-empty string")
    name = name.strip()
    if len(name) > 255:
        raise RouteError(field, f"`{field}` must be at most 255 characters")
    return name


def _endpoint(row: sa.Row[Any]) -> Endpoint:
    kind = EndpointKind(row.kind)
    return Endpoint(
        id=row.id,
        uuid=row.uuid,
        server_id=row.server_id,
        kind=kind,
        name=row.name,
        url=row.url,
        encoding=Encoding(row.encoding) if row.encoding else None,
        format=Format(row.format) if row.format else None,
        strip_replies=bool(row.strip_replies),
        include_attachments=True if row.include_attachments is None else bool(row.include_attachments),
        timeout=row.timeout,
        hostname=row.hostname,
        port=row.port,
        tls_mode=TLSMode(row.tls_mode) if row.tls_mode else None,
        address=row.address,
    )


def _insert_endpoint(conn: Connection, server_id: int, name: object, now: float, **values: Any) -> Endpoint:
    get_server(conn, server_id)
    name = _check_name(name)
    taken = conn.execute(
        sa.select(endpoints.c.id).where(endpoints.c.server_id == server_id, endpoints.c.name == name)
    ).first()
    if taken is not None:
        raise AlreadyExists(f"the server already has an endpoint named {name!r}")
    result = conn.execute(
        endpoints.insert().values(server_id=server_id, name=name, created_at=now, updated_at=now, **values)
    )
    (endpoint_id,) = result.inserted_primary_key or (None,)
    assert endpoint_id is not None
    return get_endpoint(conn, server_id, int(endpoint_id))


def add_http_endpoint(
    conn: Connection,
    server_id: int,
    name: object,
    url: object,
    now: float,
    *,
    encoding: object = Encoding.JSON,
    format: object = Format.HASH,
    strip_replies: bool = False,
    include_attachments: bool = True,
    timeout: object = DEFAULT_TIMEOUT,
) -> Endpoint:
    """An HTTP endpoint: messages are POSTed to ``url``, signed like webhooks."""
    try:
        checked = check_url(url)
    except WebhookError as e:
        raise RouteError(e.field, e.message) from None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
        raise RouteError("timeout", f"`timeout` must be whole seconds from {MIN_TIMEOUT} to {MAX_TIMEOUT}")
    return _insert_endpoint(
        conn,
        server_id,
        name,
        now,
        kind=EndpointKind.HTTP.value,
        url=checked,
        encoding=_choice(Encoding, encoding, "encoding").value,
        format=_choice(Format, format, "format").value,
        strip_replies=bool(strip_replies),
        include_attachments=bool(include_attachments),
        timeout=timeout,
    )


def add_smtp_endpoint(
    conn: Connection,
    server_id: int,
    name: object,
    hostname: object,
    now: float,
    *,
    port: object = 25,
    tls_mode: object = TLSMode.AUTO,
) -> Endpoint:
    """An SMTP endpoint: messages are relayed to ``hostname``:``port``."""
    if not isinstance(hostname, str) or not _HOST_NAME.fullmatch(hostname.strip().lower().rstrip(".")):
        raise RouteError("hostname", f"`hostname` must be a host name or IPv4 address, not {hostname!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RouteError("port", f"`port` must be a port number (1 to 65535), not {port!r}")
    return _insert_endpoint(
        conn,
        server_id,
        name,
        now,
        kind=EndpointKind.SMTP.value,
        hostname=hostname.strip().lower().rstrip("."),
        port=port,
        tls_mode=_choice(TLSMode, tls_mode, "tls_mode").value,
    )


def add_address_endpoint(
    conn: Connection, server_id: int, name: object, address: object, now: float
) -> Endpoint:
    """An address endpoint: messages are forwarded to ``address`` (sender rewritten by SRS)."""
    if not isinstance(address, str):
        raise RouteError("address", "`address` must be an e-mail address")
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or any(c.isspace() or ord(c) < 32 for c in address) or len(address) > 320:
        raise RouteError("address", f"`address` must be an e-mail address (local@domain), not {address!r}")
    try:
        domain = normalize_domain_name(domain)
    except Exception:
        raise RouteError("address", f"`address` has no valid domain: {address!r}") from None
    return _insert_endpoint(
        conn, server_id, name, now, kind=EndpointKind.ADDRESS.value, address=f"{local}@{domain}"
    )


def get_endpoint(conn: Connection, server_id: int, endpoint: int | str) -> Endpoint:
    """A server's endpoint by id, uuid or name; `NotFound` otherwise."""
    query = sa.select(endpoints).where(endpoints.c.server_id == server_id)
    if isinstance(endpoint, int):
        query = query.where(endpoints.c.id == endpoint)
    else:
        query = query.where(sa.or_(endpoints.c.uuid == endpoint, endpoints.c.name == endpoint))
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"the server has no endpoint {endpoint!r}")
    return _endpoint(row)


def list_endpoints(conn: Connection, server_id: int) -> list[Endpoint]:
    query = sa.select(endpoints).where(endpoints.c.server_id == server_id).order_by(endpoints.c.name)
    return [_endpoint(row) for row in conn.execute(query)]


def remove_endpoint(conn: Connection, server_id: int, endpoint: int | str, now: float) -> Endpoint:
    """Delete an endpoint. A route left in Endpoint mode with no endpoint turns to Reject (as Postal
    does), so its mail is refused rather than accepted for nowhere."""
    found = get_endpoint(conn, server_id, endpoint)
    route_ids = list(
        conn.execute(
            sa.select(route_endpoints.c.route_id).where(route_endpoints.c.endpoint_id == found.id)
        ).scalars()
    )
    conn.execute(route_endpoints.delete().where(route_endpoints.c.endpoint_id == found.id))
    conn.execute(endpoints.delete().where(endpoints.c.id == found.id))
    for route_id in route_ids:
        left = conn.execute(
            sa.select(sa.func.count()).where(route_endpoints.c.route_id == route_id)
        ).scalar_one()
        if not left:
            conn.execute(
                routes.update()
                .where(routes.c.id == route_id, routes.c.mode == RouteMode.ENDPOINT.value)
                .values(mode=RouteMode.REJECT.value, updated_at=now)
            )
    return found


def _new_token(conn: Connection) -> str:
    while True:
        token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))
        if conn.execute(sa.select(routes.c.id).where(routes.c.token == token)).first() is None:
            return token


def split_route_address(address: object) -> tuple[str, str | None]:
    """``(name, domain)`` of a route's address (``local@domain``, ``*@domain``, or ``__returnpath__``
    with no domain), checked and lower-cased; `RouteError` naming ``address`` otherwise."""
    if not isinstance(address, str) or not address.strip():
        raise RouteError("address", "`address` must be local@domain, *@domain or __returnpath__")
    text = address.strip().lower()
    if text == RETURN_PATH:
        return RETURN_PATH, None
    name, at, domain = text.rpartition("@")
    if not at:
        raise RouteError(
            "address", f"`address` must be local@domain, *@domain or __returnpath__, not {address!r}"
        )
    if name != WILDCARD and (not _LOCAL_PART.fullmatch(name) or len(name) > 64):
        raise RouteError(
            "address",
            f"`address`'s local part {name!r} may hold only letters, digits, hyphens and dots (at most 64; "
            "a +tag is matched without being named), or be *",
        )
    try:
        return name, normalize_domain_name(domain)
    except Exception:
        raise RouteError("address", f"`address` has no valid domain: {address!r}") from None


def add_route(
    conn: Connection,
    server_id: int,
    address: object,
    now: float,
    *,
    mode: object = RouteMode.ENDPOINT,
    endpoints_: Sequence[int | str] = (),
    spam_mode: object = SpamMode.MARK,
) -> Route:
    """A route for ``address`` of server ``server_id`` (see the module docstring).

    The domain must be a verified domain of the server or of its organization. ``Endpoint`` mode needs at
    least one endpoint of the server's; the other modes take none. A wildcard route and the return-path
    route take HTTP endpoints only (as in Postal: forwarding a whole domain by SMTP or to an address
    invites loops and backscatter), and a server has one return-path route.
    """
    server = get_server(conn, server_id)
    name, domain = split_route_address(address)
    route_mode: RouteMode = _choice(RouteMode, mode, "mode")
    spam: SpamMode = _choice(SpamMode, spam_mode, "spam_mode")
    chosen = [get_endpoint(conn, server_id, e) for e in dict.fromkeys(endpoints_)]
    if route_mode is RouteMode.ENDPOINT and not chosen:
        raise RouteError("endpoints", "`endpoints`: a route in Endpoint mode needs at least one endpoint")
    if route_mode is not RouteMode.ENDPOINT and chosen:
        raise RouteError("endpoints", f"`endpoints`: a route in {route_mode} mode takes no endpoints")
    if name in (WILDCARD, RETURN_PATH) and any(e.kind is not EndpointKind.HTTP for e in chosen):
        which = "wildcard" if name == WILDCARD else "return-path"
        raise RouteError("endpoints", f"`endpoints`: a {which} route takes HTTP endpoints only")
    domain_id = None
    if domain is None:
        taken = conn.execute(
            sa.select(routes.c.id).where(routes.c.server_id == server_id, routes.c.name == RETURN_PATH)
        ).first()
        if taken is not None:
            raise AlreadyExists("the server already has a return-path route")
    else:
        owned = conn.execute(
            sa.select(domains.c.id)
            .where(
                domains.c.name == domain,
                domains.c.verified_at.is_not(None),
                sa.or_(domains.c.server_id == server_id, domains.c.organization_id == server.organization_id),
            )
            .order_by(domains.c.server_id.is_(None), domains.c.id)
        ).first()
        if owned is None:
            raise RouteError(
                "address", f"`address`: {domain} is not a verified domain of {server.full_permalink}"
            )
        domain_id = owned.id
        taken = conn.execute(
            sa.select(routes.c.server_id).where(routes.c.domain == domain, routes.c.name == name)
        ).first()
        if taken is not None:
            raise AlreadyExists(f"{name}@{domain} already has a route")
    result = conn.execute(
        routes.insert().values(
            server_id=server_id,
            domain_id=domain_id,
            domain=domain,
            name=name,
            mode=route_mode.value,
            spam_mode=spam.value,
            token=_new_token(conn),
            created_at=now,
            updated_at=now,
        )
    )
    (route_id,) = result.inserted_primary_key or (None,)
    assert route_id is not None
    if chosen:
        conn.execute(
            route_endpoints.insert(),
            [{"route_id": route_id, "endpoint_id": e.id, "position": n} for n, e in enumerate(chosen)],
        )
    return _load_routes(conn, routes.c.id == route_id)[0]


def _load_routes(conn: Connection, condition: Any) -> list[Route]:
    rows = list(conn.execute(sa.select(routes).where(condition).order_by(routes.c.domain, routes.c.name)))
    if not rows:
        return []
    linked: dict[int, list[Endpoint]] = {}
    query = (
        sa.select(route_endpoints.c.route_id, endpoints)
        .join(endpoints, endpoints.c.id == route_endpoints.c.endpoint_id)
        .where(route_endpoints.c.route_id.in_([r.id for r in rows]))
        .order_by(route_endpoints.c.route_id, route_endpoints.c.position)
    )
    for row in conn.execute(query):
        linked.setdefault(row.route_id, []).append(_endpoint(row))
    return [
        Route(
            id=r.id,
            uuid=r.uuid,
            server_id=r.server_id,
            domain_id=r.domain_id,
            domain=r.domain,
            name=r.name,
            mode=RouteMode(r.mode),
            spam_mode=SpamMode(r.spam_mode),
            token=r.token,
            endpoints=tuple(linked.get(r.id, ())),
        )
        for r in rows
    ]


def list_routes(conn: Connection, server_id: int) -> list[Route]:
    return _load_routes(conn, routes.c.server_id == server_id)


def get_route(conn: Connection, server_id: int, route: int | str) -> Route:
    """A server's route by id, uuid, token or address; `NotFound` otherwise."""
    if isinstance(route, int):
        condition = routes.c.id == route
    else:
        text = route.strip().lower()
        by_address: Any = sa.false()
        try:
            name, domain = split_route_address(text)
            by_address = sa.and_(
                routes.c.name == name,
                routes.c.domain.is_(None) if domain is None else routes.c.domain == domain,
            )
        except RouteError:
            pass
        condition = sa.or_(routes.c.uuid == route.strip(), routes.c.token == text, by_address)
    found = _load_routes(conn, sa.and_(routes.c.server_id == server_id, condition))
    if not found:
        raise NotFound(f"the server has no route {route!r}")
    return found[0]


def remove_route(conn: Connection, server_id: int, route: int | str) -> Route:
    found = get_route(conn, server_id, route)
    conn.execute(routes.delete().where(routes.c.id == found.id))
    return found


def route_for(conn: Connection, address: str) -> RouteMatch | None:
    """The route incoming mail to ``address`` is for: ``local`` (without a ``+tag``) at its domain, else
    the domain's ``*`` route; None when the domain has no route at all or the address is malformed."""
    local, at, domain_part = address.strip().rpartition("@")
    if not at or not local:
        return None
    try:
        domain = normalize_domain_name(domain_part)
    except Exception:
        return None
    local = local.lower()
    name, plus, tag = local.partition("+")
    found = _load_routes(conn, sa.and_(routes.c.domain == domain, routes.c.name.in_([name, WILDCARD])))
    exact = [r for r in found if r.name == name]
    chosen = exact or [r for r in found if r.name == WILDCARD]
    if not chosen:
        return None
    return RouteMatch(chosen[0], tag if plus else None)


def has_routes(conn: Connection, domain: str) -> bool:
    """Whether any server routes mail for ``domain`` (then an unknown local part is 550 5.1.1)."""
    try:
        name = normalize_domain_name(domain)
    except Exception:
        return False
    return conn.execute(sa.select(routes.c.id).where(routes.c.domain == name).limit(1)).first() is not None


def route_by_token(conn: Connection, token: str) -> Route | None:
    """The route whose forwarding address is ``<token>@<route domain>``."""
    found = _load_routes(conn, routes.c.token == token.strip().lower())
    return found[0] if found else None

"""The configuration: one TOML file turned into frozen attrs values.

Every problem in a file is reported at once, each named by its key path (``smtp.listeners[1].tls``), so an
operator fixes a config in one pass instead of one error per start. Unknown keys are errors: a misspelt key
that silently falls back to a default is how mail ends up on the wrong port.
"""

from __future__ import annotations

import ipaddress
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

T = TypeVar("T")

_LISTENER_TLS_MODES = ("none", "starttls", "implicit")


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` lists every one by key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def _at_least_1024(value: Any) -> str | None:
    return None if value >= 1024 else "must be at least 1024"


def _secret_or_empty(value: Any) -> str | None:
    if value == "" or len(value) >= 16:
        return None
    return "must be empty (generated in data_dir) or at least 16 characters"


def _check(validator: Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": validator}


@attrs.frozen
class GeneralConfig:
    #: The name this installation uses in greetings, Received headers and as default HELO name.
    hostname: str = "localhost"
    #: Where the embedded SQLite database, the embedded Redis and generated TLS keys live.
    data_dir: str = "data"


@attrs.frozen
class DatabaseConfig:
    #: SQLAlchemy URL; empty means SQLite at ``<data_dir>/mtad.sqlite3``.
    url: str = ""
    #: Threads in the database pool (SQL never runs on the reactor thread).
    pool_size: int = attrs.field(default=4, metadata=_check(_positive))


@attrs.frozen
class RedisConfig:
    #: ``redis://host:port/db`` or ``unix:///path?db=N``; empty means an embedded Redis in ``data_dir``.
    url: str = ""
    #: Seconds before a Redis command is abandoned and the caller told to try again later.
    timeout: float = attrs.field(default=10.0, metadata=_check(_positive))


@attrs.frozen
class ListenerConfig:
    #: A Twisted server endpoint string, e.g. ``tcp:2525:interface=127.0.0.1``.
    endpoint: str
    #: ``none``, ``starttls`` (offered after EHLO) or ``implicit`` (TLS from the first byte, port 465).
    tls: str = attrs.field(default="starttls", metadata=_check(_one_of(*_LISTENER_TLS_MODES)))
    #: Name used in logs and the status endpoint; defaults to the endpoint string.
    name: str = ""
    #: Offer AUTH before TLS (only for trusted networks).
    allow_plaintext_auth: bool = False
    max_connections: int = attrs.field(default=1000, metadata=_check(_positive))
    max_connections_per_ip: int = attrs.field(default=50, metadata=_check(_positive))


@attrs.frozen
class SMTPServerConfig:
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(endpoint="tcp:2525:interface=127.0.0.1"),)
    #: Largest message accepted, in octets (advertised with SIZE, RFC 1870).
    max_message_size: int = attrs.field(default=25 * 1024 * 1024, metadata=_check(_positive))
    #: Recipients per message (RFC 5321 §4.5.3.1.8 requires at least 100 be accepted).
    max_recipients: int = attrs.field(default=100, metadata=_check(_positive))
    #: Bad commands before a session is closed with 421.
    max_bad_commands: int = attrs.field(default=10, metadata=_check(_positive))
    #: Failed AUTH attempts per client IP within ``auth_failure_window`` before AUTH is refused.
    max_auth_failures: int = attrs.field(default=5, metadata=_check(_positive))
    auth_failure_window: float = attrs.field(default=300.0, metadata=_check(_positive))
    #: PEM certificate chain and key for STARTTLS / implicit TLS; empty means a self-signed pair
    #: generated in ``data_dir`` on first start.
    tls_certificate: str = ""
    tls_private_key: str = ""


@attrs.frozen
class HTTPConfig:
    #: Endpoint strings for the HTTP API, status and metrics.
    listeners: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)


@attrs.frozen
class DNSConfig:
    #: ``host`` or ``host:port`` of recursive resolvers; empty means the system's resolv.conf.
    nameservers: tuple[str, ...] = ()
    timeout: float = attrs.field(default=5.0, metadata=_check(_positive))
    #: Also look up AAAA records of MX hosts.
    use_ipv6: bool = False


@attrs.frozen
class RetryConfig:
    """Soft-failure back-off: ``base_delay × factor^attempt`` seconds, Postal's schedule by default."""

    base_delay: float = attrs.field(default=300.0, metadata=_check(_positive))
    factor: float = attrs.field(default=1.3, metadata=_check(_positive))
    max_attempts: int = attrs.field(default=18, metadata=_check(_positive))


@attrs.frozen
class DeliveryConfig:
    #: Run the delivery loop in this process (turn off for SMTP/API-only processes).
    enabled: bool = True
    #: Messages in flight at once in this process.
    concurrency: int = attrs.field(default=200, metadata=_check(_positive))
    #: Messages claimed from the queue per round.
    batch_size: int = attrs.field(default=100, metadata=_check(_positive))
    #: Seconds a claimed message is ours before another process may take it.
    lease_seconds: float = attrs.field(default=600.0, metadata=_check(_positive))
    #: Seconds between polls of an empty queue.
    poll_interval: float = attrs.field(default=1.0, metadata=_check(_positive))
    #: Concurrent outbound connections per source address, over all processes.
    max_connections_per_ip: int = attrs.field(default=100, metadata=_check(_positive))
    #: Concurrent outbound connections per (source address, destination MX host).
    max_connections_per_destination: int = attrs.field(default=10, metadata=_check(_positive))
    #: Messages sent over one connection before it is closed.
    max_messages_per_connection: int = attrs.field(default=100, metadata=_check(_positive))
    #: Pool used by servers that name none.
    default_pool: str = "default"
    #: TCP port of remote MX hosts. Always 25 on the Internet; tests and smart-host setups change it.
    port: int = attrs.field(default=25, metadata=_check(_positive))
    #: Connect timeout in seconds for outbound SMTP.
    connect_timeout: float = attrs.field(default=30.0, metadata=_check(_positive))
    #: Days a held message is kept before it expires.
    hold_days: float = attrs.field(default=7.0, metadata=_check(_positive))
    #: Worker processes that DKIM-sign for this process's deliveries; 0 signs in the reactor thread.
    signing_processes: int = attrs.field(default=1, metadata=_check(_not_negative))
    retry: RetryConfig = RetryConfig()


@attrs.frozen
class DomainsConfig:
    """What sending domains publish and how they are checked; Postal's ``dns.*`` names by default."""

    #: SPF records must ``include:`` this name.
    spf_include: str = "spf.postal.example.com"
    #: Return-path CNAMEs (``<return_path_prefix>.<domain>``) point here.
    return_path_domain: str = "rp.postal.example.com"
    return_path_prefix: str = "psrp"
    #: The key of the HMAC that signs each message's VERP return path (`mtad.mail.verp`), so that a bounce
    #: to a made-up address marks nothing; empty: generated once in ``data_dir`` (``verp.secret``). Every
    #: process that sends or reads bounces must have the same one: on several machines, set it here (or
    #: share the file); changing it orphans the bounces of mail already sent.
    verp_secret: str = attrs.field(default="", repr=False, metadata=_check(_secret_or_empty))
    #: MX hosts published for inbound mail to a domain, with this preference.
    mx_records: tuple[str, ...] = ("mx1.postal.example.com", "mx2.postal.example.com")
    mx_priority: int = attrs.field(default=10, metadata=_check(_not_negative))
    #: The verification TXT record is ``<verification_prefix> <token>``.
    verification_prefix: str = "postal-verification"
    #: DKIM selectors are ``<selector_prefix>-xxxxxx``.
    selector_prefix: str = "postal"
    #: PEM file of the installation's own DKIM key, which signs mail whose From domain has no key of its
    #: own (as ``d=<return_path_domain>``, selector ``<selector_prefix>``); empty: generated in data_dir.
    installation_key: str = ""
    #: Size of new RSA DKIM keys (RFC 8301: at least 1024, 2048 recommended).
    rsa_bits: int = attrs.field(default=2048, metadata=_check(_at_least_1024))
    #: Run the periodic DNS check in this process (one process per installation is enough).
    check_enabled: bool = True
    #: Seconds between DNS checks of each domain, and between looks for domains due a check.
    check_interval: float = attrs.field(default=3600.0, metadata=_check(_positive))
    check_poll_interval: float = attrs.field(default=300.0, metadata=_check(_positive))


@attrs.frozen
class RetentionConfig:
    """How long raw messages are kept in SQL after acceptance (Postal's raw message retention)."""

    #: Days a raw message is kept after it was accepted (Postal: ``raw_message_retention_days``, 30).
    raw_message_days: float = attrs.field(default=30.0, metadata=_check(_positive))
    #: Megabytes (MiB) all raw messages may take together; the oldest go first beyond it. 0: no limit.
    raw_message_max_mb: int = attrs.field(default=0, metadata=_check(_not_negative))
    #: Seconds between sweeps that delete raw messages retention no longer keeps.
    sweep_interval: float = attrs.field(default=3600.0, metadata=_check(_positive))
    #: Seconds after acceptance a raw message the recorder has not archived (its ``message.queued`` event
    #: was trimmed from the stream or lost) is archived from Redis anyway, so that no body stays there
    #: forever.
    archive_catch_up_after: float = attrs.field(default=3600.0, metadata=_check(_positive))
    #: Seconds between looks for such raw messages.
    archive_catch_up_interval: float = attrs.field(default=300.0, metadata=_check(_positive))


@attrs.frozen
class EventsConfig:
    """``[events]``: the event stream and its consumers (recorder, webhooks, ...)."""

    #: ``/status`` raises an alarm when the stream holds more events than this. The stream is never
    #: trimmed past a consumer group that has not acknowledged an event, so a stuck consumer shows here
    #: instead of losing webhooks.
    stream_alarm_length: int = attrs.field(default=1_000_000, metadata=_check(_positive))
    #: Seconds between trims of what every consumer group has acknowledged.
    trim_interval: float = attrs.field(default=10.0, metadata=_check(_positive))
    #: Seconds a consumer waits after finding no new events: how late a quiet stream's event is handled.
    poll_interval: float = attrs.field(default=0.2, metadata=_check(_positive))
    #: Seconds an event may stay unacknowledged with a consumer before another consumer of its group
    #: takes it over (the first was killed).
    claim_idle: float = attrs.field(default=60.0, metadata=_check(_positive))


def _networks(value: Any) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not a network (CIDR, e.g. 10.0.0.0/8)"
    return None


def _delays(value: Any) -> str | None:
    return None if all(d > 0 for d in value) else "every delay must be greater than 0"


@attrs.frozen
class WebhooksConfig:
    """``[webhooks]``: Postal-compatible signed webhooks."""

    #: The RSA key webhooks (and HTTP endpoints) are signed with; created (2048 bits) when missing.
    #: Default: ``signing.key`` in ``general.data_dir``. Its public half is at ``/.well-known/jwks.json``.
    signing_key: str = ""
    #: Seconds a receiver has to answer (Postal: 5).
    timeout: float = attrs.field(default=5.0, metadata=_check(_positive))
    #: Requests in flight to one receiver (scheme, host and port) from one process.
    per_url_concurrency: int = attrs.field(default=4, metadata=_check(_positive))
    #: Requests in flight from one process in all.
    concurrency: int = attrs.field(default=50, metadata=_check(_positive))
    #: Seconds between the attempts of a failing request; after the last, it is given up (Postal's).
    retry_delays: tuple[float, ...] = attrs.field(
        default=(120.0, 180.0, 360.0, 600.0, 900.0), metadata=_check(_delays)
    )
    #: Days the request log (every attempt) is kept.
    request_log_days: float = attrs.field(default=10.0, metadata=_check(_positive))
    #: Networks webhooks may be sent to although private, loopback or link-local (the SSRF guard refuses
    #: those otherwise), e.g. ``["10.1.0.0/16"]`` for receivers on your own network.
    allowed_networks: tuple[str, ...] = attrs.field(default=(), metadata=_check(_networks))


@attrs.frozen
class SuppressionConfig:
    """``[suppression]``: each server's list of addresses it does not send to (`mtad.suppression`)."""

    #: Days an address stays suppressed after a hard bounce, repeated soft failures or an operator's
    #: ``add-suppression`` without ``--days`` (Postal: 30). 0: never expires.
    expiry_days: float = attrs.field(default=30.0, metadata=_check(_not_negative))
    #: Soft failures in a row (each a retry the recipient's server answered with a temporary error,
    #: with no delivery between) after which the address is suppressed. Reputation and spam-content
    #: refusals never count.
    soft_fail_threshold: int = attrs.field(default=5, metadata=_check(_positive))
    #: Days an address stays suppressed after a spam complaint. 0: never expires.
    complaint_expiry_days: float = attrs.field(default=0.0, metadata=_check(_not_negative))
    #: Days an address stays suppressed after it unsubscribed. 0: never expires.
    unsubscribe_expiry_days: float = attrs.field(default=0.0, metadata=_check(_not_negative))
    #: Seconds each process keeps the answer for an address (listed or not) before asking SQL again: a
    #: new entry takes up to this long to stop deliveries in a process that asked just before. 0: ask
    #: for every batch.
    lookup_cache_seconds: float = attrs.field(default=15.0, metadata=_check(_not_negative))


@attrs.frozen
class LimitsConfig:
    """``[limits]``: servers' send limits (`mtad.limits`); each server's limit, window and action (hold or
    refuse) are set with ``mtad set-server``."""

    #: Seconds between looks for messages held by a send limit that the window has room for now.
    release_interval: float = attrs.field(default=10.0, metadata=_check(_positive))
    #: Seconds between two ``SendLimitApproaching`` (or two ``SendLimitExceeded``) events of one server
    #: (Postal: an hour).
    notice_interval: int = attrs.field(default=3600, metadata=_check(_positive))
    #: Suspend a server automatically when the bounces that came back reach this percentage of the
    #: messages it sent in the last ``rate_window_hours``. 0: off.
    bounce_rate_threshold: float = attrs.field(default=0.0, metadata=_check(_not_negative))
    #: The same for spam complaints (ARF feedback reports). 0: off.
    complaint_rate_threshold: float = attrs.field(default=0.0, metadata=_check(_not_negative))
    #: The window of both rates, in hours.
    rate_window_hours: float = attrs.field(default=24.0, metadata=_check(_positive))
    #: Messages a server must have sent in the window before its rates count.
    rate_min_sent: int = attrs.field(default=100, metadata=_check(_positive))


@attrs.frozen
class SourceAddressConfig:
    #: Local address outbound connections bind to.
    ip: str
    #: HELO/EHLO name for connections from this address (should match its PTR record).
    hostname: str = ""


@attrs.frozen
class IPPoolConfig:
    name: str
    addresses: tuple[SourceAddressConfig, ...] = ()


@attrs.frozen
class Config:
    general: GeneralConfig = GeneralConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    smtp: SMTPServerConfig = SMTPServerConfig()
    http: HTTPConfig = HTTPConfig()
    dns: DNSConfig = DNSConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    domains: DomainsConfig = DomainsConfig()
    retention: RetentionConfig = RetentionConfig()
    events: EventsConfig = EventsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    suppression: SuppressionConfig = SuppressionConfig()
    limits: LimitsConfig = LimitsConfig()
    #: Named sets of source addresses. With none, a pool named ``default`` uses the system's choice of
    #: source address and ``general.hostname`` as HELO name.
    ip_pools: tuple[IPPoolConfig, ...] = ()

    @property
    def data_path(self) -> Path:
        return Path(self.general.data_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_path.resolve() / 'mtad.sqlite3'}"

    def pools(self) -> tuple[IPPoolConfig, ...]:
        """The configured pools, or the implicit default pool."""
        if self.ip_pools:
            return self.ip_pools
        return (
            IPPoolConfig(name=self.delivery.default_pool, addresses=(SourceAddressConfig(ip="0.0.0.0"),)),
        )


def load_config(path: str | Path | None) -> Config:
    """Read and check a TOML config file; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from e
    return parse_config(data)


def parse_config(data: Mapping[str, Any]) -> Config:
    """Turn parsed TOML into a :class:`Config`, collecting every problem before raising."""
    problems: list[str] = []
    config = _build(Config, data, "", problems)
    if config is not None:
        problems.extend(_cross_checks(config))
    if problems or config is None:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config) -> list[str]:
    problems = []
    names = [p.name for p in config.ip_pools]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(f"ip_pools[{i}].name: duplicate pool name {name!r}")
    if config.ip_pools and config.delivery.default_pool not in names:
        problems.append(f"delivery.default_pool: no pool named {config.delivery.default_pool!r} in ip_pools")
    for i, pool in enumerate(config.ip_pools):
        if not pool.addresses:
            problems.append(f"ip_pools[{i}].addresses: a pool needs at least one address")
    listener_names = [listener.name or listener.endpoint for listener in config.smtp.listeners]
    for i, name in enumerate(listener_names):
        if name in listener_names[:i]:
            problems.append(f"smtp.listeners[{i}]: duplicate listener name {name!r}")
    if bool(config.smtp.tls_certificate) != bool(config.smtp.tls_private_key):
        problems.append("smtp.tls_certificate: tls_certificate and tls_private_key must be set together")
    return problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    """Build attrs class ``cls`` from a TOML table, appending problems named by key path."""
    if not isinstance(data, Mapping):
        problems.append(f"{path or '<top>'}: must be a table")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            problems.append(f"{_join(path, key)}: unknown key")
    kwargs: dict[str, Any] = {}
    ok = True
    for name, field in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if field.default is attrs.NOTHING:
                problems.append(f"{key_path}: required key is missing")
                ok = False
            continue
        before = len(problems)
        value = _convert(hints[name], data[name], key_path, problems)
        if len(problems) > before:
            ok = False
            continue
        check = field.metadata.get("check")
        if check is not None:
            message = check(value)
            if message:
                problems.append(f"{key_path}: {message} (got {data[name]!r})")
                ok = False
                continue
        kwargs[name] = value
    return cls(**kwargs) if ok else None


def _convert(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            problems.append(f"{path}: must be an array")
            return None
        return tuple(_convert(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if attrs.has(hint):
        return _build(hint, value, path, problems)
    if origin is types.UnionType:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        problems.append(f"{path}: must be an integer (got {value!r})")
        return None
    if not isinstance(value, hint):
        problems.append(f"{path}: must be {_type_name(hint)} (got {value!r})")
        return None
    return value


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))

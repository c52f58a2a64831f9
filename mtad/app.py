"""The composition root: turns a `Config` into the running daemon.

Start-up is one asynchronous sequence, in dependency order: Redis (embedded or external) answers, the
database schema is current, the consumers and the delivery loop run, and only then do listeners open, so
no SMTP client is ever told 250 by a process that cannot store the message. Any failure in that sequence
is logged and ends the process with a non-zero exit status.

Shutdown runs the same steps backwards, one at a time (``MultiService`` would stop them all at once, and
the delivery loop must give its leases back *before* the Redis it talks to goes away): listeners close,
open SMTP sessions get a short grace period, in-flight deliveries finish or are released, the recorder
finishes its batch, then Redis and the database are let go.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from admin_api.jwks import JWKSApp
from admin_api.legacy_api import LegacyAPI
from admin_api.manage_api import ManageAPI
from admin_api.site import make_site
from admin_api.status import StatusApp
from mtad.accept import Acceptor
from mtad.bounces.inbox import BounceInbox
from mtad.bounces.matching import ReturnPathDomains
from mtad.bounces.processor import BounceProcessor
from mtad.bounces.return_path import ReturnPath, verp_secret
from mtad.config import Config
from mtad.domains.dns_check import DomainDNSChecker
from mtad.domains.dns_notice import DNSErrorNotice
from mtad.events.archive import ArchiveCatchUp
from mtad.events.consumer import StreamConsumer
from mtad.events.recorder import GROUP as RECORDER_GROUP
from mtad.events.recorder import Recorder
from mtad.events.trim import StreamTrim
from mtad.limits.protection import GROUP as PROTECTION_GROUP
from mtad.limits.protection import ProtectionSettings, RateProtection
from mtad.limits.release import SendLimitRelease
from mtad.limits.window import SendWindow
from mtad.mail.dkim import DKIMKey
from mtad.mail.dkim_keys import RSA, dkim_txt_value, load_or_create_key
from mtad.outbound.deliverer import Deliverer, DelivererConfig
from mtad.outbound.delivery import DeliveryService, DeliverySettings
from mtad.outbound.holds import HoldExpiry
from mtad.outbound.mx import MXResolver, ResolverConfig, parse_nameservers
from mtad.outbound.pools import ConnectionLimits, IPPool, SourceAddress
from mtad.outbound.retry import RetryPolicy
from mtad.outbound.signing import MessageSigner, SignElsewhere
from mtad.outbound.signing_pool import SigningPool
from mtad.queue.client import RedisClient
from mtad.queue.embedded import EmbeddedRedis
from mtad.queue.events import EventStream, StreamAppender, StreamMaintenance
from mtad.queue.limits import AuthFailureCounter, ConnectionLimiter
from mtad.queue.redis_queue import RedisQueue
from mtad.smtp.client import ClientTimeouts
from mtad.smtp.relay_policy import RelayPolicy
from mtad.smtp.server_protocol import SMTPServerFactory
from mtad.status import ListenerStatus, StatusReporter
from mtad.store.db import Database
from mtad.store.domains import find_sending_domain
from mtad.store.migrate import schema_problem, upgrade_schema
from mtad.store.raw_messages import RawMessageRetention
from mtad.store.servers import Server, find_server
from mtad.store.suppressions import SuppressionExpiry
from mtad.store.webhooks import WebhookRequestRetention
from mtad.submission.policy import SubmissionPolicy
from mtad.suppression.lookup import SuppressionLookup
from mtad.suppression.trigger import GROUP as SUPPRESSION_GROUP
from mtad.suppression.trigger import SuppressionTrigger
from mtad.tls import ensure_self_signed, server_context
from mtad.webhooks.dispatcher import DispatchSettings, WebhookDispatcher
from mtad.webhooks.guard import parse_networks
from mtad.webhooks.queue import WebhookQueue
from mtad.webhooks.sender import SenderSettings, WebhookSender, guarded_agent
from mtad.webhooks.signing import WebhookSigner
from mtad.webhooks.trigger import GROUP as WEBHOOKS_GROUP
from mtad.webhooks.trigger import WebhookTrigger

#: Every consumer group of the event stream: created at start by every process, so that the stream is
#: never trimmed past a group before it exists.
CONSUMER_GROUPS = (RECORDER_GROUP, WEBHOOKS_GROUP, SUPPRESSION_GROUP)


def _protection_settings(config: Config) -> ProtectionSettings:
    limits = config.limits
    return ProtectionSettings(
        bounce_rate=limits.bounce_rate_threshold,
        complaint_rate=limits.complaint_rate_threshold,
        window=round(limits.rate_window_hours * 3600),
        min_sent=limits.rate_min_sent,
    )


T = TypeVar("T")

#: Seconds open SMTP sessions may take to finish after the listeners close on shutdown.
SMTP_GRACE_SECONDS = 10.0


class StartupError(Exception):
    """Start-up cannot go on; the message says what to fix."""


class MtadService(Service):
    """The whole daemon as one service: `startService` runs the start-up sequence, `stopService` drains."""

    log = Logger()

    def __init__(
        self, config: Config, reactor: Any, exit_on_failure: bool = True, freeze_gc: bool = False
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._exit_on_failure = exit_on_failure
        self._freeze_gc = freeze_gc
        self._stops: list[tuple[str, Callable[[], Awaitable[object] | object]]] = []
        self._starting: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._start_outcome: Literal[True] | Failure | None = None
        self.smtp_factories: list[SMTPServerFactory] = []
        self.ports: dict[str, IListeningPort] = {}
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.embedded_redis: EmbeddedRedis | None = None
        self.redis: RedisClient | None = None
        self.queue: RedisQueue | None = None
        self.signing_pool: SigningPool | None = None
        self.database: Database | None = None
        self.delivery: DeliveryService | None = None
        self.stream: StreamMaintenance | None = None
        self.webhook_queue: WebhookQueue | None = None
        self.webhook_signer: WebhookSigner | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.bounce_inbox: BounceInbox | None = None
        self.send_window: SendWindow | None = None
        self.verp_secret = b""

    # -- start --------------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self.start())
        self._starting.addCallbacks(self._started, self._start_failed)

    def when_started(self) -> Deferred[None]:
        """Fires when start-up has finished (listeners open), or fails with why it could not."""
        assert self._starting is not None, "service not started"
        done: Deferred[None] = Deferred()
        if self._start_outcome is None:
            self._waiters.append(done)
        elif self._start_outcome is True:
            done.callback(None)
        else:
            done.errback(self._start_outcome)
        return done

    def _started(self, result: None) -> None:
        self._start_outcome = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        self._start_outcome = failure
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        if isinstance(failure.value, CancelledError) and not self.running:
            return  # Stopped while starting: not a failure.
        if isinstance(failure.value, StartupError):
            self.log.critical("mtad cannot start: {reason}", reason=str(failure.value))
        else:
            self.log.failure("mtad cannot start", failure)
        if self._exit_on_failure:
            # twistd has no exit status of its own to give; leave with 1 once the reactor has stopped
            # (after our stopService has let go of what did start).
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.stop()

    async def start(self) -> None:
        config = self.config
        data = config.data_path
        data.mkdir(parents=True, exist_ok=True)
        redis_url = config.redis.url
        if not redis_url:
            self.embedded_redis = EmbeddedRedis(self._reactor, str(data))
            self.embedded_redis.startService()
            self._on_stop("embedded redis", self.embedded_redis.stopService)
            await self.embedded_redis.when_ready()
            redis_url = self.embedded_redis.url
        self.redis = RedisClient.from_url(self._reactor, redis_url, timeout=config.redis.timeout, poolsize=4)
        self._on_stop("redis client", self.redis.disconnect)
        connected = self.redis.wait_connected()
        connected.addTimeout(max(config.redis.timeout, 1.0), self._reactor)
        try:
            await connected
        except Exception as e:
            raise StartupError(f"redis.url: cannot reach Redis at {redis_url}: {e}") from e
        self.queue = RedisQueue(self.redis)
        await self._check_persistence(self.queue)
        self.database = await self._open_database()

        events = config.events
        groups = self._consumer_groups(config)
        for group in groups:
            # Every group exists before anything is trimmed, whatever this process runs.
            await self._stream(group).ensure_group()
        recorder = StreamConsumer(
            self._stream(RECORDER_GROUP),
            Recorder(self.database, self._reactor, self.queue),
            self._reactor,
            idle_delay=events.poll_interval,
        )
        recorder.startService()
        self._on_stop("recorder", recorder.stopService)
        self._start_webhooks(self.redis, self.database)
        self._start_feedback(self.redis, self.queue, self.database)
        protection = _protection_settings(config)
        if protection.enabled:
            rates = StreamConsumer(
                self._stream(PROTECTION_GROUP),
                RateProtection(self.redis, self.queue.keys, self.database, self._reactor, protection),
                self._reactor,
                idle_delay=events.poll_interval,
            )
            rates.startService()
            self._on_stop("rate protection", rates.stopService)
        self.stream = StreamMaintenance(self.redis)
        trim = StreamTrim(self._reactor, self.stream, groups, interval=events.trim_interval)
        trim.startService()
        self._on_stop("event stream trim", trim.stopService)
        retention = config.retention
        raw_retention = RawMessageRetention(
            self._reactor,
            self.database,
            retention.raw_message_days * 86400,
            max_bytes=retention.raw_message_max_mb * 1024 * 1024 or None,
            interval=retention.sweep_interval,
        )
        raw_retention.startService()
        self._on_stop("raw message retention", raw_retention.stopService)
        catch_up = ArchiveCatchUp(
            self._reactor,
            self.database,
            self.queue,
            retention.archive_catch_up_after,
            interval=retention.archive_catch_up_interval,
        )
        catch_up.startService()
        self._on_stop("raw message catch-up", catch_up.stopService)
        resolver = self._resolver()
        if config.domains.check_enabled:
            checker = DomainDNSChecker(
                self.database,
                resolver,
                self._reactor,
                config.domains,
                poll_interval=config.domains.check_poll_interval,
                on_dns_error=DNSErrorNotice(
                    self.database, StreamAppender(self.redis, self.queue.keys), self._reactor
                ),
            )
            checker.startService()
            self._on_stop("domain DNS checks", checker.stopService)
        if config.delivery.enabled:
            sign_elsewhere = None
            if config.delivery.signing_processes:
                self.signing_pool = SigningPool(
                    self._reactor, self._reactor, config.delivery.signing_processes
                )
                self.signing_pool.startService()
                self._on_stop("signing workers", self.signing_pool.stopService)  # after delivery (reversed)
                sign_elsewhere = self.signing_pool.sign
            self.delivery = self._delivery_service(self.queue, self.redis, resolver, sign_elsewhere)
            self.delivery.startService()
            self._on_stop("delivery", self.delivery.stopService)
        hold_expiry = HoldExpiry(self._reactor, self.queue, config.delivery.hold_days * 86400)
        hold_expiry.startService()
        self._on_stop("hold expiry", hold_expiry.stopService)
        self.send_window = SendWindow(self.redis, notice_seconds=config.limits.notice_interval)
        database = self.database
        release = SendLimitRelease(
            self._reactor,
            self.send_window,
            lambda server_id: database.run(find_server, server_id),
            interval=config.limits.release_interval,
        )
        release.startService()
        self._on_stop("send limit release", release.stopService)
        acceptor = Acceptor(
            self.queue,
            self._reactor,
            default_pool=config.delivery.default_pool,
            timeout=config.redis.timeout,
            hostname=config.general.hostname,
        )
        listeners = await self._open_smtp_listeners(acceptor, self.database)
        await self._open_http_listeners(acceptor, self.queue, self.database, listeners)
        self.log.info(
            "mtad ready: {listeners} listening, delivery {delivery}",
            listeners=", ".join(self.ports),
            delivery="on" if self.delivery else "off",
        )
        if self._freeze_gc:
            # Everything alive now (modules, config, engine, caches) lives as long as the process. Left to
            # the cyclic collector, each full collection walked all of it again: 70-120 ms with the
            # reactor stopped, about once a second under send API load (the p99 of the send API).
            # Frozen, the collector walks only what the traffic allocates.
            gc.collect()
            gc.freeze()

    def _on_stop(self, name: str, stop: Callable[[], Awaitable[object] | object]) -> None:
        self._stops.append((name, stop))

    async def _check_persistence(self, queue: RedisQueue) -> None:
        info = await queue.persistence_info()
        self.log.info("redis persistence: {info}", info=info)
        durable = info.get("aof_enabled") and info.get("appendfsync") == "always"
        if self.embedded_redis is None and not durable:
            self.log.warn(
                "redis at {url} does not fsync every write (appendonly yes, appendfsync always): "
                "a Redis crash can lose accepted mail",
                url=self.config.redis.url,
            )

    def _start_webhooks(self, redis: RedisClient, database: Database) -> None:
        """The ``webhooks`` consumer (events to queued requests) and the dispatcher (queued requests to
        signed POSTs), in every process: requests are leased from Redis, so processes share the work."""
        config = self.config.webhooks
        path = Path(config.signing_key) if config.signing_key else self.config.data_path / "signing.key"
        try:
            self.webhook_signer = WebhookSigner.load_or_create(path)
        except (OSError, ValueError) as e:
            raise StartupError(f"webhooks.signing_key: cannot use {path}: {e}") from e
        self.webhook_queue = WebhookQueue(redis)
        trigger = StreamConsumer(
            self._stream(WEBHOOKS_GROUP),
            WebhookTrigger(database, self.webhook_queue, self._reactor),
            self._reactor,
            idle_delay=self.config.events.poll_interval,
        )
        trigger.startService()
        self._on_stop("webhook trigger", trigger.stopService)
        agent = guarded_agent(
            self._reactor, self._reactor.nameResolver, parse_networks(config.allowed_networks)
        )
        sender = WebhookSender(
            agent,
            self._reactor,
            self.webhook_signer,
            SenderSettings(timeout=config.timeout, per_url_concurrency=config.per_url_concurrency),
            in_thread=self._in_thread,
        )
        self.webhooks = WebhookDispatcher(
            self._reactor,
            self.webhook_queue,
            database,
            sender,
            DispatchSettings(
                concurrency=config.concurrency,
                retry_delays=config.retry_delays,
                poll_interval=self.config.events.poll_interval,
            ),
        )
        self.webhooks.startService()
        self._on_stop("webhook dispatcher", self.webhooks.stopService)
        retention = WebhookRequestRetention(
            self._reactor,
            database,
            config.request_log_days * 86400,
            interval=self.config.retention.sweep_interval,
        )
        retention.startService()
        self._on_stop("webhook request retention", retention.stopService)

    def _start_feedback(self, redis: RedisClient, queue: RedisQueue, database: Database) -> None:
        """Bounces (the inbox the SMTP server fills, the processor that matches them to messages) and the
        suppression list (its ``suppression`` consumer and the expiry sweep), in every process."""
        config = self.config
        try:
            self.verp_secret = verp_secret(config.domains.verp_secret, config.data_path)
        except (OSError, ValueError) as e:
            raise StartupError(f"domains.verp_secret: {e}") from e
        self.bounce_inbox = BounceInbox(redis, self._reactor, queue.keys)
        processor = BounceProcessor(
            self.bounce_inbox,
            database,
            self._reactor,
            self._in_thread,
            secret=self.verp_secret,
            domains=ReturnPathDomains(config.domains.return_path_domain, config.domains.return_path_prefix),
        )
        processor.startService()
        self._on_stop("bounce processor", processor.stopService)
        suppression = StreamConsumer(
            self._stream(SUPPRESSION_GROUP),
            SuppressionTrigger(database, redis, queue.keys, self._reactor, config.suppression),
            self._reactor,
            idle_delay=config.events.poll_interval,
        )
        suppression.startService()
        self._on_stop("suppression trigger", suppression.stopService)
        expiry = SuppressionExpiry(self._reactor, database, interval=config.retention.sweep_interval)
        expiry.startService()
        self._on_stop("suppression expiry", expiry.stopService)

    def _in_thread(self, fn: Callable[[], T]) -> Deferred[T]:
        """Runs ``fn`` in the reactor's threadpool (CPU work that would stall the reactor: signing)."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn)

    def _consumer_groups(self, config: Config) -> tuple[str, ...]:
        """The groups this installation consumes: created at start and trimmed behind. The protection
        group only when a rate threshold is set (a group nobody reads would hold the stream forever),
        so every process sharing the stream needs the same ``[limits]`` thresholds."""
        if _protection_settings(config).enabled:
            return (*CONSUMER_GROUPS, PROTECTION_GROUP)
        return CONSUMER_GROUPS

    def _stream(self, group: str) -> EventStream:
        """This process's consumer in ``group``."""
        assert self.redis is not None
        return EventStream(
            self.redis, group, self.owner, claim_idle=self.config.events.claim_idle, clock=self._reactor
        )

    async def _open_database(self) -> Database:
        config = self.config
        database = Database.from_url(config.database_url, self._reactor, config.database.pool_size)
        database.startService()
        self._on_stop("database", database.stopService)
        try:
            if not config.database.url:
                # The embedded SQLite database is ours alone: bring it to the current schema.
                await deferToThread(upgrade_schema, database.engine)
            problem = await database.run(schema_problem)
        except sa.exc.SQLAlchemyError as e:
            raise StartupError(f"database.url: cannot use the database: {e}") from e
        if problem:
            raise StartupError(f"database: {problem}")
        return database

    def _resolver(self) -> MXResolver:
        config = self.config
        try:
            nameservers = parse_nameservers(config.dns.nameservers)
        except ValueError as e:
            raise StartupError(f"dns.nameservers: {e}") from e
        return MXResolver(
            self._reactor,
            self._reactor,
            self._reactor,
            ResolverConfig(
                nameservers=nameservers,
                timeout=config.dns.timeout,
                ipv6=config.dns.use_ipv6,
                cache_seconds=60.0,
            ),
        )

    def _delivery_service(
        self,
        queue: RedisQueue,
        redis: RedisClient,
        resolver: MXResolver,
        sign_elsewhere: SignElsewhere | None = None,
    ) -> DeliveryService:
        config = self.config
        delivery = config.delivery
        deliverer = Deliverer(
            self._reactor,
            self._reactor,
            resolver,
            ConnectionLimiter(redis),
            DelivererConfig(
                port=delivery.port,
                timeouts=ClientTimeouts(connect=delivery.connect_timeout),
                limits=ConnectionLimits(
                    per_source_ip=delivery.max_connections_per_ip,
                    per_source_ip_mx=delivery.max_connections_per_destination,
                ),
            ),
        )
        pools = {
            pool.name: IPPool(
                pool.name,
                tuple(SourceAddress(a.ip, a.hostname or config.general.hostname) for a in pool.addresses),
            )
            for pool in config.pools()
        }
        retry = delivery.retry
        settings = DeliverySettings(
            concurrency=delivery.concurrency,
            batch_size=delivery.batch_size,
            lease_seconds=delivery.lease_seconds,
            poll_interval=delivery.poll_interval,
            retry=RetryPolicy(base=retry.base_delay, factor=retry.factor, max_attempts=retry.max_attempts),
            hold_seconds=delivery.hold_days * 86400,
            default_pool=delivery.default_pool,
            return_path=ReturnPath(self.verp_secret, config.domains.return_path_domain),
        )
        try:
            assert self.database is not None
            signer = MessageSigner(
                self.database,
                self._reactor,
                fallback=self._installation_key(),
                sign_elsewhere=sign_elsewhere,
            )
            return DeliveryService(
                self._reactor,
                queue,
                deliverer,
                pools,
                settings,
                self.owner,
                sign=signer.sign,
                suppressions=SuppressionLookup(
                    self.database, self._reactor, cache_seconds=config.suppression.lookup_cache_seconds
                ),
            )
        except ValueError as e:
            raise StartupError(f"delivery: {e}") from e

    def _installation_key(self) -> DKIMKey:
        domains = self.config.domains
        path = Path(domains.installation_key) if domains.installation_key else None
        try:
            pem, public = load_or_create_key(path or self.config.data_path / "dkim-installation.pem")
        except (OSError, ValueError) as e:
            raise StartupError(f"domains.installation_key: cannot use {path}: {e}") from e
        name = f"{domains.selector_prefix}._domainkey.{domains.return_path_domain}"
        self.log.info(
            "installation DKIM key: publish {name} TXT {record!r}",
            name=name,
            record=dkim_txt_value(RSA, public),
        )
        return DKIMKey(
            domain=domains.return_path_domain,
            selector=domains.selector_prefix,
            private_key_pem=pem,
            algorithm=RSA,
        )

    async def _listen(self, name: str, description: str, factory: IProtocolFactory) -> None:
        try:
            endpoint = endpoints.serverFromString(self._reactor, description)  # type: ignore[no-untyped-call]
            port = await endpoint.listen(factory)
        except Exception as e:
            raise StartupError(f"{name}: cannot listen on {description!r}: {e}") from e
        self.ports[name] = port
        self._on_stop(f"listener {name}", port.stopListening)

    async def _open_smtp_listeners(self, acceptor: Acceptor, database: Database) -> list[ListenerStatus]:
        config = self.config
        smtp = config.smtp
        if smtp.tls_certificate:
            cert, key = Path(smtp.tls_certificate), Path(smtp.tls_private_key)
        else:
            cert, key = ensure_self_signed(config.data_path, config.general.hostname)
        try:
            tls = server_context(cert, key)
        except (OSError, ValueError) as e:
            raise StartupError(f"smtp.tls_certificate: cannot load {cert} / {key}: {e}") from e
        # RFC 4954 §6: "530 authentication required" only where AUTH can be offered at all.
        without_auth = tuple(
            listener.name or listener.endpoint
            for listener in smtp.listeners
            if listener.tls == "none" and not listener.allow_plaintext_auth
        )
        assert self.bounce_inbox is not None
        policy = RelayPolicy(
            self._reactor,
            SubmissionPolicy(
                self._reactor,
                database,
                acceptor,
                sending_domain_check=self._may_send_from,
                send_window=self.send_window,
            ),
            listeners_without_auth=without_auth,
            # Bounces come back to the return path domain from anyone, unauthenticated; parsed, not relayed.
            return_path_domains=frozenset({config.domains.return_path_domain}),
            bounce_sink=self.bounce_inbox,
        )
        # One failed-AUTH count per client IP for all listeners and all processes sharing this Redis.
        assert self.redis is not None
        auth_limiter = AuthFailureCounter(
            self.redis, self._reactor, smtp.max_auth_failures, smtp.auth_failure_window
        )
        statuses: list[ListenerStatus] = []
        for listener in smtp.listeners:
            name = listener.name or listener.endpoint
            factory = SMTPServerFactory(
                policy,
                hostname=config.general.hostname,
                clock=self._reactor,
                listener=name,
                tls_mode=listener.tls,
                tls_context=tls if listener.tls != "none" else None,
                allow_plaintext_auth=listener.allow_plaintext_auth,
                max_message_size=smtp.max_message_size,
                max_recipients=smtp.max_recipients,
                max_connections=listener.max_connections,
                max_connections_per_ip=listener.max_connections_per_ip,
                max_bad_commands=smtp.max_bad_commands,
                max_auth_failures=smtp.max_auth_failures,
                auth_failure_window=smtp.auth_failure_window,
                auth_limiter=auth_limiter,
            )
            served: IProtocolFactory = factory
            if listener.tls == "implicit":
                served = TLSMemoryBIOFactory(tls, False, factory)
            await self._listen(f"smtp {name}", listener.endpoint, served)
            self.smtp_factories.append(factory)
            statuses.append(
                ListenerStatus(name=name, kind="smtp", endpoint=listener.endpoint, tls=listener.tls)
            )
        self._on_stop("smtp sessions", self._drain_smtp_sessions)
        return statuses

    async def _may_send_from(self, server: Server, domain: str) -> bool:
        """Whether ``server`` may send as ``domain`` (From-authentication of SMTP and the send API)."""
        assert self.database is not None
        found = await self.database.run(find_sending_domain, server.id, server.organization_id, domain)
        return found is not None

    async def _drain_smtp_sessions(self) -> None:
        """Close idle sessions at once; give those storing a message a moment to send their reply.

        Closing a session before its 250 loses nothing: the client still holds the message and retries.
        """
        waited = 0.0
        while sum(f.close_sessions() for f in self.smtp_factories) and waited < SMTP_GRACE_SECONDS:
            await deferLater(self._reactor, 0.1)
            waited += 0.1
        for factory in self.smtp_factories:
            factory.close_sessions(even_busy=True)

    async def _open_http_listeners(
        self, acceptor: Acceptor, queue: RedisQueue, database: Database, smtp_listeners: list[ListenerStatus]
    ) -> None:
        config = self.config
        http_statuses = [
            ListenerStatus(name=endpoint, kind="http", endpoint=endpoint, tls="none")
            for endpoint in config.http.listeners
        ]

        async def ping() -> None:
            await database.run(lambda conn: conn.execute(sa.text("SELECT 1")))

        reporter = StatusReporter(
            self._reactor,
            queue,
            ping,
            [*smtp_listeners, *http_statuses],
            embedded_redis=self.embedded_redis is not None,
            signing=self.signing_pool.status if self.signing_pool is not None else None,
            events=self.stream,
            events_alarm_length=config.events.stream_alarm_length,
            webhooks=self.webhook_queue.depth if self.webhook_queue is not None else None,
            bounces=self.bounce_inbox.pending if self.bounce_inbox is not None else None,
        )

        legacy = LegacyAPI(
            self._reactor,
            database,
            # Sender may stand in for From where the server has allow_sender (the policy's default).
            SubmissionPolicy(
                self._reactor,
                database,
                acceptor,
                sending_domain_check=self._may_send_from,
                send_window=self.send_window,
            ),
            queue,
            max_message_size=config.smtp.max_message_size,
            hostname=config.general.hostname,
            in_thread=self._in_thread,
        )
        manage = ManageAPI(self._reactor, database, queue, suppression=config.suppression)
        site = make_site(
            [
                (b"/status", StatusApp(reporter).app.resource()),
                *(
                    [(b"/.well-known/jwks.json", JWKSApp(self.webhook_signer).app.resource())]
                    if self.webhook_signer is not None
                    else []
                ),
                (b"/api/v1/", legacy.app.resource()),
                (b"/api/v2/", manage.app.resource()),
            ],
            max_body=legacy.max_request_size,
        )
        for endpoint in config.http.listeners:
            await self._listen(f"http {endpoint}", endpoint, site)

    # -- stop ---------------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        self.log.info("mtad stopping")
        # Listeners first (no new work), then the rest in reverse order of start.
        ordered = [s for s in self._stops if s[0].startswith("listener ")]
        ordered += [s for s in reversed(self._stops) if not s[0].startswith("listener ")]
        self._stops = []
        for name, stop in ordered:
            try:
                result = stop()
                if isinstance(result, Deferred) or hasattr(result, "__await__"):
                    await result  # type: ignore[misc]
            except Exception:
                self.log.failure("error while stopping {part}", part=name)
        self.log.info("mtad stopped")

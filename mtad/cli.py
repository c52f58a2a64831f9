"""``mtad``: the operator's command for the database: create and upgrade the schema, make and list objects.

Every command works on the database named by the configuration file (``--config``) and exits non-zero with
one clear line on stderr when something is wrong. Secrets (API keys, SMTP passwords) are printed once, by the
command that makes them, and never again: only their hashes are stored.

The held-message commands (``release-held``, ``cancel-held``) also reach the queue in Redis: ``redis.url``,
or the embedded Redis's socket in ``data_dir``, which exists only while the daemon runs. They run Twisted's
reactor in this process for the duration of the command (`reactor_runner`, given the global reactor by
`mtad.tap.cli`); the command line process is not the daemon, so nothing else waits on that reactor.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.python.failure import Failure

from mtad.config import Config, ConfigError, load_config
from mtad.domains import dns_check
from mtad.domains.dns_check import BlockingResolver, run_blocking
from mtad.mail.dkim_keys import ED25519, RSA
from mtad.outbound.held_actions import NOT_HELD, HeldAction, HeldActionFailed, HeldOutcome, act_on_held
from mtad.outbound.mx import parse_nameservers
from mtad.queue.client import RedisClient
from mtad.queue.embedded import EmbeddedRedis, EmbeddedRedisError
from mtad.queue.keys import QueueKeys
from mtad.queue.model import QueueError, RedisUnavailable
from mtad.queue.redis_queue import RedisQueue
from mtad.store import credentials as credential_store
from mtad.store import domains as domain_store
from mtad.store import messages as message_store
from mtad.store import organizations as organization_store
from mtad.store import routes as route_store
from mtad.store import servers as server_store
from mtad.store import suppressions as suppression_store
from mtad.store import webhooks as webhook_store
from mtad.store.db import StoreError, make_engine
from mtad.store.migrate import head_revision, schema_problem, schema_revision, upgrade_schema
from mtad.suppression import export as suppression_export
from mtad.suppression.policy import expires_at as suppression_expiry
from mtad.webhooks.signing import WebhookSigner

T = TypeVar("T")


class CommandError(Exception):
    """A problem to report to the operator as one line, exiting with status 1."""


def config_from_toml(path: str | Path | None) -> Config:
    """The configuration the daemon would use with this file (checked in full, as the daemon does)."""
    try:
        return load_config(path)
    except ConfigError as e:
        raise CommandError(str(e)) from None


def database_url_from_toml(path: str | Path | None) -> str:
    """The database URL the daemon would use with this config file (checked in full, as the daemon does)."""
    return config_from_toml(path).database_url


def _sqlite_path(url: str) -> Path | None:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


class AsyncRunner(Protocol):
    """Runs ``work(reactor)`` to its end and returns its result (or raises its exception)."""

    def __call__(self, work: Callable[[Any], Coroutine[Any, Any, T]], /) -> T: ...


def reactor_runner(reactor: Any) -> AsyncRunner:
    """An `AsyncRunner` that runs ``work(reactor)`` on ``reactor`` in this command line process.

    The reactor runs until ``work`` is done and is then stopped; a reactor cannot be started twice, so
    this runs once per process (one command). The reactor is the global one, given by `mtad.tap.cli`
    (txredisapi schedules on it, so the queue cannot run on a private one); the daemon never uses this.
    Ctrl-C stops the reactor and the command fails with "interrupted".
    """

    def run(work: Callable[[Any], Coroutine[Any, Any, T]], /) -> T:
        outcome: list[Any] = []

        def stop(_: object) -> None:
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # Ctrl-C got there first.

        def start() -> None:
            d: Deferred[T] = Deferred.fromCoroutine(work(reactor))
            d.addBoth(outcome.append).addBoth(stop)

        reactor.callWhenRunning(start)
        reactor.run()
        if not outcome:
            raise CommandError("interrupted")
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    return run


def _no_reactor(work: Callable[[Any], Coroutine[Any, Any, T]], /) -> T:
    raise CommandError("this command needs a reactor: run it as the `mtad` command (mtad.tap:cli)")


def queue_location(config: Config) -> tuple[str, str | None]:
    """The Redis URL the daemon's queue is at, and the embedded Redis's socket path when it is embedded."""
    if config.redis.url:
        return config.redis.url, None
    try:
        embedded = EmbeddedRedis(None, str(config.data_path))
    except EmbeddedRedisError as e:
        raise CommandError(f"general.data_dir: {e}") from None
    return embedded.url, embedded.socket_path


_ALLOW_SENDER_ON = (
    "the Sender domain may authenticate its messages when the From domain does not (allow_sender)"
)


class _Commands:
    def __init__(
        self,
        config: Config,
        out: TextIO,
        run_async: AsyncRunner = _no_reactor,
        queue_keys: QueueKeys | None = None,
    ) -> None:
        self.config = config
        self.url = config.database_url
        self.out = out
        self._engine: Engine | None = None
        self.domain_settings = config.domains
        self.run_async = run_async
        self.queue_keys = queue_keys if queue_keys is not None else QueueKeys()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def print(self, *lines: str) -> None:
        for line in lines:
            self.out.write(line + "\n")

    def _ready(self) -> None:
        """Refuse to work on a database that is missing or not at the current schema."""
        sqlite_path = _sqlite_path(self.url)
        if sqlite_path is not None and not sqlite_path.exists():
            # Opening would create an empty file and hide a wrong data_dir behind "not initialized".
            raise CommandError(f"no database at {sqlite_path}; run `mtad initialize` (or check --config)")
        with self.engine.connect() as conn:
            problem = schema_problem(conn)
        if problem is not None:
            raise CommandError(problem)

    def transaction(self, fn: Callable[[Connection], T]) -> T:
        self._ready()
        with self.engine.begin() as conn:
            return fn(conn)

    # Commands.

    def initialize(self, args: argparse.Namespace) -> None:
        sqlite_path = _sqlite_path(self.url)
        if sqlite_path is not None:
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        revision = upgrade_schema(self.engine)
        self.print(f"database initialized at schema revision {revision}")

    def upgrade(self, args: argparse.Namespace) -> None:
        sqlite_path = _sqlite_path(self.url)
        if sqlite_path is not None and not sqlite_path.exists():
            raise CommandError(f"no database at {sqlite_path}; run `mtad initialize` (or check --config)")
        with self.engine.connect() as conn:
            before = schema_revision(conn)
        if before is None:
            raise CommandError("the database is not initialized; run `mtad initialize`")
        if before == head_revision():
            self.print(f"database already at schema revision {before}")
            return
        after = upgrade_schema(self.engine)
        self.print(f"database upgraded from schema revision {before} to {after}")

    def make_organization(self, args: argparse.Namespace) -> None:
        organization = self.transaction(
            lambda conn: organization_store.create_organization(
                conn, args.name, time.time(), permalink=args.permalink
            )
        )
        self.print(f"organization {organization.permalink} created")

    def make_server(self, args: argparse.Namespace) -> None:
        server = self.transaction(
            lambda conn: server_store.create_server(
                conn,
                args.organization,
                args.name,
                time.time(),
                mode=server_store.ServerMode(args.mode),
                permalink=args.permalink,
                allow_sender=args.allow_sender,
            )
        )
        self.print(f"server {server.full_permalink} created (mode {server.mode}, token {server.token})")
        if server.allow_sender:
            self.print(_ALLOW_SENDER_ON)

    def set_server(self, args: argparse.Namespace) -> None:
        limit_given = any(
            v is not None for v in (args.send_limit, args.send_limit_period, args.send_limit_action)
        )
        if args.allow_sender is None and not limit_given and args.suspend is None and not args.unsuspend:
            raise CommandError(
                "nothing to change: give --allow-sender/--no-allow-sender, --send-limit, "
                "--send-limit-period, --send-limit-action, --suspend or --unsuspend"
            )
        if args.suspend is not None and args.unsuspend:
            raise CommandError("give --suspend or --unsuspend, not both")
        said: list[str] = []

        def update(conn: Connection) -> server_store.Server:
            now = time.time()
            server = server_store.get_server_by_name(conn, args.server)
            if args.allow_sender is not None:
                server = server_store.set_allow_sender(conn, server.id, args.allow_sender, now)
                said.append(
                    _ALLOW_SENDER_ON
                    if server.allow_sender
                    else "only the From domain authenticates its messages"
                )
            if limit_given:
                limit = server.send_limit if args.send_limit is None else args.send_limit
                if args.send_limit == _NO_LIMIT:
                    limit = None
                period = server.send_limit_period
                if args.send_limit_period is not None:
                    period = args.send_limit_period
                action = server.send_limit_action
                if args.send_limit_action is not None:
                    action = server_store.SendLimitAction(args.send_limit_action.capitalize())
                server = server_store.set_send_limit(conn, server.id, limit, period, action, now)
                said.append(_send_limit_text(server))
            if args.suspend is not None:
                server_store.suspend_server(conn, server.id, args.suspend or "Suspended by an operator", now)
                said.append("suspended: it sends nothing and its API keys and SMTP logins are refused")
            elif args.unsuspend:
                server_store.suspend_server(conn, server.id, None, now)
                said.append("no longer suspended")
            return server

        server = self.transaction(update)
        self.print(
            *(f"server {server.full_permalink}: {line}" for line in said),
            "(running daemons see the change within a minute)",
        )

    def make_credential(self, args: argparse.Namespace) -> None:
        def make(conn: Connection) -> tuple[server_store.Server, credential_store.NewCredential]:
            server = server_store.get_server_by_name(conn, args.server)
            new = credential_store.create_credential(
                conn,
                server.id,
                credential_store.CredentialType(args.type),
                time.time(),
                name=args.name,
                key=args.key,
                hold=args.hold,
            )
            return server, new

        server, new = self.transaction(make)
        credential = new.credential
        label = f"{credential.type} credential {credential.id} ({credential.name})"
        self.print(f"{label} created for {server.full_permalink}")
        if credential.type is credential_store.CredentialType.API:
            self.print(f"API key: {new.secret}", "This key is shown only now; store it safely.")
        elif credential.type is credential_store.CredentialType.SMTP:
            self.print(
                f"SMTP username: {server.full_permalink} (any username is accepted)",
                f"SMTP password: {new.secret}",
                "This password is shown only now; store it safely.",
            )
        else:
            self.print(f"clients from {credential.network} may send as {server.full_permalink} without AUTH")

    def list_organizations(self, args: argparse.Namespace) -> None:
        organizations = self.transaction(organization_store.list_organizations)
        self._table(["PERMALINK", "NAME"], [[o.permalink, o.name] for o in organizations])

    def list_servers(self, args: argparse.Namespace) -> None:
        servers = self.transaction(lambda conn: server_store.list_servers(conn, args.organization))
        self._table(
            ["SERVER", "NAME", "MODE", "TOKEN", "SUSPENDED", "SEND LIMIT", "ALLOW SENDER"],
            [
                [
                    s.full_permalink,
                    s.name,
                    s.mode,
                    s.token,
                    f"yes: {s.suspension_reason}" if s.suspended else "no",
                    "-"
                    if s.send_limit is None
                    else f"{s.send_limit}/{s.send_limit_period or 3600}s {s.send_limit_action.value.lower()}",
                    "yes" if s.allow_sender else "no",
                ]
                for s in servers
            ],
        )

    def list_credentials(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> tuple[dict[int, str], list[credential_store.Credential]]:
            names = {s.id: s.full_permalink for s in server_store.list_servers(conn)}
            server_id = None if args.server is None else server_store.get_server_by_name(conn, args.server).id
            return names, credential_store.list_credentials(conn, server_id)

        names, credentials = self.transaction(load)
        self._table(
            ["ID", "SERVER", "TYPE", "NAME", "NETWORK", "HOLD", "LAST USED"],
            [
                [
                    str(c.id),
                    names.get(c.server_id, str(c.server_id)),
                    c.type,
                    c.name,
                    c.network or "-",
                    "yes" if c.hold else "no",
                    _format_time(c.last_used_at),
                ]
                for c in credentials
            ],
        )

    # Domains.

    def _resolver(self) -> BlockingResolver:
        try:
            nameservers = parse_nameservers(self.config.dns.nameservers)
        except ValueError as e:
            raise CommandError(f"dns.nameservers: {e}") from None
        return BlockingResolver(nameservers, timeout=self.config.dns.timeout)

    def _owner_names(self, conn: Connection) -> dict[tuple[str, int], str]:
        names = {("server", s.id): s.full_permalink for s in server_store.list_servers(conn)}
        for organization in organization_store.list_organizations(conn):
            names["organization", organization.id] = f"{organization.permalink}/*"
        return names

    def _owner(self, names: dict[tuple[str, int], str], domain: domain_store.Domain) -> str:
        if domain.server_id is not None:
            return names.get(("server", domain.server_id), f"server {domain.server_id}")
        assert domain.organization_id is not None
        return names.get(("organization", domain.organization_id), f"organization {domain.organization_id}")

    def _load_domain(self, name: str) -> tuple[domain_store.Domain, list[domain_store.DomainKey], str]:
        def load(conn: Connection) -> tuple[domain_store.Domain, list[domain_store.DomainKey], str]:
            domain = domain_store.get_domain_by_name(conn, name)
            return (
                domain,
                domain_store.list_keys(conn, domain.id),
                self._owner(self._owner_names(conn), domain),
            )

        return self.transaction(load)

    def _print_records(self, domain: domain_store.Domain, keys: list[domain_store.DomainKey]) -> None:
        settings = self.domain_settings
        notes = {
            "verification": f"Verification: proves you control {domain.name} (then `mtad verify-domain`)",
            "spf": f"SPF: lets us send for {domain.name} (merge the include into an existing SPF record)",
            "return-path": f"Return path: bounces to mail from {domain.name} come back through this name",
            "mx": f"MX (optional): only to receive mail for {domain.name} here",
        }
        dkim_keys = iter(key for key in keys if key.state != domain_store.RETIRED)
        shown: set[str] = set()
        for record in dns_check.records_to_publish(domain, keys, settings):
            if record.purpose == "dkim":
                key = next(dkim_keys)
                self.print(f"; DKIM: {key.algorithm} key, selector {key.selector} ({key.state})")
            elif record.purpose not in shown:
                if record.purpose == "verification" and domain.verified:
                    continue
                self.print(f"; {notes[record.purpose]}")
            shown.add(record.purpose)
            self.print(record.zone_line())

    def _print_statuses(self, domain: domain_store.Domain, keys: list[domain_store.DomainKey]) -> None:
        self.print(f"DNS checked: {_format_time(domain.dns_checked_at)}")
        for label, status, error in (
            ("SPF", domain.spf_status, domain.spf_error),
            ("DKIM", domain.dkim_status, domain.dkim_error),
            ("MX", domain.mx_status, domain.mx_error),
            ("Return path", domain.return_path_status, domain.return_path_error),
        ):
            self.print(f"  {label:<12} {_status(status, error)}")
        self.print("DKIM keys:")
        for key in keys:
            state = key.state if key.retired_at is None else f"{key.state} {_format_time(key.retired_at)}"
            dns = _status(key.dns_status, key.dns_error)
            self.print(f"  {key.selector:<20} {key.algorithm:<8} {state:<10} DNS {dns}")

    def add_domain(self, args: argparse.Namespace) -> None:
        settings = self.domain_settings

        def add(conn: Connection) -> tuple[domain_store.Domain, list[domain_store.DomainKey], str]:
            if args.organization:
                organization = organization_store.get_organization(conn, args.owner)
                owner = {"organization_id": organization.id}
                label = f"organization {organization.permalink}"
            else:
                server = server_store.get_server_by_name(conn, args.owner)
                owner = {"server_id": server.id}
                label = f"server {server.full_permalink}"
            domain = domain_store.create_domain(
                conn,
                args.name,
                time.time(),
                algorithms=(RSA, ED25519) if args.ed25519 else (RSA,),
                selector_prefix=settings.selector_prefix,
                rsa_bits=settings.rsa_bits,
                use_for_any=args.use_for_any,
                **owner,
            )
            return domain, domain_store.list_keys(conn, domain.id), label

        domain, keys, label = self.transaction(add)
        self.print(f"domain {domain.name} added to {label} (id {domain.id}); publish these DNS records:", "")
        self._print_records(domain, keys)

    def list_domains(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> tuple[dict[tuple[str, int], str], list[domain_store.Domain]]:
            if args.server is None:
                return self._owner_names(conn), domain_store.list_domains(conn)
            server = server_store.get_server_by_name(conn, args.server)
            return self._owner_names(conn), domain_store.list_domains(conn, server.id, server.organization_id)

        names, domains = self.transaction(load)
        self._table(
            ["ID", "DOMAIN", "OWNER", "VERIFIED", "SPF", "DKIM", "MX", "RETURN PATH", "ANY"],
            [
                [
                    str(d.id),
                    d.name,
                    self._owner(names, d),
                    "yes" if d.verified else "no",
                    d.spf_status or "-",
                    d.dkim_status or "-",
                    d.mx_status or "-",
                    d.return_path_status or "-",
                    "yes" if d.use_for_any else "no",
                ]
                for d in domains
            ],
        )

    def show_domain(self, args: argparse.Namespace) -> None:
        domain, keys, owner = self._load_domain(args.name)
        self.print(
            f"domain {domain.name} (id {domain.id})",
            f"owner: {owner}",
            f"verified: {_format_time(domain.verified_at) if domain.verified else 'no'}",
            f"use for any From domain: {'yes' if domain.use_for_any else 'no'}",
        )
        self._print_statuses(domain, keys)
        self.print("", "DNS records:")
        self._print_records(domain, keys)

    def verify_domain(self, args: argparse.Namespace) -> None:
        domain, _, _ = self._load_domain(args.name)
        if domain.verified:
            self.print(f"{domain.name} is already verified (since {_format_time(domain.verified_at)})")
            return
        result = run_blocking(dns_check.check_verification(self._resolver(), domain, self.domain_settings))
        if result.status != domain_store.OK:
            raise CommandError(f"{domain.name} is not verified: {result.error}")
        self.transaction(lambda conn: domain_store.verify_domain(conn, domain.id, time.time()))
        self.print(
            f"{domain.name} verified; next: publish its other records and `mtad check-domain {domain.name}`"
        )

    def check_domain(self, args: argparse.Namespace) -> None:
        domain, keys, _ = self._load_domain(args.name)
        result = run_blocking(dns_check.check_domain(self._resolver(), domain, keys, self.domain_settings))
        domain = self.transaction(
            lambda conn: domain_store.record_dns_check(conn, domain.id, result, time.time())
        )
        keys = self.transaction(lambda conn: domain_store.list_keys(conn, domain.id))
        self.print(f"domain {domain.name}: DNS {'OK' if domain.dns_ok else 'not OK'}")
        self._print_statuses(domain, keys)
        for key_id, check in result.keys:
            if check.status is None:
                selector = next(k.selector for k in keys if k.id == key_id)
                self.print(f"  {selector}: {check.error}")
        for field in ("spf", "dkim", "mx", "return_path"):
            check = getattr(result, field)
            if check.status is None:
                self.print(f"  {field.replace('_', ' ')} not checked: {check.error}")
        if not domain.verified:
            self.print(f"note: {domain.name} is not verified yet; `mtad verify-domain {domain.name}`")

    def rotate_dkim(self, args: argparse.Namespace) -> None:
        settings = self.domain_settings

        def rotate(conn: Connection) -> tuple[domain_store.Domain, domain_store.DomainKey, list[str]]:
            domain = domain_store.get_domain_by_name(conn, args.name)
            key = domain_store.rotate_key(
                conn,
                domain.id,
                time.time(),
                algorithm=args.algorithm,
                selector_prefix=settings.selector_prefix,
                rsa_bits=settings.rsa_bits,
            )
            current = [
                k.selector for k in domain_store.signing_keys(conn, domain.id) if k.algorithm == key.algorithm
            ]
            return domain, key, current

        domain, key, current = self.transaction(rotate)
        record = next(r for r in dns_check.records_to_publish(domain, [key], settings) if r.purpose == "dkim")
        self.print(
            f"new {key.algorithm} key for {domain.name}: selector {key.selector} (not signing yet)",
            "Publish this record; once it resolves, "
            f"`mtad activate-dkim {domain.name} {key.selector}` switches signing to it:",
            record.zone_line(),
        )
        if current:
            self.print(
                f"Keep the record of the current key ({current[0]}) until a few days after the switch."
            )

    def activate_dkim(self, args: argparse.Namespace) -> None:
        domain, keys, _ = self._load_domain(args.name)
        selector = args.selector.strip().lower()
        key = next((k for k in keys if k.selector == selector), None)
        if key is None:
            raise CommandError(f"{domain.name} has no DKIM key with selector {args.selector!r}")
        if not args.force and key.state != domain_store.ACTIVE:
            check = run_blocking(dns_check.check_dkim_key(self._resolver(), domain, key))
            if check.status != domain_store.OK:
                raise CommandError(
                    f"not activating {key.selector}: {check.error} (publish the record first, or use --force)"
                )
        retiring = [
            k.selector for k in keys if k.state == domain_store.ACTIVE and k.algorithm == key.algorithm
        ]
        self.transaction(lambda conn: domain_store.activate_key(conn, domain.id, selector, time.time()))
        self.print(f"{domain.name} now signs {key.algorithm} with {key.selector}")
        for old in retiring:
            if old != key.selector:
                self.print(f"{old} retired: keep its record published for a few days, then remove it")

    # Held messages.

    def _held_filter(self, conn: Connection, args: argparse.Namespace) -> message_store.HeldFilter:
        server_id = None
        if args.server is not None:
            server_id = server_store.get_server_by_name(conn, args.server).id
        return message_store.HeldFilter(
            server_id=server_id, rcpt_to=args.rcpt_to, mail_from=args.mail_from, held_before=args.before
        )

    def list_held(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> tuple[dict[int, str], list[message_store.Message]]:
            names = {s.id: s.full_permalink for s in server_store.list_servers(conn)}
            held = message_store.list_held_messages(conn, self._held_filter(conn, args), limit=args.limit + 1)
            return names, held

        names, held = self.transaction(load)
        more = len(held) > args.limit
        held = held[: args.limit]
        if not held:
            self.print("no held messages" + _described(args))
            return
        self._table(
            ["ID", "SERVER", "MAIL FROM", "RCPT TO", "HELD", "EXPIRES", "SUBJECT"],
            [
                [
                    str(m.id),
                    names.get(m.server_id, str(m.server_id)),
                    m.mail_from or "<>",
                    m.rcpt_to,
                    _format_time(m.last_delivery_attempt),
                    _format_time(m.hold_expiry),
                    _shorten(m.subject or "", 40),
                ]
                for m in held
            ],
        )
        if more:
            self.print(f"(only the {args.limit} longest held are shown; use --limit or filters for more)")

    def release_held(self, args: argparse.Namespace) -> None:
        self._act_on_held(args, HeldAction.RELEASE)

    def cancel_held(self, args: argparse.Namespace) -> None:
        self._act_on_held(args, HeldAction.CANCEL)

    def _act_on_held(self, args: argparse.Namespace, action: HeldAction) -> None:
        """Release or cancel held messages named by id, or chosen from SQL (status Held) by filters."""
        done = action.value
        filtered = args.server is not None or args.rcpt_to or args.mail_from or args.before is not None
        if args.ids and (filtered or args.all):
            raise CommandError("give message ids, or filters (or --all), not both")
        if not args.ids and not filtered and not args.all:
            raise CommandError(
                "name the messages: their ids, filters (--server, --rcpt-to, --mail-from, --before), "
                "or --all for every held message"
            )
        ids: list[int]
        if args.ids:
            ids = list(dict.fromkeys(args.ids))
        else:
            ids = self.transaction(
                lambda conn: message_store.held_message_ids(conn, self._held_filter(conn, args))
            )
            if not ids:
                self.print("no held messages" + _described(args))
                return
        url, socket_path = queue_location(self.config)
        if socket_path is not None and not os.path.exists(socket_path):
            raise CommandError(
                f"the embedded Redis is not running (no socket at {socket_path}): it runs only while the "
                "mtad daemon runs with this data_dir; start mtad and try again (or set redis.url)"
            )

        async def work(reactor: Any) -> HeldOutcome:
            client = RedisClient.from_url(reactor, url, timeout=self.config.redis.timeout, poolsize=1)
            try:
                try:
                    await client.wait_connected()
                except RedisUnavailable as e:
                    raise CommandError(_unreachable(str(e), socket_path)) from None
                queue = RedisQueue(client, self.queue_keys)
                return await act_on_held(action, queue, ids, reactor.seconds())
            finally:
                await client.disconnect()

        try:
            outcome = self.run_async(work)
        except HeldActionFailed as e:
            if e.done:
                self.print(
                    f"{done} {len(e.done)} of {len(ids)} messages before Redis failed; "
                    "running the command again is safe"
                )
            if isinstance(e.error, QueueError):
                raise CommandError(f"Redis: {e.error}") from None
            raise e.error from None
        if args.ids:
            for message_id in ids:
                self.print(
                    f"{message_id}: {NOT_HELD}" if message_id in outcome.not_held else f"{done} {message_id}"
                )
            if outcome.not_held:
                raise CommandError(
                    f"{len(outcome.not_held)} of {len(ids)} messages were not held; nothing done for them"
                )
            return
        self.print(f"{done} {len(outcome.done)} of {len(ids)} held messages{_described(args)}")
        for message_id in outcome.not_held:
            self.print(f"  skipped {message_id}: {NOT_HELD}")

    # Webhooks.

    # -- routes and endpoints ---------------------------------------------------------------------------

    def add_endpoint(self, args: argparse.Namespace) -> None:
        def add(conn: Connection) -> tuple[server_store.Server, route_store.Endpoint]:
            server = server_store.get_server_by_name(conn, args.server)
            now = time.time()
            if args.http is not None:
                endpoint = route_store.add_http_endpoint(
                    conn,
                    server.id,
                    args.name,
                    args.http,
                    now,
                    encoding=args.encoding,
                    format=args.format,
                    strip_replies=args.strip_replies,
                    include_attachments=not args.no_attachments,
                    timeout=args.timeout,
                )
            elif args.smtp is not None:
                host, _, port = args.smtp.rpartition(":") if ":" in args.smtp else (args.smtp, "", "25")
                if not port.isdigit():
                    raise CommandError(f"--smtp: the port of {args.smtp!r} is not a number")
                endpoint = route_store.add_smtp_endpoint(
                    conn, server.id, args.name, host, now, port=int(port), tls_mode=args.tls
                )
            else:
                endpoint = route_store.add_address_endpoint(conn, server.id, args.name, args.address, now)
            return server, endpoint

        server, endpoint = self.transaction(add)
        self.print(
            f"{endpoint.kind} endpoint {endpoint.name!r} added to {server.full_permalink}: "
            + endpoint.describe(),
            f"uuid: {endpoint.uuid}",
        )

    def list_endpoints(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> list[route_store.Endpoint]:
            return route_store.list_endpoints(conn, server_store.get_server_by_name(conn, args.server).id)

        self._table(
            ["NAME", "KIND", "WHERE", "UUID"],
            [[e.name, e.kind, e.describe(), e.uuid] for e in self.transaction(load)],
        )

    def remove_endpoint(self, args: argparse.Namespace) -> None:
        def remove(conn: Connection) -> route_store.Endpoint:
            server = server_store.get_server_by_name(conn, args.server)
            return route_store.remove_endpoint(conn, server.id, args.endpoint, time.time())

        endpoint = self.transaction(remove)
        self.print(f"endpoint {endpoint.name!r} removed; a route left without endpoints now rejects its mail")

    def add_route(self, args: argparse.Namespace) -> None:
        def add(conn: Connection) -> tuple[server_store.Server, route_store.Route]:
            server = server_store.get_server_by_name(conn, args.server)
            route = route_store.add_route(
                conn,
                server.id,
                args.address,
                time.time(),
                mode=args.mode,
                endpoints_=args.endpoints or (),
                spam_mode=args.spam_mode,
            )
            return server, route

        server, route = self.transaction(add)
        where = ", ".join(e.name for e in route.endpoints) or "-"
        self.print(
            f"route {route.address} added to {server.full_permalink}: {route.mode} (endpoints: {where})",
            f"forwarding address token: {route.token}",
        )

    def list_routes(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> list[route_store.Route]:
            return route_store.list_routes(conn, server_store.get_server_by_name(conn, args.server).id)

        self._table(
            ["ADDRESS", "MODE", "SPAM", "ENDPOINTS", "TOKEN"],
            [
                [r.address, r.mode, r.spam_mode, ", ".join(e.name for e in r.endpoints) or "-", r.token]
                for r in self.transaction(load)
            ],
        )

    def remove_route(self, args: argparse.Namespace) -> None:
        def remove(conn: Connection) -> route_store.Route:
            server = server_store.get_server_by_name(conn, args.server)
            return route_store.remove_route(conn, server.id, args.route)

        route = self.transaction(remove)
        self.print(f"route {route.address} removed")

    def add_webhook(self, args: argparse.Namespace) -> None:
        def add(conn: Connection) -> tuple[server_store.Server, webhook_store.Webhook]:
            server = server_store.get_server_by_name(conn, args.server)
            webhook = webhook_store.add_webhook(
                conn, server.id, args.name, args.url, time.time(), events=args.events, enabled=args.enabled
            )
            return server, webhook

        server, webhook = self.transaction(add)
        self.print(
            f"webhook {webhook.id} ({webhook.name}) added to {server.full_permalink}: {webhook.url}",
            f"uuid: {webhook.uuid}",
            f"events: {_webhook_events(webhook)}",
        )
        if not webhook.enabled:
            self.print(f"disabled: `mtad set-webhook {webhook.id} --enable` starts sending to it")

    def webhook_key(self, args: argparse.Namespace) -> None:
        """The public half of the webhook signing key, as django-anymail's ``WEBHOOK_KEY`` takes it (the
        daemon creates the key on first start; this creates it too, so it can be set before)."""
        webhooks = self.config.webhooks
        path = Path(webhooks.signing_key) if webhooks.signing_key else self.config.data_path / "signing.key"
        try:
            signer = WebhookSigner.load_or_create(path)
        except (OSError, ValueError) as e:
            raise CommandError(f"webhooks.signing_key: cannot use {path}: {e}") from e
        self.print(signer.public_key_for_anymail())

    def list_webhooks(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> tuple[dict[int, str], list[webhook_store.Webhook]]:
            names = {s.id: s.full_permalink for s in server_store.list_servers(conn)}
            server_id = None if args.server is None else server_store.get_server_by_name(conn, args.server).id
            return names, webhook_store.list_webhooks(conn, server_id)

        names, webhooks = self.transaction(load)
        self._table(
            ["ID", "SERVER", "NAME", "ENABLED", "EVENTS", "LAST USED", "UUID", "URL"],
            [
                [
                    str(w.id),
                    names.get(w.server_id, str(w.server_id)),
                    w.name,
                    "yes" if w.enabled else "no",
                    _webhook_events(w),
                    _format_time(w.last_used_at),
                    w.uuid,
                    w.url,
                ]
                for w in webhooks
            ],
        )

    def set_webhook(self, args: argparse.Namespace) -> None:
        events: list[str] | webhook_store.Keep | None = webhook_store.KEEP
        if args.all_events:
            events = None
        elif args.events is not None:
            events = args.events
        if args.url is None and args.name is None and args.enabled is None and events is webhook_store.KEEP:
            raise CommandError(
                "nothing to change: give --url, --name, --event or --all-events, --enable or --disable"
            )
        webhook = self.transaction(
            lambda conn: webhook_store.update_webhook(
                conn, args.id, time.time(), name=args.name, url=args.url, enabled=args.enabled, events=events
            )
        )
        self.print(
            f"webhook {webhook.id} ({webhook.name}): {webhook.url}",
            f"events: {_webhook_events(webhook)}; {'enabled' if webhook.enabled else 'disabled'}",
        )

    def remove_webhook(self, args: argparse.Namespace) -> None:
        webhook = self.transaction(lambda conn: webhook_store.remove_webhook(conn, args.id))
        self.print(f"webhook {webhook.id} ({webhook.name}) removed; its logged requests are kept")

    def webhook_requests(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> tuple[dict[int, str], list[webhook_store.WebhookRequest]]:
            names = {s.id: s.full_permalink for s in server_store.list_servers(conn)}
            server_id = None if args.server is None else server_store.get_server_by_name(conn, args.server).id
            found = webhook_store.list_webhook_requests(
                conn,
                server_id,
                webhook_id=args.webhook,
                uuid=args.uuid,
                before_id=args.before,
                limit=args.limit + 1,
            )
            return names, found

        names, found = self.transaction(load)
        more = len(found) > args.limit
        found = found[: args.limit]
        if not found:
            self.print("no webhook requests" + ("" if args.before is None else f" before {args.before}"))
            return
        self._table(
            [
                *("ID", "TIME", "SERVER", "WEBHOOK", "EVENT", "ATTEMPT", "STATUS"),
                *("TIME TAKEN", "RETRY", "UUID", "RESULT"),
            ],
            [
                [
                    str(r.id),
                    _format_time(r.timestamp),
                    names.get(r.server_id, str(r.server_id)),
                    "-" if r.webhook_id is None else str(r.webhook_id),
                    r.event,
                    str(r.attempt),
                    webhook_store.describe_status(r.status_code),
                    f"{r.duration:.3f} s",
                    "yes" if r.will_retry else "no",
                    r.uuid,
                    _shorten(r.error or r.response or "", 40),
                ]
                for r in found
            ],
        )
        if more:
            self.print(f"(more: --before {found[-1].id})")

    # Suppressions.

    def add_suppression(self, args: argparse.Namespace) -> None:
        now = time.time()
        source = suppression_store.SuppressionSource(args.source)
        if args.never:
            expires_at = None
        elif args.days is not None:
            expires_at = now + args.days * 86400
        else:
            expires_at = suppression_expiry(self.config.suppression, source, now)

        def add(conn: Connection) -> tuple[server_store.Server, suppression_store.Suppression]:
            server = server_store.get_server_by_name(conn, args.server)
            added = suppression_store.add_suppression(
                conn, server.id, args.address, source, now, reason=args.reason, expires_at=expires_at
            )
            return server, added

        server, added = self.transaction(add)
        self.print(
            f"{added.address} is suppressed for {server.full_permalink} ({added.source.value}) "
            f"{_until(added.expires_at)}"
        )

    def remove_suppression(self, args: argparse.Namespace) -> None:
        def remove(conn: Connection) -> tuple[server_store.Server, suppression_store.Suppression | None]:
            server = server_store.get_server_by_name(conn, args.server)
            return server, suppression_store.remove_suppression(conn, server.id, args.address)

        server, removed = self.transaction(remove)
        if removed is None:
            raise CommandError(f"{args.address} is not on the suppression list of {server.full_permalink}")
        self.print(f"{removed.address} removed from the suppression list of {server.full_permalink}")

    def list_suppressions(self, args: argparse.Namespace) -> None:
        def load(conn: Connection) -> suppression_store.SuppressionPage:
            server = server_store.get_server_by_name(conn, args.server)
            return suppression_store.list_suppressions(
                conn,
                server.id,
                time.time(),
                page=args.page,
                per_page=args.per_page,
                source=args.source,
                search=args.search,
            )

        page = self.transaction(load)
        if not page.suppressions:
            self.print("no suppressed addresses" + (f" on page {page.page}" if page.total else ""))
        else:
            self._table(
                ["ADDRESS", "SOURCE", "SINCE", "UNTIL", "MESSAGE", "REASON"],
                [
                    [
                        s.address,
                        s.source.value,
                        _format_time(s.created_at),
                        "never expires" if s.expires_at is None else _format_time(s.expires_at),
                        "-" if s.message_id is None else str(s.message_id),
                        _shorten(s.reason or "", 60),
                    ]
                    for s in page.suppressions
                ],
            )
        self.print(f"page {page.page} of {page.pages} ({page.total} suppressed addresses)")

    def export_suppressions(self, args: argparse.Namespace) -> None:
        """The whole list, in chunks of one short transaction each (`export_suppressions`)."""
        server = self.transaction(lambda conn: server_store.get_server_by_name(conn, args.server))
        now = time.time()
        if args.format == "csv":
            self.out.write(suppression_export.csv_header())
        after_id = 0
        while True:
            chunk = self.transaction(
                functools.partial(
                    suppression_store.export_suppressions,
                    server_id=server.id,
                    now=now,
                    after_id=after_id,
                    source=args.source,
                    search=args.search,
                )
            )
            if not chunk:
                break
            self.out.write(suppression_export.chunk(chunk, args.format))
            after_id = chunk[-1].id

    def _table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
        for row in [header, *rows]:
            self.print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _until(expires_at: float | None) -> str:
    return "until removed (it never expires)" if expires_at is None else f"until {_format_time(expires_at)}"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _webhook_events(webhook: webhook_store.Webhook) -> str:
    if webhook.all_events:
        return "all"
    return ", ".join(e for e in webhook_store.WEBHOOK_EVENTS if e in webhook.events)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def _described(args: argparse.Namespace) -> str:
    """The filters of a held-message command, for its summary line."""
    parts = []
    if args.server is not None:
        parts.append(f"server {args.server}")
    if args.rcpt_to:
        parts.append(f"rcpt to {args.rcpt_to}")
    if args.mail_from:
        parts.append(f"mail from {args.mail_from}")
    if args.before is not None:
        parts.append(f"held before {_format_time(args.before)}")
    return f" ({', '.join(parts)})" if parts else ""


def _unreachable(error: str, socket_path: str | None) -> str:
    if socket_path is None:
        return f"redis.url: {error}"
    return (
        f"cannot reach the embedded Redis ({error}): it runs only while the mtad daemon runs with this "
        "data_dir; start mtad and try again (or set redis.url)"
    )


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def time_argument(text: str) -> float:
    """A ``--before`` time: ``2024-05-01``, ``2024-05-01 12:00`` (UTC unless an offset is given), Unix
    seconds, or an age (``30m``, ``6h``, ``2d``: that long ago)."""
    text = text.strip()
    age = _AGE.fullmatch(text)
    if age is not None:
        return time.time() - float(age.group(1)) * _AGE_UNITS[age.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use 2024-05-01, '2024-05-01 12:00', Unix seconds or an age like 2d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _status(status: str | None, error: str | None) -> str:
    if status is None:
        return "not checked"
    return f"{status}: {error}" if error else status


_ALLOW_SENDER_HELP = (
    "a message whose From domain is not one of the server's sending domains may be sent if its Sender "
    "domain is (Postal's allow_sender; SMTP and the HTTP API)"
)


#: ``--send-limit none``: parsed apart from "not given" (None).
_NO_LIMIT = 0


def _limit_or_none(text: str) -> int:
    return _NO_LIMIT if text.strip().lower() == "none" else _positive(text)


def _send_limit_text(server: server_store.Server) -> str:
    if server.send_limit is None:
        return "no send limit"
    action = "held until there is room" if server.send_limit_action.value == "Hold" else "refused (451 4.7.1)"
    period = server.send_limit_period or 3600
    return f"send limit {server.send_limit} messages per {period} s; messages over it are {action}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtad", description="Operate an mtad installation's database.")
    parser.add_argument("--config", "-c", metavar="PATH", help="TOML configuration file (default: built-in)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("initialize", help="create the database schema, or upgrade it to the latest")
    commands.add_parser("upgrade", help="run pending schema migrations")

    p = commands.add_parser("make-organization", help="create an organization")
    p.add_argument("name")
    p.add_argument("--permalink", help="short name (default: made from NAME)")

    p = commands.add_parser("make-server", help="create a server in an organization")
    p.add_argument("organization", metavar="ORG_PERMALINK")
    p.add_argument("name")
    p.add_argument("--mode", choices=[m.value for m in server_store.ServerMode], default="Live")
    p.add_argument("--permalink", help="short name (default: made from NAME)")
    p.add_argument("--allow-sender", action="store_true", help=_ALLOW_SENDER_HELP)

    p = commands.add_parser("set-server", help="change a server's settings")
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("--allow-sender", action=argparse.BooleanOptionalAction, help=_ALLOW_SENDER_HELP)
    p.add_argument(
        "--send-limit",
        metavar="N",
        type=_limit_or_none,
        help="messages (one per recipient) the server may send per window; 'none' removes the limit",
    )
    p.add_argument(
        "--send-limit-period",
        metavar="SECONDS",
        type=_positive,
        help="the rolling window's length (default 3600, at least 60)",
    )
    p.add_argument(
        "--send-limit-action",
        choices=["hold", "refuse"],
        help="what a message over the limit gets: held and released when there is room (default), "
        "or refused with 451 4.7.1 / a SendLimitExceeded error",
    )
    p.add_argument("--suspend", metavar="REASON", help="suspend the server: it sends nothing")
    p.add_argument("--unsuspend", action="store_true", help="lift a suspension")

    p = commands.add_parser("make-credential", help="create a credential; prints its secret once")
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("--type", required=True, choices=[t.value for t in credential_store.CredentialType])
    p.add_argument(
        "--key", help="SMTP-IP: the IP address or CIDR network; API/SMTP: import an existing secret"
    )
    p.add_argument("--name", help="a label for the credential")
    p.add_argument("--hold", action="store_true", help="hold every message sent with this credential")

    commands.add_parser("list-organizations", help="list organizations")
    p = commands.add_parser("list-servers", help="list servers")
    p.add_argument("organization", metavar="ORG_PERMALINK", nargs="?")
    p = commands.add_parser("list-credentials", help="list credentials (never their secrets)")
    p.add_argument("server", metavar="SERVER", nargs="?")

    p = commands.add_parser("add-domain", help="add a sending domain; prints the DNS records to publish")
    p.add_argument(
        "owner", metavar="SERVER_OR_ORG", help="organization/server, or with --organization an organization"
    )
    p.add_argument("name", metavar="NAME", help="the domain, e.g. example.com")
    p.add_argument(
        "--organization", action="store_true", help="the domain belongs to the organization's servers"
    )
    p.add_argument("--ed25519", action="store_true", help="also make an Ed25519 key (dual signing, RFC 8463)")
    p.add_argument(
        "--use-for-any", action="store_true", help="may sign mail from any From domain of its owner"
    )
    p = commands.add_parser("list-domains", help="list domains (with a server: those it may send from)")
    p.add_argument("server", metavar="SERVER", nargs="?")
    p = commands.add_parser("show-domain", help="show a domain's DNS records, check results and DKIM keys")
    p.add_argument("name", metavar="NAME", help="domain name, or its id if several owners added it")
    p = commands.add_parser("verify-domain", help="look up the verification TXT record now; mark verified")
    p.add_argument("name", metavar="NAME")
    p = commands.add_parser("check-domain", help="check SPF, DKIM, MX and return-path records now")
    p.add_argument("name", metavar="NAME")
    p = commands.add_parser("rotate-dkim", help="make a new DKIM key to publish before activating it")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--algorithm", choices=[RSA, ED25519], default=RSA)
    p = commands.add_parser(
        "activate-dkim", help="sign with a published DKIM key; retire the one it replaces"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("selector", metavar="SELECTOR")
    p.add_argument("--force", action="store_true", help="activate even if its DNS record is not found")

    p = commands.add_parser("list-held", help="list held messages (development mode, held credentials)")
    p.add_argument("server", metavar="SERVER", nargs="?", help="organization/server (default: all servers)")
    _held_filters(p)
    p.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    for name, verb, effect in (
        ("release-held", "release", "deliver now"),
        ("cancel-held", "cancel", "delete without delivering (status HoldCancelled)"),
    ):
        p = commands.add_parser(
            name, help=f"{verb} held messages: {effect}; by id, or in bulk by filters (needs the queue)"
        )
        p.add_argument("ids", metavar="ID", type=int, nargs="*", help="message ids")
        p.add_argument("--server", metavar="SERVER", help="held messages of organization/server")
        _held_filters(p)
        p.add_argument("--all", action="store_true", help="every held message (that matches the filters)")

    _webhook_commands(commands)
    _suppression_commands(commands)
    _route_commands(commands)
    return parser


_EVENT_HELP = "send only this event (repeatable); the events are " + ", ".join(webhook_store.WEBHOOK_EVENTS)


def _route_commands(commands: Any) -> None:
    p = commands.add_parser("add-endpoint", help="add an endpoint: where a server's incoming mail goes")
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("name", help="a name for it, unique in the server")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--http", metavar="URL", help="POST each message to this URL, signed like webhooks")
    kind.add_argument("--smtp", metavar="HOST[:PORT]", help="relay each message to this SMTP server")
    kind.add_argument("--address", metavar="ADDRESS", help="forward each message to this address")
    p.add_argument("--encoding", choices=[e.value for e in route_store.Encoding], default="BodyAsJSON")
    p.add_argument("--format", choices=[f.value for f in route_store.Format], default="Hash")
    p.add_argument("--strip-replies", action="store_true", help="Hash: leave quoted replies out")
    p.add_argument("--no-attachments", action="store_true", help="Hash: leave attachments out")
    p.add_argument("--timeout", type=int, default=route_store.DEFAULT_TIMEOUT, help="seconds (5 to 60)")
    p.add_argument("--tls", choices=[t.value for t in route_store.TLSMode], default="Auto", help="SMTP")

    p = commands.add_parser("list-endpoints", help="list a server's endpoints")
    p.add_argument("server", metavar="SERVER")

    p = commands.add_parser(
        "remove-endpoint", help="delete an endpoint (its routes reject if left with none)"
    )
    p.add_argument("server", metavar="SERVER")
    p.add_argument("endpoint", metavar="ENDPOINT", help="its name or uuid")

    p = commands.add_parser(
        "add-route", help="route incoming mail for local@domain (or *@domain) of a server's domain"
    )
    p.add_argument("server", metavar="SERVER")
    p.add_argument("address", metavar="ADDRESS", help="local@domain, *@domain or __returnpath__")
    p.add_argument(
        "--endpoint",
        dest="endpoints",
        metavar="ENDPOINT",
        action="extend",
        nargs="+",
        help="names (in order)",
    )
    p.add_argument("--mode", choices=[m.value for m in route_store.RouteMode], default="Endpoint")
    p.add_argument("--spam-mode", choices=[m.value for m in route_store.SpamMode], default="Mark")

    p = commands.add_parser("list-routes", help="list a server's routes")
    p.add_argument("server", metavar="SERVER")

    p = commands.add_parser("remove-route", help="delete a route")
    p.add_argument("server", metavar="SERVER")
    p.add_argument("route", metavar="ROUTE", help="its address, token or uuid")


def _webhook_commands(commands: Any) -> None:
    p = commands.add_parser("add-webhook", help="add a webhook: a URL the server's events are POSTed to")
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("url", metavar="URL", help="http:// or https:// URL")
    p.add_argument("--name", help="a label for the webhook (default: the URL's host)")
    p.add_argument(
        "--event",
        dest="events",
        metavar="EVENT",
        action="extend",
        nargs="+",
        help=f"{_EVENT_HELP} (default: all)",
    )
    p.add_argument(
        "--disabled", dest="enabled", action="store_false", help="add it without sending to it yet"
    )

    commands.add_parser(
        "webhook-key", help="print the webhook signing key's public half (django-anymail's WEBHOOK_KEY)"
    )

    p = commands.add_parser("list-webhooks", help="list webhooks")
    p.add_argument("server", metavar="SERVER", nargs="?", help="organization/server (default: all servers)")

    p = commands.add_parser(
        "set-webhook", help="change a webhook's URL, name, events or whether it is enabled"
    )
    p.add_argument("id", metavar="ID", type=int, help="the webhook's id (list-webhooks)")
    p.add_argument("--url", help="new http:// or https:// URL")
    p.add_argument("--name", help="new label")
    events = p.add_mutually_exclusive_group()
    events.add_argument(
        "--event", dest="events", metavar="EVENT", action="extend", nargs="+", help=_EVENT_HELP
    )
    events.add_argument("--all-events", action="store_true", help="send every event")
    enabled = p.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_const", const=True, help="send to it")
    enabled.add_argument("--disable", dest="enabled", action="store_const", const=False, help="stop sending")

    p = commands.add_parser("remove-webhook", help="delete a webhook (its request log is kept)")
    p.add_argument("id", metavar="ID", type=int)

    p = commands.add_parser("webhook-requests", help="the webhook request log, newest first")
    p.add_argument("server", metavar="SERVER", nargs="?", help="organization/server (default: all servers)")
    p.add_argument("--webhook", metavar="ID", type=int, help="requests to this webhook only")
    p.add_argument("--uuid", metavar="UUID", help="the attempts to send one event (its payload's uuid)")
    p.add_argument("--before", metavar="ID", type=int, help="older than the request with this id (next page)")
    p.add_argument("--limit", type=_positive, default=50, help="show at most this many (default 50)")


_SOURCES = [s.value for s in suppression_store.SuppressionSource]


def _positive_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of days: {text!r}")
    return value


def _suppression_commands(commands: Any) -> None:
    p = commands.add_parser(
        "add-suppression", help="add an address to a server's suppression list: nothing is sent to it"
    )
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--reason", help="a note saying why (shown in the message's delivery details)")
    p.add_argument("--source", choices=_SOURCES, default="Manual", help="why it is listed (default Manual)")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument(
        "--days",
        type=_positive_days,
        help="expire after this many days (default: suppression.expiry_days, or "
        "unsubscribe/complaint_expiry_days for those sources)",
    )
    expiry.add_argument("--never", action="store_true", help="never expire")

    p = commands.add_parser("remove-suppression", help="take an address off a server's suppression list")
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("address", metavar="ADDRESS")

    p = commands.add_parser(
        "list-suppressions", help="a server's suppressed addresses, newest first, a page at a time"
    )
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument("--page", type=_positive, default=1, help="which page (default 1)")
    p.add_argument(
        "--per-page",
        type=_positive,
        default=suppression_store.DEFAULT_PER_PAGE,
        help=f"addresses a page (default {suppression_store.DEFAULT_PER_PAGE}, "
        f"at most {suppression_store.MAX_PER_PAGE})",
    )
    _suppression_filters(p)

    p = commands.add_parser(
        "export-suppressions", help="write a server's whole suppression list to stdout (JSON lines or CSV)"
    )
    p.add_argument("server", metavar="SERVER", help="organization/server (or a unique server permalink)")
    p.add_argument(
        "--format",
        choices=suppression_export.FORMATS,
        default="jsonl",
        help="jsonl: one JSON object a line (Unix seconds); csv: with a header, ISO 8601 UTC times",
    )
    _suppression_filters(p)


def _suppression_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=_SOURCES, help="only addresses listed for this reason")
    p.add_argument("--search", metavar="TEXT", help="only addresses containing TEXT (ignoring case)")


def _held_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rcpt-to", metavar="ADDRESS", help="recipient; * matches anything (*@example.com)")
    p.add_argument("--mail-from", metavar="ADDRESS", help="envelope sender; * matches anything")
    p.add_argument(
        "--before",
        metavar="TIME",
        type=time_argument,
        help="held before TIME: 2024-05-01, '2024-05-01 12:00' (UTC), Unix seconds, or an age (2d, 6h)",
    )


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    *,
    run_async: AsyncRunner = _no_reactor,
    queue_keys: QueueKeys | None = None,
) -> int:
    """Run one ``mtad`` command; return the exit status (0 success, 1 failure, 2 usage error).

    ``run_async`` runs the commands' Redis work: `mtad.tap.cli` gives one on the global reactor, tests
    run it on trial's reactor from a thread;
    ``queue_keys`` is the queue's key prefix (tests use a fresh one).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (to sys.stderr).
        return int(e.code or 0)
    try:
        commands = _Commands(config_from_toml(args.config), out, run_async, queue_keys)
        try:
            getattr(commands, args.command.replace("-", "_"))(args)
        finally:
            commands.close()
    except (CommandError, StoreError) as e:
        err.write(f"mtad: error: {e}\n")
        return 1
    except sa.exc.SQLAlchemyError as e:
        # One line, without SQLAlchemy's trailing background link.
        message = str(e.orig if isinstance(e, sa.exc.DBAPIError) and e.orig is not None else e)
        err.write(f"mtad: error: database: {message.splitlines()[0] if message else type(e).__name__}\n")
        return 1
    return 0

"""``mtad``: the operator's command for the database: create and upgrade the schema, make and list objects.

Every command works on the database named by the configuration file (``--config``) and exits non-zero with
one clear line on stderr when something is wrong. Secrets (API keys, SMTP passwords) are printed once, by the
command that makes them, and never again: only their hashes are stored.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mtad.config import ConfigError, load_config
from mtad.store import credentials as credential_store
from mtad.store import organizations as organization_store
from mtad.store import servers as server_store
from mtad.store.db import StoreError, make_engine
from mtad.store.migrate import head_revision, schema_problem, schema_revision, upgrade_schema

T = TypeVar("T")


class CommandError(Exception):
    """A problem to report to the operator as one line, exiting with status 1."""


def database_url_from_toml(path: str | Path | None) -> str:
    """The database URL the daemon would use with this config file (checked in full, as the daemon does)."""
    try:
        return load_config(path).database_url
    except ConfigError as e:
        raise CommandError(str(e)) from None


def _sqlite_path(url: str) -> Path | None:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


class _Commands:
    def __init__(self, url: str, out: TextIO) -> None:
        self.url = url
        self.out = out
        self._engine: Engine | None = None

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
            )
        )
        self.print(f"server {server.full_permalink} created (mode {server.mode}, token {server.token})")

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
            ["SERVER", "NAME", "MODE", "TOKEN", "SUSPENDED"],
            [[s.full_permalink, s.name, s.mode, s.token, "yes" if s.suspended else "no"] for s in servers],
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

    def _table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
        for row in [header, *rows]:
            self.print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


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
    return parser


def main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run one ``mtad`` command; return the exit status (0 success, 1 failure, 2 usage error)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (to sys.stderr).
        return int(e.code or 0)
    try:
        commands = _Commands(database_url_from_toml(args.config), out)
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

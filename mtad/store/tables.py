"""The SQL schema as SQLAlchemy Core metadata: the one description that migrations are checked against.

Conventions, chosen so that one schema runs unchanged on SQLite, PostgreSQL and MySQL/MariaDB:

- Every time is a float of epoch seconds (``Double``: DOUBLE PRECISION / DOUBLE / REAL), never a DateTime.
  Postal stores decimal timestamps in its message tables too; floats sort, compare and subtract the same way
  on every backend and carry no timezone to get wrong.
- Ids are 64-bit. SQLite only autoincrements an ``INTEGER PRIMARY KEY`` (the rowid alias), so the
  autoincrement ids use an ``Integer`` variant there; SQLite integers are 64-bit anyway.
- Free text (subjects, SMTP output) is ``Text`` with no length limit: a subject may be 10,000 emoji. MySQL
  tables are ``utf8mb4`` (MySQL's ``utf8`` is 3 bytes and rejects emoji) and long text is ``MEDIUMTEXT``
  there, since MySQL's ``TEXT`` stops at 64 KiB.
- Indexed strings have lengths that fit MySQL's 3072-byte InnoDB key limit at 4 bytes per character.
- Binary data (raw messages) is ``LargeBinary``: BLOB on SQLite, BYTEA on PostgreSQL, ``LONGBLOB`` on MySQL,
  whose ``BLOB`` stops at 64 KiB. Raw messages are stored in parts (``mtad.store.raw_messages.PART_SIZE``) so
  that no single row comes near MySQL's ``max_allowed_packet`` (16 MiB by default on MariaDB).
- History tables (messages, deliveries) have no foreign keys: they are written at least once from the event
  stream, and a row that cannot be inserted must not poison a batch forever. The one exception is
  ``webhook_requests.webhook_id`` (``ON DELETE SET NULL``, so the log outlives its webhook); the function
  that records requests writes NULL for a webhook deleted in the meantime, so that key cannot poison one.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

#: Names for constraints and indexes so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def _new_uuid() -> str:
    return str(uuid.uuid4())


#: Table options: InnoDB with a 4-byte UTF-8 character set on MySQL/MariaDB; ignored elsewhere.
TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}

#: An autoincrementing 64-bit id (``INTEGER`` on SQLite so that it aliases the rowid).
AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
#: Unbounded text; ``MEDIUMTEXT`` (16 MiB) on MySQL/MariaDB.
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
#: Epoch seconds.
Timestamp: sa.Double[float] = sa.Double()
#: Unbounded octets; ``LONGBLOB`` on MySQL/MariaDB.
LongBinary = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

organizations = sa.Table(
    "organizations",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("permalink", sa.String(255), nullable=False, unique=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    **TABLE_OPTIONS,
)

servers = sa.Table(
    "servers",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("organization_id", sa.BigInteger, sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("permalink", sa.String(255), nullable=False),
    # ``Live`` or ``Development`` (Development servers hold all outgoing mail, as in Postal).
    sa.Column("mode", sa.String(16), nullable=False),
    # Six lowercase characters, unique: it names the server in return paths (``<token>@rp.example``).
    sa.Column("token", sa.String(16), nullable=False, unique=True),
    sa.Column("suspended", sa.Boolean, nullable=False, default=False),
    sa.Column("suspension_reason", sa.Text, nullable=True),
    # Outgoing messages allowed per ``send_limit_period`` seconds; NULL means unlimited.
    sa.Column("send_limit", sa.Integer, nullable=True),
    sa.Column("send_limit_period", sa.Integer, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    # Whether the Sender domain may authenticate a message whose From domain is not (Postal's setting).
    sa.Column("allow_sender", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    # Names the server to webhook receivers (Postal's ``uuid``); made on insert.
    sa.Column("uuid", sa.String(36), nullable=False, unique=True, default=_new_uuid),
    # What a message over the send limit gets: ``Hold`` (Postal's way) or ``Refuse`` (451 4.7.1).
    sa.Column("send_limit_action", sa.String(16), nullable=False, default="Hold", server_default="Hold"),
    sa.UniqueConstraint("organization_id", "permalink"),
    **TABLE_OPTIONS,
)

credentials = sa.Table(
    "credentials",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("server_id", sa.BigInteger, sa.ForeignKey("servers.id"), nullable=False, index=True),
    # ``SMTP``, ``API`` or ``SMTP-IP``.
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    # SHA-256 (hex) of the secret for SMTP and API credentials; the secret itself is never stored.
    sa.Column("key_hash", sa.String(64), nullable=True, unique=True),
    # The IP address or CIDR network of an SMTP-IP credential (not a secret, stored as given).
    sa.Column("network", sa.String(64), nullable=True),
    sa.Column("hold", sa.Boolean, nullable=False, default=False),
    sa.Column("last_used_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    **TABLE_OPTIONS,
)

messages = sa.Table(
    "messages",
    metadata,
    # Allocated in Redis when the message is accepted (one id per recipient), never by the database.
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("token", sa.String(64), nullable=False, index=True),
    sa.Column("server_id", sa.BigInteger, nullable=False),
    # ``outgoing`` or ``incoming``.
    sa.Column("scope", sa.String(16), nullable=False),
    # RFC 5321 §4.5.3.1: a path is at most 256 octets; 320 leaves room for unusual but valid input.
    sa.Column("rcpt_to", sa.String(320), nullable=False),
    sa.Column("mail_from", sa.String(320), nullable=False),
    sa.Column("subject", LongText, nullable=True),
    # The Message-ID header (RFC 5322 §3.6.4); lines may be long, so no length limit.
    sa.Column("message_id", sa.Text, nullable=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    # Pending/Sent/SoftFail/HardFail/Held/Bounced/HoldCancelled/Processed/Error (Postal's statuses).
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("held", sa.Boolean, nullable=False, default=False),
    sa.Column("hold_expiry", Timestamp, nullable=True),
    sa.Column("last_delivery_attempt", Timestamp, nullable=True),
    sa.Column("tag", sa.String(255), nullable=True),
    sa.Column("timestamp", Timestamp, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    # Whether the message came to us over TLS (SMTP STARTTLS/implicit TLS; always true for the API).
    sa.Column("received_with_ssl", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    # Its raw message in ``raw_messages`` (shared by the messages of one accept); a message whose raw
    # message was deleted under retention keeps the id. NULL for messages recorded before raw messages
    # were kept.
    sa.Column("raw_message_id", sa.BigInteger, nullable=True),
    # A bounce (DSN, complaint) received for one of our messages: ``bounce`` set, ``bounce_for_id`` the
    # message it was matched to (Postal's columns of those names).
    sa.Column("bounce", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("bounce_for_id", sa.BigInteger, nullable=True),
    sa.Index(None, "server_id", "timestamp"),
    **TABLE_OPTIONS,
)

raw_messages = sa.Table(
    "raw_messages",
    metadata,
    # The id of the first message of the accept that stored it (its body's id in Redis), never allocated
    # by the database: storing the same body again is a no-op.
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("server_id", sa.BigInteger, nullable=False),
    # When the message was accepted: retention counts from here.
    sa.Column("timestamp", Timestamp, nullable=False),
    # Octets of the whole message (the sum of its parts).
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Index(None, "timestamp", "id"),
    **TABLE_OPTIONS,
)

raw_message_parts = sa.Table(
    "raw_message_parts",
    metadata,
    sa.Column("raw_message_id", sa.BigInteger, primary_key=True, autoincrement=False),
    # 0, 1, ...: the message is the concatenation of its parts in this order (part 0 always exists).
    sa.Column("part", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", LongBinary, nullable=False),
    **TABLE_OPTIONS,
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    # The id of the event that recorded this attempt: inserting the same event twice is a no-op.
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("message_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # The SMTP reply code of the attempt (RFC 5321 §4.2), if there was one.
    sa.Column("code", sa.Integer, nullable=True),
    sa.Column("output", LongText, nullable=True),
    sa.Column("details", LongText, nullable=True),
    sa.Column("sent_with_ssl", sa.Boolean, nullable=False, default=False),
    sa.Column("log_id", sa.String(64), nullable=True),
    # Seconds the attempt took.
    sa.Column("time", sa.Double, nullable=True),
    sa.Column("timestamp", Timestamp, nullable=False),
    **TABLE_OPTIONS,
)

domains = sa.Table(
    "domains",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    # Lower-case, A-labels for internationalized names (RFC 5890), no trailing dot.
    sa.Column("name", sa.String(253), nullable=False, index=True),
    # The owner: exactly one of a server or an organization (whose servers may all use the domain).
    sa.Column("server_id", sa.BigInteger, sa.ForeignKey("servers.id"), nullable=True),
    sa.Column("organization_id", sa.BigInteger, sa.ForeignKey("organizations.id"), nullable=True),
    # Published as a TXT record ``postal-verification <token>`` at the domain to prove control of it.
    sa.Column("verification_token", sa.String(64), nullable=False),
    sa.Column("verified_at", Timestamp, nullable=True),
    # May send mail whose From domain is not one of the owner's verified domains (as in Postal).
    sa.Column("use_for_any", sa.Boolean, nullable=False, default=False),
    # DNS check results: ``OK``, ``Missing`` or ``Invalid`` with the reason, NULL before the first check.
    sa.Column("spf_status", sa.String(16), nullable=True),
    sa.Column("spf_error", sa.Text, nullable=True),
    sa.Column("dkim_status", sa.String(16), nullable=True),
    sa.Column("dkim_error", sa.Text, nullable=True),
    sa.Column("mx_status", sa.String(16), nullable=True),
    sa.Column("mx_error", sa.Text, nullable=True),
    sa.Column("return_path_status", sa.String(16), nullable=True),
    sa.Column("return_path_error", sa.Text, nullable=True),
    sa.Column("dns_checked_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    # Names the domain to webhook receivers (``DomainDNSError``'s ``uuid``); made on insert.
    sa.Column("uuid", sa.String(36), nullable=False, unique=True, default=_new_uuid),
    # NULLs are distinct in unique constraints on every backend, so each applies to its kind of owner only.
    sa.UniqueConstraint("server_id", "name"),
    sa.UniqueConstraint("organization_id", "name"),
    sa.CheckConstraint("(server_id IS NULL) <> (organization_id IS NULL)", name="one_owner"),
    **TABLE_OPTIONS,
)

domain_keys = sa.Table(
    "domain_keys",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("domain_id", sa.BigInteger, sa.ForeignKey("domains.id"), nullable=False),
    # The DKIM selector (RFC 6376 §3.1): the record lives at ``<selector>._domainkey.<domain>``.
    sa.Column("selector", sa.String(63), nullable=False),
    # ``rsa`` or ``ed25519``.
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("private_key_pem", sa.Text, nullable=False),
    # Base64, as in the ``p=`` tag of the DNS record.
    sa.Column("public_key", sa.Text, nullable=False),
    # ``published`` (record to be put in DNS, not signing yet), ``active`` (signing; one per algorithm),
    # ``retired`` (no longer signing; its record stays until signed mail in flight has been verified).
    sa.Column("state", sa.String(16), nullable=False),
    # Result of the last DNS check of this key's record: ``OK``, ``Missing`` or ``Invalid`` and why.
    sa.Column("dns_status", sa.String(16), nullable=True),
    sa.Column("dns_error", sa.Text, nullable=True),
    sa.Column("activated_at", Timestamp, nullable=True),
    sa.Column("retired_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.UniqueConstraint("domain_id", "selector"),
    **TABLE_OPTIONS,
)

webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column(
        "server_id",
        sa.BigInteger,
        sa.ForeignKey("servers.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # Names the webhook to the outside (Postal's ``uuid``): the management API takes it as well as the id.
    sa.Column("uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    # http(s) only; no length limit (query strings carrying tokens can be long).
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True, server_default=sa.true()),
    # True: every event; false: the events listed in ``webhook_events`` for it.
    sa.Column("all_events", sa.Boolean, nullable=False, default=True, server_default=sa.true()),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    # When a request to it last succeeded (2xx).
    sa.Column("last_used_at", Timestamp, nullable=True),
    **TABLE_OPTIONS,
)

webhook_events = sa.Table(
    "webhook_events",
    metadata,
    # The events a webhook with ``all_events`` false is sent; a webhook for all events has no rows here.
    sa.Column(
        "webhook_id",
        sa.BigInteger,
        sa.ForeignKey("webhooks.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("event", sa.String(64), primary_key=True),
    **TABLE_OPTIONS,
)

webhook_requests = sa.Table(
    "webhook_requests",
    metadata,
    # The request log: one row per attempt to send an event to a webhook, kept under retention.
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("server_id", sa.BigInteger, nullable=False),
    # The log outlives the webhook: deleting one leaves its requests with NULL here.
    sa.Column("webhook_id", sa.BigInteger, sa.ForeignKey("webhooks.id", ondelete="SET NULL"), nullable=True),
    # The ``uuid`` of the payload sent, one per event and webhook, the same on every retry.
    sa.Column("uuid", sa.String(36), nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    # 1, 2, ...: recording the same attempt again (a retried batch) is a no-op.
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("timestamp", Timestamp, nullable=False),
    # The HTTP status, or Postal's pseudo codes: -1 timeout, -2 connection failed, -3 TLS certificate
    # refused, -4 destination not allowed.
    sa.Column("status_code", sa.Integer, nullable=False),
    # Seconds the request took.
    sa.Column("duration", sa.Double, nullable=False),
    # The start of the response body, as the sender kept it.
    sa.Column("response", LongText, nullable=True),
    # The JSON body sent, exactly (its signature was over these octets).
    sa.Column("payload", LongText, nullable=False),
    sa.Column("will_retry", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.UniqueConstraint("uuid", "attempt"),
    # Paging a server's log (and one webhook's) newest first; retention and the log of all servers.
    sa.Index(None, "server_id", "timestamp", "id"),
    sa.Index(None, "webhook_id", "timestamp", "id"),
    sa.Index(None, "timestamp", "id"),
    **TABLE_OPTIONS,
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    # Addresses a server does not send to (Postal's suppression list), until ``expires_at`` if set.
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column(
        "server_id",
        sa.BigInteger,
        sa.ForeignKey("servers.id", ondelete="CASCADE"),
        nullable=False,
    ),
    # The recipient address, lower-cased (one entry per address and server).
    sa.Column("address", sa.String(320), nullable=False),
    # Why: HardBounce, SoftFailures, Complaint, Manual or Unsubscribe.
    sa.Column("source", sa.String(32), nullable=False),
    # Words for people: the SMTP reply or DSN status that caused it, or the operator's note.
    sa.Column("reason", LongText, nullable=True),
    # The message whose delivery, bounce or complaint caused it, if one did.
    sa.Column("message_id", sa.BigInteger, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    # NULL: never expires (complaints and unsubscribes by default).
    sa.Column("expires_at", Timestamp, nullable=True),
    sa.UniqueConstraint("server_id", "address"),
    # Paging a server's list newest first.
    sa.Index(None, "server_id", "created_at"),
    **TABLE_OPTIONS,
)

endpoints = sa.Table(
    "endpoints",
    metadata,
    # Where a server's incoming mail goes (Postal's HTTP, SMTP and address endpoints, in one table: the
    # columns of the other kinds are NULL).
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("uuid", sa.String(36), nullable=False, unique=True, default=_new_uuid),
    sa.Column("server_id", sa.BigInteger, sa.ForeignKey("servers.id", ondelete="CASCADE"), nullable=False),
    # ``HTTP``, ``SMTP`` or ``Address``.
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    # HTTP: the URL, ``BodyAsJSON`` or ``FormData``, ``Hash`` or ``RawMessage``, reply stripping,
    # attachments in the Hash, seconds the receiver has to answer (5 to 60).
    sa.Column("url", sa.Text, nullable=True),
    sa.Column("encoding", sa.String(16), nullable=True),
    sa.Column("format", sa.String(16), nullable=True),
    sa.Column("strip_replies", sa.Boolean, nullable=True),
    sa.Column("include_attachments", sa.Boolean, nullable=True),
    sa.Column("timeout", sa.Integer, nullable=True),
    # SMTP: host, port, ``None``, ``Auto``, ``STARTTLS`` or ``TLS``.
    sa.Column("hostname", sa.String(253), nullable=True),
    sa.Column("port", sa.Integer, nullable=True),
    sa.Column("tls_mode", sa.String(16), nullable=True),
    # Address: where the mail is forwarded (SRS-rewritten sender).
    sa.Column("address", sa.String(320), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.UniqueConstraint("server_id", "name"),
    **TABLE_OPTIONS,
)

routes = sa.Table(
    "routes",
    metadata,
    # Which incoming addresses a server accepts, and what becomes of their mail.
    sa.Column("id", AutoId, primary_key=True, autoincrement=True),
    sa.Column("uuid", sa.String(36), nullable=False, unique=True, default=_new_uuid),
    sa.Column("server_id", sa.BigInteger, sa.ForeignKey("servers.id", ondelete="CASCADE"), nullable=False),
    # The domain's name is copied here (lower-case A-labels) so that a RCPT is one indexed lookup; NULL
    # for the return-path route.
    sa.Column("domain_id", sa.BigInteger, sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=True),
    sa.Column("domain", sa.String(253), nullable=True),
    # A local part (lower-case), ``*`` for the whole domain, or ``__returnpath__``.
    sa.Column("name", sa.String(64), nullable=False),
    # ``Endpoint``, ``Accept``, ``Hold``, ``Bounce`` or ``Reject``.
    sa.Column("mode", sa.String(16), nullable=False),
    # ``Mark``, ``Quarantine`` or ``Fail``.
    sa.Column("spam_mode", sa.String(16), nullable=False),
    # Eight characters: the route's forwarding address ``<token>@<route domain>``.
    sa.Column("token", sa.String(16), nullable=False, unique=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    # One route per address across all servers (as in Postal): the RCPT decides by it alone.
    sa.UniqueConstraint("domain", "name"),
    sa.Index(None, "server_id"),
    sa.Index(None, "domain_id"),
    **TABLE_OPTIONS,
)

route_endpoints = sa.Table(
    "route_endpoints",
    metadata,
    # The endpoints a route's mail goes to, each getting its own copy; ``position`` orders them.
    sa.Column("route_id", sa.BigInteger, sa.ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column(
        "endpoint_id", sa.BigInteger, sa.ForeignKey("endpoints.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Index(None, "endpoint_id"),
    **TABLE_OPTIONS,
)

"""The SMTP relay policy over the submission policy, against a real SQL database and a real Redis: AUTH,
relay control, queueing, caches."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtad.accept import AcceptedMessage, Acceptor
from mtad.caching import ExpiringCache
from mtad.queue.client import RedisClient
from mtad.queue.redis_queue import RedisQueue
from mtad.smtp.policy import AuthIdentity, Envelope, SessionInfo
from mtad.smtp.relay_policy import (
    AUTH_REQUIRED,
    CREDENTIAL_REVOKED,
    FROM_NOT_ALLOWED,
    RELAY_DENIED,
    SERVER_SUSPENDED,
    RelayPolicy,
    queued_reply,
)
from mtad.smtp.reply import Reply
from mtad.store import credentials as cs
from mtad.store import domains as ds
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import Database, make_engine
from mtad.store.migrate import upgrade_schema
from mtad.submission.answers import HoldReason
from mtad.submission.policy import SubmissionPolicy
from mtad.submission.unavailable import LookupTimeout, PolicyUnavailable
from tests.redis_server import RedisTestCase, connect, real_reactor
from tests.store.support import MYSQL, POSTGRES, SQLITE, fresh_database_url
from tests.test_accept import MESSAGE, closed_port

NOW = 1_700_000_000.0


def session(
    client_ip: str = "192.0.2.1", auth: AuthIdentity | None = None, listener: str = "submission"
) -> SessionInfo:
    return SessionInfo(
        session_id="s1",
        client_ip=client_ip,
        client_port=40000,
        server_ip="192.0.2.25",
        server_port=587,
        helo="client.test",
        tls=True,
        auth=auth,
        listener=listener,
    )


def envelope(*rcpts: str) -> Envelope:
    return Envelope(
        mail_from="sender@example.test",
        rcpt_to=rcpts,
        body_8bit=False,
        smtputf8=False,
        size=len(MESSAGE),
    )


def headers(*fields: str) -> bytes:
    """A small message with these header fields (and a Subject)."""
    return "".join(f"{field}\r\n" for field in (*fields, "Subject: hi")).encode() + b"\r\nbody\r\n"


class StalledDatabase:
    """A database that never answers: the only way to make a unit of work outlast the policy's timeout
    deterministically (real SQL cannot be paused at will)."""

    def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


class FailingAcceptor(Acceptor):
    """An acceptor with a bug: any exception but the known ones must still give 451, never 250."""

    async def accept(self, *args: Any, **kwargs: Any) -> list[AcceptedMessage]:
        raise RuntimeError("bug in the accept path")


class RelayPolicyTests(RedisTestCase):
    backend = SQLITE

    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, self.backend))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = Database(self.engine, real_reactor())
        self.database.startService()
        self.addCleanup(self.database.stopService)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = RedisQueue(self.redis, self.keys)
        self.acceptor = Acceptor(self.queue, self.clock, default_pool="main", timeout=5.0)
        self.policy = self.make_policy()
        organization = self.transaction(os_.create_organization, "Acme", NOW)
        self.server = self.transaction(ss.create_server, "acme", "Main", NOW)
        smtp = self.transaction(cs.create_credential, self.server.id, cs.CredentialType.SMTP, NOW)
        self.credential = smtp.credential
        # The organization's verified domain: its servers may send as example.test (MESSAGE's From).
        domain = self.transaction(
            ds.create_domain, "example.test", NOW, organization_id=organization.id, rsa_bits=1024
        )
        self.transaction(ds.verify_domain, domain.id, NOW)
        self.domain_checks: list[tuple[int, str]] = []
        assert smtp.secret is not None
        self.password = smtp.secret

    def make_policy(
        self, database: Any = None, acceptor: Acceptor | None = None, **kwargs: Any
    ) -> RelayPolicy:
        """A relay policy over its own submission policy (``kwargs`` other than the relay policy's own go
        to the submission policy)."""
        relay = {
            name: kwargs.pop(name)
            for name in ("listeners_without_auth", "return_path_domains", "bounce_sink", "sink_timeout")
            if name in kwargs
        }
        relay.setdefault("listeners_without_auth", {"mx-plain"})
        kwargs.setdefault("sending_domain_check", self.may_send_from)
        kwargs.setdefault("cache_seconds", 60.0)
        kwargs.setdefault("timeout", 10.0)
        submission = SubmissionPolicy(
            self.clock, database or self.database, acceptor or self.acceptor, **kwargs
        )
        return RelayPolicy(self.clock, submission, **relay)

    async def may_send_from(self, server: ss.Server, domain: str) -> bool:
        """The daemon's check (mtad.app): a verified domain of the server or its organization."""
        self.domain_checks.append((server.id, domain))
        found = await self.database.run(ds.find_sending_domain, server.id, server.organization_id, domain)
        return found is not None

    def transaction(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)

    def make_ip_credential(self, network: str, server: ss.Server | None = None, **kw: Any) -> cs.Credential:
        server = server or self.server
        made = self.transaction(
            cs.create_credential, server.id, cs.CredentialType.SMTP_IP, NOW, key=network, **kw
        )
        credential: cs.Credential = made.credential
        return credential

    async def login(self, policy: RelayPolicy | None = None) -> SessionInfo:
        identity = await (policy or self.policy).authenticate(session(), "acme/main", self.password)
        assert identity is not None
        return session(auth=identity)

    # -- AUTH ---------------------------------------------------------------------------------------

    async def test_authenticate_with_key(self) -> None:
        """The SMTP key authenticates whatever the username; the identity names credential and server."""
        identity = await self.policy.authenticate(session(), "anything", self.password)
        self.assertEqual(identity, AuthIdentity("anything", self.credential.id, self.server.id))
        stored = self.transaction(cs.find_credential, self.credential.id)
        self.assertEqual(stored.last_used_at, NOW)

    async def test_authenticate_wrong_key(self) -> None:
        """A wrong or empty password gives None (the server answers 535 5.7.8)."""
        self.assertIsNone(await self.policy.authenticate(session(), "acme/main", "x" * 24))
        self.assertIsNone(await self.policy.authenticate(session(), "acme/main", ""))

    async def test_authenticate_suspended_server(self) -> None:
        """A suspended server's credential does not authenticate."""
        self.transaction(ss.suspend_server, self.server.id, "abuse", NOW)
        self.assertIsNone(await self.policy.authenticate(session(), "acme/main", self.password))

    async def test_authenticate_database_error_fails(self) -> None:
        """A database error fails the Deferred (454 4.7.0 from the server), never a 535 for a good key;
        the error is logged once."""
        broken = Database(make_engine(fresh_database_url(self, SQLITE)), real_reactor())
        broken.startService()
        self.addCleanup(broken.stopService)
        policy = self.make_policy(database=broken)
        with self.assertRaises(PolicyUnavailable):
            await policy.authenticate(session(), "acme/main", self.password)
        self.assertEqual(len(self.flushLoggedErrors(sa.exc.OperationalError)), 1)

    def test_authenticate_database_timeout(self) -> None:
        """A database that does not answer within ``timeout`` fails AUTH (the timeout is logged)."""
        policy = self.make_policy(database=StalledDatabase())
        d = policy.authenticate(session(), "acme/main", self.password)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, PolicyUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(LookupTimeout)), 1)

    # -- MAIL FROM ----------------------------------------------------------------------------------

    async def test_mail_from_null_and_addresses_accepted(self) -> None:
        """The null reverse-path and ordinary addresses are accepted; a path without a domain is not."""
        self.assertIsNone(await self.policy.check_mail_from(session(), ""))
        self.assertIsNone(await self.policy.check_mail_from(session(), "a@example.test"))
        reply = await self.policy.check_mail_from(session(), "nodomain@")
        self.assertEqual((reply.code, reply.enhanced), (501, "5.1.7"))

    # -- relay control ------------------------------------------------------------------------------

    async def test_relay_without_auth_needs_authentication(self) -> None:
        """Unauthenticated relay where AUTH is offered is 530 5.7.0 Authentication required (RFC 4954 §6)."""
        reply = await self.policy.check_rcpt(session(), "s@x.test", "rcpt@example.org")
        self.assertEqual(reply, Reply(530, "5.7.0", "Authentication required"))
        self.assertIs(reply, AUTH_REQUIRED)

    async def test_relay_denied_where_auth_is_never_offered(self) -> None:
        """On a listener that never offers AUTH, unauthenticated relay is 554 5.7.1 Relay access denied."""
        reply = await self.policy.check_rcpt(session(listener="mx-plain"), "s@x.test", "rcpt@example.org")
        self.assertEqual(reply, Reply(554, "5.7.1", "Relay access denied"))
        self.assertIs(reply, RELAY_DENIED)

    async def test_relay_allowed_when_authenticated(self) -> None:
        """An authenticated session may relay to any domain."""
        authenticated = await self.login()
        self.assertIsNone(await self.policy.check_rcpt(authenticated, "s@x.test", "rcpt@example.org"))

    async def test_relay_allowed_from_ip_credential_network(self) -> None:
        """A client inside an SMTP-IP network (IPv4 CIDR, also as IPv4-mapped IPv6) may relay; others not."""
        self.make_ip_credential("10.1.0.0/16")
        for ip in ("10.1.2.3", "10.1.255.255", "::ffff:10.1.2.3"):
            self.assertIsNone(await self.policy.check_rcpt(session(ip), "s@x.test", "r@example.org"), ip)
        for ip in ("10.2.0.1", "192.0.2.1", "not-an-ip", ""):
            self.assertIs(
                await self.policy.check_rcpt(session(ip), "s@x.test", "r@example.org"), AUTH_REQUIRED
            )

    async def test_relay_allowed_from_ipv6_credential(self) -> None:
        """IPv6 SMTP-IP networks match IPv6 clients."""
        self.make_ip_credential("2001:db8::/32")
        self.assertIsNone(await self.policy.check_rcpt(session("2001:db8::7"), "s@x.test", "r@example.org"))
        self.assertIs(
            await self.policy.check_rcpt(session("2001:db9::7"), "s@x.test", "r@example.org"), AUTH_REQUIRED
        )

    async def test_ip_credential_use_recorded(self) -> None:
        """Relaying through an SMTP-IP credential records its last use."""
        credential = self.make_ip_credential("10.1.0.0/16")
        await self.policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@example.org")
        self.assertEqual(self.transaction(cs.find_credential, credential.id).last_used_at, NOW)

    async def test_ip_credential_of_suspended_server(self) -> None:
        """An SMTP-IP client of a suspended server is refused with 554 5.7.1 at RCPT."""
        self.make_ip_credential("10.1.0.0/16")
        self.transaction(ss.suspend_server, self.server.id, "abuse", NOW)
        reply = await self.policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@example.org")
        self.assertEqual(reply, Reply(554, "5.7.1", "Mail server has been suspended"))

    async def test_relay_check_database_error(self) -> None:
        """A database error during the relay check is 451 4.3.0 (logged), never a relay."""
        broken = Database(make_engine(fresh_database_url(self, SQLITE)), real_reactor())
        broken.startService()
        self.addCleanup(broken.stopService)
        policy = self.make_policy(database=broken)
        reply = await policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@example.org")
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(sa.exc.OperationalError)), 1)

    def test_relay_check_database_timeout(self) -> None:
        """A database that does not answer within ``timeout`` makes the relay check 451 4.3.0."""
        policy = self.make_policy(database=StalledDatabase())
        d = policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@example.org")
        self.assertNoResult(d)
        self.clock.advance(10.0)
        reply = self.successResultOf(d)
        assert reply is not None
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(LookupTimeout)), 1)

    # -- accepting ----------------------------------------------------------------------------------

    async def test_accept_queues_and_answers_ids(self) -> None:
        """The message is queued per recipient for the session's server; the 250 names the ids."""
        authenticated = await self.login()
        reply = await self.policy.accept_message(authenticated, envelope("a@x.test", "b@y.test"), MESSAGE)
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertRegex(reply.text, r"^Ok: queued as \d+ \d+$")
        ids = [int(i) for i in reply.text.rsplit("as ", 1)[1].split()]
        fields = [await self.queue.message_fields(i) for i in ids]
        self.assertEqual([f["rcpt_to"] for f in fields], ["a@x.test", "b@y.test"])
        for f in fields:
            self.assertEqual(f["server_id"], str(self.server.id))
            self.assertEqual(f["scope"], "outgoing")
            self.assertEqual(f["mail_from"], "sender@example.test")
            self.assertEqual(f["pool"], "main")
            self.assertNotIn("hold_reason", f)

    async def test_accept_for_most_specific_ip_credential(self) -> None:
        """A client in two SMTP-IP networks sends as the server of the most specific one."""
        other = self.transaction(ss.create_server, "acme", "Other", NOW)
        self.make_ip_credential("10.0.0.0/8")
        self.make_ip_credential("10.9.9.9/32", server=other)
        reply = await self.policy.accept_message(session("10.9.9.9"), envelope("a@x.test"), MESSAGE)
        self.assertEqual(reply.code, 250)
        (mid,) = [int(i) for i in reply.text.rsplit("as ", 1)[1].split()]
        self.assertEqual((await self.queue.message_fields(mid))["server_id"], str(other.id))

    async def test_accept_with_held_credential(self) -> None:
        """A credential set to hold queues its messages with Postal's hold reason."""
        held = self.transaction(cs.create_credential, self.server.id, cs.CredentialType.SMTP, NOW, hold=True)
        identity = await self.policy.authenticate(session(), "u", held.secret)
        reply = await self.policy.accept_message(session(auth=identity), envelope("a@x.test"), MESSAGE)
        self.assertEqual(reply.code, 250)
        mid = int(reply.text.rsplit(" ", 1)[1])
        self.assertEqual((await self.queue.message_fields(mid))["hold_reason"], HoldReason.CREDENTIAL.value)

    async def test_accept_development_mode(self) -> None:
        """A development-mode server's messages are queued with the development hold reason."""
        self.transaction(lambda conn: conn.execute(sa.text("UPDATE servers SET mode = 'Development'")))
        authenticated = await self.login()
        reply = await self.policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        mid = int(reply.text.rsplit(" ", 1)[1])
        fields = await self.queue.message_fields(mid)
        self.assertEqual(fields["hold_reason"], "Server is in development mode.")

    async def test_accept_without_credential_denied(self) -> None:
        """A session with no credential (IP list changed since RCPT) is not queued: 530/554, no message."""
        reply = await self.policy.accept_message(session("10.1.2.3"), envelope("a@x.test"), MESSAGE)
        self.assertIs(reply, AUTH_REQUIRED)
        self.assertEqual((await self.queue.stats(NOW)).due_now, 0)

    # -- From-authentication ------------------------------------------------------------------------

    async def accepts(self, message: bytes, identity: SessionInfo | None = None) -> bool:
        """Whether DATA of ``message`` is queued (250), or refused as not the server's to send (530 5.7.1)."""
        reply = await self.policy.accept_message(
            identity or await self.login(), envelope("a@x.test"), message
        )
        if reply.code == 250:
            return True
        self.assertIs(reply, FROM_NOT_ALLOWED)
        self.assertEqual((reply.code, reply.enhanced), (530, "5.7.1"))
        return False

    async def test_from_must_be_a_sending_domain(self) -> None:
        """A From outside the server's sending domains is refused 530 5.7.1 (as Postal) and nothing is
        queued; every From address must be allowed, and a message without From is refused."""
        self.assertFalse(await self.accepts(headers("From: App <app@foreign.test>")))
        self.assertFalse(await self.accepts(headers("From: a@example.test, b@foreign.test")))
        self.assertFalse(await self.accepts(headers()))
        self.assertFalse(await self.accepts(headers("From: not an address")))
        self.assertEqual((await self.queue.stats(NOW)).due_now, 0)
        self.assertTrue(await self.accepts(headers("From: A <a@EXAMPLE.test>, b@example.test")))

    async def test_sender_authenticates_only_with_allow_sender(self) -> None:
        """An authenticated Sender stands in for an unauthenticated From only where the server has
        allow_sender (seen once the server cache expires); without it the message is refused."""
        authenticated = await self.login()
        foreign_from = headers("From: app@foreign.test", "Sender: relay@example.test")
        self.assertFalse(await self.accepts(foreign_from, authenticated))
        self.transaction(ss.set_allow_sender, self.server.id, True, NOW)
        self.clock.advance(59)
        self.assertFalse(await self.accepts(foreign_from, authenticated))
        self.clock.advance(1)
        self.assertTrue(await self.accepts(foreign_from, authenticated))
        self.assertFalse(await self.accepts(headers("From: app@foreign.test"), authenticated))
        self.assertFalse(
            await self.accepts(headers("From: app@foreign.test", "Sender: relay@other.test"), authenticated)
        )
        self.assertTrue(await self.accepts(headers("Sender: relay@example.test"), authenticated))

    async def test_from_checked_for_ip_credential(self) -> None:
        """Sessions relaying by SMTP-IP credential are held to the same From check."""
        self.make_ip_credential("10.1.0.0/16")
        self.assertFalse(await self.accepts(headers("From: app@foreign.test"), session("10.1.2.3")))
        self.assertTrue(await self.accepts(headers("From: app@example.test"), session("10.1.2.3")))

    async def test_domain_check_cached(self) -> None:
        """The answer of the sending-domain check is cached per server and domain for ``cache_seconds``."""
        authenticated = await self.login()
        for _ in range(3):
            self.assertTrue(await self.accepts(headers("From: a@example.test"), authenticated))
            self.assertFalse(await self.accepts(headers("From: a@foreign.test"), authenticated))
        self.assertEqual(
            self.domain_checks, [(self.server.id, "example.test"), (self.server.id, "foreign.test")]
        )
        self.clock.advance(60)
        self.assertTrue(await self.accepts(headers("From: a@example.test"), authenticated))
        self.assertEqual(len(self.domain_checks), 3)

    async def test_domain_check_failure_is_temporary(self) -> None:
        """A sending-domain check that fails or outlasts ``timeout`` is 451 4.3.0; nothing is queued."""

        async def broken(server: ss.Server, domain: str) -> bool:
            raise RuntimeError("database gone")

        policy = self.make_policy(sending_domain_check=broken)
        reply = await policy.accept_message(await self.login(policy), envelope("a@x.test"), MESSAGE)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        policy = self.make_policy(sending_domain_check=lambda server, domain: Deferred())
        # The login fills the credential and server caches: DATA goes straight to the domain check.
        authenticated = await self.login(policy)
        d = policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        self.assertNoResult(d)
        self.clock.advance(10)
        reply = self.successResultOf(d)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(LookupTimeout)), 1)
        self.assertEqual((await self.queue.stats(NOW)).due_now, 0)

    async def test_accept_redis_disconnected(self) -> None:
        """With Redis gone, DATA is answered 451 4.3.0 and nothing claims to be queued."""
        client = await connect()
        await client.disconnect()
        policy = self.make_policy(acceptor=Acceptor(RedisQueue(client, self.keys), self.clock, timeout=5.0))
        reply = await policy.accept_message(await self.login(policy), envelope("a@x.test"), MESSAGE)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertIn("try again later", reply.text)

    async def test_accept_redis_out_of_memory(self) -> None:
        """When Redis refuses writes for lack of memory, DATA gets 452 4.3.1 and nothing is queued."""
        authenticated = await self.login()
        old = await self.redis.execute("CONFIG", "GET", "maxmemory")
        self.addCleanup(lambda: self.redis.execute("CONFIG", "SET", "maxmemory", old[1]))
        await self.redis.execute("CONFIG", "SET", "maxmemory", "1")
        reply = await self.policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        await self.redis.execute("CONFIG", "SET", "maxmemory", old[1])
        self.assertEqual((reply.code, reply.enhanced), (452, "4.3.1"))
        self.assertEqual((await self.queue.stats(NOW)).due_now, 0)

    async def test_accept_redis_unreachable_times_out(self) -> None:
        """A Redis that never answers gives 451 4.3.0 once the acceptor's timeout passes."""
        client = RedisClient.from_url(
            real_reactor(), f"redis://127.0.0.1:{closed_port()}", timeout=60.0, clock=self.clock
        )
        self.addCleanup(client.disconnect)
        policy = self.make_policy(
            acceptor=Acceptor(RedisQueue(client, self.keys), self.clock, timeout=5.0),
            sending_domain_check=lambda server, domain: succeed(True),
        )
        authenticated = await self.login(policy)
        # The login filled the caches and the domain check answers at once, so the policy goes straight to
        # Redis without a database round trip.
        self.assertIsNone(await policy.check_rcpt(authenticated, "s@x.test", "a@x.test"))
        d = policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        self.assertNoResult(d)
        self.clock.advance(5.0)
        reply = self.successResultOf(d)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))

    async def test_accept_unexpected_error(self) -> None:
        """Any other failure while queueing is logged and answered 451 4.3.0."""
        policy = self.make_policy(acceptor=FailingAcceptor(self.queue, self.clock))
        reply = await policy.accept_message(await self.login(policy), envelope("a@x.test"), MESSAGE)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    # -- caches -------------------------------------------------------------------------------------

    async def test_ip_credential_list_cached_until_expiry(self) -> None:
        """A new SMTP-IP credential takes effect once the cached list expires (``cache_seconds``)."""
        self.assertIs(await self.policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@x.org"), AUTH_REQUIRED)
        self.make_ip_credential("10.1.0.0/16")
        self.clock.advance(59)
        self.assertIs(await self.policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@x.org"), AUTH_REQUIRED)
        self.clock.advance(1)
        self.assertIsNone(await self.policy.check_rcpt(session("10.1.2.3"), "s@x.test", "r@x.org"))

    async def test_server_suspension_seen_after_cache_expiry(self) -> None:
        """Suspending a server refuses its sessions (RCPT and DATA 554 5.7.1) once the cache expires."""
        authenticated = await self.login()
        self.transaction(ss.suspend_server, self.server.id, "abuse", NOW)
        self.assertIsNone(await self.policy.check_rcpt(authenticated, "s@x.test", "r@x.org"))
        self.clock.advance(60)
        self.assertIs(await self.policy.check_rcpt(authenticated, "s@x.test", "r@x.org"), SERVER_SUSPENDED)
        reply = await self.policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        self.assertEqual(reply, Reply(554, "5.7.1", "Mail server has been suspended"))
        self.assertEqual((await self.queue.stats(NOW)).due_now, 0)

    async def test_deleted_credential_seen_after_cache_expiry(self) -> None:
        """A credential deleted after AUTH stops the session relaying once the cache expires."""
        authenticated = await self.login()
        self.transaction(cs.delete_credential, self.credential.id)
        self.assertIsNone(await self.policy.check_rcpt(authenticated, "s@x.test", "r@x.org"))
        self.clock.advance(60)
        self.assertIs(await self.policy.check_rcpt(authenticated, "s@x.test", "r@x.org"), CREDENTIAL_REVOKED)

    async def test_server_lookup_cached(self) -> None:
        """Within ``cache_seconds`` RCPT and DATA need no database at all (once the From domain has been
        checked)."""
        authenticated = await self.login()
        await self.policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        self.policy.submission.credentials.database = StalledDatabase()  # type: ignore[assignment]
        self.database = self.policy.submission.credentials.database  # type: ignore[assignment]
        self.assertIsNone(await self.policy.check_rcpt(authenticated, "s@x.test", "r@x.org"))
        reply = await self.policy.accept_message(authenticated, envelope("a@x.test"), MESSAGE)
        self.assertEqual(reply.code, 250)


class RelayPolicyPostgresTests(RelayPolicyTests):
    backend = POSTGRES


class RelayPolicyMySQLTests(RelayPolicyTests):
    backend = MYSQL


class ReplyAndCacheTests(SynchronousTestCase):
    def test_queued_reply_lists_ids(self) -> None:
        """The 250 lists each id while the line stays short."""
        self.assertEqual(queued_reply([17, 18]), Reply(250, "2.0.0", "Ok: queued as 17 18"))

    def test_queued_reply_long_list_is_a_range(self) -> None:
        """Many ids become a range so the reply line stays within RFC 5321's 512 octets."""
        reply = queued_reply(list(range(10_000_000_000, 10_000_000_100)))
        self.assertEqual(reply.text, "Ok: queued as 10000000000 to 10000000099 (100 messages)")
        self.assertLess(len(reply.to_bytes()), 512)

    def test_expiring_cache(self) -> None:
        """Entries expire after ``seconds`` on the clock; the cache never holds more than ``size``."""
        clock = Clock()
        cache: ExpiringCache[int, str] = ExpiringCache(clock, 10.0, size=3)
        cache.put(1, "a")
        clock.advance(9.9)
        self.assertEqual(cache.get(1), "a")
        clock.advance(0.1)
        self.assertIsNone(cache.get(1))
        for i in range(10):
            cache.put(i, str(i))
        self.assertEqual(len(cache), 3)
        self.assertEqual([cache.get(i) for i in (7, 8, 9)], ["7", "8", "9"])

"""The submission policy against real SQLite and a real Redis: who submits, may-send-as, holds, queueing."""

from __future__ import annotations

from typing import Any

import attrs
import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mtad.accept import Acceptor
from mtad.queue.redis_queue import RedisQueue
from mtad.store import credentials as cs
from mtad.store import organizations as os_
from mtad.store import servers as ss
from mtad.store.db import make_engine
from mtad.store.migrate import upgrade_schema
from mtad.store.servers import Server
from mtad.submission.answers import HoldReason, Permit, Queued, Refusal, Refused, Submitter
from mtad.submission.policy import SubmissionPolicy
from mtad.submission.unavailable import LookupTimeout, PolicyUnavailable
from tests.redis_server import RedisTestCase, connect
from tests.smtp.test_relay_policy import StalledDatabase
from tests.store.support import SQLITE, SynchronousDatabase, fresh_database_url

NOW = 1_700_000_000.0
MESSAGE = b"From: App <app@example.test>\r\nSubject: hi\r\n\r\nbody\r\n"


class SubmissionPolicyTests(RedisTestCase):
    async def _set_up_redis(self) -> None:
        await super()._set_up_redis()
        self.engine = make_engine(fresh_database_url(self, SQLITE))
        self.addCleanup(self.engine.dispose)
        upgrade_schema(self.engine)
        self.database = SynchronousDatabase(self.engine)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = RedisQueue(self.redis, self.keys)
        self.acceptor = Acceptor(self.queue, self.clock, default_pool="main", timeout=5.0)
        self.transaction(os_.create_organization, "Acme", NOW)
        self.server: Server = self.transaction(ss.create_server, "acme", "Main", NOW)
        self.sending_domains = {"example.test"}
        self.policy = self.make_policy()

    def make_policy(self, **kwargs: Any) -> SubmissionPolicy:
        kwargs.setdefault("sending_domain_check", self.sending_domain_check)
        kwargs.setdefault("timeout", 10.0)
        database = kwargs.pop("database", self.database)
        return SubmissionPolicy(self.clock, database, kwargs.pop("acceptor", self.acceptor), **kwargs)

    async def sending_domain_check(self, server: Server, domain: str) -> bool:
        return domain in self.sending_domains

    def transaction(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)

    def credential(self, type: cs.CredentialType, **kwargs: Any) -> tuple[cs.Credential, str]:
        made = self.transaction(cs.create_credential, self.server.id, type, NOW, **kwargs)
        return made.credential, made.secret

    async def submitter(self, **kwargs: Any) -> Submitter:
        _, key = self.credential(cs.CredentialType.API, **kwargs)
        found = await self.policy.api_submitter(key)
        assert isinstance(found, Submitter)
        return found

    # -- who submits --------------------------------------------------------------------------------

    async def test_api_key(self) -> None:
        """An API key gives its credential and server and records the use; an unknown key, or an SMTP
        password given as a key, is UNKNOWN_CREDENTIAL."""
        credential, key = self.credential(cs.CredentialType.API)
        found = await self.policy.api_submitter(key)
        assert isinstance(found, Submitter)
        self.assertEqual((found.credential.id, found.server.id), (credential.id, self.server.id))
        self.assertEqual(self.transaction(cs.find_credential, credential.id).last_used_at, NOW)
        _, password = self.credential(cs.CredentialType.SMTP)
        for wrong in ("x" * 24, password):
            self.assertEqual(await self.policy.api_submitter(wrong), Refused(Refusal.UNKNOWN_CREDENTIAL))

    async def test_smtp_password(self) -> None:
        """An SMTP password gives its credential; an API key given as a password is UNKNOWN_CREDENTIAL."""
        credential, password = self.credential(cs.CredentialType.SMTP)
        found = await self.policy.smtp_submitter(password)
        assert isinstance(found, Submitter)
        self.assertEqual(found.credential.id, credential.id)
        _, key = self.credential(cs.CredentialType.API)
        for wrong in ("", key):
            self.assertEqual(await self.policy.smtp_submitter(wrong), Refused(Refusal.UNKNOWN_CREDENTIAL))

    async def test_suspended_server(self) -> None:
        """Every way of finding a suspended server's credential is SERVER_SUSPENDED."""
        _, key = self.credential(cs.CredentialType.API)
        smtp, password = self.credential(cs.CredentialType.SMTP)
        self.credential(cs.CredentialType.SMTP_IP, key="10.1.0.0/16")
        self.transaction(ss.suspend_server, self.server.id, "abuse", NOW)
        suspended = Refused(Refusal.SERVER_SUSPENDED)
        self.assertEqual(await self.policy.api_submitter(key), suspended)
        self.assertEqual(await self.policy.smtp_submitter(password), suspended)
        self.assertEqual(await self.policy.session_submitter(smtp.id, "192.0.2.1"), suspended)
        self.assertEqual(await self.policy.session_submitter(None, "10.1.2.3"), suspended)

    async def test_session(self) -> None:
        """A session sends with the credential it authenticated with, else its SMTP-IP credential (whose
        use is recorded); with neither it is NO_CREDENTIAL; a deleted credential is CREDENTIAL_REVOKED."""
        smtp, _ = self.credential(cs.CredentialType.SMTP)
        ip, _ = self.credential(cs.CredentialType.SMTP_IP, key="10.1.0.0/16")
        by_auth = await self.policy.session_submitter(smtp.id, "10.1.2.3")
        assert isinstance(by_auth, Submitter)
        self.assertEqual(by_auth.credential.id, smtp.id)
        by_ip = await self.policy.session_submitter(None, "10.1.2.3")
        assert isinstance(by_ip, Submitter)
        self.assertEqual(by_ip.credential.id, ip.id)
        self.assertEqual(self.transaction(cs.find_credential, ip.id).last_used_at, NOW)
        self.assertEqual(
            await self.policy.session_submitter(None, "192.0.2.1"), Refused(Refusal.NO_CREDENTIAL)
        )
        self.transaction(cs.delete_credential, smtp.id)
        self.clock.advance(60)
        self.assertEqual(
            await self.policy.session_submitter(smtp.id, "10.1.2.3"), Refused(Refusal.CREDENTIAL_REVOKED)
        )

    async def test_database_failure_is_unavailable(self) -> None:
        """A database that fails or does not answer is PolicyUnavailable ("The database"), never a
        refusal; the cause is logged."""
        broken = SynchronousDatabase(make_engine(fresh_database_url(self, SQLITE)))
        policy = self.make_policy(database=broken)
        with self.assertRaises(PolicyUnavailable) as raised:
            await policy.api_submitter("k" * 24)
        self.assertEqual(raised.exception.what, "The database")
        self.assertEqual(len(self.flushLoggedErrors(sa.exc.OperationalError)), 1)
        stalled = self.make_policy(database=StalledDatabase())
        d = Deferred.fromCoroutine(stalled.session_submitter(None, "10.1.2.3"))
        self.clock.advance(10)
        self.failureResultOf(d, PolicyUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(LookupTimeout)), 1)

    # -- may it send this ---------------------------------------------------------------------------

    async def test_may_send_as(self) -> None:
        """From must be a sending domain; Sender stands in only where the server has allow_sender."""
        submitter = await self.submitter()
        self.assertIsInstance(await self.policy.may_send_as(submitter, "a@Example.TEST", None), Permit)
        refused = Refused(Refusal.FROM_NOT_ALLOWED)
        self.assertEqual(await self.policy.may_send_as(submitter, "a@foreign.test", None), refused)
        self.assertEqual(
            await self.policy.may_send_as(submitter, "a@foreign.test", "s@example.test"), refused
        )
        allowing = Submitter(submitter.credential, attrs.evolve(submitter.server, allow_sender=True))
        self.assertIsInstance(
            await self.policy.may_send_as(allowing, "a@foreign.test", "s@example.test"), Permit
        )

    async def test_may_send_message(self) -> None:
        """A message is judged by its From fields (every one must be allowed)."""
        submitter = await self.submitter()
        self.assertIsInstance(await self.policy.may_send_message(submitter, MESSAGE), Permit)
        foreign = MESSAGE.replace(b"app@example.test", b"app@example.test, b@foreign.test")
        self.assertEqual(
            await self.policy.may_send_message(submitter, foreign), Refused(Refusal.FROM_NOT_ALLOWED)
        )

    async def test_domain_check_failure_is_unavailable(self) -> None:
        """A sending-domain check that fails is PolicyUnavailable ("The sending domain check")."""

        async def broken(server: Server, domain: str) -> bool:
            raise RuntimeError("database gone")

        policy = self.make_policy(sending_domain_check=broken)
        submitter = await self.submitter()
        with self.assertRaises(PolicyUnavailable) as raised:
            await policy.may_send_message(submitter, MESSAGE)
        self.assertEqual(raised.exception.what, "The sending domain check")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_hold_reasons(self) -> None:
        """A held credential holds with Postal's reason; a development-mode server with its own; the
        credential's reason wins when both apply; otherwise nothing is held."""
        plain = await self.submitter()
        held = await self.submitter(hold=True)
        self.assertIsNone((await self.policy.may_send_message(plain, MESSAGE)).hold)  # type: ignore[union-attr]
        self.assertIs(self.policy.hold_reason(held), HoldReason.CREDENTIAL)
        development = attrs.evolve(plain.server, mode=ss.ServerMode.DEVELOPMENT)
        self.assertIs(
            self.policy.hold_reason(Submitter(plain.credential, development)), HoldReason.DEVELOPMENT_MODE
        )
        self.assertIs(self.policy.hold_reason(Submitter(held.credential, development)), HoldReason.CREDENTIAL)

    # -- queue it -----------------------------------------------------------------------------------

    async def test_submit_queues_with_hold(self) -> None:
        """A permitted message is queued once per recipient, durable on return, with its hold reason."""
        permit = await self.policy.may_send_message(await self.submitter(hold=True), MESSAGE)
        assert isinstance(permit, Permit)
        queued = await self.policy.submit(
            permit, "app@example.test", ["a@x.test", "b@y.test"], MESSAGE, received_with_ssl=True
        )
        assert isinstance(queued, Queued)
        self.assertIs(queued.hold, HoldReason.CREDENTIAL)
        fields = [await self.queue.message_fields(m.id) for m in queued.messages]
        self.assertEqual([f["rcpt_to"] for f in fields], ["a@x.test", "b@y.test"])
        self.assertEqual({f["hold_reason"] for f in fields}, {HoldReason.CREDENTIAL.value})
        self.assertEqual({f["server_id"] for f in fields}, {str(self.server.id)})

    async def test_submit_redis_gone(self) -> None:
        """With Redis gone the answer is QUEUE_UNAVAILABLE (with the error for the log), nothing queued."""
        client = await connect()
        await client.disconnect()
        policy = self.make_policy(acceptor=Acceptor(RedisQueue(client, self.keys), self.clock, timeout=5.0))
        permit = await policy.may_send_message(await self.submitter(), MESSAGE)
        assert isinstance(permit, Permit)
        result = await policy.submit(permit, "", ["a@x.test"], MESSAGE, received_with_ssl=False)
        assert isinstance(result, Refused)
        self.assertIs(result.reason, Refusal.QUEUE_UNAVAILABLE)
        self.assertTrue(result.detail)

    async def test_submit_suspended_server(self) -> None:
        """A permit whose server is suspended by the time it is used queues nothing: SERVER_SUSPENDED."""
        submitter = await self.submitter()
        suspended = attrs.evolve(submitter.server, suspended=True)
        permit = Permit(Submitter(submitter.credential, suspended), hold=None)
        result = await self.policy.submit(permit, "", ["a@x.test"], MESSAGE, received_with_ssl=False)
        self.assertEqual(result, Refused(Refusal.SERVER_SUSPENDED))
        self.assertEqual((await self.queue.stats(NOW)).due_now, 0)

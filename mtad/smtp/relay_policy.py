"""The SMTP server's policy: the submission policy's answers as SMTP replies, and bounces to their sink.

Who may relay, as which server, with which From, held or not, is decided by
`mtad.submission.SubmissionPolicy`, for SMTP as for the send API; this module only asks it at the
right command and words its answers as replies with RFC 3463 enhanced status codes. It knows no
storage: no SQL, no Redis.

Recipients are of two kinds:

* **Relay** (every domain we do not route; mtad routes none yet): DESIGN invariant 4 applies, so RCPT is
  accepted only for a session that authenticated with an SMTP credential (RFC 4954) or connects from the
  network of an SMTP-IP credential, as in Postal. At the end of DATA the message must come from its
  server (`SubmissionPolicy.may_send_message`: every From in a sending domain of the server, or, where
  the server has ``allow_sender``, every Sender), and is queued.
* **Return path** (`mtad.submission.return_path`): a recipient at one of ``return_path_domains`` is
  accepted from anyone, without authentication, and at the end of DATA the message goes to the
  `BounceSink`, never to the queue. A transaction holds one kind only: the first recipient accepted
  fixes it, and a recipient of the other kind is answered `MIXED_RECIPIENTS` (``452 4.5.3``, RFC 5321
  §4.5.3.1.10: the client sends what was accepted and retries the rest in a new transaction).

Nothing is kept per session. What a session maps to follows from what `SessionInfo` carries every time
(the `AuthIdentity` our `authenticate` returned, or the client address, and the recipients accepted so
far), looked up through the submission policy's short-lived caches.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.smtp.policy import AuthIdentity, Envelope, SessionInfo, SMTPPolicy
from mtad.smtp.reply import Reply
from mtad.submission.answers import Queued, Refusal, Refused, Submitter
from mtad.submission.policy import SubmissionPolicy
from mtad.submission.return_path import BounceSink, is_return_path_address, normalize_domains
from mtad.submission.unavailable import PolicyUnavailable, bounded

#: RFC 4954 §6: relaying needs authentication, and this session can still authenticate.
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
#: RFC 3463 §3.8 (X.7.1, delivery not authorized): relaying is refused and AUTH would not help here.
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
#: Postal's words for a suspended server; X.7.1 since the refusal is policy, not the message.
SERVER_SUSPENDED = Reply(554, "5.7.1", "Mail server has been suspended")
#: The credential the session authenticated with has been deleted since.
CREDENTIAL_REVOKED = Reply(554, "5.7.1", "Credential is no longer valid")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
#: Postal's reply, code included, for a message whose From (or Sender) is not its server's to send as:
#: Postal clients and the applications behind them see the same 530. RFC 4954 §6 gives 530 to "authenticate
#: first"; either way it is permanent, and X.7.1 (RFC 3463: delivery not authorized) says why.
FROM_NOT_ALLOWED = Reply(
    530, "5.7.1", "From/Sender name is not valid: not a verified sending domain of this mail server"
)
#: RFC 3463 X.3.0: the system (database or queue) failed; the client keeps the message and retries.
TRY_AGAIN = Reply(451, "4.3.0", "Temporary failure, try again later")
QUEUE_UNAVAILABLE = Reply(451, "4.3.0", "Queue temporarily unavailable, try again later")
#: RFC 3463 X.3.1 "mail system full"; 452 per RFC 5321 §4.2.2 (insufficient system storage).
QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
#: RFC 3463 X.7.1 with a 4yz code: the server's send limit is reached and it refuses what is over it;
#: the client keeps the message and tries again later, when the rolling window has room.
SEND_LIMIT_EXCEEDED = Reply(451, "4.7.1", "Send limit exceeded for this mail server, try again later")
#: A return-path recipient after relay recipients, or the other way round. 452 with X.5.3 ("too many
#: recipients", RFC 3463 §3.6) is RFC 5321 §4.5.3.1.10's answer for "not in this transaction": clients
#: deliver to the recipients accepted and retry this one in a transaction of its own.
MIXED_RECIPIENTS = Reply(
    452, "4.5.3", "Bounces to the return-path domain and relayed mail need separate transactions"
)
#: The end of DATA of a transaction holding both kinds (only a server that ignored `MIXED_RECIPIENTS`
#: could send one): refused for good, since sending it again cannot succeed.
MIXED_TRANSACTION = Reply(
    554, "5.5.3", "Bounces to the return-path domain and relayed mail need separate transactions"
)
#: A message for the return-path domain is stored for bounce processing.
BOUNCE_RECEIVED = Reply(250, "2.0.0", "Ok: received")

#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; long id lists become a range.
_MAX_IDS_TEXT = 400

#: Answers to a session's credential that refuse it, by reason (NO_CREDENTIAL depends on the listener).
_REFUSALS = {
    Refusal.CREDENTIAL_REVOKED: CREDENTIAL_REVOKED,
    Refusal.UNKNOWN_CREDENTIAL: CREDENTIAL_REVOKED,
    Refusal.SERVER_SUSPENDED: SERVER_SUSPENDED,
    Refusal.FROM_NOT_ALLOWED: FROM_NOT_ALLOWED,
    Refusal.QUEUE_FULL: QUEUE_FULL,
    Refusal.QUEUE_UNAVAILABLE: QUEUE_UNAVAILABLE,
    Refusal.SEND_LIMIT_EXCEEDED: SEND_LIMIT_EXCEEDED,
}


def queued_reply(ids: Sequence[int]) -> Reply:
    """``250 2.0.0 Ok: queued as 17 18``: the ids the client can quote to find its messages."""
    text = "Ok: queued as " + " ".join(str(i) for i in ids)
    if len(text) > _MAX_IDS_TEXT:
        text = f"Ok: queued as {ids[0]} to {ids[-1]} ({len(ids)} messages)"
    return Reply(250, "2.0.0", text)


class RelayPolicy:
    """`~mtad.smtp.policy.SMTPPolicy` for authenticated and IP-trusted sending, and for bounces.

    ``listeners_without_auth`` names listeners that never offer AUTH (no TLS, no STARTTLS and no
    plaintext AUTH): a refused relay there is ``554 5.7.1``, not ``530 5.7.0``. ``return_path_domains``
    (``[domains] return_path_domain``) are accepted from anyone and go to ``bounce_sink``; give both or
    neither. The sink is bounded by ``sink_timeout`` on ``clock``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        submission: SubmissionPolicy,
        *,
        listeners_without_auth: Collection[str] = (),
        return_path_domains: Collection[str] = frozenset(),
        bounce_sink: BounceSink | None = None,
        sink_timeout: float = 30.0,
    ) -> None:
        if bool(return_path_domains) != (bounce_sink is not None):
            raise ValueError("return_path_domains and bounce_sink go together")
        self.clock = clock
        self.submission = submission
        self.listeners_without_auth = frozenset(listeners_without_auth)
        self.return_path_domains = normalize_domains(return_path_domains)
        self.bounce_sink = bounce_sink
        self.sink_timeout = sink_timeout

    # -- SMTPPolicy ---------------------------------------------------------------------------------

    def authenticate(
        self, session: SessionInfo, username: str, password: str
    ) -> Deferred[AuthIdentity | None]:
        """The SMTP credential whose key is ``password`` (any username, as in Postal).

        A suspended server's credential is refused like a wrong one (535 5.7.8): the Protocol has no
        other negative answer. A database failure or timeout fails the Deferred with `PolicyUnavailable`,
        which the server answers ``454 4.7.0`` (RFC 4954 §6, temporary), so a database outage never tells
        clients their password is wrong, nor counts against them in the failed-AUTH limiter.
        """
        return Deferred.fromCoroutine(self._authenticate(session, username, password))

    def check_mail_from(self, session: SessionInfo, address: str) -> Deferred[Reply | None]:
        """Any sender the server parsed, including the null reverse-path ``<>`` (RFC 5321 §4.5.5)."""
        if address:
            local, at, domain = address.rpartition("@")
            if not (local and at and domain):
                return succeed(BAD_SENDER)
        return succeed(None)

    def check_rcpt(self, session: SessionInfo, mail_from: str, address: str) -> Deferred[Reply | None]:
        """Return-path recipients from anyone; relay only for a credential's session (`relay_refusal`);
        never both in one transaction (`MIXED_RECIPIENTS`)."""
        return Deferred.fromCoroutine(self._check_rcpt(session, address))

    def accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Deferred[Reply]:
        """Queue the message for the session's server, or hand a bounce to the sink; 250 only once the
        message is durable."""
        return Deferred.fromCoroutine(self._accept_message(session, envelope, message))

    # -- decisions ----------------------------------------------------------------------------------

    def is_return_path(self, address: str) -> bool:
        """Whether ``address`` is a return-path recipient (`mtad.submission.return_path`)."""
        return is_return_path_address(address, self.return_path_domains)

    def relay_refusal(self, session: SessionInfo) -> Reply:
        """The answer to a relay attempt by a session with no credential.

        RFC 4954 §6: ``530 5.7.0 Authentication required`` is for a command refused because
        authentication is required and not in force, so it is the answer when this session can still
        authenticate: it has not, and its listener offers AUTH (now, or after STARTTLS). Where AUTH is
        never offered, or the session already authenticated, 530 would send the client after something it
        cannot get: the answer is then ``554 5.7.1 Relay access denied`` (RFC 3463 X.7.1, delivery not
        authorized), Postfix's reply for the same case.
        """
        if session.auth is None and session.listener not in self.listeners_without_auth:
            return AUTH_REQUIRED
        return RELAY_DENIED

    def _reply(self, session: SessionInfo, refused: Refused) -> Reply:
        if refused.reason is Refusal.NO_CREDENTIAL:
            return CREDENTIAL_REVOKED if session.auth is not None else self.relay_refusal(session)
        return _REFUSALS[refused.reason]

    async def _authenticate(self, session: SessionInfo, username: str, password: str) -> AuthIdentity | None:
        found = await self.submission.smtp_submitter(password)
        if isinstance(found, Refused):
            if found.reason is Refusal.SERVER_SUSPENDED:
                self.log.info(
                    "smtp auth refused in {session_id}: the credential's server is suspended",
                    session_id=session.session_id,
                )
            return None
        return AuthIdentity(username=username, credential_id=found.credential.id, server_id=found.server.id)

    async def _submitter(self, session: SessionInfo) -> Submitter | Refused:
        credential_id = session.auth.credential_id if session.auth is not None else None
        return await self.submission.session_submitter(credential_id, session.client_ip)

    async def _check_rcpt(self, session: SessionInfo, address: str) -> Reply | None:
        bounce = self.is_return_path(address)
        if bounce:
            refusal = None
        else:
            try:
                found = await self._submitter(session)
            except PolicyUnavailable:
                return TRY_AGAIN
            refusal = self._reply(session, found) if isinstance(found, Refused) else None
        if refusal is None and any(self.is_return_path(r) != bounce for r in session.rcpt_to):
            refusal = MIXED_RECIPIENTS
        if refusal is not None:
            self.log.info(
                "smtp rcpt {address} refused for {client_ip} in {session_id}: {reply}",
                address=address,
                client_ip=session.client_ip,
                session_id=session.session_id,
                reply=str(refusal),
            )
        return refusal

    async def _accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Reply:
        bounces = [self.is_return_path(r) for r in envelope.rcpt_to]
        if all(bounces):
            return await self._accept_bounce(session, envelope, message)
        if any(bounces):
            return MIXED_TRANSACTION
        try:
            return await self._accept_relay(session, envelope, message)
        except PolicyUnavailable:
            return TRY_AGAIN
        except Exception:
            self.log.failure("smtp message in {session_id} not queued", session_id=session.session_id)
            return TRY_AGAIN

    async def _accept_relay(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Reply:
        found = await self._submitter(session)
        if isinstance(found, Refused):
            return self._reply(session, found)
        permit = await self.submission.may_send_message(found, message)
        if isinstance(permit, Refused):
            self.log.info(
                "smtp message in {session_id} refused: From/Sender not a sending domain of {server}",
                session_id=session.session_id,
                server=found.server.full_permalink,
            )
            return self._reply(session, permit)
        result = await self.submission.submit(
            permit, envelope.mail_from, envelope.rcpt_to, message, received_with_ssl=session.tls
        )
        return self._queued(session, result)

    def _queued(self, session: SessionInfo, result: Queued | Refused) -> Reply:
        if isinstance(result, Refused):
            if result.detail:
                self.log.warn(
                    "smtp message in {session_id} not queued: {error}",
                    session_id=session.session_id,
                    error=result.detail,
                )
            return self._reply(session, result)
        return queued_reply([m.id for m in result.messages])

    async def _accept_bounce(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Reply:
        sink = self.bounce_sink
        if sink is None:  # ruled out by __init__: no domains, so no return-path recipient
            return TRY_AGAIN
        work = sink.put(
            mail_from=envelope.mail_from,
            rcpt_to=envelope.rcpt_to,
            data=message,
            received_with_ssl=session.tls,
            client_ip=session.client_ip,
        )
        try:
            await bounded(
                work,
                self.clock,
                self.sink_timeout,
                "The bounce sink",
                self.log,
                session_id=session.session_id,
            )
        except PolicyUnavailable:
            return TRY_AGAIN
        self.log.info(
            "smtp bounce for {rcpt_to} from {client_ip} in {session_id} received",
            rcpt_to=", ".join(envelope.rcpt_to),
            client_ip=session.client_ip,
            session_id=session.session_id,
        )
        return BOUNCE_RECEIVED


if TYPE_CHECKING:

    def _implements_policy(policy: RelayPolicy) -> SMTPPolicy:
        return policy  # mypy checks that RelayPolicy satisfies the Protocol

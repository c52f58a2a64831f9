"""`SubmissionPolicy`: may this credential send this message now, and if not, why.

The one place the decision is made, for SMTP and the send API alike: who submits (a credential and its
server, found by API key, SMTP password, SMTP session or client address), whether the server may send
as the message's From (or Sender), whether its messages are held and why, and handing a permitted
message to the `Acceptor`. Answers are values (`Submitter`, `Permit`, `Refused`, `Queued`); a lookup that
fails or outlasts ``timeout`` is `PolicyUnavailable` ("try again later"), never a refusal.

The checks come in the order a way in needs them, since Postal's clients expect Postal's order of errors
(``send/message`` checks its From between its other parameter checks): `api_submitter` /
`smtp_submitter` / `session_submitter`, then `may_send_as` or `may_send_message` (which give the
`Permit`), then `submit`.

Send limits are decided in `submit`, when the number of recipients is known: a message not held for
another reason is counted in its server's window (`mtad.limits.window`) if it fits; if it does not, it is
held (``HoldReason.SEND_LIMIT``, released by `mtad.limits.release` when there is room) or refused
(``Refusal.SEND_LIMIT_EXCEEDED``), as the server's ``send_limit_action`` says. A message held for another
reason is not counted: it is not sent unless released, and the count is of messages sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtad.accept import Acceptor, ServerSuspended
from mtad.limits.window import SendWindow
from mtad.queue.model import QueueFull, RedisUnavailable
from mtad.store.db import Database
from mtad.store.messages import Scope
from mtad.store.servers import SendLimitAction, Server, ServerMode
from mtad.submission.answers import (
    HoldReason,
    Permit,
    Queued,
    Refusal,
    Refused,
    Submitter,
    hold_details,
)
from mtad.submission.credentials import Credentials
from mtad.submission.sending_domains import SendingDomainCheck, SendingDomains, server_allows_sender


class SubmissionPolicy:
    """The submission decision over one set of caches.

    ``sending_domain_check(server, domain)`` says whether ``server`` may send as ``domain`` (the daemon
    gives one backed by ``mtad.store.domains.find_sending_domain``); ``sender_allowed(server)`` whether
    Sender may stand in for From (by default the server's ``allow_sender``). Credentials, servers, the
    SMTP-IP list and domain answers are cached for ``cache_seconds``; every lookup is bounded by
    ``timeout`` on ``clock``. ``send_window`` counts servers' send limits (None: limits are not applied,
    for tools that queue on an operator's behalf).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        database: Database,
        acceptor: Acceptor,
        *,
        sending_domain_check: SendingDomainCheck,
        cache_seconds: float = 60.0,
        timeout: float = 30.0,
        sender_allowed: Callable[[Server], bool] = server_allows_sender,
        send_window: SendWindow | None = None,
    ) -> None:
        self.clock = clock
        self.acceptor = acceptor
        self.send_window = send_window
        self.timeout = timeout
        self.credentials = Credentials(clock, database, cache_seconds=cache_seconds, timeout=timeout)
        self.sending_domains = SendingDomains(
            clock,
            sending_domain_check,
            cache_seconds=cache_seconds,
            timeout=timeout,
            sender_allowed=sender_allowed,
        )

    # -- who submits --------------------------------------------------------------------------------

    async def api_submitter(self, key: str) -> Submitter | Refused:
        """The send API's caller by its ``X-Server-API-Key``; its use is recorded beside the request."""
        submitter = await self.credentials.by_api_key(key)
        if submitter is None:
            return Refused(Refusal.UNKNOWN_CREDENTIAL)
        if submitter.server.suspended:
            return Refused(Refusal.SERVER_SUSPENDED)
        self.credentials.record_use_beside(submitter.credential)
        return submitter

    async def smtp_submitter(self, password: str) -> Submitter | Refused:
        """SMTP AUTH (RFC 4954): the SMTP credential whose password is ``password``, any username."""
        submitter = await self.credentials.by_smtp_password(password)
        if submitter is None:
            return Refused(Refusal.UNKNOWN_CREDENTIAL)
        if submitter.server.suspended:
            return Refused(Refusal.SERVER_SUSPENDED)
        return submitter

    async def session_submitter(self, credential_id: int | None, client_ip: str) -> Submitter | Refused:
        """Who an SMTP session sends as: the credential it authenticated with (``credential_id``), else
        the SMTP-IP credential whose network holds ``client_ip``.

        Looked up afresh (through the caches) at every RCPT and DATA, so nothing is kept per session and a
        deleted credential or a suspended server takes effect within ``cache_seconds``. The use of an
        SMTP-IP credential is recorded (at most once per ``cache_seconds``).
        """
        if credential_id is not None:
            credential = await self.credentials.by_id(credential_id)
            if credential is None:
                return Refused(Refusal.CREDENTIAL_REVOKED)
        else:
            credential = await self.credentials.by_client_ip(client_ip)
            if credential is None:
                return Refused(Refusal.NO_CREDENTIAL)
        server = await self.credentials.server(credential.server_id)
        if server is None:
            return Refused(Refusal.CREDENTIAL_REVOKED)
        if server.suspended:
            return Refused(Refusal.SERVER_SUSPENDED)
        if credential_id is None:
            await self.credentials.record_use(credential)
        return Submitter(credential=credential, server=server)

    # -- may it send this -----------------------------------------------------------------------------

    async def may_send_as(
        self, submitter: Submitter, from_address: str, sender_address: str | None
    ) -> Permit | Refused:
        """``send/message``: may ``submitter`` send with this From (or Sender, where allowed)."""
        if not await self.sending_domains.mailboxes_allowed(submitter.server, from_address, sender_address):
            return Refused(Refusal.FROM_NOT_ALLOWED)
        return self._permit(submitter)

    async def may_send_message(self, submitter: Submitter, message: bytes) -> Permit | Refused:
        """SMTP and ``send/raw``: may ``submitter`` send ``message``, judged by its From/Sender fields."""
        if not await self.sending_domains.headers_allowed(submitter.server, message):
            return Refused(Refusal.FROM_NOT_ALLOWED)
        return self._permit(submitter)

    def hold_reason(self, submitter: Submitter) -> HoldReason | None:
        """Why ``submitter``'s messages are held now, if they are: its credential says so, else its
        server is in development mode (Postal's order). Send limits will add theirs here."""
        if submitter.credential.hold:
            return HoldReason.CREDENTIAL
        if submitter.server.mode is ServerMode.DEVELOPMENT:
            return HoldReason.DEVELOPMENT_MODE
        return None

    def _permit(self, submitter: Submitter) -> Permit:
        return Permit(submitter=submitter, hold=self.hold_reason(submitter))

    # -- queue it ---------------------------------------------------------------------------------------

    async def submit(
        self,
        permit: Permit,
        mail_from: str,
        rcpt_to: Sequence[str],
        message: bytes,
        *,
        tag: str | None = None,
        received_with_ssl: bool,
        bounce: bool = False,
    ) -> Queued | Refused:
        """Queue ``message`` once per recipient of ``rcpt_to`` for the permitted submitter.

        `Queued` only once Redis has stored every message (DESIGN invariant 1). A full or unreachable
        Redis is `Refused` (nothing was queued: try again later), as is a message over a send limit that
        refuses; any other error is raised.
        """
        server = permit.submitter.server
        hold = permit.hold
        try:
            if hold is None and server.send_limit is not None and self.send_window is not None:
                d = self.send_window.reserve(server, len(rcpt_to), self.clock.seconds())
                reservation = await d.addTimeout(self.timeout, self.clock)
                if not reservation.fits:
                    if server.send_limit_action is SendLimitAction.REFUSE:
                        return Refused(
                            Refusal.SEND_LIMIT_EXCEEDED,
                            f"{reservation.volume} of {server.send_limit} sent in the window",
                        )
                    hold = HoldReason.SEND_LIMIT
            accepted = await self.acceptor.accept(
                server,
                Scope.OUTGOING.value,
                mail_from,
                rcpt_to,
                message,
                hold_reason=hold_details(hold, server) if hold is not None else None,
                limit_hold=hold is HoldReason.SEND_LIMIT,
                tag=tag,
                received_with_ssl=received_with_ssl,
                bounce=bounce,
            )
        except DeferredTimeoutError:
            return Refused(Refusal.QUEUE_UNAVAILABLE, f"Redis did not answer within {self.timeout} s")
        except ServerSuspended:
            return Refused(Refusal.SERVER_SUSPENDED)
        except QueueFull as e:
            return Refused(Refusal.QUEUE_FULL, str(e))
        except RedisUnavailable as e:
            return Refused(Refusal.QUEUE_UNAVAILABLE, str(e))
        return Queued(messages=tuple(accepted), hold=hold)

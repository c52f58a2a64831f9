"""What the SMTP server asks the application, and the values it passes.

The server state machine (:mod:`mtad.smtp.server`) decides protocol questions alone (syntax, sequence,
limits); every question about *who may send what to whom* is the policy's: credentials, sender and
recipient checks (the relay decision of DESIGN invariant 4 lives in ``check_rcpt``) and storing the message
(invariant 1: a 250 to DATA only after the policy's Deferred fires with it). Every decision is a Deferred,
and the server answers strictly in the order the commands came (RFC 2920 §3).
"""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.internet.defer import Deferred

from mtad.smtp.reply import Reply


@attrs.frozen
class AuthIdentity:
    """Who authenticated with SMTP AUTH (RFC 4954); the application fills in its own ids."""

    username: str
    credential_id: int = 0
    server_id: int = 0


@attrs.frozen
class SessionInfo:
    """What the policy knows about the session at the moment it is asked."""

    session_id: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    #: The EHLO/HELO argument, None before the client greeted.
    helo: str | None
    #: TLS is active (STARTTLS completed or an implicit-TLS listener).
    tls: bool
    #: Who authenticated, if anyone.
    auth: AuthIdentity | None
    #: Listener name from the configuration.
    listener: str
    #: The recipients accepted so far in the current mail transaction (RCPT answered 250), in order;
    #: empty outside one. A policy needs them to keep kinds of recipient apart (bounces, relay).
    rcpt_to: tuple[str, ...] = ()


@attrs.frozen
class Envelope:
    """The SMTP envelope of one accepted message (RFC 5321 §2.3.1)."""

    #: Reverse-path; the empty string is the null sender ``<>`` (RFC 5321 §4.5.5).
    mail_from: str
    rcpt_to: tuple[str, ...]
    #: ``BODY=8BITMIME`` was declared (RFC 6152).
    body_8bit: bool
    #: ``SMTPUTF8`` was declared (RFC 6531): addresses and headers may be UTF-8.
    smtputf8: bool
    #: Octets of the message handed to ``accept_message`` (Received header included).
    size: int


class SMTPPolicy(Protocol):
    """The application's side of an SMTP session.

    A Deferred that fails is logged by the server and answered with a temporary error (451 4.3.0, or
    454 4.7.0 for AUTH, RFC 4954 §6), so an exception never loses a reply or leaves a client hanging.
    """

    def authenticate(
        self, session: SessionInfo, username: str, password: str
    ) -> Deferred[AuthIdentity | None]:
        """Check credentials: an identity on success, None for bad credentials (535 5.7.8)."""

    def check_mail_from(self, session: SessionInfo, address: str) -> Deferred[Reply | None]:
        """Decide on MAIL FROM: None accepts (250 2.1.0), a Reply is sent as the answer."""

    def check_rcpt(self, session: SessionInfo, mail_from: str, address: str) -> Deferred[Reply | None]:
        """Decide on RCPT TO (relay control lives here): None accepts (250 2.1.5), a Reply is sent."""

    def accept_message(self, session: SessionInfo, envelope: Envelope, message: bytes) -> Deferred[Reply]:
        """Store the message durably and return the reply to the end of data (250 2.0.0 with queue id).

        ``message`` is the message as received, CRLF line endings, dot-unstuffed, with our ``Received:``
        header prepended. A positive reply must only be returned once the message is durable.
        """

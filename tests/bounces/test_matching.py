"""Unit tests for mtad.bounces.matching (no I/O), the bounce events' schema and their webhooks."""

from __future__ import annotations

import json
import typing

from twisted.trial.unittest import SynchronousTestCase

from mtad.accept import MessageHeaders
from mtad.bounces.matching import (
    MAX_TOKENS,
    Lookup,
    Original,
    Received,
    candidates,
    clean,
    decide,
    recipient_for,
)
from mtad.config import ConfigError, load_config
from mtad.events.schema import (
    BOUNCE_CATEGORIES,
    MessageBounced,
    MessageDelivery,
    MessageQueued,
    SpamComplaint,
    decode_entry,
    encode,
)
from mtad.mail.bounces import BounceRecipient, BounceReport, ComplaintReport, OriginalMessage
from mtad.mail.verp import encode_return_path
from mtad.outbound.classify import Category
from mtad.queue.model import Event
from mtad.store.messages import Message, MessageStatus, Scope
from mtad.webhooks.payloads import webhook_event_for
from tests.bounces.support import DOMAIN, DOMAINS, SECRET

NOW = 1_700_000_100.0


def original(**changes: object) -> Message:
    values: dict[str, object] = {
        "id": 41,
        "token": "tok41",
        "server_id": 3,
        "scope": Scope.OUTGOING,
        "rcpt_to": "user@example.com",
        "mail_from": "app@example.org",
        "subject": "Welcome 👋",
        "message_id": "welcome-1@example.org",
        "size": 100,
        "status": MessageStatus.SENT,
        "held": False,
        "hold_expiry": None,
        "last_delivery_attempt": NOW - 50,
        "tag": "welcome",
        "timestamp": NOW - 60,
    }
    values.update(changes)
    return Message(**values)  # type: ignore[arg-type]


def received(report: BounceReport, rcpt_to: str = "x@rp.mtad.test") -> Received:
    return Received(
        id=42,
        token="bouncetok",
        mail_from="",
        rcpt_to=(rcpt_to,),
        size=500,
        received_with_ssl=False,
        received_at=NOW - 5,
        report=report,
        headers=MessageHeaders("Undelivered", "dsn-1@mx.example.com", None),
    )


FAILED = BounceRecipient(
    final_recipient="user@example.com",
    action="failed",
    status="5.1.1",
    diagnostic_type="smtp",
    diagnostic="550 5.1.1 no such user",
    remote_mta="mx.example.com",
)


class CandidateTests(SynchronousTestCase):
    """Which addresses and tokens may name the original, in which order."""

    def test_recipient_verp_first(self) -> None:
        """A VERP recipient is found; quoted tokens are then not looked at."""
        address = encode_return_path(SECRET, 3, 41, DOMAIN)
        found = candidates(SECRET, DOMAINS, [address], BounceReport("dsn", "x", postal_msgids=("tok",)))
        self.assertEqual([(m.server_id, m.message_id) for m in found.verp], [(3, 41)])
        self.assertEqual(found.tokens, ())

    def test_per_domain_return_path(self) -> None:
        """An address at ``psrp.<domain>`` is ours too (Postal's per-domain return path)."""
        address = encode_return_path(SECRET, 3, 41, "psrp.example.org")
        found = candidates(SECRET, DOMAINS, [address], BounceReport("dsn", "x"))
        self.assertEqual([m.message_id for m in found.verp], [41])
        elsewhere = encode_return_path(SECRET, 3, 41, "example.org")
        self.assertEqual(candidates(SECRET, DOMAINS, [elsewhere], BounceReport("dsn", "x")).verp, ())

    def test_quoted_return_path_and_arf_sender(self) -> None:
        """A feedback report's Original-Mail-From and the quoted Return-Path are VERP candidates."""
        a = encode_return_path(SECRET, 3, 41, DOMAIN)
        b = encode_return_path(SECRET, 3, 43, DOMAIN)
        report = BounceReport(
            "complaint",
            "x",
            complaint=ComplaintReport(original_mail_from=a),
            original=OriginalMessage(headers=(("Return-Path", f"<{b}>"),)),
        )
        found = candidates(SECRET, DOMAINS, ["fbl@rp.mtad.test"], report)
        self.assertEqual([m.message_id for m in found.verp], [41, 43])

    def test_tokens_bounded(self) -> None:
        """Without VERP, at most MAX_TOKENS quoted tokens are looked up."""
        tokens = tuple(f"t{n}" for n in range(50))
        found = candidates(
            SECRET, DOMAINS, ["x@rp.mtad.test"], BounceReport("dsn", "x", postal_msgids=tokens)
        )
        self.assertEqual(found.tokens, tokens[:MAX_TOKENS])

    def test_recipient_for(self) -> None:
        """The block naming the message's recipient wins, then the first failed one."""
        delayed = BounceRecipient(final_recipient="other@example.com", action="delayed")
        report = BounceReport("dsn", "x", recipients=(delayed, FAILED))
        self.assertIs(recipient_for(report, "USER@example.com"), FAILED)
        self.assertIs(recipient_for(report, "nobody@example.com"), FAILED)
        self.assertIs(recipient_for(report, "other@example.com"), delayed)
        self.assertIsNone(recipient_for(BounceReport("dsn", "x"), "user@example.com"))

    def test_clean(self) -> None:
        """Text for SQL and JSON: no NUL, no lone surrogate, bounded."""
        self.assertEqual(clean("a\x00b\udcff"), "ab?")
        self.assertEqual(clean("x" * 2000, 10), "xxxxxxx...")
        self.assertIsNone(clean(None))


class DecideTests(SynchronousTestCase):
    """The events of one report."""

    def test_bounce_events(self) -> None:
        """A failed DSN: the report queued (bounce, linked), its Processed delivery, the original's
        Bounced delivery (next attempt) and message.bounced, in that order."""
        report = BounceReport("dsn", "RFC 3464", recipients=(FAILED,))
        lookup = Lookup((Original(original(), 1),), (), "verp")
        outcome = decide(received(report), lookup, NOW, secret=SECRET, domains=DOMAINS)
        queued, processed, bounced, event = outcome.events
        assert isinstance(queued, MessageQueued) and isinstance(bounced, MessageDelivery)
        self.assertEqual(
            (queued.id, queued.scope, queued.bounce, queued.bounce_for_id), (42, "incoming", True, 41)
        )
        self.assertEqual((queued.raw_message_id, queued.server_id), (42, 3))
        assert isinstance(processed, MessageDelivery)
        self.assertEqual((processed.message_id, processed.status), (42, "Processed"))
        self.assertEqual(
            (bounced.message_id, bounced.attempt, bounced.status, bounced.code), (41, 2, "Bounced", 550)
        )
        assert isinstance(event, MessageBounced)
        self.assertEqual((event.hard, event.category, event.status), (True, "bad_mailbox", "5.1.1"))
        self.assertEqual(outcome.marked, (41,))

    def test_no_recipient_block(self) -> None:
        """A bounce naming no recipient still bounces its message, soft and of unknown category."""
        report = BounceReport("unrecognised_bounce", "from MAILER-DAEMON")
        lookup = Lookup((Original(original(), 1),), (), "verp")
        events = decide(received(report), lookup, NOW, secret=SECRET, domains=DOMAINS).events
        [event] = [e for e in events if isinstance(e, MessageBounced)]
        self.assertEqual((event.hard, event.category), (False, "unknown"))

    def test_unmatched_kinds(self) -> None:
        """Nothing found: bounces get Postal's HardFail, other mail is just Processed; none is linked."""
        for kind, status, bounce in (
            ("dsn", "HardFail", True),
            ("auto_reply", "Processed", False),
            ("not_a_bounce", "Processed", False),
        ):
            report = BounceReport(kind, "x")  # type: ignore[arg-type]
            queued, delivery = decide(received(report), Lookup(), NOW, secret=SECRET, domains=DOMAINS).events
            assert isinstance(queued, MessageQueued) and isinstance(delivery, MessageDelivery)
            self.assertEqual((queued.bounce, queued.bounce_for_id, queued.server_id), (bounce, None, 0))
            self.assertEqual(delivery.status, status)


class SchemaTests(SynchronousTestCase):
    """The new events' encoding."""

    def test_categories_match_the_classifier(self) -> None:
        """The schema's categories are the classifier's."""
        self.assertEqual(BOUNCE_CATEGORIES, frozenset(typing.get_args(Category)))

    def test_round_trip_and_strict_category(self) -> None:
        """Both events decode from their encoding; an unknown category is refused."""
        bounced = MessageBounced(
            message_id=1,
            server_id=2,
            rcpt_to="a@b",
            bounce_id=3,
            hard=True,
            category="bad_mailbox",
            timestamp=NOW,
        )
        complaint = SpamComplaint(
            message_id=1, server_id=2, rcpt_to="a@b", feedback_type="abuse", timestamp=NOW
        )
        for event in (bounced, complaint):
            kind, data = encode(event)
            self.assertEqual(decode_entry(Event("1-1", kind, json.loads(data))).event, event)
        kind, data = encode(bounced)
        broken = {**json.loads(data), "category": "whatever"}
        with self.assertRaises(ValueError):
            decode_entry(Event("1-2", kind, broken))


class WebhookTests(SynchronousTestCase):
    """Postal's MessageBounced payload, and mtad's SpamComplaint."""

    def test_message_bounced_payload(self) -> None:
        """``{original_message, bounce}``, each Postal's message hash; the bounce is incoming."""
        report = BounceReport("dsn", "RFC 3464", recipients=(FAILED,))
        lookup = Lookup((Original(original(), 1),), (), "verp")
        events = decide(received(report), lookup, NOW, secret=SECRET, domains=DOMAINS).events
        [event] = [e for e in events if isinstance(e, MessageBounced)]
        fired = webhook_event_for(event)
        assert fired is not None
        self.assertEqual((fired.server_id, fired.event), (3, "MessageBounced"))
        self.assertEqual(
            fired.payload,
            {
                "original_message": {
                    "id": 41,
                    "token": "tok41",
                    "direction": "outgoing",
                    "message_id": "welcome-1@example.org",
                    "to": "user@example.com",
                    "from": "app@example.org",
                    "subject": "Welcome 👋",
                    "timestamp": NOW - 60,
                    "spam_status": "NotChecked",
                    "tag": "welcome",
                },
                "bounce": {
                    "id": 42,
                    "token": "bouncetok",
                    "direction": "incoming",
                    "message_id": "dsn-1@mx.example.com",
                    "to": "x@rp.mtad.test",
                    "from": "",
                    "subject": "Undelivered",
                    "timestamp": NOW - 5,
                    "spam_status": "NotChecked",
                    "tag": None,
                },
            },
        )
        # The Bounced delivery itself fires nothing (Postal: Bounced fires MessageBounced only).
        self.assertIsNone(webhook_event_for(next(e for e in events if isinstance(e, MessageDelivery))))

    def test_spam_complaint_payload(self) -> None:
        """A complaint fires mtad's SpamComplaint with the message, the feedback type and the report."""
        report = BounceReport(
            "complaint", "ARF", complaint=ComplaintReport(feedback_type="abuse", source_ip="192.0.2.9")
        )
        lookup = Lookup((Original(original(), 1),), (), "verp")
        events = decide(received(report), lookup, NOW, secret=SECRET, domains=DOMAINS).events
        [event] = [e for e in events if isinstance(e, SpamComplaint)]
        fired = webhook_event_for(event)
        assert fired is not None
        self.assertEqual(fired.event, "SpamComplaint")
        self.assertEqual(
            {k: v for k, v in fired.payload.items() if k not in ("message", "bounce")},
            {"feedback_type": "abuse", "user_agent": None, "source_ip": "192.0.2.9", "timestamp": NOW},
        )
        self.assertEqual(fired.payload["message"]["id"], 41)
        self.assertEqual(fired.payload["bounce"]["id"], 42)


class ConfigTests(SynchronousTestCase):
    """``domains.verp_secret``."""

    def test_short_secret_refused(self) -> None:
        """A configured secret shorter than 16 characters is a config error naming the key."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[domains]\nverp_secret = "short"\n')
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertIn("domains.verp_secret", str(raised.exception))
        with open(path, "w") as f:
            f.write('[domains]\nverp_secret = "long enough for a secret"\n')
        self.assertEqual(load_config(path).domains.verp_secret, "long enough for a secret")

"""Tests for mtad.store.messages: message and delivery history."""

from __future__ import annotations

from mtad.store.messages import (
    DeliveryAttempt,
    Message,
    MessageStatus,
    Scope,
    find_message,
    list_deliveries,
    list_messages,
    record_delivery,
    record_messages,
)
from tests.store.support import MYSQL, POSTGRES, DatabaseTestCase

NOW = 1_700_000_000.0
#: 10,000 four-byte characters: longer than MySQL's TEXT and impossible in MySQL's 3-byte "utf8".
EMOJI_SUBJECT = "📬" * 9_999 + "✓"


def message(id: int = 1, **changes: object) -> Message:
    values: dict[str, object] = {
        "id": id,
        "token": f"tok{id}",
        "server_id": 7,
        "scope": Scope.OUTGOING,
        "rcpt_to": "rcpt@example.com",
        "mail_from": "sender@example.org",
        "subject": "Hello",
        "message_id": "<abc@example.org>",
        "size": 1234,
        "status": MessageStatus.PENDING,
        "held": False,
        "hold_expiry": None,
        "last_delivery_attempt": None,
        "tag": None,
        "timestamp": NOW,
    }
    values.update(changes)
    return Message(**values)  # type: ignore[arg-type]


def attempt(event_id: str, status: MessageStatus, timestamp: float, **changes: object) -> DeliveryAttempt:
    values: dict[str, object] = {
        "event_id": event_id,
        "message_id": 1,
        "attempt": 1,
        "status": status,
        "output": "250 2.0.0 OK",
        "details": "Message for rcpt@example.com accepted by mx.example.com",
        "sent_with_ssl": True,
        "timestamp": timestamp,
    }
    values.update(changes)
    return DeliveryAttempt(**values)  # type: ignore[arg-type]


class MessageTests(DatabaseTestCase):
    def test_emoji_subject_round_trips(self) -> None:
        """A 10,000-character subject of 4-byte emoji is stored and read back unchanged."""
        self.transaction(record_messages, [message(subject=EMOJI_SUBJECT)], NOW)
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual(found.subject, EMOJI_SUBJECT)
        self.assertEqual(found, message(subject=EMOJI_SUBJECT))

    def test_large_ids_and_long_output(self) -> None:
        """Ids beyond 32 bits and delivery output beyond 64 KiB are stored whole."""
        big = 2**40 + 5
        output = "x" * 100_000
        self.transaction(record_messages, [message(id=big)], NOW)
        self.transaction(
            record_delivery, attempt("1-0", MessageStatus.SENT, NOW + 1, message_id=big, output=output), NOW
        )
        [delivery] = self.transaction(list_deliveries, big)
        self.assertEqual((delivery.message_id, delivery.output), (big, output))

    def test_record_messages_is_idempotent(self) -> None:
        """Recording a message that exists leaves the recorded row as it was."""
        self.transaction(record_messages, [message()], NOW)
        self.transaction(record_messages, [message(subject="changed"), message(id=2)], NOW)
        first = self.transaction(find_message, 1)
        assert first is not None
        self.assertEqual(first.subject, "Hello")
        self.assertEqual([m.id for m in self.transaction(list_messages, 7)], [2, 1])

    def test_delivery_updates_message(self) -> None:
        """A delivery attempt is recorded and sets the message's status and last attempt time."""
        self.transaction(record_messages, [message()], NOW)
        self.transaction(record_delivery, attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 10, code=451), NOW)
        self.transaction(
            record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 70, attempt=2, code=250), NOW
        )
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual((found.status, found.last_delivery_attempt), (MessageStatus.SENT, NOW + 70))
        deliveries = self.transaction(list_deliveries, 1)
        self.assertEqual(
            [(d.attempt, d.status, d.code) for d in deliveries], [(1, "SoftFail", 451), (2, "Sent", 250)]
        )
        self.assertTrue(deliveries[0].sent_with_ssl)

    def test_delivery_recorded_before_its_message(self) -> None:
        """A delivery recorded before its message (another process's recorder committed first) gives the
        message its status when the message is recorded; the latest attempt wins, and a message with no
        attempt stays Pending."""
        self.transaction(record_delivery, attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 1), NOW)
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 5, attempt=2), NOW)
        self.transaction(record_delivery, attempt("3-0", MessageStatus.HELD, NOW + 2, message_id=3), NOW)
        self.assertIsNone(self.transaction(find_message, 1))
        self.transaction(record_messages, [message(1), message(2), message(3)], NOW + 6)
        first, second, third = (self.transaction(find_message, i) for i in (1, 2, 3))
        assert first is not None and second is not None and third is not None
        self.assertEqual((first.status, first.last_delivery_attempt), (MessageStatus.SENT, NOW + 5))
        self.assertEqual((second.status, second.last_delivery_attempt), (MessageStatus.PENDING, None))
        self.assertEqual((third.status, third.held), (MessageStatus.HELD, True))
        # Recording the messages again (a replayed batch) changes nothing.
        self.transaction(record_messages, [message(1)], NOW + 7)
        self.assertEqual(self.transaction(find_message, 1), first)

    def test_replayed_old_delivery_changes_nothing(self) -> None:
        """Replaying an older attempt's event neither duplicates its row nor regresses the message status."""
        self.transaction(record_messages, [message()], NOW)
        old = attempt("1-0", MessageStatus.SOFT_FAIL, NOW + 10)
        self.transaction(record_delivery, old, NOW)
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 70, attempt=2), NOW)
        self.transaction(record_delivery, old, NOW)
        found = self.transaction(find_message, 1)
        assert found is not None
        self.assertEqual(found.status, MessageStatus.SENT)
        self.assertEqual(len(self.transaction(list_deliveries, 1)), 2)

    def test_held_sets_hold_expiry(self) -> None:
        """A Held attempt marks the message held until the expiry; a later Sent clears the hold."""
        self.transaction(record_messages, [message()], NOW)
        self.transaction(
            record_delivery, attempt("1-0", MessageStatus.HELD, NOW + 1, hold_expiry=NOW + 86400), NOW
        )
        held = self.transaction(find_message, 1)
        assert held is not None
        self.assertEqual((held.held, held.hold_expiry), (True, NOW + 86400))
        self.transaction(record_delivery, attempt("2-0", MessageStatus.SENT, NOW + 2), NOW)
        sent = self.transaction(find_message, 1)
        assert sent is not None
        self.assertEqual((sent.held, sent.hold_expiry, sent.status), (False, None, MessageStatus.SENT))


class MessagePostgresTests(MessageTests):
    backend = POSTGRES


class MessageMySQLTests(MessageTests):
    backend = MYSQL

"""Tests for mtad.webhooks."""

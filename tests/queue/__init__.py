"""Tests for mtad.queue."""

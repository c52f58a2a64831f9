"""Tests for mtad.events."""

"""Tests for mtad.store."""

"""Tests for mtad.mail."""

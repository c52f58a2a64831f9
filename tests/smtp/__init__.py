"""Tests for mtad.smtp."""

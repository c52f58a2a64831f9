"""Tests for mtad.outbound."""

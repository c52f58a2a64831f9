"""Tests for mtad.bounces."""

"""Tests for mtad.suppression."""

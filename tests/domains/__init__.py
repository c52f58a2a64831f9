"""Tests for mtad.domains and DKIM key handling."""

"""Inbound routing (later issues)."""

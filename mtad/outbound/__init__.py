"""Outbound delivery: IP pools, connection limits, MX resolution, retry policy."""

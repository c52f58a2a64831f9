"""Tests for the relay benchmark: ``.venv/bin/python -m twisted.trial tools.bench.tests``."""

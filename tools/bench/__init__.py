"""Benchmarks: the relay benchmark comparing mtad with a private Postfix (``python -m tools.bench.relay``)."""

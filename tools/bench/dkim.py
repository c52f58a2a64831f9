"""DKIM signing speed: dkimpy's default signer against :class:`mtad.mail.dkim.DKIMSigner`.

Both sign the same messages (about 5 KB each, prose-like bodies, a dozen header fields) with the same
2048-bit RSA key, relaxed/relaxed over Postal's header list, one thread each. Each run signs the whole
set; the result is the median of the runs' messages per second. Also measured: our signer with an RSA and
an Ed25519 key (dual signing), and our signer in two threads at once (does the RSA operation release the
GIL, so that a second core helps?)::

    .venv/bin/python -m tools.bench.dkim [--runs 5] [--messages 2000] [--dkimpy-messages 100] [--size 5120]

dkimpy's set is smaller because it is about 20 times slower; the rates are per second either way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mtad.mail.dkim import POSTAL_SIGNED_HEADERS, DKIMKey, DKIMSigner

DOMAIN = "bench.test"
NOW = 1_764_000_000.0
WORDS = (
    "the quick brown fox jumps over lazy dog delivery message sender recipient domain signature header"
    " body canonical relaxed simple queue retry bounce unsubscribe newsletter invoice order shipped"
).split()


def make_messages(count: int, size: int, seed: int = 1) -> list[bytes]:
    """``count`` distinct messages of about ``size`` bytes: typical headers, wrapped prose, a link."""
    rng = random.Random(seed)
    messages = []
    for n in range(count):
        head = (
            f"Received: from client.bench.test (client.bench.test [127.0.0.1])\r\n\tby mx.bench.test; "
            f"Thu, 27 Nov 2025 10:00:{n % 60:02d} +0000\r\n"
            f"From: Bench Sender <sender@{DOMAIN}>\r\n"
            f"To: Recipient {n} <rcpt{n}@dest.test>\r\n"
            f"Subject: Your order {n} has shipped\r\n"
            f"Date: Thu, 27 Nov 2025 10:00:{n % 60:02d} +0000\r\n"
            f"Message-ID: <{n}.bench@{DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
            f"List-Unsubscribe: <https://{DOMAIN}/u/{n}>\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            "\r\n"
        ).encode()
        lines: list[str] = []
        line: list[str] = []
        length = len(head)
        while length < size:
            word = rng.choice(WORDS)
            if sum(len(w) + 1 for w in line) + len(word) > 72:
                lines.append(" ".join(line))
                length += len(lines[-1]) + 2
                line = []
            line.append(word)
        lines.append(f"https://{DOMAIN}/track/{n}")
        messages.append(head + ("\r\n".join(lines) + "\r\n").encode())
    return messages


def rate(sign: Callable[[bytes], bytes], messages: Sequence[bytes]) -> float:
    """Messages per second signing ``messages`` one after another."""
    start = time.perf_counter()
    for message in messages:
        sign(message)
    return len(messages) / (time.perf_counter() - start)


def threaded_rate(sign: Callable[[bytes], bytes], messages: Sequence[bytes], threads: int) -> float:
    """Messages per second with ``threads`` threads each signing all of ``messages``."""
    workers = [threading.Thread(target=lambda: [sign(m) for m in messages]) for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * len(messages) / (time.perf_counter() - start)


def median_rate(measure: Callable[[], float], runs: int) -> tuple[float, list[float]]:
    rates = [measure() for _ in range(runs)]
    return statistics.median(rates), rates


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.dkim", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000, help="messages per run for our signer")
    parser.add_argument("--dkimpy-messages", type=int, default=100, help="messages per run for dkimpy")
    parser.add_argument("--size", type=int, default=5120, help="approximate message size in bytes")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    rsa_key = DKIMKey(DOMAIN, "rsa", rsa_pem)
    ed_key = DKIMKey(DOMAIN, "ed", ed_pem, algorithm="ed25519")
    messages = make_messages(args.messages, args.size)
    signer = DKIMSigner()
    include = [h.encode() for h in POSTAL_SIGNED_HEADERS]

    def dkimpy_sign(message: bytes) -> bytes:
        signature: bytes = dkim.sign(
            message,
            b"rsa",
            DOMAIN.encode(),
            rsa_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return signature + message

    sizes = [len(m) for m in messages]
    cpus = os.cpu_count() or 1
    print(
        f"DKIM signing: {len(messages)} messages of {min(sizes)}-{max(sizes)} bytes, RSA 2048, "
        f"relaxed/relaxed, median of {args.runs} runs, {cpus} CPUs",
        flush=True,
    )
    signer.sign(messages[0], [rsa_key, ed_key], NOW)  # load the keys outside the measurement
    results: dict[str, tuple[float, list[float]]] = {}
    cases: list[tuple[str, Callable[[], float]]] = [
        ("dkimpy default signer", lambda: rate(dkimpy_sign, messages[: args.dkimpy_messages])),
        ("mtad DKIMSigner rsa", lambda: rate(lambda m: signer.sign(m, [rsa_key], NOW), messages)),
        (
            "mtad DKIMSigner rsa+ed25519",
            lambda: rate(lambda m: signer.sign(m, [rsa_key, ed_key], NOW), messages),
        ),
        ("mtad DKIMSigner ed25519", lambda: rate(lambda m: signer.sign(m, [ed_key], NOW), messages)),
        (
            "mtad DKIMSigner rsa, 2 threads",
            lambda: threaded_rate(lambda m: signer.sign(m, [rsa_key], NOW), messages, 2),
        ),
    ]
    for name, measure in cases:
        median, rates = median_rate(measure, args.runs)
        results[name] = (median, rates)
        runs = ", ".join(f"{r:.0f}" for r in rates)
        print(
            f"{name:32s} {median:8.0f} messages/s  {1000 / median:6.3f} ms/message  (runs: {runs})",
            flush=True,
        )
    ours = results["mtad DKIMSigner rsa"][0]
    theirs = results["dkimpy default signer"][0]
    print(f"mtad/dkimpy: {ours / theirs:.1f}x", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({name: {"median": m, "runs": r} for name, (m, r) in results.items()}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

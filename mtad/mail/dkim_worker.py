"""A DKIM signing worker process: reads signing jobs on stdin, writes signed messages on stdout.

Run as ``python -m mtad.mail.dkim_worker`` by `mtad.outbound.signing_pool.SigningPool`, never by hand.
Signing a 5 KB message costs 0.3-0.6 ms of CPU (most of it RSA; BENCHMARKS.md has both machines), the
largest single cost of a delivery. In a thread it would still share the GIL with the reactor: measured,
a thread pool made the send API's p99 worse than signing inline. A process signs on another core and
hands back the signed bytes.

Each frame is a 4-byte big-endian length and a pickle. The only peer is the daemon that started this
process, over its own pipes, so pickle (fast, and it carries `DKIMKey` as it is) is safe here.

- job: ``(job_id, now, keys, message)`` with ``keys`` a tuple of `DKIMKey`;
- answer: ``(job_id, "ok", signed_message)``, or ``(job_id, kind, text)`` where ``kind`` is
  ``"unsignable"`` (`UnsignableMessageError`), ``"key"`` (`DKIMKeyError`) or ``"error"`` (anything else).

End of input ends the process, and nothing else does: Ctrl-C at a terminal or systemd's SIGTERM reach the
whole process group, and the daemon, still delivering while it drains, closes the worker's input when it
no longer needs it. If the daemon dies, the pipe closes and the worker ends too.
"""

from __future__ import annotations

import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO

from mtad.mail.dkim import DKIMKeyError, DKIMSigner, UnsignableMessageError

LENGTH = struct.Struct(">I")


def frame(payload: Any) -> bytes:
    """``payload`` pickled behind its length, as both ends write it."""
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def answer(signer: DKIMSigner, job: tuple[int, float, tuple[Any, ...], bytes]) -> tuple[int, str, Any]:
    """The answer to one job; never raises, so one bad message cannot end the worker."""
    job_id, now, keys, message = job
    try:
        return (job_id, "ok", signer.sign(message, keys, now=now))
    except UnsignableMessageError as e:
        return (job_id, "unsignable", str(e))
    except DKIMKeyError as e:
        return (job_id, "key", str(e))
    except Exception as e:
        return (job_id, "error", f"{type(e).__name__}: {e}")


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer jobs until ``stdin`` ends."""
    signer = DKIMSigner()
    while True:
        header = _read_exact(stdin, LENGTH.size)
        if header is None:
            return
        (size,) = LENGTH.unpack(header)
        payload = _read_exact(stdin, size)
        if payload is None:
            return
        stdout.write(frame(answer(signer, pickle.loads(payload))))
        stdout.flush()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())

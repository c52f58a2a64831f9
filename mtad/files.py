"""`create_once`: a secret file in the data directory, made by whichever process starts first.

Several processes may start at once on one data directory (the VERP secret, the webhook signing key, the
installation's DKIM key), and all must end up with the same contents. So the new contents go to a file of
the process's own, fsync'd, and are hard-linked into place: the link fails for all but the first, each
loser drops its own and reads the winner's, and nobody reads a half-written file. (Creating the file
itself with ``O_EXCL`` fails the losers with FileExistsError, and one may read it still empty.)
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def create_once(path: Path, make: Callable[[], bytes], mode: int = 0o600) -> bytes:
    """The contents of ``path``, written there first (with ``mode``) from ``make()`` if it is missing.

    ``make`` runs only when the file is missing, and its result may be thrown away (another process was
    first). Raises OSError when the file cannot be read or written.
    """
    if not path.exists():
        data = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process was first: its contents win
        finally:
            os.unlink(temporary)
    return path.read_bytes()

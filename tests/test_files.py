"""`mtad.files.create_once` against the real file system: the first writer wins, losers read its file."""

from __future__ import annotations

import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mtad.files import create_once
from mtad.mail.dkim_keys import load_or_create_key


class CreateOnceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.path = self.dir / "data" / "secret"

    def test_created_then_kept(self) -> None:
        self.assertEqual(create_once(self.path, lambda: b"first"), b"first")
        self.assertEqual(create_once(self.path, lambda: b"second"), b"first")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(sorted(p.name for p in self.path.parent.iterdir()), ["secret"])

    def test_another_process_first(self) -> None:
        """Another process writes the file after this one saw it missing: this one reads that file, and
        leaves no file of its own behind."""

        def make() -> bytes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(b"winner")
            return b"loser"

        self.assertEqual(create_once(self.path, make), b"winner")
        self.assertEqual(sorted(p.name for p in self.path.parent.iterdir()), ["secret"])

    def test_dkim_key_race(self) -> None:
        """The installation's DKIM key: a process that loses the race gets the winner's key (it raised
        FileExistsError before)."""
        winner_path = self.dir / "other" / "dkim.key"
        winner, public = load_or_create_key(winner_path, rsa_bits=1024)
        key = self.dir / "data" / "dkim.key"
        original = Path.exists
        # The file is missing when looked for, and there when this process links its own into place.
        calls = []

        def exists(path: Path) -> bool:
            if path == key and not calls:
                calls.append(path)
                key.parent.mkdir(parents=True, exist_ok=True)
                key.write_bytes(winner)
                return False
            return original(path)

        self.patch(Path, "exists", exists)
        self.assertEqual(load_or_create_key(key, rsa_bits=1024), (winner, public))

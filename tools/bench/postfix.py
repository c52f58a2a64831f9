"""A private Postfix instance for the relay benchmark: its own config, queue and loopback port.

The benchmark compares mtad with Postfix doing the same job (SMTP in on loopback, relay to a sink on
another 127.0.0.x address). Postfix comes from Debian's package, unpacked by ``tools/bench/setup-postfix``
into ``tools/bench/.cache/postfix`` -- never installed system-wide. Everything Postfix would normally find
under ``/etc/postfix``, ``/var/spool/postfix`` and ``/usr/lib/postfix`` is redirected to the unpacked tree
and a work directory through ``main.cf`` (``config_directory``, ``queue_directory``, ``daemon_directory``,
``shlib_directory``, ...), and the unpacked shared libraries are found through ``LD_LIBRARY_PATH``, which
``import_environment`` passes from ``master`` to its daemons (Postfix scrubs the environment otherwise).

Configuration is Postfix's defaults except what the benchmark needs: no chroot, no DNS (the relay host is a
bracketed IP literal, so no MX or A lookup happens, RFC 5321 §5.1 does not apply), no local delivery, relaying
permitted for 127.0.0.0/8 only, logging to ``master``'s stdout (``maillog_file = /dev/stdout``, handled by
``postlogd``) which the runner redirects to a file. Performance-relevant defaults stay as shipped
(``in_flow_delay``, connection caching, concurrency 20 per destination) so the numbers describe the
Postfix an operator gets; ``overrides`` changes any of them for experiments.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import attrs

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"


class PostfixNotInstalled(RuntimeError):
    """The unpacked Postfix tree is missing: run ``tools/bench/setup-postfix``."""


class PostfixFailed(RuntimeError):
    """A ``postfix`` command failed; the message carries its output."""


@attrs.frozen
class PostfixInstall:
    """Where the unpacked Debian package lives, and the environment its binaries need."""

    root: Path

    @property
    def sbin(self) -> Path:
        return self.root / "usr" / "sbin"

    @property
    def daemon_directory(self) -> Path:
        return self.root / "usr" / "lib" / "postfix" / "sbin"

    @property
    def shlib_directory(self) -> Path:
        return self.root / "usr" / "lib" / "postfix"

    @property
    def meta_directory(self) -> Path:
        return self.root / "etc" / "postfix"

    def tool(self, name: str) -> Path:
        """Path of a command from the package (``postfix``, ``smtp-source``, ``smtp-sink``, ...)."""
        return self.sbin / name

    def env(self) -> dict[str, str]:
        """The process environment for Postfix binaries: the unpacked libraries come first.

        The binaries carry ``RUNPATH=/usr/lib/postfix``; ``LD_LIBRARY_PATH`` is searched before RUNPATH.
        """
        paths = [
            self.shlib_directory,
            self.root / "usr" / "lib" / "x86_64-linux-gnu",
            self.root / "lib" / "x86_64-linux-gnu",
        ]
        env = dict(os.environ)
        previous = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = ":".join([str(p) for p in paths] + ([previous] if previous else []))
        env["LANG"] = "C"
        return env


def find_install(cache: Path = DEFAULT_CACHE) -> PostfixInstall:
    """Return the unpacked Postfix under ``cache``, or raise :class:`PostfixNotInstalled`."""
    install = PostfixInstall(root=cache / "postfix")
    for needed in (install.tool("postfix"), install.tool("smtp-source"), install.tool("smtp-sink")):
        if not needed.exists():
            raise PostfixNotInstalled(f"{needed} is missing: run tools/bench/setup-postfix (as root)")
    return install


@attrs.frozen
class PostfixConfig:
    """What the benchmark decides about the instance; everything else is Postfix's default."""

    listen: tuple[str, int] = ("127.0.0.1", 10025)
    relay: tuple[str, int] = ("127.0.0.3", 25)
    source_ip: str = "127.0.0.2"
    hostname: str = "postfix.bench.test"
    overrides: Mapping[str, str] = attrs.field(factory=dict)


def main_cf(install: PostfixInstall, workdir: Path, config: PostfixConfig) -> str:
    """The ``main.cf`` text for an instance whose state lives under ``workdir``."""
    relay_host, relay_port = config.relay
    settings: dict[str, str] = {
        "compatibility_level": "3.6",
        "config_directory": str(workdir / "etc"),
        "queue_directory": str(workdir / "queue"),
        "data_directory": str(workdir / "data"),
        "command_directory": str(install.sbin),
        "daemon_directory": str(install.daemon_directory),
        "shlib_directory": str(install.shlib_directory),
        "meta_directory": str(install.meta_directory),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": config.hostname,
        "mydomain": "bench.test",
        "myorigin": "bench.test",
        "mydestination": "",
        "inet_interfaces": config.listen[0],
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "relayhost": f"[{relay_host}]:{relay_port}",
        "smtp_bind_address": config.source_ip,
        "local_transport": "error:local delivery is disabled",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "default_process_limit": "100",
        "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH",
        "maillog_file": "/dev/stdout",
    }
    settings.update(config.overrides)
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def master_cf(config: PostfixConfig) -> str:
    """The ``master.cf`` text: Debian's services minus local delivery and chroot, smtpd on our port."""
    host, port = config.listen
    services = [
        f"{host}:{port} inet n - n - - smtpd",
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "showq unix n - n - - showq",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "postlog unix-dgram n - n - 1 postlogd",
    ]
    return "\n".join(services) + "\n"


def wait_for_port(
    address: tuple[str, int], timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until something accepts TCP connections at ``address`` (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {address}")
        try:
            with socket.create_connection(address, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address[0]}:{address[1]} after {timeout}s") from None
            time.sleep(0.05)


def ensure_port_free(address: tuple[str, int]) -> None:
    """Fail if something already accepts connections at ``address``.

    :func:`wait_for_port` only sees that *something* listens; a leftover instance from an interrupted run
    would otherwise be measured in place of the one just started.
    """
    try:
        with socket.create_connection(address, timeout=1):
            pass
    except OSError:
        return
    raise RuntimeError(f"{address[0]}:{address[1]} is already in use (a leftover benchmark process?)")


@attrs.define
class PostfixInstance:
    """One private Postfix: ``start()`` writes the config and runs ``postfix start-fg`` under our control.

    Implements the runner's ``SystemUnderTest`` shape: ``name``, ``smtp_addresses``, ``process_roots()``,
    ``stop()``.
    """

    install: PostfixInstall
    workdir: Path
    config: PostfixConfig = attrs.field(factory=PostfixConfig)
    name: str = "postfix"
    _process: subprocess.Popen[bytes] | None = None

    @property
    def smtp_addresses(self) -> list[tuple[str, int]]:
        return [self.config.listen]

    @property
    def config_directory(self) -> Path:
        return self.workdir / "etc"

    @property
    def log_path(self) -> Path:
        return self.workdir / "maillog"

    def prepare(self) -> None:
        """Create the work directory, config files and queue (``postfix check`` makes queue subdirectories).

        Postfix wants ``data_directory`` owned by ``mail_owner`` and the queue owned by root.
        """
        etc = self.config_directory
        etc.mkdir(parents=True, exist_ok=True)
        (self.workdir / "queue").mkdir(exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, user="postfix")
        (etc / "main.cf").write_text(main_cf(self.install, self.workdir, self.config))
        (etc / "master.cf").write_text(master_cf(self.config))
        dynamicmaps = self.install.meta_directory / "dynamicmaps.cf"
        if not dynamicmaps.exists():
            dynamicmaps.touch()
        self.postfix("check")

    def postfix(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``postfix -c <our config> ARGS``; a failure raises with Postfix's own complaint."""
        done = subprocess.run(
            [str(self.install.tool("postfix")), "-c", str(self.config_directory), *args],
            env=self.install.env(),
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise PostfixFailed(f"postfix {' '.join(args)} failed ({done.returncode}): {output}")
        return done

    def start(self, timeout: float = 30.0) -> None:
        """Start the master in the foreground (its own session) and wait for smtpd to listen."""
        ensure_port_free(self.config.listen)
        self.prepare()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.install.tool("postfix")), "-c", str(self.config_directory), "start-fg"],
                env=self.install.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.config.listen, timeout, self._process)
        except BaseException:
            self.stop()
            raise

    def master_pid(self) -> int | None:
        """The master's pid from its pid file (``postfix start-fg`` runs it under a shell)."""
        try:
            return int((self.workdir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def process_roots(self) -> list[int]:
        """Processes whose trees are Postfix (the master and every daemon it spawns)."""
        pid = self.master_pid()
        return [pid] if pid is not None else []

    def stop(self, timeout: float = 30.0) -> None:
        """``postfix stop``, then wait; kill the session if the master does not go."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(PostfixFailed):
            self.postfix("stop")
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

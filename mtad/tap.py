"""``twistd mtad``: command-line options and the service maker; and the ``mtad`` command's entry point.

This is the only module that imports the global reactor; everything below receives it as an argument.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from mtad.config import ConfigError, load_config


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: embedded defaults)."],
    ]


def makeService(options: Options) -> IService:
    """Build the daemon's service tree; a bad config stops start-up with every problem listed."""
    from twisted.internet import reactor

    from mtad.app import MtadService

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        sys.stderr.write(f"mtad: {e}\n")
        raise SystemExit(2) from e
    return MtadService(config, reactor, freeze_gc=True)


def cli() -> int:
    """The ``mtad`` operator command (console script), with the global reactor for its Redis work."""
    from twisted.internet import reactor

    from mtad.cli import main, reactor_runner

    return main(run_async=reactor_runner(reactor))

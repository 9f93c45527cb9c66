"""Logging set-up for the host process."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(level: str) -> None:
    """Send the host's log to stderr at ``level`` (rpyc's own chatter stays at WARNING)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # rpyc logs every accept and goodbye at INFO under per-port logger names.
    for name in ("rpyc", "SLAVE"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))

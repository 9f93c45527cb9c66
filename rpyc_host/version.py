"""The ``--version`` line every command prints."""

from __future__ import annotations

import platform

import rpyc

from . import __version__


def version_text(prog: str) -> str:
    """``<prog> <version> (rpyc <version>, Python <version>)``."""
    return f"{prog} {__version__} (rpyc {rpyc.__version__}, Python {platform.python_version()})"

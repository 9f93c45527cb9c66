"""Exceptions raised by the host.

    HostError                  base of everything the host raises on purpose
    ├── ConfigError            a mistake in the configuration: file, key path, what is wrong
    └── StartupError           a listener or service could not start (port in use, ...)

Each carries a message written for the person running the server; the CLI prints it as one
``Error: ...`` line and exits non-zero, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HostError(Exception):
    """Base class of the host's own errors."""


class ConfigError(HostError):
    """A configuration mistake, located by file and dotted key path.

    ``str(err)`` reads ``<file>: <key.path>: <message>``.
    """

    def __init__(self, message: str, *, path: str = "", source: str = "") -> None:
        self.message = message
        self.path = path
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.path) if p]
        return ": ".join([*parts, self.message])

    def located(self, source: str) -> ConfigError:
        """Return a copy of this error that names the configuration file."""
        return ConfigError(self.message, path=self.path, source=source)


class StartupError(HostError):
    """A service or listener could not be started."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

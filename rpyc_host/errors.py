"""Exceptions raised by the host.

    HostError                  base of everything the host raises on purpose
    ├── ConfigError            a mistake in the configuration: file, key path, what is wrong
    ├── StartupError           a listener or service could not start (port in use, ...)
    └── Refused                a connection was refused (limits, credentials, TLS, throttling)

ConfigError and StartupError carry a message written for the person running the server; the
CLI prints it as one ``Error: ...`` line and exits non-zero, without a traceback. Refused stays
inside the host: it is logged, counted, and told to the client in the wire's refusal frames.
Errors of one connection's bytes (a frame too large, a stalled peer) are the wire layer's
(:mod:`rpyc_host.wire.errors`); a service's own errors are its own (the ingest service's
``StoreError``, ...).
"""

from __future__ import annotations

from .wire.errors import did_you_mean

__all__ = ["ConfigError", "HostError", "Refused", "StartupError", "did_you_mean"]


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


class Refused(HostError):
    """A connection was refused; ``reason`` is for the log, ``message`` for the client.

    ``kind`` is how it is counted (``auth``, ``tls``, ``limit``, ``throttle``); ``after_token``
    says the client's token was read, so it is waiting for a status frame rather than an rpyc
    reply.
    """

    def __init__(self, reason: str, message: str, kind: str, *, after_token: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.kind = kind
        self.after_token = after_token

"""``client.connect``: a connection to one service, by configured name or by address.

Name resolution and defaults live here (the service's address, token and TLS from the config
file, ``$RPYC_HOST_TOKEN`` and ``$RPYC_HOST_TLS_*``); the connecting itself is the wire's
:func:`rpyc_host.wire.dial`, whose errors are mapped here, once, to :mod:`client.errors`.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import rpyc

from rpyc_host.wire import CredentialsRefused, DialError, client_context, dial
from rpyc_host.wire.stream_reader import CONFIG_KEY as STREAM_CHUNK

from .errors import AuthError, ConfigError, ConnectError
from .settings import ClientSettings, load_settings

DEFAULT_TIMEOUT = 30.0

ConfigArg = str | os.PathLike[str] | ClientSettings | None


def resolve(service: str, config: ConfigArg = None) -> tuple[str, int]:
    """The (host, port) of a configured service.

    ``config`` is a config file path (default ``$RPYC_HOST_CONFIG``, else ``config.yaml`` in the
    current directory) or :class:`~client.settings.ClientSettings` already read. A service bound
    to a wildcard address is reached through loopback.
    """
    return load_settings(config).address(service)


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client TLS context: verify the server against ``ca`` (or the system store), and present
    ``cert``/``key`` when the server requires client certificates (mutual TLS)."""
    return client_context(ca, cert, key)


def connect(
    service: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    config: ConfigArg = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 3,
    backoff: float = 0.2,
    compression: bool = False,
    local_service: Any = rpyc.VoidService,
    token: str | None = None,
    tls: bool | ssl.SSLContext | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    stream_chunk: int | None = None,
) -> Any:
    """Connect to a service by configured name, or by ``host`` and ``port``.

    Args:
        service: a service name from the config file (``"demo"``), or None with host/port.
        config: the config file to resolve ``service`` in (path or ClientSettings).
        timeout: seconds for connecting and for each call (``sync_request_timeout``).
        retries: extra connect attempts after a refusal or timeout, ``backoff * 2**n`` apart.
        compression: zlib-compress large frames (only worth it on slow links).
        local_service: what the server may call back on this side (default: nothing but the
            callables the client passes explicitly).
        token: sent before anything else when the server has ``security.tokens``; defaults to
            ``$RPYC_HOST_TOKEN``, then to the config file's first token when connecting by name.
        tls: True (or an ``ssl.SSLContext``) to speak TLS; on by default when connecting by
            name to a config with ``security.tls``. ``ca``, ``cert``, ``key`` (or
            ``$RPYC_HOST_TLS_CA``, ``_CERT``, ``_KEY``) build the context: the CA that signed
            the server's certificate, and this client's certificate for mutual TLS.
        stream_chunk: items fetched per round trip when a method returns a stream (an
            iterator; default 1024); one stream can change it with ``.chunked(n)``.

    Returns:
        an rpyc ``Connection``; use it as a context manager, or call ``close()``. Errors the
        service raises arrive as their own type with a clean message.

    Raises:
        ConfigError: the name cannot be resolved (no config file, no such service); the message
            says what to pass.
        AuthError: the server refused the token.
        ConnectError: the service could not be reached; the message says where and why.
    """
    token = token or os.environ.get("RPYC_HOST_TOKEN") or None
    if service is not None and (host is None or port is None):
        settings = load_settings(config)
        rhost, rport = settings.address(service)
        host, port = host or rhost, port or rport
        if token is None:
            token = settings.token
        if tls is None and settings.tls:
            tls = True
    if host is None or port is None:
        raise ConfigError("connect() needs a service name, or both host= and port=")
    ca = ca or os.environ.get("RPYC_HOST_TLS_CA")
    cert = cert or os.environ.get("RPYC_HOST_TLS_CERT")
    key = key or os.environ.get("RPYC_HOST_TLS_KEY")
    context = tls if isinstance(tls, ssl.SSLContext) else None
    if context is None and (tls or ca or cert):
        context = client_context(ca, cert, key)
    if stream_chunk is not None and (type(stream_chunk) is not int or stream_chunk < 1):
        raise ConfigError(f"stream_chunk must be an int >= 1, got {stream_chunk!r}")
    try:
        return dial(
            host,
            port,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            compression=compression,
            local_service=local_service,
            token=token,
            tls=context,
            name=service,
            config={STREAM_CHUNK: stream_chunk} if stream_chunk else None,
        )
    except CredentialsRefused as exc:
        raise AuthError(str(exc)) from None
    except DialError as exc:
        raise ConnectError(str(exc)) from None


def describe(conn: Any) -> dict[str, Any]:
    """A service's ``describe()`` as a dict: ``{"service": NAME, "methods": {name: {...}}}``."""
    name, methods = conn.root.describe()
    return {
        "service": name,
        "methods": {m: {"signature": sig, "doc": doc} for m, sig, doc in methods},
    }

"""Client library for services run by rpyc-host.

Usage::

    import client

    with client.connect("demo") as conn:          # name resolved through config.yaml
        print(conn.root.add(1, 2))

    with client.connect(host="10.0.0.5", port=18861, timeout=5) as conn:
        add = conn.root.add                       # cache the bound method: one round trip per call
        total = sum(add(i, i) for i in range(100))

Connections set TCP_NODELAY, do not zlib-compress frames, time out calls after ``timeout``
seconds and retry refused or timed-out connects with exponential backoff. Plain
``rpyc.connect(host, port)`` works against the same servers too.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Any

import rpyc
from rpyc.utils.factory import connect_channel

from rpyc_host.config import Config, load_config
from rpyc_host.security import AuthError, client_handshake
from rpyc_host.transport import make_channel

__all__ = [
    "AuthError",
    "ConnectError",
    "ServicePool",
    "connect",
    "connect_service",
    "describe",
    "resolve",
    "tls_context",
]

DEFAULT_CONFIG = "config.yaml"
DEFAULT_TIMEOUT = 30.0


class ConnectError(ConnectionError):
    """No connection could be made to the service (after retries)."""


def _load(config: str | os.PathLike[str] | None) -> Config:
    return load_config(config or os.environ.get("RPYC_HOST_CONFIG", DEFAULT_CONFIG))


def resolve(service: str, config: str | os.PathLike[str] | None = None) -> tuple[str, int]:
    """The (host, port) of a configured service.

    ``config`` defaults to ``$RPYC_HOST_CONFIG`` or ``config.yaml`` in the current directory.
    A service bound to a wildcard address is reached through loopback.
    """
    path = config or os.environ.get("RPYC_HOST_CONFIG", DEFAULT_CONFIG)
    svc = _load(config).service(service)
    if not svc.port:
        raise ConnectError(
            f"service {service!r} is configured with port 0 (any free port) in "
            f"{path}; pass host= and port= with the port the server logged"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(svc.host, svc.host)
    return host, svc.port


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client TLS context: verify the server against ``ca`` (or the system store), and present
    ``cert``/``key`` when the server requires client certificates (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def connect(
    service: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    config: str | os.PathLike[str] | None = None,
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
) -> Any:
    """Connect to a service by configured name, or by ``host`` and ``port``.

    Args:
        service: a service name from the config file (``"demo"``), or None with host/port.
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

    Returns:
        an rpyc ``Connection``; use it as a context manager, or call ``close()``.

    Raises:
        ConnectError: the service could not be reached; the message says where and why.
    """
    token = token or os.environ.get("RPYC_HOST_TOKEN") or None
    if service is not None and (host is None or port is None):
        rhost, rport = resolve(service, config)
        host, port = host or rhost, port or rport
        security = _load(config).security
        if token is None and security.tokens:
            token = security.tokens[0]
        if tls is None and security.tls is not None:
            tls = True
    ca = ca or os.environ.get("RPYC_HOST_TLS_CA")
    cert = cert or os.environ.get("RPYC_HOST_TLS_CERT")
    key = key or os.environ.get("RPYC_HOST_TLS_KEY")
    context = tls if isinstance(tls, ssl.SSLContext) else None
    if context is None and (tls or ca or cert):
        context = tls_context(ca, cert, key)
    if host is None or port is None:
        raise ValueError("connect() needs a service name, or both host= and port=")
    attempt = 0
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except (ConnectionRefusedError, TimeoutError) as exc:
            if attempt >= retries:
                target = f"{service!r} at {host}:{port}" if service else f"{host}:{port}"
                raise ConnectError(
                    f"cannot connect to {target} after {attempt + 1} attempt(s): {exc.strerror or exc}"
                ) from None
            time.sleep(backoff * (2**attempt))
            attempt += 1
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    target = f"{service!r} at {host}:{port}" if service else f"{host}:{port}"
    try:
        sock.settimeout(timeout)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        if token:
            client_handshake(sock, token)
        sock.settimeout(None)
    except AuthError as exc:
        sock.close()
        raise AuthError(f"{target}: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise ConnectError(f"cannot connect to {target}: {exc}") from None
    conn_config = {
        "sync_request_timeout": timeout,
        "allow_pickle": False,
        "include_local_traceback": False,
        "include_local_version": False,
    }
    channel = make_channel(sock, compress=compression)
    conn = connect_channel(channel, service=local_service, config=conn_config)
    try:
        conn.root  # noqa: B018 - one round trip, so a refusal (limits, missing token) shows here
    except (ConnectionRefusedError, EOFError) as exc:
        conn.close()
        text = (
            str(exc).split("\n\n========= Remote Traceback")[0].strip() or "connection closed by the server"
        )
        raise ConnectError(f"{target} refused the connection: {text}") from None
    return conn


def describe(conn: Any) -> dict[str, Any]:
    """A service's ``describe()`` as a dict: ``{"service": NAME, "methods": {name: {...}}}``."""
    name, methods = conn.root.describe()
    return {
        "service": name,
        "methods": {m: {"signature": sig, "doc": doc} for m, sig, doc in methods},
    }


# Last: the pool builds on connect() above.
from .pool import ServicePool, connect_service  # noqa: E402

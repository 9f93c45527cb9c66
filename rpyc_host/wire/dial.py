"""Dial a host's service: connect with retries, TLS, the token handshake and a tuned channel.

Usage::

    conn = dial("127.0.0.1", 18861, timeout=5, token=token, tls=client_context(ca="ca.crt"))
    conn.root.add(1, 2)

What comes back is a :class:`~rpyc_host.wire.remote.WireConnection` on a
:class:`~rpyc_host.wire.transport.FastChannel` (TCP_NODELAY, no zlib unless asked), with safe
client settings (no pickling, no tracebacks or versions sent back to the server) and
``sync_request_timeout`` = ``timeout``. The first round trip (``conn.root``) is made here, so a
refusal (limits, a missing token) is raised here and not at the first call.

Error handling: :class:`~rpyc_host.wire.errors.DialError` (where and why) when no connection can
be made after ``retries`` (refused and timed-out connects are retried, ``backoff * 2**n`` apart);
:class:`~rpyc_host.wire.errors.CredentialsRefused` when the server refuses the token.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import rpyc

from . import context, tracing
from .errors import CredentialsRefused, DialError
from .handshake import client_handshake
from .remote import WireConnection, message
from .transport import make_channel

CLIENT_PROTOCOL: dict[str, Any] = {
    "allow_pickle": False,
    "include_local_traceback": False,
    "include_local_version": False,
}


def dial(
    host: str,
    port: int,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.2,
    compression: bool = False,
    local_service: Any = rpyc.VoidService,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    name: str | None = None,
    config: dict[str, Any] | None = None,
) -> WireConnection:
    """Connect to ``host:port``; see the module docstring. ``name`` only labels error messages;
    ``config`` adds rpyc connection settings."""
    target = f"{name!r} at {host}:{port}" if name else f"{host}:{port}"
    sock = _connect(host, port, timeout, retries, backoff, target)
    try:
        sock.settimeout(timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        if token:
            client_handshake(sock, token)
        sock.settimeout(None)
    except CredentialsRefused as exc:
        sock.close()
        raise CredentialsRefused(f"{target}: {exc}") from None
    except DialError as exc:
        sock.close()
        raise DialError(f"{target} refused the connection: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise DialError(f"cannot connect to {target}: {exc}") from None
    tracing.configure()  # spans only when OpenTelemetry is installed and configured
    root = local_service() if isinstance(local_service, type) else local_service
    conn_config = {
        **CLIENT_PROTOCOL,
        "sync_request_timeout": timeout,
        "peer_service": name or f"{host}:{port}",
        **(config or {}),
    }
    conn = WireConnection(root, make_channel(sock, compress=compression), conn_config)
    try:
        # The first round trip shows a refusal (limits, a missing token) here; the next ask
        # whether the peer is a host that takes call contexts in their compact form or, an
        # older host, as tuples (a stock rpyc server takes none).
        version = _version(conn, context.TEXT_MARKER)
        conn.peer_takes_text = version >= context.TEXT_IN_PAIR
        conn.peer_takes_bare_text = version >= context.TEXT_VERSION
        conn.peer_speaks_context = conn.peer_takes_text or _version(conn, context.MARKER) == context.VERSION
    except (ConnectionRefusedError, EOFError, TimeoutError) as exc:
        conn.close()
        text = message(exc) or "connection closed by the server"
        raise DialError(f"{target} refused the connection: {text}") from None
    return conn


def _version(conn: WireConnection, name: str) -> int:
    """The version the peer's root exposes as ``name``; 0 if none (or not a number)."""
    try:
        value = getattr(conn.root, name, None)
    except AttributeError:
        return 0
    return value if type(value) is int else 0


def _connect(
    host: str, port: int, timeout: float, retries: int, backoff: float, target: str
) -> socket.socket:
    attempt = 0
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except (ConnectionRefusedError, TimeoutError) as exc:
            if attempt >= retries:
                raise DialError(
                    f"cannot connect to {target} after {attempt + 1} attempt(s): {exc.strerror or exc}"
                ) from None
            time.sleep(backoff * (2**attempt))
            attempt += 1
        except OSError as exc:
            raise DialError(f"cannot connect to {target}: {exc.strerror or exc}") from None

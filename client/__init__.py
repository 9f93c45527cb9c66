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

Modules: ``connection`` (:func:`connect`), ``aio`` (the asyncio client), ``settings`` (the
light config reader), ``pool`` (instances found through a registry), ``batch`` (many calls in
one request: :func:`batch`), ``ingest`` (collectors), ``files`` (transfers), ``errors`` (the
exception tree), ``cli`` (``python -m client``).
"""

from __future__ import annotations

from rpyc_host.wire.context import current as current_context
from rpyc_host.wire.context import deadline

from . import aio
from .batch import Batch, Result, batch
from .connection import DEFAULT_TIMEOUT, connect, describe, resolve, tls_context
from .errors import (
    AuthError,
    ClientError,
    ConfigError,
    ConnectError,
    DeadlineExceeded,
    NoInstanceError,
    describe_error,
    is_remote,
)
from .pool import ServicePool, connect_service
from .settings import ClientSettings, load_settings

__all__ = [
    "DEFAULT_TIMEOUT",
    "AuthError",
    "Batch",
    "ClientError",
    "ClientSettings",
    "ConfigError",
    "ConnectError",
    "DeadlineExceeded",
    "NoInstanceError",
    "Result",
    "ServicePool",
    "aio",
    "batch",
    "connect",
    "connect_service",
    "current_context",
    "deadline",
    "describe",
    "describe_error",
    "is_remote",
    "load_settings",
    "resolve",
    "tls_context",
]

"""Which instance of a service serves a connection, or a call (``services.<name>.instance``).

- ``connection`` (the default): each connection is served by a shallow copy of the configured
  instance, made before its ``on_connect``: attributes set in ``__init__`` are shared, those
  set in ``on_connect`` or by a call belong to the connection.
- ``shared``: every connection is served by the configured instance itself. ``on_connect`` and
  ``on_disconnect`` still run once per connection, each receiving its connection, but what they
  set is seen by every connection: the service must be thread-safe. On the ``forking`` server
  the instance is shared within one child process, that is within one connection.
- ``call``: each call runs on a fresh shallow copy of the connection's instance, as its
  ``on_connect`` left it (Pyro5's "percall"): ``on_connect`` and ``on_disconnect`` run once per
  connection on the connection's copy, so what ``on_connect`` sets (an account, a connection
  id) is seen by every call, while an attribute a call sets is gone by the next call.
"""

from __future__ import annotations

import copy
import types
from typing import Any

CONNECTION, SHARED, CALL = "connection", "shared", "call"
MODES = (CALL, CONNECTION, SHARED)
# Set in a connection's config in ``call`` mode: HostConnection asks call_target() per call.
PER_CALL_KEY = "host_instance_per_call"


def connection_root(prototype: Any, mode: str) -> Any:
    """The root object one new connection is served by, for ``mode``."""
    if mode == SHARED:
        return prototype
    return copy.copy(prototype)


def call_target(root: Any, method: Any) -> Any:
    """``method`` bound to a fresh copy of ``root`` when it is one of ``root``'s own methods;
    anything else (a live object the service handed out, a callable) is called as it is."""
    if getattr(method, "__self__", None) is root and isinstance(method, types.MethodType):
        return types.MethodType(method.__func__, copy.copy(root))
    return method

"""XML-RPC and JSON-RPC 2.0 over HTTP for the host's services (the ``gateway:`` config section).

Modules, one job each:

- ``server``: the listener, a thread per keep-alive connection, auth, TLS, shutdown;
- ``http``: HTTP/1.1 requests parsed by httptools (llhttp), responses written in one send;
- ``calls``: the method catalog, sessions, value rules, error codes; ``links``: in-process calls
  (rpyc for forking services); ``auth``: Bearer tokens with the host's shared login throttle;
- ``xmlrpc`` / ``jsonrpc``: the two wire formats; ``introspection``: ``system.*``.

See docs/gateway.md for the user's view.
"""

from __future__ import annotations

from .server import Gateway

__all__ = ["Gateway"]

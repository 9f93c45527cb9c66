"""XML-RPC and JSON-RPC 2.0 over HTTP for the host's services (the ``gateway:`` config section).

Modules, one job each:

- ``server``: the listener, a thread per keep-alive connection, auth, TLS, shutdown;
- ``http``: the minimal HTTP/1.1 request parser and response writer;
- ``calls``: the method catalog, the rpyc sessions to the services, value rules, error codes;
- ``xmlrpc`` / ``jsonrpc``: the two wire formats; ``introspection``: ``system.*``.

See docs/gateway.md for the user's view.
"""

from __future__ import annotations

from .server import Gateway

__all__ = ["Gateway"]

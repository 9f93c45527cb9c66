"""rpyc_host: run RPyC services from a YAML file, securely and fast.

The pieces, one module each: ``config`` (validated settings), ``exposure`` (classes to
services), ``servers`` (threaded, threadpool, forking), ``transport`` (tuned channels),
``protocol`` (safe rpyc settings), ``batching`` and ``oneway_calls`` (batched and one-way
calls; services mark one-way methods with ``rpyc_host.oneway``), ``host`` (start and graceful
stop), ``classic`` (debug console), ``cli`` (``server.py``).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .oneway_calls import oneway

__all__ = ["oneway"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``rpyc_host.oneway`` for services, loaded on first use: a client that imports only
    # rpyc_host.wire loads no host code.
    if name == "oneway":
        from .oneway_calls import oneway

        return oneway
    raise AttributeError(f"module 'rpyc_host' has no attribute {name!r}")

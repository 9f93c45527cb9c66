"""The three server types: ``threaded``, ``threadpool`` and ``forking``.

All three are rpyc ``Server`` subclasses sharing :class:`~.base.HostServerMixin`: admission
(connection limits, throttled addresses), the TLS/token handshake, tuned channels (TCP_NODELAY,
no zlib, a frame size limit), a per-connection copy of the service, connection ids, idle and
stall timeouts, a count of requests in flight, and a graceful stop.
"""

from .base import HostServerMixin, ServerSettings
from .forking import HostForkingServer
from .threaded import HostThreadedServer
from .threadpool import HostThreadPoolServer

SERVER_TYPES: dict[str, type[HostServerMixin]] = {
    "forking": HostForkingServer,
    "threaded": HostThreadedServer,
    "threadpool": HostThreadPoolServer,
}

__all__ = [
    "SERVER_TYPES",
    "HostForkingServer",
    "HostServerMixin",
    "HostThreadPoolServer",
    "HostThreadedServer",
    "ServerSettings",
]

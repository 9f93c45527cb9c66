"""``threaded``: rpyc's ThreadedServer, one thread per connection."""

from __future__ import annotations

import socket
import threading
from typing import Any

import rpyc
from rpyc.utils.server import ThreadedServer

from .base import HostServerMixin, ServerSettings


class HostThreadedServer(HostServerMixin, ThreadedServer):
    """A thread per connection: the handshake and every call run in it."""

    def __init__(self, service: rpyc.Service, settings: ServerSettings, **kwargs: Any) -> None:
        ThreadedServer.__init__(self, service, **kwargs)
        self._host_setup(settings)

    def _start_connection(self, sock: socket.socket, peer: Any) -> None:
        thread = threading.Thread(
            target=self._handle, args=(sock, peer), name=f"{self.name}-conn", daemon=True
        )
        thread.start()

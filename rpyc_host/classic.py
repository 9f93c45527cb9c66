"""rpyc's classic console inside the host process, for inspecting live services.

Classic mode gives a client the whole interpreter (``conn.modules``, ``conn.eval``,
``conn.execute``): it is remote code execution by design. It is off by default, listens only on
loopback (enforced when the config is validated), and logs every session with its peer.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import rpyc
from rpyc.utils.authenticators import SSLAuthenticator
from rpyc.utils.server import ThreadedServer

from .config import TLSSection, is_loopback

log = logging.getLogger("rpyc_host.classic")


class LoggedSlaveService(rpyc.SlaveService):
    """``SlaveService`` that logs who connected and for how long."""

    def on_connect(self, conn: Any) -> None:
        super().on_connect(conn)
        self._peer = conn._config.get("endpoints", (None, None))[1]
        log.warning("classic console session opened by %s", self._peer)

    def on_disconnect(self, conn: Any) -> None:
        log.warning("classic console session closed by %s", self._peer)
        super().on_disconnect(conn)


class ClassicConsole:
    """A ThreadedServer serving ``SlaveService`` on a loopback address."""

    def __init__(self, host: str, port: int, tls: TLSSection | None = None) -> None:
        mutual = tls is not None and tls.ca is not None
        if not is_loopback(host) and not mutual:
            raise ValueError(
                f"refusing to serve the classic console on non-loopback {host!r} without mutual TLS"
            )
        authenticator = None
        if mutual and tls is not None:
            # Only holders of a client certificate from the configured CA get a console.
            authenticator = SSLAuthenticator(tls.key, tls.cert, ca_certs=tls.ca, cert_reqs=ssl.CERT_REQUIRED)
        self.server = ThreadedServer(
            LoggedSlaveService,
            hostname=host,
            port=port,
            ipv6=":" in host,
            logger=log,
            authenticator=authenticator,
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    def start(self) -> None:
        self.server._listen()  # rpyc's ThreadedServer: bind now, so the address is known
        self._thread = threading.Thread(target=self.server.start, name="classic-accept", daemon=True)
        self._thread.start()
        log.warning("classic console (remote code execution, for debugging) on %s:%d", *self.address)

    def close(self) -> None:
        self.server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

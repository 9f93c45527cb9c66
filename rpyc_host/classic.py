"""rpyc's classic console inside the host process, for inspecting live services.

Classic mode gives a client the whole interpreter (``conn.modules``, ``conn.eval``,
``conn.execute``): it is remote code execution by design. It is off by default and logs every
session with its peer. Where it may listen is decided by :func:`check_console` alone (config
validation and the console both call it): on loopback, or anywhere with
``allow_remote: true`` and a ``ca`` of its own, whose client certificates alone open a console
(never the services' CA: a certificate for calling services must not give code execution).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Any

import rpyc
from rpyc.utils.authenticators import SSLAuthenticator
from rpyc.utils.server import ThreadedServer

from . import inherited
from .config import ClassicSection, TLSSection, is_loopback
from .errors import ConfigError

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


def check_console(section: ClassicSection, tls: TLSSection | None) -> None:
    """The rule for where the classic console may listen and who may open it.

    A loopback host is always allowed. Any other host needs ``debug.classic.allow_remote: true``
    and ``debug.classic.ca``. A ``ca`` (on any host) must be a readable file other than
    ``security.tls.ca``, and needs ``security.tls`` cert and key: the console serves TLS with
    them and requires a client certificate from its own CA.

    Raises:
        ConfigError: one line naming the key and saying what to add.
    """
    host = section.host
    if not is_loopback(host):
        risk = f"{host!r} is not a loopback address, and the classic console runs any code a client sends"
        if not section.allow_remote:
            raise ConfigError(
                f"{risk}: listen on 127.0.0.1, or add debug.classic.allow_remote: true and "
                "debug.classic.ca (a CA of the console's own for its client certificates)",
                path="debug.classic.host",
            )
        if section.ca is None:
            raise ConfigError(
                f"{risk}: add debug.classic.ca (a CA of the console's own; only its client "
                "certificates open a console)",
                path="debug.classic.host",
            )
    if section.ca is None:
        return
    if not Path(section.ca).is_file():
        raise ConfigError(f"{section.ca!r} is not a readable file", path="debug.classic.ca")
    if tls is None:
        raise ConfigError(
            "the console's TLS needs a server certificate: add security.tls with cert and key",
            path="debug.classic.ca",
        )
    if tls.ca is not None and os.path.samefile(section.ca, tls.ca):
        raise ConfigError(
            f"{section.ca!r} is also security.tls.ca; give the console a CA of its own, so a "
            "client certificate for the services does not open a console",
            path="debug.classic.ca",
        )


class ClassicConsole:
    """A ThreadedServer serving ``SlaveService`` where :func:`check_console` allows it."""

    def __init__(self, section: ClassicSection, tls: TLSSection | None = None) -> None:
        check_console(section, tls)
        host = section.host
        authenticator = None
        if section.ca is not None and tls is not None:
            # Only holders of a client certificate from the console's own CA get a console.
            authenticator = SSLAuthenticator(
                tls.key, tls.cert, ca_certs=section.ca, cert_reqs=ssl.CERT_REQUIRED
            )
        self.server = ThreadedServer(
            LoggedSlaveService,
            hostname=host,
            port=section.port,
            ipv6=":" in host,
            logger=log,
            authenticator=authenticator,
        )
        self._thread: threading.Thread | None = None
        inherited.hold(self)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    def close_in_child(self) -> None:
        """In a forked connection process: the listener's and the console connections' copies go
        (see :mod:`.inherited`)."""
        self.server.listener.close()
        for sock in list(self.server.clients):
            sock.close()

    def start(self) -> None:
        self.server._listen()  # rpyc's ThreadedServer: bind now, so the address is known
        self._thread = threading.Thread(target=self.server.start, name="classic-accept", daemon=True)
        self._thread.start()
        log.warning("classic console (remote code execution, for debugging) on %s:%d", *self.address)

    def close(self) -> None:
        self.server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

"""The gateway's listener: accepts HTTP connections and serves each on its own thread.

A thread per keep-alive connection, as ``ThreadingMixIn`` does, but each thread keeps its
connection's rpyc sessions (:class:`~.calls.Session`) for the connection's whole life, so a call
costs one HTTP round trip plus one rpyc round trip, and never a reconnect.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Config, TLSSection
from ..errors import StartupError
from ..security import server_tls_context
from ..wire import dial
from ..wire.transport import tune_socket
from . import jsonrpc, xmlrpc
from .calls import Catalog, Session
from .http import ClientGone, HTTPConnection, HTTPError, Request

if TYPE_CHECKING:
    from ..host import Host

log = logging.getLogger("rpyc_host.gateway")

Handler = Callable[[bytes, Session], "bytes | None"]
# Paths to protocols. "/" is XML-RPC too: clients in other languages often post there.
ROUTES: dict[str, tuple[Handler, str]] = {
    "/RPC2": (xmlrpc.handle, xmlrpc.CONTENT_TYPE),
    "/": (xmlrpc.handle, xmlrpc.CONTENT_TYPE),
    "/jsonrpc": (jsonrpc.handle, jsonrpc.CONTENT_TYPE),
}
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class _Peer:
    """One HTTP connection being served: its socket and whether it is between requests."""

    __slots__ = ("idle", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle = True


class Gateway:
    """XML-RPC and JSON-RPC over HTTP for the services in ``config.gateway.services``.

    Usage (the host does this when ``gateway.enabled``)::

        gateway = Gateway(config, host)   # binds, or raises StartupError
        gateway.start()                   # accepts on a thread; logs "gateway on HOST:PORT"
        print(gateway.address)            # the real (host, port), also with port 0
        gateway.close()                   # stop accepting, finish calls in flight, disconnect
    """

    def __init__(self, config: Config, host: Host) -> None:
        self.section = config.gateway
        self.grace_period = config.grace_period
        hosted = {h.config.name: h for h in host.hosted}
        missing = [name for name in self.section.services if name not in hosted]
        if missing:
            raise StartupError(f"gateway.services: {', '.join(map(repr, missing))} not running in this host")
        self.catalog = Catalog((name, type(hosted[name].service)) for name in self.section.services)
        self._targets = {}
        for name in self.section.services:
            bound_host, port = host.address(name)
            self._targets[name] = (_WILDCARDS.get(bound_host, bound_host), port)
        self._max_connections = max(
            [hosted[name].config.limits.max_connections for name in self.section.services] or [1000]
        )
        self._tokens = tuple(t.encode() for t in config.security.tokens)
        tls = config.security.tls
        self._ssl = _server_context(config) if tls else None
        # Backend connections authenticate like any client: the first token, and TLS pinned to
        # the host's own certificate (the services listen with it).
        self._connect_extra: dict[str, Any] = {}
        if config.security.tokens:
            self._connect_extra["token"] = config.security.tokens[0]
        if tls:
            self._connect_extra["tls"] = _backend_context(tls)
        self._sock = _listen(self.section.host, self.section.port, self.section.backlog)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._peers: set[_Peer] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="gateway-accept", daemon=True)
        self._thread.start()
        log.info(
            "gateway on %s:%d (%s; XML-RPC at /RPC2, JSON-RPC at /jsonrpc; services: %s%s)",
            self.address[0],
            self.address[1],
            "https" if self._ssl else "http",
            ", ".join(self.section.services) or "(none)",
            "; Bearer tokens required" if self._tokens else "",
        )

    def close(self, grace: float | None = None) -> None:
        """Stop accepting; close idle connections; let requests in flight finish (up to the grace
        period), then close the rest. Every connection's rpyc sessions are closed."""
        grace = self.grace_period if grace is None else grace
        with self._lock:
            if self._closing:
                return
            self._closing = True
            peers = list(self._peers)
        _shutdown(self._sock)
        self._sock.close()
        for peer in peers:
            if peer.idle:
                _shutdown(peer.sock)
        deadline = time.monotonic() + grace
        with self._idle:
            while self._peers and self._idle.wait(max(0.0, deadline - time.monotonic())):
                pass
            left = list(self._peers)
        for peer in left:
            _shutdown(peer.sock)
        with self._idle:
            self._idle.wait_for(lambda: not self._peers, timeout=5.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        log.info("gateway closed")

    # -- serving -----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _addr = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                # Out of descriptors or similar: say so and give the system a moment.
                log.warning("gateway: accept failed: %s", exc)
                time.sleep(0.05)
                continue
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                crowded = len(self._peers) >= self._max_connections
                peer = _Peer(sock)
                if not crowded:
                    self._peers.add(peer)
            if crowded:
                log.warning("gateway: %d connections open; refusing one (503)", self._max_connections)
                threading.Thread(target=_refuse, args=(sock,), daemon=True).start()
                continue
            threading.Thread(target=self._serve, args=(peer,), name="gateway-conn", daemon=True).start()

    def _serve(self, peer: _Peer) -> None:
        sock = peer.sock
        session = Session(self.catalog, self._backend)
        try:
            tune_socket(sock)
            sock.settimeout(self.section.timeout)
            if self._ssl is not None:
                sock = peer.sock = self._ssl.wrap_socket(sock, server_side=True)
            http = HTTPConnection(sock, self.section.max_body_bytes)
            while not self._closing:
                peer.idle = True
                request = http.read_request()
                peer.idle = False
                status, body, content_type, headers = self._respond(request, session)
                keep = request.keep_alive and not self._closing
                http.send_response(status, body, content_type, keep, request.version, headers)
                if not keep:
                    break
        except HTTPError as exc:
            peer.idle = False
            try:
                http.send_response(
                    exc.status,
                    f"{exc.message}\n".encode(),
                    "text/plain; charset=utf-8",
                    False,
                    headers=exc.headers,
                )
            except OSError:
                pass
            http.linger_close()
        except (ClientGone, OSError, ssl.SSLError):
            pass
        finally:
            session.close()
            try:
                sock.close()
            except OSError:
                pass
            with self._idle:
                self._peers.discard(peer)
                self._idle.notify_all()

    def _respond(self, request: Request, session: Session) -> tuple[int, bytes, str, dict[str, str]]:
        if self._tokens and not self._authorized(request.headers.get("authorization", "")):
            raise HTTPError(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": 'Bearer realm="rpyc-host"'},
            )
        route = ROUTES.get(request.path)
        if route is None:
            return (
                404,
                f"no such path {request.path!r}; XML-RPC is at /RPC2, JSON-RPC at /jsonrpc\n".encode(),
                "text/plain; charset=utf-8",
                {},
            )
        if request.method != "POST":
            return 405, b"use POST\n", "text/plain; charset=utf-8", {"Allow": "POST"}
        handler, content_type = route
        body = handler(request.body, session)
        if body is None:
            return 204, b"", content_type, {}
        return 200, body, content_type, {}

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare with every token, always, so the time taken does not say which one was close.
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(given, expected)
        return ok

    def _backend(self, service: str) -> Any:
        host, port = self._targets[service]
        return dial(host, port, timeout=self.section.timeout, retries=1, **self._connect_extra)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"gateway: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _server_context(config: Config) -> ssl.SSLContext | None:
    tls = config.security.tls
    assert tls is not None
    try:
        return server_tls_context(config.security)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"gateway: cannot use security.tls ({tls.cert!r}, {tls.key!r}): {exc}") from None


def _backend_context(tls: TLSSection) -> ssl.SSLContext:
    """The client side of the gateway's connections to its own services.

    The services present ``tls.cert``: it is trusted as it is (a partial chain), so a
    certificate signed by a CA the config does not name still verifies; the host name is not
    checked because the address is the one the service bound. With ``tls.ca`` (mutual TLS) the
    gateway presents the same certificate as its client certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(tls.cert)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _refuse(sock: socket.socket) -> None:
    http = HTTPConnection(sock, 0)
    try:
        sock.settimeout(2.0)
        http.send_response(503, b"too many connections; try again later\n", "text/plain", False)
    except OSError:
        pass
    http.linger_close()

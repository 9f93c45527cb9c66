"""The gateway's listener: accepts HTTP connections and serves each on its own thread.

A thread per keep-alive connection, as ``ThreadingMixIn`` does. Admission (at accept, before
anything is read): at most the services' ``limits.max_connections`` connections in all and
``gateway.max_connections_per_ip`` from one address, others get 503 with the limit named. Each
connection keeps its :class:`~.calls.Session` for its whole life: calls run in this process
(:class:`~.links.LocalLink`), or over rpyc for a ``forking`` service (:class:`~.links.RemoteLink`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import inherited
from ..config import Config, TLSSection
from ..errors import StartupError
from ..refusal_log import RefusalLog
from ..security import closer, server_tls_context
from ..wire import context
from ..wire.transport import tune_socket
from . import jsonrpc, xmlrpc
from .auth import Doorman
from .calls import Catalog, Link, Session
from .deadlines import CONTEXT_HEADERS, context_of
from .http import ClientGone, HTTPConnection, HTTPError, Request, plain_response
from .links import LocalLink, RemoteLink

if TYPE_CHECKING:
    from ..host import Host, Hosted

log = logging.getLogger("rpyc_host.gateway")

Handler = Callable[[bytes, Session], "bytes | None"]
# Paths to protocols. "/" is XML-RPC too: clients in other languages often post there.
ROUTES: dict[str, tuple[Handler, str]] = {
    "/RPC2": (xmlrpc.handle, xmlrpc.CONTENT_TYPE),
    "/": (xmlrpc.handle, xmlrpc.CONTENT_TYPE),
    "/jsonrpc": (jsonrpc.handle, jsonrpc.CONTENT_TYPE),
}
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_TEXT = "text/plain; charset=utf-8"
_CONTEXT_HEADERS = frozenset(CONTEXT_HEADERS)


class _Peer:
    """One HTTP connection being served: its socket, address and whether it is between requests."""

    __slots__ = ("address", "idle", "ip", "sock")

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address: tuple[str, int] = (str(address[0]), int(address[1])) if address else ("?", 0)
        self.ip = self.address[0]
        self.idle = True


class Gateway:
    """XML-RPC and JSON-RPC over HTTP for the services in ``config.gateway.services``.

    Usage (the host does this when ``gateway.enabled``)::

        gateway = Gateway(config, host)   # binds, or raises StartupError
        gateway.start()                   # accepts on a thread; logs "gateway on HOST:PORT"
        print(gateway.address)            # the real (host, port), also with port 0
        gateway.close()                   # stop accepting, finish calls in flight, disconnect

    ``refusals`` counts refused connections and requests by reason (``/metrics``).
    """

    def __init__(self, config: Config, host: Host) -> None:
        self.section = config.gateway
        self.grace_period = config.grace_period
        hosted = {h.config.name: h for h in host.hosted}
        missing = [name for name in self.section.services if name not in hosted]
        if missing:
            raise StartupError(f"gateway.services: {', '.join(map(repr, missing))} not running in this host")
        self._hosted: dict[str, Hosted] = {name: hosted[name] for name in self.section.services}
        self.catalog = Catalog((name, type(h.service)) for name, h in self._hosted.items())
        self._calls = host.calls
        self._max_connections = max(
            [h.config.limits.max_connections for h in self._hosted.values()] or [1000]
        )
        self._max_per_ip = self.section.max_connections_per_ip
        self.doorman = Doorman(config.security.tokens, host.throttle)
        tls = config.security.tls
        self._ssl = _server_context(config) if tls else None
        # A forking service is reached over rpyc, authenticating like any client: the first
        # token, and TLS pinned to the host's own certificate (the services listen with it).
        self._remote: dict[str, tuple[tuple[str, int], str | None, ssl.SSLContext | None]] = {}
        for name, h in self._hosted.items():
            if h.config.type == "forking":
                bound_host, port = h.address
                self._remote[name] = (
                    (_WILDCARDS.get(bound_host, bound_host), port),
                    config.security.tokens[0] if config.security.tokens else None,
                    _backend_context(tls) if tls else None,
                )
        self._sock = _listen(self.section.host, self.section.port, self.section.backlog)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._peers: set[_Peer] = set()
        self._per_ip: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self._refusal_log = RefusalLog(log)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        inherited.hold(self)

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
            "; Bearer tokens required" if self.doorman.needed else "",
        )

    def close(self, grace: float | None = None) -> None:
        """Stop accepting; close idle connections; let requests in flight finish (up to the grace
        period), then close the rest. Every connection's sessions are closed."""
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

    def close_in_child(self) -> None:
        """In a forked connection process: the listener's and every HTTP connection's copy go
        (see :mod:`..inherited`); the parent's sockets stay as they are."""
        self._sock.close()
        for peer in list(self._peers):
            peer.sock.close()

    def open_connections(self, ip: str | None = None) -> int:
        """HTTP connections being served, in all or from one address."""
        with self._lock:
            return len(self._peers) if ip is None else self._per_ip.get(ip, 0)

    def refusal_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.refusals)

    def _count(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    # -- admission ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                # Out of descriptors or similar: say so and give the system a moment.
                log.warning("gateway: accept failed: %s", exc)
                time.sleep(0.05)
                continue
            peer = _Peer(sock, addr)
            if self._blocked_at_accept(peer):
                continue
            refusal = ""
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                if len(self._peers) >= self._max_connections:
                    refusal, reason = (
                        f"the gateway is at its connection limit ({self._max_connections}, the services' "
                        "limits.max_connections); try again later",
                        "max_connections",
                    )
                elif self._per_ip[peer.ip] >= self._max_per_ip:
                    refusal, reason = (
                        f"too many connections from {peer.ip} (gateway.max_connections_per_ip: "
                        f"{self._max_per_ip}); close some and retry",
                        "max_connections_per_ip",
                    )
                else:
                    self._peers.add(peer)
                    self._per_ip[peer.ip] += 1
                if refusal:
                    self.refusals[reason] += 1
            if refusal:
                self._refusal_log.refused(
                    peer.ip, reason, "gateway: refused a connection from %s:%d: %s", *peer.address, refusal
                )
                # The answer fits the empty send buffer; the shared closer drains and closes the
                # socket later, so a flood of refusals costs no thread each.
                closer().close_after(sock, plain_response(503, refusal))
                continue
            threading.Thread(target=self._serve, args=(peer,), name="gateway-conn", daemon=True).start()

    def _blocked_at_accept(self, peer: _Peer) -> bool:
        """Answer 429 at once to an address the login throttle blocks: no thread, no parsing.

        Over plain HTTP only: behind TLS the answer needs a handshake, so the connection's own
        thread answers it after the handshake (``Doorman.screen`` per request)."""
        if self._ssl is not None or not self.doorman.needed:
            return False
        try:
            self.doorman.screen(peer.ip)
        except HTTPError as exc:
            self._count(exc.reason)
            closer().close_after(peer.sock, plain_response(exc.status, exc.message, exc.headers))
            return True
        return False

    # -- serving -----------------------------------------------------------------------------------

    def _serve(self, peer: _Peer) -> None:
        sock = peer.sock
        session = Session(self.catalog, lambda service: self._open_link(service, peer, sock, session))
        http: HTTPConnection | None = None
        try:
            tune_socket(sock)
            if self._ssl is not None:
                sock.settimeout(self.section.request_timeout)
                sock = peer.sock = self._ssl.wrap_socket(sock, server_side=True)
            http = HTTPConnection(
                sock, self.section.max_body_bytes, self.section.timeout, self.section.request_timeout
            )
            while not self._closing:
                peer.idle = True
                request = http.read_request()
                peer.idle = False
                status, body, content_type, headers = self._respond(request, session, peer)
                keep = request.keep_alive and not self._closing
                http.send_response(status, body, content_type, keep, request.version, headers)
                if not keep:
                    break
        except HTTPError as exc:
            peer.idle = False
            self._count(exc.reason)
            assert http is not None
            try:
                http.send_response(exc.status, f"{exc.message}\n".encode(), _TEXT, False, headers=exc.headers)
            except OSError:
                pass
            http.linger_close()
        except (ClientGone, OSError, ssl.SSLError):
            pass
        except Exception:
            # A gateway bug: the connection ends with a 500, the server and its other clients do not.
            log.exception("gateway: serving %s:%d failed", *peer.address)
            if http is not None:
                try:
                    http.send_response(
                        500, b"internal error in the gateway (see the server log)\n", _TEXT, False
                    )
                except OSError:
                    pass
        finally:
            session.close()
            try:
                # Shut down, not only closed: a copy of the descriptor elsewhere (a process forked
                # meanwhile) must not keep the connection open for the client.
                _shutdown(sock)
                sock.close()
            except OSError:
                pass
            with self._idle:
                self._peers.discard(peer)
                self._per_ip[peer.ip] -= 1
                if self._per_ip[peer.ip] <= 0:
                    del self._per_ip[peer.ip]
                self._idle.notify_all()

    def _respond(
        self, request: Request, session: Session, peer: _Peer
    ) -> tuple[int, bytes, str, dict[str, str]]:
        doorman = self.doorman
        if doorman.needed:
            doorman.screen(peer.ip)
            doorman.check(peer.ip, peer.address[1], request.headers.get("authorization", ""))
            if not session.authenticated:
                session.authenticated = True
                doorman.succeeded(peer.ip)
        headers = request.headers
        # A request that names no deadline, trace or id costs nothing here: its calls run with
        # the connection's own defaults, as before.
        ctx = None if _CONTEXT_HEADERS.isdisjoint(headers) else context_of(headers)
        session.trace = (ctx.traceparent, ctx.tracestate) if ctx is not None else (None, None)
        route = ROUTES.get(request.path)
        if route is None:
            return (
                404,
                f"no such path {request.path!r}; XML-RPC is at /RPC2, JSON-RPC at /jsonrpc\n".encode(),
                _TEXT,
                {},
            )
        if request.method != "POST":
            return 405, b"use POST\n", _TEXT, {"Allow": "POST"}
        handler, content_type = route
        if ctx is None:
            body = handler(request.body, session)
            return (204, b"", content_type, {}) if body is None else (200, body, content_type, {})
        session.deadline_hit = False
        with context.use(ctx):
            body = handler(request.body, session)
        # A deadline that passed is the HTTP answer too (the body says which call ran out).
        status = 504 if session.deadline_hit or ctx.expired() else 200
        if body is None:
            return (504, b"", content_type, {}) if status == 504 else (204, b"", content_type, {})
        return status, body, content_type, {"X-Request-Id": ctx.request_id or ""}

    def _open_link(self, service: str, peer: _Peer, sock: socket.socket, session: Session) -> Link:
        remote = self._remote.get(service)
        if remote is not None:
            address, token, tls = remote
            return RemoteLink(service, address, self.section.timeout, token, tls)
        credentials: dict[str, Any] = {}
        if self.doorman.needed:
            credentials["token"] = True
        if isinstance(sock, ssl.SSLSocket):
            cert: Any = sock.getpeercert()
            if cert:
                credentials["subject"] = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
        try:
            local = sock.getsockname()[:2]
        except OSError:
            local = ("?", 0)
        return LocalLink(
            self._hosted[service],
            peer.address,
            local,
            credentials or None,
            self._calls,
            lambda: session.trace,
        )


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

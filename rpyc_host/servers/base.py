"""What every host server adds to rpyc's ``Server``.

A connection goes through three stages:

1. **admission** (accept thread, cheap): connection limits and throttled addresses; a refused
   client is told why (see :mod:`rpyc_host.security`) and closed from a background thread;
2. **handshake** (the connection's own thread, process or pool worker): TLS and token;
3. **serving**: a per-connection copy of the service on a tuned channel, until the client
   leaves, stays silent for ``idle_timeout``, stalls mid-frame for ``handshake_timeout``, or
   the server stops.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import rpyc
from rpyc.core.stream import ClosedFile

from .. import logs
from ..budget import CONFIG_KEY, Ledger, caps_from_limits
from ..config import LimitsSection, SecurityConfig
from ..errors import Refused
from ..instances import CALL, CONNECTION, PER_CALL_KEY, connection_root
from ..oneway_calls import BOOK_KEY, OnewayBook
from ..protocol import NO_WAIT, SAFE_PROTOCOL, HostConnection, InflightTracker
from ..security import Gatekeeper, closer
from ..wire.handshake import rpyc_refusal_frame
from ..wire.transport import FastChannel, tune_socket
from .stream import ServingSocketStream

_CONN_IDS = itertools.count(1)
# Every live host server, so a forked child can drop the sockets it inherited from the others.
LIVE: weakref.WeakSet[HostServerMixin] = weakref.WeakSet()


@dataclass(frozen=True)
class ServerSettings:
    """Everything a host server needs beyond rpyc's own constructor arguments."""

    name: str
    limits: LimitsSection
    gatekeeper: Gatekeeper
    compression: bool = False
    pool_size: int = 16
    grace_period: float = 10.0
    calls: Any = None  # a rpyc_host.metrics.CallBook when metrics are on
    instance: str = CONNECTION  # services.<name>.instance (rpyc_host.instances)


class HostServerMixin:
    """Admission, handshake, tuned connections and graceful stop; see the module docstring."""

    # Set by rpyc's Server.__init__.
    service: rpyc.Service
    listener: socket.socket
    logger: logging.Logger
    protocol_config: dict[str, Any]
    clients: set[socket.socket]
    active: bool
    host: str
    port: int

    if TYPE_CHECKING:  # provided by rpyc's Server, which every host server also derives from

        def _listen(self) -> None: ...
        def accept(self) -> None: ...
        def close(self) -> None: ...

    def _host_setup(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.limits = settings.limits
        self.gatekeeper = settings.gatekeeper
        self.tracker = InflightTracker()
        self.ledger = Ledger(settings.name, caps_from_limits(settings.limits))
        self.oneway = OnewayBook()
        self.connections: set[HostConnection] = set()
        self._conn_lock = threading.Lock()
        self._per_ip: Counter[str] = Counter()
        self._admitted = 0
        self.total_admitted = 0
        self.protocol_config = {
            **SAFE_PROTOCOL,
            **self.protocol_config,
            "sync_request_timeout": settings.limits.call_timeout,
            "host_tracker": self.tracker,
            "host_logger": self.logger,
            "host_calls": settings.calls,
            "host_service": settings.name,
            "host_server": self,
            BOOK_KEY: self.oneway,
        }
        if not any(isinstance(f, RpycChatter) for f in self.logger.filters):
            self.logger.addFilter(RpycChatter())
        # Accepted sockets inherit TCP_NODELAY from the listener on Linux; set it on both anyway.
        tune_socket(self.listener)
        LIVE.add(self)

    # -- admission (accept thread) -----------------------------------------------------------------

    def _accept_method(self, sock: socket.socket) -> None:
        peer = _peer(sock)
        try:
            self._admit(peer)
        except Refused as refusal:
            self.clients.discard(sock)
            self.gatekeeper.refuse(sock, refusal, peer)
            return
        self._start_connection(sock, peer)

    def _admit(self, peer: Any) -> None:
        ip = str(peer[0])
        self.gatekeeper.screen(ip)
        with self._conn_lock:
            if self._admitted >= self.limits.max_connections:
                raise Refused(
                    f"max_connections ({self.limits.max_connections}) reached",
                    f"{self.name!r} is at its connection limit ({self.limits.max_connections}); retry later",
                    "limit",
                )
            if self._per_ip[ip] >= self.limits.max_connections_per_ip:
                raise Refused(
                    f"max_connections_per_ip ({self.limits.max_connections_per_ip}) reached",
                    f"too many connections from {ip} to {self.name!r} "
                    f"(limit {self.limits.max_connections_per_ip}); close some and retry",
                    "limit",
                )
            self._admitted += 1
            self.total_admitted += 1
            self._per_ip[ip] += 1

    def _release(self, peer: Any) -> None:
        ip = str(peer[0])
        with self._conn_lock:
            self._admitted -= 1
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

    @property
    def admitted(self) -> int:
        return self._admitted

    def _start_connection(self, sock: socket.socket, peer: Any) -> None:
        raise NotImplementedError

    def waiting(self, conn: HostConnection) -> AbstractContextManager[object]:
        """Held while a request waits on its client; a thread or process per connection loses
        nothing by waiting, so nothing to do (the thread pool hands the worker's place over)."""
        return NO_WAIT

    # -- handshake and connection ------------------------------------------------------------------

    def _new_connid(self) -> str:
        return f"{self.name}-{next(_CONN_IDS)}"

    def _open(self, sock: socket.socket, peer: Any, connid: str | None = None) -> HostConnection | None:
        """Handshake and build the rpyc connection; None (already refused and logged) on failure."""
        credentials = None
        if self.gatekeeper.needed:
            try:
                sock, credentials = self.gatekeeper.handshake(sock)
            except Refused as refusal:
                self.gatekeeper.refuse(sock, refusal, peer)
                return None
        try:
            return self._build_connection(sock, peer, connid, credentials)
        except OnConnectFailed:
            return None  # logged, and the client told why
        except Exception:
            self.logger.exception("could not set up a connection from %s:%s", *peer[:2])
            sock.close()
            return None

    def _build_connection(
        self, sock: socket.socket, peer: Any, connid: str | None = None, credentials: Any = None
    ) -> HostConnection:
        # A peer silent mid-frame (or not reading a reply) must not hold its thread or worker
        # forever: the stream bounds such waits by handshake_timeout itself (a socket timeout
        # would make CPython poll() before every send). It makes a TLS socket non-blocking.
        sock.settimeout(None)
        connid = connid or self._new_connid()
        config = dict(
            self.protocol_config,
            connid=connid,
            credentials=credentials,
            endpoints=(sock.getsockname(), peer),
            logger=self.logger,
        )
        account = config[CONFIG_KEY] = self.ledger.open_account(connid)
        config["host_opened_at"] = time.monotonic()
        root = connection_root(self.service, self.settings.instance)
        if self.settings.instance == CALL:
            config[PER_CALL_KEY] = True
        tune_socket(sock)
        channel = CountingChannel(
            ServingSocketStream(sock, self.limits.handshake_timeout),
            compress=self.settings.compression,
            max_frame=self.limits.max_frame_bytes,
        )
        config["host_traffic"] = channel
        try:
            conn: HostConnection = root._connect(channel, config)  # runs the service's on_connect
        except Exception as exc:
            account.close()
            # The half-built rpyc Connection closes its stream when collected: detach the socket
            # first, so only the refusal closer (which owns it from here) ever closes it.
            channel.stream.sock = ClosedFile
            self._refuse_after_on_connect(sock, peer, exc)
            raise OnConnectFailed from None
        with self._conn_lock:
            self.connections.add(conn)
        how = f" ({', '.join(sorted(credentials))})" if credentials else ""
        self.logger.info("connected%s", how, extra=_conn_extra(connid, peer))
        return conn

    def _refuse_after_on_connect(self, sock: socket.socket, peer: Any, exc: Exception) -> None:
        """The service's on_connect raised: log it once, and answer the client's first request
        with the reason (plain rpyc clients read it too) instead of resetting the connection."""
        reason = f"{type(exc).__name__}: {exc}"
        self.gatekeeper.refusals.add("on_connect", self.name)
        self.logger.warning("refused the connection: on_connect raised %s", reason)
        self.logger.debug("on_connect traceback", exc_info=exc)
        closer().close_after(sock, rpyc_refusal_frame(f"{self.name} refused the connection: {reason}"))

    def _forget(self, conn: HostConnection) -> None:
        with self._conn_lock:
            if conn not in self.connections:
                return  # already forgotten (and its closing logged)
            self.connections.discard(conn)
        self._log_disconnected(conn)
        account = conn._config.get(CONFIG_KEY)
        if account is not None:
            account.close()  # whatever the connection still held goes back to the service

    def _handle(self, sock: socket.socket, peer: Any, connid: str | None = None) -> None:
        """A connection's whole life, in its own thread or process."""
        connid = connid or self._new_connid()
        logs.set_connection(connid, format_peer(peer))
        try:
            conn = self._open(sock, peer, connid)
            if conn is not None:
                self._serve_until_closed(conn)
        finally:
            self.clients.discard(sock)
            self._release(peer)
            logs.set_connection(None, None)

    def _serve_until_closed(self, conn: HostConnection) -> None:
        idle = self.limits.idle_timeout or None
        last = time.monotonic()
        try:
            while not conn.closed:
                if conn.serve(idle):
                    last = time.monotonic()
                elif idle is not None and time.monotonic() - last >= idle:
                    conn._config["host_close_reason"] = f"idle for {idle:.0f} s"
                    break
        except Exception as exc:
            log_closed(self.logger, conn, exc)
        finally:
            close_quietly(conn, self.logger)
            self._forget(conn)

    def _log_disconnected(self, conn: HostConnection) -> None:
        """One line for a connection's end: how long, how much, and why."""
        config = conn._config
        opened = config.get("host_opened_at")
        traffic = config.get("host_traffic")
        if opened is None or not isinstance(traffic, CountingChannel) or config.get("host_close_logged"):
            return
        config["host_close_logged"] = True
        # Once the server stops, its own closing of sockets surfaces as errors like EBADF: not news.
        why = (config.get("host_close_reason") or "client closed") if self.active else "server stopping"
        self.logger.info(
            "disconnected after %.2f s: %d requests, %s in, %s out (%s)",
            time.monotonic() - opened,
            traffic.requests,
            _size(traffic.bytes_in),
            _size(traffic.bytes_out),
            why,
            extra=_conn_extra(config.get("connid"), config.get("endpoints", (None, "?"))[1]),
        )

    # -- running and stopping ----------------------------------------------------------------------

    def start(self) -> None:
        """Accept connections until stopped (blocking).

        Unlike rpyc's ``Server.start``, leaving the accept loop does not close the clients:
        the host decides when, after letting calls in flight finish.
        """
        self._listen()
        try:
            while self.active:
                self.accept()
        except EOFError:
            pass  # the listener was closed by stop_accepting()

    def listen(self) -> None:
        """Bind and listen (idempotent), so every listener is up before any accepts."""
        self._listen()

    def adopt_listener(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (bound, e.g. passed by systemd) instead of the socket rpyc bound in
        ``__init__``; before :meth:`listen`. ``sock`` is used as it is, never re-bound."""
        if self.active:
            raise RuntimeError(f"{self.name}: adopt_listener() after listen()")
        self.listener.close()
        # As rpyc's own listener: accept() wakes up twice a second to notice a stop.
        sock.settimeout(0.5)
        self.listener = sock
        self.host, self.port = sock.getsockname()[:2]
        tune_socket(self.listener)

    @property
    def in_flight(self) -> int:
        """Requests being dispatched now."""
        return self.tracker.count

    def reconfigure(
        self, limits: LimitsSection, security: SecurityConfig, tls: ssl.SSLContext | None
    ) -> None:
        """Apply reloaded limits and credentials: admission and budgets at once, timeouts and
        credentials for new connections; open connections are left as they are."""
        self.limits = limits
        self.ledger.caps = caps_from_limits(limits)
        self.protocol_config["sync_request_timeout"] = limits.call_timeout
        self.gatekeeper.reconfigure(security, limits, tls)

    def stop_accepting(self) -> None:
        """Close the listener; connections already open keep being served."""
        self.active = False
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def drain(self, timeout: float) -> bool:
        """Wait for requests in flight to finish; False if ``timeout`` passed first."""
        return self.tracker.wait_idle(timeout)

    def close_in_child(self) -> None:
        """In a forked child: drop this server's inherited sockets without touching the parent's."""
        self.listener.close()
        for sock in list(self.clients):
            sock.close()

    def wait_closed(self, timeout: float) -> bool:
        """After close(): wait until every connection has run its disconnect hooks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._conn_lock:
                if not self.connections:
                    return True
            time.sleep(0.01)
        return False

    def force_close(self) -> None:
        """Close connections whose calls outlived the grace period, so on_disconnect still runs."""
        with self._conn_lock:
            stuck = list(self.connections)
        for conn in stuck:
            close_quietly(conn, self.logger)
            self._forget(conn)


def log_closed(logger: logging.Logger, conn: HostConnection, exc: Exception) -> None:
    """Note why a connection ended in an error, for its "disconnected" line: a peer's bad data
    or stall is the peer's problem, not a server bug, so no traceback."""
    config = conn._config
    if config.get("host_close_reason"):
        return
    if isinstance(exc, EOFError):
        text = str(exc)
        # "closed by peer": the client left; "stream has been closed": after its close request.
        if text and "closed by peer" not in text and "stream has been closed" not in text:
            config["host_close_reason"] = text
    elif not conn.closed:
        config["host_close_reason"] = f"unreadable data from the client ({type(exc).__name__}: {exc})"
    server = config.get("host_server")
    if conn.closed and isinstance(server, HostServerMixin):
        # rpyc closed it already (its socket number may be reused at once): say so now rather
        # than only when the server forgets the connection.
        server._log_disconnected(conn)


def close_quietly(conn: HostConnection, logger: logging.Logger) -> None:
    """Close without rpyc's polite close request, which waits (up to call_timeout) for an answer
    a stalled or silent peer never sends; on_disconnect still runs."""
    try:
        conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError, EOFError):  # EOFError: rpyc's ClosedFile, already closed
        pass
    try:
        conn.close()
    except Exception:
        logger.debug("closing %s failed", conn._config.get("connid"), exc_info=True)


class RpycChatter(logging.Filter):
    """Moves rpyc's own INFO lines about accepting and listening to DEBUG: the host writes one
    line when a connection opens and one when it closes, and one per listener."""

    PREFIXES = ("accepted ", "server started on ", "listener closed")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not str(record.msg).startswith(self.PREFIXES):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class OnConnectFailed(Exception):
    """The service's on_connect raised; the client has been told and the socket handed off."""


class CountingChannel(FastChannel):
    """The channel a host serves on: FastChannel counts frame bytes each way and requests
    received, for the line logged when the connection closes."""

    __slots__ = ()


def _size(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    if count < 1_000_000:
        return f"{count / 1000:.1f} kB"
    return f"{count / 1_000_000:.1f} MB"


def _conn_extra(connid: Any, peer: Any) -> dict[str, Any]:
    return {"connid": connid, "peer": format_peer(peer)}


def format_peer(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return ("?", 0)

"""The three server types: ``threaded``, ``threadpool`` and ``forking``.

All three are rpyc ``Server`` subclasses that share :class:`HostServerMixin`: tuned channels
(TCP_NODELAY, no zlib), a per-connection copy of the service, connection ids, a count of
requests in flight, and a graceful stop (stop accepting, let calls finish, then disconnect).

- ``threaded``: rpyc's ThreadedServer, one thread per connection.
- ``threadpool``: at most ``pool_size`` worker threads serve every connection. rpyc's own
  ThreadPoolServer stalls ~100 ms per call (a socket handed back to ``poll()`` while another
  thread is blocked in it is not seen until that poll times out). Here the workers wait on one
  shared epoll set with EPOLLONESHOT: a ready connection wakes exactly one worker, which serves
  it and re-arms it; epoll sees re-armed sockets at once, so no call waits for a timeout.
- ``forking``: one child process per connection, each reaped by a waiter thread as soon as it
  exits (no SIGCHLD handler, which would have to live on the main thread and would reap
  processes the services start). Stopping the server stops the children.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import rpyc
from rpyc.utils.server import ForkingServer, Server, ThreadedServer

from .exposure import per_connection
from .protocol import SAFE_PROTOCOL, HostConnection, InflightTracker
from .transport import make_channel, tune_socket

_CONN_IDS = itertools.count(1)
# Every live host server, so a forked child can drop the sockets it inherited from the others.
_LIVE: weakref.WeakSet[HostServerMixin] = weakref.WeakSet()


class HostServerMixin:
    """What every host server type adds to rpyc's ``Server``."""

    # Set by rpyc's Server.__init__ / by this mixin.
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

    def _host_setup(self, name: str, compression: bool) -> None:
        self.name = name
        self.compression = compression
        self.tracker = InflightTracker()
        self.connections: set[HostConnection] = set()
        self._conn_lock = threading.Lock()
        self.protocol_config = {
            **SAFE_PROTOCOL,
            **self.protocol_config,
            "host_tracker": self.tracker,
            "host_logger": self.logger,
        }
        # Accepted sockets inherit TCP_NODELAY from the listener on Linux; set it on both anyway.
        tune_socket(self.listener)
        _LIVE.add(self)

    # -- connections ---------------------------------------------------------------------------

    def _new_connid(self) -> str:
        return f"{self.name}-{next(_CONN_IDS)}"

    def _build_connection(self, sock: socket.socket, connid: str | None = None) -> HostConnection:
        peer = _peer(sock)
        connid = connid or self._new_connid()
        config = dict(
            self.protocol_config,
            connid=connid,
            credentials=None,
            endpoints=(sock.getsockname(), peer),
            logger=self.logger,
        )
        root = per_connection(self.service)
        conn: HostConnection = root._connect(make_channel(sock, self.compression), config)
        with self._conn_lock:
            self.connections.add(conn)
        return conn

    def _forget(self, conn: HostConnection) -> None:
        with self._conn_lock:
            self.connections.discard(conn)

    def _serve_client(self, sock: socket.socket, credentials: Any) -> None:
        try:
            conn = self._build_connection(sock)
        except Exception:
            self.logger.exception("could not set up a connection from %s", _peer(sock))
            return
        try:
            conn.serve_all()
        except Exception:
            self.logger.exception("[%s] connection failed", conn._config.get("connid"))
        finally:
            self._forget(conn)

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

    # -- stopping ------------------------------------------------------------------------------

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
            _close_quietly(conn, self.logger)
            self._forget(conn)


def _close_quietly(conn: HostConnection, logger: logging.Logger) -> None:
    try:
        conn.close()
    except Exception:
        logger.debug("closing %s failed", conn._config.get("connid"), exc_info=True)


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return ("?", 0)


class HostThreadedServer(HostServerMixin, ThreadedServer):
    """A thread per connection."""

    def __init__(self, service: rpyc.Service, *, name: str, compression: bool = False, **kwargs: Any) -> None:
        ThreadedServer.__init__(self, service, **kwargs)
        self._host_setup(name, compression)

    def _accept_method(self, sock: socket.socket) -> None:
        thread = threading.Thread(
            target=self._authenticate_and_serve_client, args=(sock,), name=f"{self.name}-conn", daemon=True
        )
        thread.start()


class HostThreadPoolServer(HostServerMixin, Server):
    """At most ``pool_size`` worker threads serving every connection through one epoll set."""

    _MASK = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT

    def __init__(
        self,
        service: rpyc.Service,
        *,
        name: str,
        pool_size: int = 16,
        compression: bool = False,
        **kwargs: Any,
    ) -> None:
        Server.__init__(self, service, **kwargs)
        self._host_setup(name, compression)
        self.pool_size = pool_size
        self._epoll = select.epoll()
        self._by_fd: dict[int, tuple[HostConnection, socket.socket]] = {}
        self._workers: list[threading.Thread] = []

    def _listen(self) -> None:
        if self.active:
            return
        Server._listen(self)
        for i in range(self.pool_size):
            worker = threading.Thread(target=self._work, name=f"{self.name}-worker-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _accept_method(self, sock: socket.socket) -> None:
        try:
            conn = self._build_connection(sock)
        except Exception:
            self.logger.exception("could not set up a connection from %s", _peer(sock))
            self.clients.discard(sock)
            sock.close()
            return
        fd = conn.fileno()
        self._by_fd[fd] = (conn, sock)
        self._epoll.register(fd, self._MASK)

    def _work(self) -> None:
        while self.active or self._by_fd:
            try:
                events = self._epoll.poll(0.5, 1)
            except (OSError, ValueError):  # epoll closed under us: the server is stopping
                return
            for fd, _ in events:
                entry = self._by_fd.get(fd)
                if entry is not None:
                    self._serve_ready(fd, *entry)

    def _serve_ready(self, fd: int, conn: HostConnection, sock: socket.socket) -> None:
        try:
            # Serve what is ready, then hand the socket back; a busy client does not hog a worker.
            for _ in range(16):
                if not conn.poll(0):
                    break
        except (EOFError, OSError):
            self._drop(fd, conn, sock)
            return
        except Exception:
            self.logger.exception("[%s] connection failed", conn._config.get("connid"))
            self._drop(fd, conn, sock)
            return
        if conn.closed:
            self._drop(fd, conn, sock)
            return
        try:
            self._epoll.modify(fd, self._MASK)
        except OSError:
            self._drop(fd, conn, sock)

    def _drop(self, fd: int, conn: HostConnection, sock: socket.socket) -> None:
        # rpyc may already have closed the socket, and the accept thread may have reused its fd
        # number for a new connection: only unregister the entry if it is still this one.
        entry = self._by_fd.get(fd)
        if entry is not None and entry[0] is conn:
            del self._by_fd[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        try:
            conn.close()
        except Exception:
            pass
        self.clients.discard(sock)
        sock.close()
        self._forget(conn)

    def close(self) -> None:
        # rpyc's Server.close() closes client fds, which silently drops them from the epoll set:
        # shut them down first so a worker sees EOF, drops the connection and runs its hooks.
        self.active = False
        for _, sock in list(self._by_fd.values()):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while self._by_fd and time.monotonic() < deadline:
            time.sleep(0.01)
        for fd, (conn, sock) in list(self._by_fd.items()):  # a worker is stuck: cut it loose
            self._drop(fd, conn, sock)
        Server.close(self)
        for worker in self._workers:
            worker.join(timeout=5)
        self._epoll.close()


class HostForkingServer(HostServerMixin, ForkingServer):
    """A child process per connection."""

    def __init__(
        self,
        service: rpyc.Service,
        *,
        name: str,
        compression: bool = False,
        grace_period: float = 10.0,
        **kwargs: Any,
    ) -> None:
        # Not ForkingServer.__init__: it installs a process-wide SIGCHLD handler (main thread only).
        Server.__init__(self, service, **kwargs)
        self._host_setup(name, compression)
        self.grace_period = grace_period
        self.children: set[int] = set()
        self._children_lock = threading.Lock()

    def _accept_method(self, sock: socket.socket) -> None:
        connid = self._new_connid()  # numbered in the parent, so ids stay unique across children
        pid = os.fork()
        if pid == 0:  # child
            status = 0
            try:
                for server in list(_LIVE):
                    if server is not self:
                        server.close_in_child()
                self.listener.close()
                self.clients = {sock}
                self._serve_in_child(sock, connid)
            except BaseException:
                self.logger.exception("connection process failed")
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        sock.close()
        self.clients.discard(sock)
        with self._children_lock:
            self.children.add(pid)
        threading.Thread(target=self._reap, args=(pid,), name=f"{self.name}-reap-{pid}", daemon=True).start()

    def _serve_in_child(self, sock: socket.socket, connid: str) -> None:
        conn = self._build_connection(sock, connid)

        def on_alarm(signum: int, frame: Any) -> None:
            # The call outlived the grace period: disconnect (running on_disconnect) and exit.
            _close_quietly(conn, self.logger)
            os._exit(1)

        def on_term(signum: int, frame: Any) -> None:
            # Finish the call in flight (up to the grace period), then disconnect.
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(0.05, self.grace_period))
            threading.Thread(target=self._close_when_idle, args=(sock,), daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the parent decides
        try:
            conn.serve_all()
        finally:
            self._forget(conn)

    def _close_when_idle(self, sock: socket.socket) -> None:
        self.tracker.wait_idle(self.grace_period)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reap(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        with self._children_lock:
            self.children.discard(pid)

    def live_children(self) -> set[int]:
        with self._children_lock:
            return set(self.children)

    def drain(self, timeout: float) -> bool:
        """Ask every child to finish its call and disconnect; wait for them to exit."""
        for pid in self.live_children():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.live_children() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.live_children()

    def close(self) -> None:
        Server.close(self)
        for pid in self.live_children():
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.live_children() and time.monotonic() < deadline:
            time.sleep(0.01)

    def wait_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.live_children() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.live_children()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


SERVER_TYPES: dict[str, type[HostServerMixin]] = {
    "forking": HostForkingServer,
    "threaded": HostThreadedServer,
    "threadpool": HostThreadPoolServer,
}

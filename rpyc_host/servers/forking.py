"""``forking``: one child process per connection.

Children are reaped as soon as they exit by one thread waiting on their pidfds: no SIGCHLD
handler, which would have to be installed from the main thread and would also reap processes
the services start, and no thread per child (every fork copies every thread's stack mapping,
so a thread per connection made each fork slower as connections piled up).
Stopping the server asks each child (SIGTERM) to finish its call and disconnect, and kills what
is left after the grace period.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import rpyc
from rpyc.utils.server import ForkingServer, Server

from .. import inherited, logs
from .base import LIVE, HostServerMixin, ServerSettings, close_quietly, format_peer


class HostForkingServer(HostServerMixin, ForkingServer):
    """A child process per connection: the handshake and every call run in it."""

    def __init__(self, service: rpyc.Service, settings: ServerSettings, **kwargs: Any) -> None:
        # Not ForkingServer.__init__: it installs a process-wide SIGCHLD handler (main thread only).
        Server.__init__(self, service, **kwargs)
        self._host_setup(settings)
        self.grace_period = settings.grace_period
        self.children: dict[int, Any] = {}
        self._children_lock = threading.Lock()
        self._reaper = Reaper(self._reaped, name=f"{self.name}-reaper")

    def _start_connection(self, sock: socket.socket, peer: Any) -> None:
        connid = self._new_connid()  # numbered in the parent, so ids stay unique across children
        pid = os.fork()
        if pid == 0:  # child
            status = 0
            try:
                for server in list(LIVE):
                    if server is not self:
                        server.close_in_child()
                self.listener.close()
                self._reaper.close_in_child()
                inherited.let_go()
                self.clients = {sock}
                self._serve_in_child(sock, peer, connid)
            except BaseException:
                self.logger.exception("connection process failed")
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        sock.close()
        self.clients.discard(sock)
        with self._children_lock:
            self.children[pid] = peer
        self._reaper.watch(pid)

    def _serve_in_child(self, sock: socket.socket, peer: Any, connid: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
        logs.set_connection(connid, format_peer(peer))
        conn = self._open(sock, peer, connid)
        if conn is None:
            return

        def on_alarm(signum: int, frame: Any) -> None:
            # The call outlived the grace period: disconnect (running on_disconnect) and exit.
            close_quietly(conn, self.logger)
            os._exit(1)

        def on_term(signum: int, frame: Any) -> None:
            # Finish the call in flight (up to the grace period), then disconnect.
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(0.05, self.grace_period))
            threading.Thread(target=self._close_when_idle, args=(conn,), daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        self._serve_until_closed(conn)
        # One-way calls still queued were accepted: run them (within the grace period) before exiting.
        self.tracker.wait_idle(self.grace_period)

    def _close_when_idle(self, conn: Any) -> None:
        self.tracker.wait_idle(self.grace_period)
        try:
            conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError, EOFError):  # EOFError: the client left meanwhile
            pass

    def close_in_child(self) -> None:
        super().close_in_child()
        self._reaper.close_in_child()

    def _reaped(self, pid: int) -> None:
        with self._children_lock:
            peer = self.children.pop(pid, None)
        if peer is not None:
            self._release(peer)

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
        self._reaper.close()

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


class Reaper:
    """Reaps the given child processes as they exit, from one thread, calling ``on_exit(pid)``.

    Waits on pidfds (Linux 5.3+); where those are missing, falls back to a waiter thread per child.
    """

    def __init__(self, on_exit: Callable[[int], None], name: str) -> None:
        self.on_exit = on_exit
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._closed = False
        self._fds_open = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            threading.Thread(target=self._wait_one, args=(pid,), daemon=True).start()
            return
        with self._lock:
            self._selector.register(fd, selectors.EVENT_READ, pid)
        os.write(self._wake_w, b"x")

    def _wait_one(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self.on_exit(pid)

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(1.0):
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    self._selector.unregister(key.fd)
                os.close(key.fd)
                try:
                    os.waitpid(key.data, 0)  # it has exited: this does not block
                except ChildProcessError:
                    pass
                self.on_exit(key.data)

    def close_in_child(self) -> None:
        """In a forked child: close the inherited pidfds, selector and pipe (the thread is not
        there; its lock may have been held at fork, so it is not taken)."""
        if not self._fds_open:
            return  # closed by close(): those numbers may belong to other descriptors now
        self._close_fds()

    def _close_fds(self) -> None:
        self._fds_open = False
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                os.close(key.fd)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self) -> None:
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._lock:
            self._close_fds()

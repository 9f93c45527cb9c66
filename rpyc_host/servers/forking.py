"""``forking``: one child process per connection.

Each child is reaped by a waiter thread as soon as it exits: no SIGCHLD handler, which would
have to be installed from the main thread and would also reap processes the services start.
Stopping the server asks each child (SIGTERM) to finish its call and disconnect, and kills what
is left after the grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import rpyc
from rpyc.utils.server import ForkingServer, Server

from .. import logs
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
        threading.Thread(target=self._reap, args=(pid,), name=f"{self.name}-reap-{pid}", daemon=True).start()

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

    def _close_when_idle(self, conn: Any) -> None:
        self.tracker.wait_idle(self.grace_period)
        try:
            conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass

    def _reap(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
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

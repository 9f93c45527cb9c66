"""``threadpool``: at most ``pool_size`` worker threads serve every connection.

rpyc's own ThreadPoolServer stalls ~100 ms per call: a socket handed back to ``poll()`` while
another thread is blocked in it is not seen until that poll times out. Here the workers wait on
one shared epoll set with EPOLLONESHOT: a ready connection wakes exactly one worker, which
serves what is ready and re-arms it; epoll sees re-armed sockets at once.

A connection that needs a handshake is registered raw and handshaken by the worker that first
finds it readable, so a slow handshake never holds the accept thread. A client that stalls in
the middle of a frame holds one worker for at most ``handshake_timeout`` seconds; a silent
client holds none, and a sweeper thread closes it after ``idle_timeout``.

A request that waits on its own client (a callback, pulling an argument's items) would hold a
worker for as long as the client likes. Before such a wait the worker hands its place in the
pool to a spare thread, so ``pool_size`` workers always serve ready connections; the worker
returns to the pool (and the pool shrinks back) once the request is done. Waiting requests are
held in the service's ledger (``limits.max_waiting_requests`` and ``..._per_connection``): past
either cap the wait is refused at once, which bounds the spare threads.

Of the ``pool_size`` workers only about one per CPU polls for ready sockets; the others are
parked and let in when a polling one is held by a slow request for a few ms (see
:mod:`.pool_watch`), so ``pool_size`` calls can still block at once.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import rpyc
from rpyc.utils.server import Server

from .. import logs
from ..budget import CONFIG_KEY
from ..protocol import HostConnection
from .base import HostServerMixin, ServerSettings, close_quietly, format_peer, log_closed
from .pool_watch import Watch, WorkerState, polling_workers

_MASK = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
WAITING = "waiting_requests"  # the ledger resource behind limits.max_waiting_requests


@dataclass
class _Entry:
    sock: socket.socket
    peer: Any
    conn: HostConnection | None  # None until the handshake is done
    last: float
    connid: str = ""
    peer_text: str = ""  # formatted once: log records of every request are tagged with it


class HostThreadPoolServer(HostServerMixin, Server):
    """At most ``pool_size`` worker threads serving every connection through one epoll set."""

    def __init__(self, service: rpyc.Service, settings: ServerSettings, **kwargs: Any) -> None:
        Server.__init__(self, service, **kwargs)
        self._host_setup(settings)
        self.pool_size = settings.pool_size
        self._epoll = select.epoll()
        self._entries: dict[int, _Entry] = {}
        self._entries_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._sweeper: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        # Workers alive, and how many of them are away waiting on their client; the pool keeps
        # live - away == pool_size (more only for a moment, until an extra worker retires).
        self._pool_lock = threading.Condition(threading.Lock())  # notified when a place frees up
        self._live = 0
        self._away = 0
        # Of the workers not away, _placed poll (or serve what they found); at most _allowed:
        # _base, plus one per polling worker held by a slow request (up to pool_size).
        self._base = polling_workers(self.pool_size)
        self._allowed = self._base
        self._placed = 0
        self._watch = Watch()
        self._worker_ids = itertools.count()
        self._me = threading.local()  # in a worker: .worker, its WorkerState

    def _listen(self) -> None:
        if self.active:
            return
        Server._listen(self)
        with self._pool_lock:
            self._live = self.pool_size
        for _ in range(self.pool_size):
            self._spawn()
        self._sweeper = threading.Thread(target=self._sweep, name=f"{self.name}-sweeper", daemon=True)
        self._sweeper.start()
        self._watcher = threading.Thread(
            target=self._watch.run,
            args=(self._serving, self._allow),
            name=f"{self.name}-watcher",
            daemon=True,
        )
        self._watcher.start()

    def _start_connection(self, sock: socket.socket, peer: Any) -> None:
        conn = None
        connid = self._new_connid()
        if not self.gatekeeper.needed:
            with logs.connection_context(connid, format_peer(peer)):
                conn = self._open(sock, peer, connid)  # cheap: no I/O before the first request
            if conn is None:
                self.clients.discard(sock)
                self._release(peer)
                return
        self._register(sock.fileno(), _Entry(sock, peer, conn, time.monotonic(), connid, format_peer(peer)))

    def _register(self, fd: int, entry: _Entry) -> None:
        # Under the lock with _drop's unregister: rpyc may close a dropped connection's socket
        # early, and the accept thread may get its fd number for a new connection meanwhile.
        with self._entries_lock:
            self._entries[fd] = entry
            self._epoll.register(fd, _MASK)

    def _spawn(self) -> None:
        worker = threading.Thread(
            target=self._work, name=f"{self.name}-worker-{next(self._worker_ids)}", daemon=True
        )
        with self._pool_lock:
            self._workers = [w for w in self._workers if w.is_alive()]
            self._workers.append(worker)
        worker.start()

    @contextmanager
    def waiting(self, conn: HostConnection) -> Iterator[None]:
        """Hand this worker's place to a spare while its request waits on the client.

        Raises:
            LimitExceeded: ``limits.max_waiting_requests`` (service) or its per-connection
                share is reached; nothing was taken.
        """
        me: WorkerState | None = getattr(self._me, "worker", None)
        if me is None:  # not a pool worker (a service's own thread): no place to hand over
            yield
            return
        account = conn._config.get(CONFIG_KEY)
        if account is not None:
            account.acquire(WAITING)
        first = not me.away  # nested waits of one request share the place handed over once
        spawn = False
        if first:
            me.away = True
            with self._pool_lock:
                self._away += 1
                if me.placed:  # a parked worker polls instead, at once
                    me.placed = False
                    self._placed -= 1
                    self._pool_lock.notify()
                if self.active and self._live - self._away < self.pool_size:
                    self._live += 1
                    spawn = True
            if spawn:
                self._spawn()
        try:
            yield
        finally:
            if first:
                me.away = False
                with self._pool_lock:
                    self._away -= 1
            if account is not None:
                account.release(WAITING)

    def _serving(self) -> bool:
        return self.active or bool(self._entries)

    def _allow(self, stuck: int) -> None:
        """The watcher's count of polling workers held by a slow request: one more may poll each."""
        allowed = min(self.pool_size, self._base + stuck)
        if allowed == self._allowed:
            return
        with self._pool_lock:
            if allowed > self._allowed:
                self._pool_lock.notify(allowed - self._allowed)
            self._allowed = allowed  # fewer: placed workers over it park at their next poll

    def _take_place(self, me: WorkerState) -> bool:
        """Park until this worker may poll; False if it is one too many (retire) or stopping."""
        with self._pool_lock:
            while True:
                if self._live - self._away > self.pool_size:  # one came back from waiting
                    self._live -= 1
                    return False
                if not (self.active or self._entries):
                    return False
                if self._placed < self._allowed:
                    self._placed += 1
                    me.placed = True
                    return True
                self._pool_lock.wait(5.0)  # notified when a place frees up or the server stops

    def _leave_place(self, me: WorkerState) -> None:
        with self._pool_lock:
            if me.placed:
                me.placed = False
                self._placed -= 1
                self._pool_lock.notify()  # a parked worker may be the one to retire instead

    def _work(self) -> None:
        me = self._me.worker = WorkerState()
        watch = self._watch
        watch.add(me)
        try:
            self._poll_and_serve(me, watch)
        finally:
            self._leave_place(me)
            watch.remove(me)

    def _poll_and_serve(self, me: WorkerState, watch: Watch) -> None:
        while self.active or self._entries:
            if not me.placed:
                if not self._take_place(me):
                    return
            elif self._placed > self._allowed or self._live - self._away > self.pool_size:
                # Read without the lock (this runs per poll); _leave_place and _take_place recheck.
                self._leave_place(me)
                continue
            try:
                events = self._epoll.poll(0.5, 1)
            except (OSError, ValueError):  # epoll closed under us: the server is stopping
                return
            for fd, _ in events:
                with self._entries_lock:
                    entry = self._entries.get(fd)
                if entry is not None:
                    me.since = entry.last = time.monotonic()
                    if watch.asleep:
                        watch.wake()
                    # Tag this worker's log records with the connection while it serves it (a
                    # plain set and reset: this runs for every request).
                    logs.set_connection(entry.connid, entry.peer_text)
                    try:
                        self._serve_ready(fd, entry)
                    finally:
                        me.since = 0.0
                        logs.set_connection(None, None)

    def _serve_ready(self, fd: int, entry: _Entry) -> None:
        conn = entry.conn
        mask = _MASK
        if conn is None:
            conn = entry.conn = self._open(entry.sock, entry.peer, entry.connid)
            if conn is None:
                self._drop(fd, entry)
                return
            # TLS may have replaced the socket object; the fd stays the same.
            entry.sock = conn._channel.stream.sock
        else:
            stream = conn._channel.stream
            try:
                # epoll said readable: one recv fills the stream's buffer, and the frames in it are
                # served with no poll() of their own (each system call is a GIL hand-off under
                # load). At most 16 in a row, then the socket goes back: a busy client does not
                # hog a worker.
                if stream.fill():
                    for _ in range(16):
                        conn.poll(0)
                        if conn.closed or not stream.buffered:
                            break
            except Exception as exc:
                log_closed(self.logger, conn, exc)
                self._drop(fd, entry)
                return
            if conn.closed:
                self._drop(fd, entry)
                return
            if stream.buffered:
                # Frames already read into the buffer: the kernel will not report them, so ask
                # for writability too, which wakes a worker at once (the next one in turn).
                mask = _MASK | select.EPOLLOUT
        try:
            self._epoll.modify(fd, mask)
        except OSError:
            self._drop(fd, entry)

    def _drop(self, fd: int, entry: _Entry) -> None:
        # rpyc may already have closed the socket and the accept thread reused its fd number
        # for a new connection: only unregister the entry if it is still this one.
        with self._entries_lock:
            if self._entries.get(fd) is not entry:
                return
            del self._entries[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        if entry.conn is not None:
            close_quietly(entry.conn, self.logger)
            self._forget(entry.conn)
        self.clients.discard(entry.sock)
        entry.sock.close()
        self._release(entry.peer)

    def _sweep(self) -> None:
        """Close connections that stay silent too long (idle, or never finishing a handshake).

        Every half second it checks whether anything can be due yet, and only then walks every
        connection (a walk of 10,000 holds the GIL for milliseconds). A connection's ``last``
        only moves forward, so after a walk nothing known expires before the earliest deadline
        it saw, and nothing registered later before now + the shorter limit; new limits (a
        reload) start a walk at once.
        """
        due = 0.0
        walked_with = None
        while self.active:
            time.sleep(0.5)
            now = time.monotonic()
            limits = self.limits
            if now < due and limits is walked_with:
                continue
            walked_with = limits
            due = self._sweep_once(now, limits.idle_timeout, limits.handshake_timeout)

    def _sweep_once(self, now: float, idle: float, handshake: float) -> float:
        """One walk: close what is due; returns when the next walk may find something due."""
        with self._entries_lock:
            entries = list(self._entries.values())
        shortest = min((x for x in (idle, handshake) if x), default=0.0)
        due = now + shortest if shortest else now + 3600.0
        for entry in entries:
            limit = idle if entry.conn is not None else handshake
            if not limit:
                continue
            deadline = entry.last + limit
            if now > deadline:
                entry.last = now  # once: the worker that sees the EOF drops it
                kind = "idle" if entry.conn is not None else "silent before its handshake"
                self.logger.info("closing connection from %s:%s: %s for %.0f s", *entry.peer[:2], kind, limit)
                try:
                    entry.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            elif deadline < due:
                due = deadline
        return due

    def close(self) -> None:
        # rpyc's Server.close() closes client fds, which silently drops them from the epoll set:
        # shut them down first so a worker sees EOF, drops the connection and runs its hooks.
        self.active = False
        with self._pool_lock:
            self._pool_lock.notify_all()  # parked workers: let them see the stop
        with self._entries_lock:
            entries = list(self._entries.items())
        for _, entry in entries:
            try:
                entry.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while self._entries and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._entries_lock:
            stuck = list(self._entries.items())
        for fd, entry in stuck:  # a worker is stuck in a call: cut it loose
            self._drop(fd, entry)
        Server.close(self)
        self._watch.stop()
        with self._pool_lock:
            self._pool_lock.notify_all()  # nothing is left to serve: parked workers leave
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout=5)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._epoll.close()

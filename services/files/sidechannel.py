"""The server end of a transfer's bulk side connection: a one-time listener per ticket.

``bulk(length)`` hands the client a ticket ``(host, port, token)``; the client connects to it,
sends the 32-byte token and the raw bytes follow (:mod:`rpyc_host.wire.bulk` moves them).
Anyone who can reach the port can connect too, so the listener must never let such a
connection stand in the ticket holder's way:

- every pending connection (accepted, token not yet read) is served by one selector loop, side
  by side, never one after the other: a silent one is simply never ready;
- each has ``pending_timeout`` seconds (2 s) from its accept to finish TLS and send the token;
- pending connections are counted in the connection's budget account
  (``limits.max_pending_side_connections`` and ``..._per_connection``); past a cap the oldest
  pending connection of this offer is dropped for the newcomer, and an offer always has room
  for one, so squatters elsewhere cannot lock a ticket holder out;
- with TLS (the control connection's own server context, see :func:`server_wrapper`) the
  handshake runs in the same loop, non-blocking, with the same deadline;
- a wrong token closes that connection only; the right one ends the offer: the listener and
  every other pending connection are closed.

Usage (inside an exposed method, then in the transfer's worker thread)::

    offer = BulkOffer(bind_host, timeout=30, tls=server_wrapper(control_socket(conn)),
                      account=budget.account_of(conn))
    return offer.ticket
    ...
    sock = offer.accept()            # the ticket holder's socket, blocking, tuned
"""

from __future__ import annotations

import hmac
import os
import secrets
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rpyc_host.budget import Account, LimitExceeded
from rpyc_host.wire.bulk import TOKEN_BYTES, Ticket, tune

PENDING = "pending_side_connections"  # the budget resource
PENDING_TIMEOUT = 2.0  # seconds a side connection has to finish TLS and send its token
MAX_PENDING = 8  # per offer when there is no budget account (a service outside the host)
BACKLOG = 64


@dataclass(frozen=True)
class ServerTLS:
    """How side connections of one control connection speak TLS (see :func:`server_wrapper`)."""

    context: ssl.SSLContext
    subject: Any  # the control connection's client-certificate subject, None without mutual TLS

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """A non-blocking server-side TLS socket whose handshake :class:`BulkOffer` drives."""
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def server_wrapper(control: socket.socket | None) -> ServerTLS | None:
    """TLS for side connections exactly as on ``control``, the connection the ticket was asked on.

    The same server context (certificate, minimum version, client-certificate CA), and with
    mutual TLS the side connection must present a certificate with the control connection's
    subject: a ticket is only good for the peer it was issued to. None when ``control`` is plain.
    """
    if not isinstance(control, ssl.SSLSocket):
        return None
    return ServerTLS(control.context, _subject(control))


def _subject(sock: ssl.SSLSocket) -> Any:
    cert = sock.getpeercert()
    return cert.get("subject") if cert else None


class _Pending:
    """A side connection that has not yet shown its token."""

    __slots__ = ("deadline", "got", "handshaking", "sock")

    def __init__(self, sock: socket.socket, deadline: float, handshaking: bool) -> None:
        self.sock = sock
        self.deadline = deadline
        self.handshaking = handshaking
        self.got = b""


class BulkOffer:
    """A one-connection listener on ``bind_host`` (any free port); see the module docstring."""

    def __init__(
        self,
        bind_host: str,
        *,
        timeout: float = 30.0,
        tls: ServerTLS | None = None,
        account: Account | None = None,
        pending_timeout: float = PENDING_TIMEOUT,
    ) -> None:
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((bind_host, 0))
            self._listener.listen(BACKLOG)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._listener.close()
            raise
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.timeout = timeout
        self.pending_timeout = pending_timeout
        self._tls = tls
        self._account = account
        self._pending: deque[_Pending] = deque()  # oldest first
        self._charged = 0  # pending connections counted in the account: all but the first
        self._lock = threading.Lock()
        self._closed = False
        self._looping = False
        self._paused_until = 0.0  # accepting stopped until then (the process is out of descriptors)
        host, port = self._listener.getsockname()[:2]
        self.ticket: Ticket = (host, port, self.token)

    def accept(self) -> socket.socket:
        """The ticket holder's connection (blocking, tuned) once it sent the token.

        TimeoutError if it did not within ``timeout`` seconds; ConnectionAbortedError if
        :meth:`close` cancelled the offer. The offer is closed when this returns.
        """
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("data connection cancelled")
            self._looping = True
        deadline = time.monotonic() + self.timeout
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                now = time.monotonic()
                for pending in [p for p in self._pending if p.deadline <= now]:
                    self._drop(sel, pending)
                if now >= deadline:
                    raise TimeoutError(f"no data connection within {self.timeout:g} s")
                if self._paused_until and now >= self._paused_until:
                    self._paused_until = 0.0
                    sel.register(self._listener, selectors.EVENT_READ)
                wake_at = min(
                    [deadline, *(p.deadline for p in self._pending), self._paused_until or deadline]
                )
                for key, _ in sel.select(max(0.0, wake_at - now)):
                    if key.fileobj is self._listener:
                        self._accept_new(sel)
                    elif isinstance(key.data, _Pending) and key.data in self._pending:
                        sock = self._advance(sel, key.data)
                        if sock is not None:
                            return sock
            raise ConnectionAbortedError("data connection cancelled")
        finally:
            sel.close()
            while self._pending:
                self._drop(None, self._pending[0])
            with self._lock:
                self._closed = True
                self._looping = False
                self._close_fds()

    def close(self) -> None:
        """Cancel the offer: stop listening; a thread in :meth:`accept` wakes and raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._looping:
                # accept() owns the descriptors while it selects on them: wake it, it closes them.
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass
            else:
                self._close_fds()

    def _close_fds(self) -> None:
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- pending connections -----------------------------------------------------------------------

    def _accept_new(self, sel: selectors.BaseSelector) -> None:
        while True:  # the whole backlog: one wake-up may stand for many connections
            try:
                raw, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of descriptors: the connections wait in the backlog; stop watching the
                # listener for a moment rather than spin on it.
                sel.unregister(self._listener)
                self._paused_until = time.monotonic() + 0.1
                return
            raw.setblocking(False)
            try:
                sock: socket.socket = self._tls.wrap(raw) if self._tls is not None else raw
            except (OSError, ValueError):
                raw.close()
                continue
            self._make_room(sel)
            pending = _Pending(sock, time.monotonic() + self.pending_timeout, self._tls is not None)
            self._pending.append(pending)
            sel.register(sock, selectors.EVENT_READ, pending)

    def _make_room(self, sel: selectors.BaseSelector) -> None:
        """Room for one more pending connection: the first is free, more count in the account."""
        if not self._pending:
            return
        try:
            if self._account is not None:
                self._account.acquire(PENDING)
            elif len(self._pending) >= MAX_PENDING:
                raise LimitExceeded(PENDING, MAX_PENDING, "too many pending side connections")
            self._charged += 1
            return
        except LimitExceeded:
            pass  # counted by the ledger
        # At the cap the newcomer takes the slot of this offer's oldest pending connection, the
        # one that has had the longest to present a token.
        oldest = self._pending.popleft()
        self._unregister(sel, oldest)
        oldest.sock.close()

    def _advance(self, sel: selectors.BaseSelector, pending: _Pending) -> socket.socket | None:
        """Move one pending connection on; its socket once it has shown the right token."""
        sock = pending.sock
        try:
            if pending.handshaking:
                assert isinstance(sock, ssl.SSLSocket)
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    sel.modify(sock, selectors.EVENT_READ, pending)
                    return None
                except ssl.SSLWantWriteError:
                    sel.modify(sock, selectors.EVENT_WRITE, pending)
                    return None
                pending.handshaking = False
                sel.modify(sock, selectors.EVENT_READ, pending)
                expected = self._tls.subject if self._tls is not None else None
                if expected is not None and _subject(sock) != expected:
                    self._drop(sel, pending)  # another client's certificate: not the ticket's peer
                    return None
            while len(pending.got) < TOKEN_BYTES:
                try:
                    # Never past the token: the upload's bytes that follow stay in the socket.
                    chunk = sock.recv(TOKEN_BYTES - len(pending.got))
                except (BlockingIOError, ssl.SSLWantReadError):
                    return None
                except ssl.SSLWantWriteError:
                    sel.modify(sock, selectors.EVENT_WRITE, pending)
                    return None
                if not chunk:
                    self._drop(sel, pending)
                    return None
                pending.got += chunk
        except (OSError, ValueError):
            self._drop(sel, pending)  # a failed handshake or a reset (ssl.SSLError is an OSError)
            return None
        if not hmac.compare_digest(pending.got, self.token):
            self._drop(sel, pending)  # not our client: keep waiting for the right one
            return None
        self._forget(sel, pending)
        sock.setblocking(True)
        tune(sock)
        return sock

    def _drop(self, sel: selectors.BaseSelector | None, pending: _Pending) -> None:
        self._forget(sel, pending)
        pending.sock.close()

    def _forget(self, sel: selectors.BaseSelector | None, pending: _Pending) -> None:
        """No longer pending (its socket is left open): its slot in the account is given back."""
        self._unregister(sel, pending)
        self._pending.remove(pending)
        if self._charged > max(0, len(self._pending) - 1):
            self._charged -= 1
            if self._account is not None:
                self._account.release(PENDING)

    @staticmethod
    def _unregister(sel: selectors.BaseSelector | None, pending: _Pending) -> None:
        if sel is not None:
            try:
                sel.unregister(pending.sock)
            except (KeyError, ValueError):
                pass

"""A one-time side connection for bulk bytes, beside an rpyc control connection.

rpyc's data path tops out near 350 MB/s (every byte is copied several times in Python, see
RPYC-NOTES.md); a file transfer does not need framing, only the bytes. So the service offers a
*ticket* over rpyc, ``(host, port, token)``, and the client opens one TCP connection to it, sends
the token, and then the raw bytes flow with ``os.sendfile`` (zero-copy from the page cache) on one
side and ``recv_into`` a reused buffer on the other.

Usage (server side, inside an exposed method)::

    offer = BulkOffer(bind_host)             # listens on (bind_host, any free port)
    return offer.ticket                      # plain values: (host, port, token)
    ... later, in a worker thread:
    sock = offer.accept()                    # waits for the client holding the token
    send_file(sock, fd, offset, count)

and on the client: ``sock = open_bulk(ticket); recv_to_file(sock, fd, count)``.

Security: the listener accepts one connection carrying the right 32-byte token (compared in
constant time) within ``timeout`` seconds and then closes; wrong tokens are dropped. It binds the
interface the control connection arrived on, never a wildcard. ``wrap`` hooks (server and client)
are where TLS will go once the control connection has it: ``send_file`` already falls back from
``sendfile`` to ``sendall`` on a TLS socket.
"""

from __future__ import annotations

import hmac
import os
import secrets
import selectors
import socket
import time
from collections.abc import Callable

TOKEN_BYTES = 32
CHUNK = 1 << 20  # recv buffer and progress granularity
SEND_CHUNK = 8 << 20

Ticket = tuple[str, int, bytes]
SocketWrapper = Callable[[socket.socket], socket.socket]


class BulkOffer:
    """A one-connection listener on ``bind_host``; see the module docstring."""

    def __init__(self, bind_host: str, *, timeout: float = 30.0, wrap: SocketWrapper | None = None) -> None:
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((bind_host, 0))
            self._listener.listen(4)
        except BaseException:
            self._listener.close()
            raise
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.timeout = timeout
        self._wrap = wrap
        host, port = self._listener.getsockname()[:2]
        self.ticket: Ticket = (host, port, self.token)

    def accept(self) -> socket.socket:
        """The client's connection, after it sent the token; TimeoutError if none came in time."""
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no data connection within {self.timeout:g} s")
                self._listener.settimeout(left)
                try:
                    sock, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:  # closed by close(): the transfer was cancelled
                    raise ConnectionAbortedError("data connection cancelled") from exc
                try:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if self._wrap is not None:
                        sock = self._wrap(sock)
                    got = _recv_exact(sock, TOKEN_BYTES)
                except OSError:
                    sock.close()
                    continue
                if not hmac.compare_digest(got, self.token):
                    sock.close()  # not our client: keep waiting for the right one
                    continue
                tune(sock)
                return sock
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening (also wakes a thread blocked in accept())."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


def open_bulk(ticket: Ticket, *, timeout: float = 30.0, wrap: SocketWrapper | None = None) -> socket.socket:
    """Client side: connect to a ticket and present its token."""
    host, port, token = ticket
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if wrap is not None:
            sock = wrap(sock)
        tune(sock)
        sock.sendall(token)
    except BaseException:
        sock.close()
        raise
    return sock


def tune(sock: socket.socket) -> None:
    """Big kernel buffers: fewer wake-ups per GiB on loopback and fast links."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def send_file(
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send ``count`` bytes of ``fd`` from ``offset``; returns bytes sent (less only at EOF)."""
    if _is_tls(sock):
        return _send_copying(sock, fd, offset, count, progress)
    sent_total = 0
    timeout = sock.gettimeout()
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        while sent_total < count:
            try:
                n = os.sendfile(sock.fileno(), fd, offset + sent_total, min(SEND_CHUNK, count - sent_total))
            except BlockingIOError:
                # A socket with a timeout is non-blocking underneath: wait until it can take more.
                if not sel.select(timeout):
                    raise TimeoutError(f"peer took no data for {timeout} s") from None
                continue
            if n == 0:
                break  # the file is shorter than expected
            sent_total += n
            if progress is not None:
                progress(n)
    return sent_total


def _send_copying(
    sock: socket.socket, fd: int, offset: int, count: int, progress: Callable[[int], None] | None
) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    sent_total = 0
    while sent_total < count:
        n = os.preadv(fd, [view[: min(CHUNK, count - sent_total)]], offset + sent_total)
        if n == 0:
            break
        sock.sendall(view[:n])
        sent_total += n
        if progress is not None:
            progress(n)
    return sent_total


def recv_to_file(
    sock: socket.socket,
    fd: int,
    count: int,
    on_chunk: Callable[[memoryview], None] | None = None,
) -> int:
    """Receive exactly ``count`` bytes into ``fd`` at its current position.

    ``on_chunk`` sees each piece after it is written (hashing, progress). Raises
    ConnectionError if the peer closes early; returns ``count``.
    """
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    while done < count:
        n = sock.recv_into(view, min(CHUNK, count - done))
        if n == 0:
            raise ConnectionError(f"data connection closed after {done} of {count} bytes")
        piece = view[:n]
        written = 0
        while written < n:
            written += os.write(fd, piece[written:])
        if on_chunk is not None:
            on_chunk(piece)
        done += n
    return done


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        part = sock.recv(count - len(buf))
        if not part:
            raise ConnectionError("closed before the token")
        buf += part
    return bytes(buf)


def _is_tls(sock: socket.socket) -> bool:
    return type(sock).__name__ == "SSLSocket"

"""A one-time side connection for bulk bytes, beside an rpyc control connection.

rpyc's data path tops out near 350 MB/s (every byte is copied several times in Python); a file
transfer does not need framing, only the bytes. So the service offers a *ticket* over rpyc,
``(host, port, token)``, and the client opens one TCP connection to it, sends the token, and then
the raw bytes flow with ``os.sendfile`` (zero-copy from the page cache) on one side and
``recv_into`` a reused buffer on the other.

This module holds what both ends share and the client's end: the ticket, :func:`open_bulk`,
:func:`client_wrapper`, :func:`send_file`, :func:`recv_to_file` and :func:`tune`. The server's
end, the listener behind a ticket (its token check, deadlines and TLS), is the file service's
``services.files.sidechannel``.

Usage (client side, with a ticket the service returned)::

    sock = open_bulk(ticket, wrap=client_wrapper(control_socket(conn)))
    recv_to_file(sock, fd, 0, count)

Security: the side connection keeps the control connection's protection: when that one is
TLS, so is this one, with the client's context and server name (:func:`client_wrapper`); the
ticket is only handed out over the control connection, after its token handshake. TLS here
is an ``ssl.SSLSocket`` (:mod:`rpyc_host.wire.bulktls` words its errors).
``send_file`` reads an uncached file with ``O_DIRECT`` into reused buffers and ``sendall``s
them; a cached one goes by ``sendfile``, except on a TLS socket, where the bytes are read and
sent with ``sendall``.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import selectors
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .bulktls import handshake, receive_error, send_error

TOKEN_BYTES = 32
CHUNK = 4 << 20  # receive buffer, disk write and progress granularity
BUFFERS = 4  # CHUNK-sized buffers in flight while receiving: socket, disk and hash overlap
ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the largest in common use)
SEND_CHUNK = 8 << 20

Ticket = tuple[str, int, bytes]
SocketWrapper = Callable[[socket.socket], socket.socket]


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


def control_socket(conn: Any) -> socket.socket | None:
    """The socket under an rpyc connection (an ``ssl.SSLSocket`` when it speaks TLS), if any."""
    sock = getattr(getattr(getattr(conn, "_channel", None), "stream", None), "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def client_wrapper(control: socket.socket | None) -> SocketWrapper | None:
    """TLS for a side connection with ``control``'s client context (CA, certificate) and server name.

    The handshake has the socket's timeout (``open_bulk``'s ``timeout``) in total.
    """
    if not isinstance(control, ssl.SSLSocket):
        return None
    context, hostname = control.context, control.server_hostname

    def wrap(sock: socket.socket) -> socket.socket:
        total = sock.gettimeout() or 30.0  # open_bulk's timeout, for the whole handshake
        tls = context.wrap_socket(sock, server_hostname=hostname, do_handshake_on_connect=False)
        handshake(tls, total)
        return tls

    return wrap


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
    """Send ``count`` bytes of ``fd`` from ``offset``; returns bytes sent (less only at EOF).

    Three ways, chosen per call:

    - the range is not in the page cache (a file written with O_DIRECT, or not read lately) and
      the filesystem allows ``O_DIRECT``: :func:`_send_direct` reads it into a few reused aligned
      buffers in a reader thread while this thread sends the previous one. ``sendfile`` would
      first read the file into freshly allocated page cache, which on a VM that hands free
      memory back to its host costs a host fault per page (the receive side's problem, see
      :func:`recv_to_file`); reused buffers touch no new memory.
    - the range is cached and the socket is plain TCP: ``os.sendfile`` (no copy in user space);
    - a TLS socket: ``pread`` into one buffer and ``sendall`` (the kernel cannot encrypt).

    Error handling: a socket error or a timeout (the socket's own) is raised; so is a read error.
    ``progress(n)`` is called with each piece once it is handed to the socket.
    """
    if count > 0 and not _cached(fd, offset, count):
        direct = _open_direct(fd)
        if direct is not None:
            try:
                return _send_direct(sock, direct, offset, count, progress)
            finally:
                os.close(direct)
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
    """Send from the page cache through user space (TLS): ``pread`` 4 MiB, then encrypt and send it.

    One thread on purpose: a reader thread reading the next buffer while this one encrypts
    (both release the GIL) was measured to cost the sender about 0.2-0.3 CPU s per GiB more,
    at no gain in MB/s on 2 cores (``benchmarks/bench_tls_send.py``).
    """
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    sent_total = 0
    while sent_total < count:
        n = os.preadv(fd, [view[: min(CHUNK, count - sent_total)]], offset + sent_total)
        if n == 0:
            break
        try:
            sock.sendall(view[:n])
        except OSError as exc:
            raise send_error(exc, sock, sent_total, count) from None
        sent_total += n
        if progress is not None:
            progress(n)
    return sent_total


def _send_direct(
    sock: socket.socket, fd: int, offset: int, count: int, progress: Callable[[int], None] | None
) -> int:
    """Send from ``fd`` (opened with O_DIRECT): a reader thread fills aligned buffers, we send them."""
    reader = _DirectReader(fd, offset, count)
    sent_total = 0
    try:
        while (piece := reader.next_piece()) is not None:
            buf, skip, n = piece
            with memoryview(buf) as whole:
                try:
                    sock.sendall(whole[skip : skip + n])
                except OSError as exc:
                    raise send_error(exc, sock, sent_total, count) from None
            reader.give_back(buf)
            sent_total += n
            if progress is not None:
                progress(n)
    finally:
        reader.stop()
    return sent_total


_ReadPiece = tuple[mmap.mmap, int, int]


class _DirectReader:
    """``send_file``'s reader thread: aligned O_DIRECT reads into ``BUFFERS`` reused buffers, in order."""

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count
        self._stopped = threading.Event()
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, CHUNK))  # page-aligned, as O_DIRECT needs
        self._ready: queue.SimpleQueue[_ReadPiece | BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bulk-read", daemon=True)
        self._thread.start()

    def next_piece(self) -> _ReadPiece | None:
        """The next ``(buffer, bytes to skip at its start, bytes to send)``; None at the end."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def give_back(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            pos = self.offset - self.offset % ALIGN  # direct reads start on an aligned offset
            skip = self.offset - pos
            left = self.count
            while left > 0:
                buf = self._take()
                if buf is None:
                    return
                with memoryview(buf) as view:
                    n = os.preadv(self.fd, [view], pos)  # whole CHUNK: short only at the end of the file
                if n <= skip:
                    break  # the file is shorter than expected
                take = min(n - skip, left)
                self._ready.put((buf, skip, take))
                left -= take
                pos += n
                skip = 0
                if n < CHUNK:
                    break
            self._ready.put(None)
        except BaseException as exc:
            self._ready.put(exc)

    def _take(self) -> mmap.mmap | None:
        while not self._stopped.is_set():
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue
        return None


def _cached(fd: int, offset: int, count: int) -> bool:
    """Whether the first and last byte of the range are in the page cache (True if we cannot tell)."""
    if not hasattr(os, "RWF_NOWAIT"):
        return True
    probe = bytearray(1)
    try:
        for pos in {offset, offset + count - 1}:
            if os.preadv(fd, [probe], pos, os.RWF_NOWAIT) == 0:
                return True  # past the end: let the ordinary path report the short file
    except BlockingIOError:
        return False  # EAGAIN: the read would have gone to the disk
    except OSError:
        return True  # RWF_NOWAIT not supported here
    return True


def _open_direct(fd: int) -> int | None:
    """A second descriptor of ``fd``'s file opened with O_DIRECT, or None where that is not possible.

    A separate open file description (through ``/proc/self/fd``, which names the open file itself,
    never a path that could have been swapped), so other readers of ``fd``, such as a checksum
    computed meanwhile, keep their ordinary buffered reads.
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None  # no /proc, or a filesystem without direct I/O (tmpfs, some network ones)
    probe = mmap.mmap(-1, ALIGN)
    try:
        with memoryview(probe) as view:
            os.preadv(direct, [view], 0)  # some filesystems accept the flag but refuse the read
    except OSError:
        os.close(direct)
        return None
    finally:
        probe.close()
    return direct


class _Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...


def recv_to_file(
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    hasher: _Hasher | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Receive exactly ``count`` bytes into ``fd`` at ``offset``; returns ``count``.

    Three stages overlap (socket, disk, hash), each on a few reused page-aligned buffers, so
    memory stays at ``BUFFERS * CHUNK`` whatever the size. ``hasher.update`` sees the bytes in
    order; ``progress(n)`` is called in order once a piece is both written and hashed, so a
    caller's counters never run ahead of the file or the hash.

    Aligned pieces are written with ``O_DIRECT`` where the filesystem allows it: the bytes go
    from our buffer to the device without being copied into (and first allocating) page cache.
    On a VM that hands free memory back to its host, every fresh page-cache page costs a host
    fault, and buffered writes of a large file run at 150-250 MB/s there; direct writes do not
    touch new memory at all (see benchmarks/bench_files.py).

    Error handling: ConnectionError if the peer closes early, TimeoutError naming the socket's
    timeout and the bytes so far if it goes silent, ``bulktls.TLSRecordError`` ("TLS record
    refused after N bytes") if a TLS record fails its check; a socket, disk or hash error
    stops all three stages and is raised here. Pieces reported to ``progress`` are on disk.
    """
    pipe = _WritePipeline(fd, hasher, progress)
    done = 0
    try:
        while done < count:
            buf = pipe.free_buffer()
            # Pieces end on ALIGN boundaries of the file, so after the first all start aligned.
            want = min(CHUNK - (offset + done) % ALIGN, count - done)
            view = memoryview(buf)
            got = 0
            try:
                while got < want:
                    try:
                        n = sock.recv_into(view[got:want])
                    except OSError as exc:
                        raise receive_error(exc, sock, done + got, count) from None
                    if n == 0:
                        raise ConnectionError(f"data connection closed after {done + got} of {count} bytes")
                    got += n
            finally:
                view.release()
            pipe.submit(buf, offset + done, got)
            done += got
    finally:
        pipe.finish()
    return done


class _WritePipeline:
    """A disk-writer thread and a hasher thread behind ``recv_to_file``'s receiving loop."""

    def __init__(self, fd: int, hasher: _Hasher | None, progress: Callable[[int], None] | None) -> None:
        self.fd = fd
        self.hasher = hasher
        self.progress = progress
        self.error: BaseException | None = None
        self.direct = _direct_io_allowed(fd)
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._buffers = [mmap.mmap(-1, CHUNK) for _ in range(BUFFERS)]  # page-aligned, as O_DIRECT needs
        for b in self._buffers:
            self._free.put(b)
        self._to_write: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._write_loop,), name="bulk-write", daemon=True),
            threading.Thread(target=self._guard, args=(self._hash_loop,), name="bulk-hash", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def free_buffer(self) -> mmap.mmap:
        while True:
            self._raise_if_failed()
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue

    def submit(self, buf: mmap.mmap, pos: int, n: int) -> None:
        piece = _Piece(buf, pos, n)
        self._to_write.put(piece)
        self._to_hash.put(piece)

    def finish(self) -> None:
        """Wait for both stages to drain (or stop them after an error); re-raise their error."""
        self._to_write.put(None)
        self._to_hash.put(None)
        for t in self._threads:
            t.join()
        if self.direct:
            _set_direct(self.fd, False)
        self._raise_if_failed()
        # Buffers are left to the garbage collector: a failed stage may still hold a view.

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            # Unblock the other stages: they see the error and drain without working.
            self._to_write.put(None)
            self._to_hash.put(None)
            for b in self._buffers:
                self._free.put(b)

    def _write_loop(self) -> None:
        while (piece := self._to_write.get()) is not None:
            if self.error is not None:
                return
            self._write(piece)
            piece.written.set()

    def _write(self, piece: _Piece) -> None:
        with memoryview(piece.buf) as whole:
            view = whole[: piece.n]
            direct = self.direct and piece.pos % ALIGN == 0 and piece.n % ALIGN == 0
            if self.direct:
                _set_direct(self.fd, direct)
            done = 0
            while done < piece.n:
                try:
                    done += os.pwrite(self.fd, view[done:], piece.pos + done)
                except OSError as exc:
                    if not (direct and exc.errno == errno.EINVAL):
                        raise
                    # The filesystem refused direct I/O after all (alignment it needs): go buffered.
                    self.direct = direct = False
                    _set_direct(self.fd, False)
            view.release()

    def _hash_loop(self) -> None:
        while (piece := self._to_hash.get()) is not None:
            # Hash only what is on disk, so a failure never leaves the hash ahead of the file;
            # the writer is already on the next piece meanwhile.
            while not piece.written.wait(0.5):
                if self.error is not None:
                    return
            if self.error is not None:
                return
            if self.hasher is not None:
                with memoryview(piece.buf) as view:
                    self.hasher.update(view[: piece.n])  # releases the GIL: runs beside the socket
            if self.progress is not None:
                self.progress(piece.n)
            self._free.put(piece.buf)


class _Piece:
    __slots__ = ("buf", "n", "pos", "written")

    def __init__(self, buf: mmap.mmap, pos: int, n: int) -> None:
        self.buf = buf
        self.pos = pos
        self.n = n
        self.written = threading.Event()


def _direct_io_allowed(fd: int) -> bool:
    """Whether ``fd`` (a regular file) accepts O_DIRECT; it is left off either way."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        _set_direct(fd, True)
    except OSError:
        return False  # tmpfs and some network filesystems: buffered writes it is
    _set_direct(fd, False)
    return True


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if want != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


def _is_tls(sock: socket.socket) -> bool:
    return type(sock).__name__ == "SSLSocket"

"""A design measured and not adopted: TLS over a plain socket through memory BIOs.

Kept for ``benchmarks/bench_tlsbio.py``, which compares it with ``ssl.SSLSocket``; nothing in
``rpyc_host``, ``services`` or ``client`` imports it. It was slower than ``SSLSocket`` on both
ends (one loaded run: 654 MB/s and 0.83 / 0.77 CPU s per GiB sender / receiver, against
792 MB/s and 0.61 / 0.60): system calls are cheap on this kernel, the BIOs add two copies per
byte and a memset, and ``SSLObject.read`` still returns one record per call. The host's side
connection is an ``ssl.SSLSocket`` (``rpyc_host.wire.bulktls`` gives it a whole-handshake
deadline and clear errors).

``ssl.SSLSocket`` hands back one TLS record (at most 16 KiB) per ``recv_into`` and OpenSSL,
without read-ahead, reads each record with two ``read`` system calls; on send it writes each
record with its own system call. :class:`TLSChannel` drives an ``ssl.SSLObject``
(``context.wrap_bio``) instead: it receives up to ``CIPHER_CHUNK`` bytes of ciphertext per
``recv_into``, feeds them to the incoming BIO and decrypts record after record into the
caller's buffer with no system call in between; it encrypts up to ``WRITE_PIECE`` bytes at a
time into the outgoing BIO and sends that ciphertext with one ``sendall``.

What it bought was control (one deadline for the whole handshake, errors naming the bytes
before a damaged record, a clean close); ``SSLSocket`` gives the first natively and the
second through the host's error mapping.

The context is the caller's (certificate, CA, minimum version and hostname checks are the
context's, exactly as with ``wrap_socket``). The channel behaves like the socket subset the
bulk side connection uses (``recv_into``, ``recv``, ``sendall``, timeouts, ``close``), and like
a non-blocking ``SSLSocket`` in its handshake: :meth:`TLSChannel.do_handshake` raises
``ssl.SSLWantReadError`` / ``ssl.SSLWantWriteError`` when a non-blocking socket is not ready.

Usage::

    chan = TLSChannel(sock, context, server_side=False, server_hostname="files.example")
    chan.handshake(timeout=10)        # blocking, one deadline for the whole handshake
    chan.sendall(data)

Error handling: a record that fails its integrity check raises :class:`TLSRecordError` (a
``ConnectionError``) naming the byte count it came after; a peer that closes mid-handshake
raises ``ConnectionError``; a silent peer raises ``TimeoutError`` naming the seconds waited.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

CIPHER_CHUNK = 1 << 20  # ciphertext received per system call (64 full records)
WRITE_PIECE = 256 << 10  # plaintext encrypted per outgoing-BIO drain and sendall (stays in cache)
DRAIN_READS = 8  # at most this many CIPHER_CHUNKs discarded at close (a peer still sending gets a reset)


class TLSRecordError(ConnectionError):
    """A TLS record from the peer was refused (bad authentication tag, malformed record)."""


class TLSChannel:
    """One TLS connection over ``sock`` through an ``ssl.SSLObject``; see the module docstring."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._cipher = bytearray(CIPHER_CHUNK)
        self._cipher_view = memoryview(self._cipher)
        self._unsent = b""  # ciphertext a non-blocking send did not take yet
        self._eof = False
        self.received = 0  # plaintext bytes handed to callers
        self.context = context

    # -- handshake ---------------------------------------------------------------------------------

    def do_handshake(self) -> None:
        """The handshake on a non-blocking socket: raises SSLWantRead/WriteError until it is done."""
        while not self._handshake_step():
            pass

    def handshake(self, timeout: float) -> None:
        """The whole handshake on a blocking socket, within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        before = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"TLS handshake not finished within {timeout:g} s")
                self.sock.settimeout(left)  # every receive ends by the deadline
                if self._handshake_step():
                    return
        except TimeoutError:
            raise TimeoutError(f"TLS handshake not finished within {timeout:g} s") from None
        finally:
            self.sock.settimeout(before)

    def _handshake_step(self) -> bool:
        """Flush, advance the handshake, and receive once if it needs more; True once done."""
        self._flush()
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            if self._fill() == 0:
                raise ConnectionError("peer closed the connection during the TLS handshake") from None
            return False
        self._flush()  # the last flight (TLS 1.3 session tickets from a server)
        return True

    # -- data --------------------------------------------------------------------------------------

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Decrypt into ``buffer``: what is already received, else one receive's worth; 0 at EOF."""
        with memoryview(buffer) as whole:
            view = whole.cast("B") if whole.format != "B" else whole
            want = nbytes or len(view)
            if want == 0:
                return 0
            if want < len(view):
                view = view[:want]
            read: Any = self._tls.read  # with a buffer it returns a count; one record per call
            got = 0
            while True:
                try:
                    while got < want:
                        got += read(want - got, view[got:])
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True  # closed, with or without close_notify: the caller counts bytes
                except ssl.SSLError as exc:
                    raise TLSRecordError(
                        f"TLS record refused after {self.received + got} bytes: {exc.reason or exc}"
                    ) from None
                if got or self._eof:
                    self.received += got
                    return got
                self._flush()  # a key update or alert the read produced
                if self._fill() == 0:
                    self._eof = True

    def recv(self, bufsize: int) -> bytes:
        buf = bytearray(bufsize)
        n = self.recv_into(buf)
        return bytes(buf[:n])

    def sendall(self, data: Any) -> None:
        """Encrypt ``data`` a piece at a time and send each piece's ciphertext with one call."""
        with memoryview(data) as whole:
            view = whole.cast("B") if whole.format != "B" else whole
            for start in range(0, len(view), WRITE_PIECE):
                self._tls.write(view[start : start + WRITE_PIECE])
                self._send_out()

    # -- socket plumbing ---------------------------------------------------------------------------

    def _fill(self) -> int:
        """Receive one chunk of ciphertext into the incoming BIO; 0 when the peer closed."""
        try:
            n = self.sock.recv_into(self._cipher_view)
        except BlockingIOError:
            raise ssl.SSLWantReadError("no ciphertext yet") from None
        except TimeoutError:
            raise TimeoutError(
                f"TLS peer sent nothing for {self.sock.gettimeout():g} s (after {self.received} bytes)"
            ) from None
        if n:
            self._incoming.write(self._cipher_view[:n])
        else:
            self._incoming.write_eof()
        return n

    def _flush(self) -> None:
        """Send pending ciphertext; on a non-blocking socket, SSLWantWriteError if some is left."""
        if self._outgoing.pending:
            self._unsent += self._outgoing.read()
        if not self._unsent:
            return
        if self.sock.gettimeout() == 0.0:
            try:
                n = self.sock.send(self._unsent)
            except BlockingIOError:
                n = 0
            self._unsent = self._unsent[n:]
            if self._unsent:
                raise ssl.SSLWantWriteError("socket send buffer full")
        else:
            self.sock.sendall(self._unsent)
            self._unsent = b""

    def _send_out(self) -> None:
        if self._unsent:
            self._flush()
        try:
            self.sock.sendall(self._outgoing.read())
        except TimeoutError:
            raise TimeoutError(f"TLS peer took no data for {self.sock.gettimeout():g} s") from None

    def getpeercert(self) -> Any:
        return self._tls.getpeercert()

    def cipher(self) -> Any:
        return self._tls.cipher()

    def version(self) -> str | None:
        return self._tls.version()

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.sock.setsockopt(level, option, value)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close the socket, first discarding what the peer sent that nobody read.

        A TLS 1.3 server sends session tickets after the handshake; a sender that never reads
        would close with them unread, and the kernel then answers with a reset instead of a
        FIN, which makes the peer drop bytes it has received but not yet read.
        """
        try:
            self.sock.setblocking(False)  # with a timeout, recv would first wait for data
            for _ in range(DRAIN_READS):
                if not self.sock.recv_into(self._cipher_view):
                    break
        except OSError:
            pass  # nothing more queued (EAGAIN), or the connection is gone already
        self.sock.close()

    def __enter__(self) -> TLSChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

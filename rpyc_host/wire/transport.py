"""Socket streams and channels tuned for throughput, wire-compatible with stock rpyc.

rpyc's ``SocketStream.write`` re-slices the remaining buffer after every 64 kB send (quadratic
in the frame size), its ``Channel.send`` copies the payload into header+data, and zlib is on for
every frame over 3 kB. Here a frame goes out with one gather ``sendmsg`` (no copy), is read
with ``recv_into`` a buffer of the right size, and is never compressed unless asked. The frame
format is unchanged (``!LB`` header, payload, ``\\n``), so a stock rpyc peer interoperates; the
receiver honours the per-frame compression flag either way.

Small frames are read through a receive buffer: one ``recv`` takes the header and the payload
(and whatever follows) where rpyc makes two, and ``poll`` answers from the buffer without a
system call. Every system call releases the GIL, and under concurrency each release can cost a
wait for another thread to hand it back, so calls per frame matter more than their own time.
"""

from __future__ import annotations

import select
import socket
import ssl
import zlib
from typing import Any

from rpyc.core import consts
from rpyc.core.channel import Channel
from rpyc.core.stream import SocketStream
from rpyc.lib import Timeout

from .errors import FrameTooLarge, PeerStalled

_HEADER = Channel.FRAME_HEADER
_FLUSHER = Channel.FLUSHER
_RECV_CHUNK = 1 << 20
# What one buffered recv asks for: several small frames, or a few TLS records (16 KiB each).
_BUFFERED = 1 << 16


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: a frame split over several writes must not wait for a delayed ACK."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FastSocketStream(SocketStream):
    """A ``SocketStream`` whose reads and writes avoid quadratic slicing.

    ``stall`` (seconds) bounds how long the peer may keep a half-read frame or a half-sent reply
    waiting. It is enforced without a socket timeout, which would make CPython poll() before
    every send (and, on a plain socket, every recv): plain I/O uses MSG_DONTWAIT, a TLS socket is
    put in non-blocking mode (``ssl.SSLWantReadError`` / ``SSLWantWriteError`` then say a record
    is not complete yet), and either polls, bounded by ``stall``, only when the peer is not ready.
    """

    __slots__ = ("_nowait", "_poller", "_rbuf", "_rpos", "stall")

    def __init__(self, sock: socket.socket, stall: float | None = None) -> None:
        super().__init__(sock)
        self.stall = stall
        # The flags of a recv or send that must not wait. SSLSocket refuses flags: a TLS socket
        # with a stall limit is made non-blocking instead.
        self._nowait = 0
        if stall is not None:
            if _is_tls(sock):
                sock.setblocking(False)
            else:
                self._nowait = socket.MSG_DONTWAIT
        # Received bytes not yet read: _rbuf[_rpos:]. Empty between frames (an idle connection
        # keeps no buffer).
        self._rbuf = b""
        self._rpos = 0
        self._poller: select.poll | None = None

    def _stalled(self) -> PeerStalled:
        self.close()
        return PeerStalled("peer stalled in the middle of a frame")

    def _wait(self, event: int) -> None:
        assert self.stall is not None
        poller = select.poll()
        poller.register(self.sock.fileno(), event)
        if not poller.poll(self.stall * 1000):
            raise self._stalled()

    def _recv_into(self, view: memoryview) -> int:
        flags = self._nowait
        while True:
            try:
                return self.sock.recv_into(view, min(len(view), _RECV_CHUNK), flags)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(select.POLLIN)
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT)
            except InterruptedError:
                continue
            except TimeoutError:  # a TLS socket's timeout: the same stall limit
                raise self._stalled() from None
            except OSError as exc:
                self.close()
                raise EOFError(exc) from exc

    def _recv_some(self) -> bytes:
        """At least one byte (up to _BUFFERED), waiting within the stall limit; EOFError at the end."""
        flags = self._nowait
        while True:
            try:
                data = self.sock.recv(_BUFFERED, flags)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(select.POLLIN)
                continue
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT)
                continue
            except InterruptedError:
                continue
            except TimeoutError:
                raise self._stalled() from None
            except OSError as exc:
                self.close()
                raise EOFError(exc) from exc
            if not data:
                self.close()
                raise EOFError("connection closed by peer")
            return data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (TLS: decrypted ones the TLS layer holds too)."""
        held = len(self._rbuf) - self._rpos
        pending = getattr(self.sock, "pending", None)
        return held + (pending() if pending is not None else 0)

    def fill(self) -> bool:
        """One non-blocking ``recv`` into the buffer, for a caller told the socket is readable:
        False if nothing was there after all. A TLS socket is left to the next read, which waits
        within the stall limit (readable may mean part of a record). Raises EOFError if the peer
        has closed."""
        if self.stall is None or self._nowait == 0:
            return True
        try:
            data = self.sock.recv(_BUFFERED, self._nowait)
        except (BlockingIOError, InterruptedError):
            return self.buffered > 0
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc
        if not data:
            self.close()
            raise EOFError("connection closed by peer")
        self._rbuf = self._rbuf[self._rpos :] + data if self._rpos < len(self._rbuf) else data
        self._rpos = 0
        return True

    def _take_buffered(self) -> bytes:
        data = self._rbuf[self._rpos :]
        self._rbuf, self._rpos = b"", 0
        return data

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise EOFError."""
        if self._rpos < len(self._rbuf):
            held = self._take_buffered()
            n = min(len(held), len(view))
            view[:n] = held[:n]
            if n < len(held):
                self._rbuf = held[n:]
            view = view[n:]
        while view:
            n = self._recv_into(view)
            if not n:
                self.close()
                raise EOFError("connection closed by peer")
            view = view[n:]

    def read(self, count: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        have = len(buf) - pos
        if have >= count:  # the usual case for a payload: its header's recv brought it along
            end = pos + count
            if end == len(buf):
                self._rbuf, self._rpos = b"", 0  # drained: keep nothing between frames
            else:
                self._rpos = end
            return buf[pos:end]
        if count - have > _BUFFERED:
            # Big: what is buffered, then straight into the result (no buffer in between).
            out = bytearray(count)
            out[:have] = self._take_buffered()
            self.read_into(memoryview(out)[have:])
            return bytes(out)
        parts = [self._take_buffered()] if have else []
        while have < count:
            data = self._recv_some()
            parts.append(data)
            have += len(data)
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        if have > count:
            self._rbuf, self._rpos = buf, count
        return buf[:count] if have > count else buf

    def read_growing(self, count: int) -> bytearray:
        """Read ``count`` bytes into a buffer that grows with what arrives (never more than twice
        what the peer really sent), so a header announcing a huge frame costs nothing by itself."""
        buf = bytearray(min(count, _RECV_CHUNK))
        got = 0
        while got < count:
            if got == len(buf):
                buf.extend(bytes(min(len(buf), count - len(buf))))
            with memoryview(buf) as view:
                self.read_into(view[got : min(len(buf), got + _RECV_CHUNK)])
            got = min(len(buf), got + _RECV_CHUNK)
        return buf

    def poll(self, timeout: Any) -> bool:
        """Whether a read would find data within ``timeout`` (seconds, or rpyc's ``Timeout``);
        buffered bytes answer at once, and one poll object per stream serves every wait."""
        if self.buffered:
            return True
        if self.closed or self.sock.fileno() < 0:
            return bool(super().poll(timeout))  # closed: raises as rpyc's own does
        if isinstance(timeout, Timeout):
            left = timeout.timeleft()
        else:  # plain seconds, as the host's serving loops pass them: no Timeout built per wait
            left = None if timeout is None or timeout < 0 else timeout
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(None if left is None else max(0.0, left) * 1000))

    def writev(self, parts: list[bytes | memoryview]) -> None:
        """Send every part in order, as few system calls as the kernel allows."""
        sock = self.sock
        flags = self._nowait
        try:
            if _is_tls(sock):
                for part in parts:
                    self._send_tls(part)
                return
            if not hasattr(sock, "sendmsg"):
                for part in parts:
                    sock.sendall(part)
                return
            views = [memoryview(p) for p in parts if len(p)]
            while views:
                try:
                    sent = sock.sendmsg(views, (), flags)
                except BlockingIOError:
                    self._wait(select.POLLOUT)  # the peer is not reading: wait, within the limit
                    continue
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except TimeoutError:
            raise self._stalled() from None
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc

    def _send_tls(self, part: bytes | memoryview) -> None:
        """All of ``part`` through a TLS socket. A non-blocking ``SSL_write`` that raises
        SSLWantWriteError has kept what it encrypted and must be retried with the same bytes."""
        sock = self.sock
        with memoryview(part) as view, view.cast("B") as data:
            done = 0
            while done < len(data):
                try:
                    done += sock.send(data[done:])
                except ssl.SSLWantWriteError:
                    if self.stall is None:
                        raise
                    self._wait(select.POLLOUT)
                except ssl.SSLWantReadError:
                    if self.stall is None:
                        raise
                    self._wait(select.POLLIN)
                except InterruptedError:
                    continue

    def write(self, data: bytes) -> None:
        # A small frame almost always fits the socket buffer: one send(), no gather list.
        flags = self._nowait
        try:
            sent = self.sock.send(data, flags)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except TimeoutError:
            raise self._stalled() from None
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc
        if sent < len(data):
            self.writev([memoryview(data)[sent:]])


def _is_tls(sock: socket.socket) -> bool:
    # SSLSocket.sendmsg raises NotImplementedError; it has its own record framing anyway.
    return type(sock).__name__ == "SSLSocket"


class FastChannel(Channel):
    """A ``Channel`` over a :class:`FastSocketStream`; compression only when enabled.

    ``max_frame`` bounds what a peer can make this side buffer: a header announcing more closes
    the connection before anything is read, and a compressed frame may not inflate past it.
    """

    __slots__ = ("bytes_in", "bytes_out", "max_frame", "requests")

    def __init__(
        self, stream: FastSocketStream, compress: bool = False, max_frame: int | None = None
    ) -> None:
        super().__init__(stream, compress=compress)
        self.max_frame = max_frame
        # Frame bytes each way (before compression) and requests received, for the line a host
        # logs when a connection closes: counted here, one addition per frame, rather than in
        # a subclass's overrides, whose extra calls cost more than the counting.
        self.bytes_in = self.bytes_out = self.requests = 0

    def send(self, data: bytes) -> None:
        self.bytes_out += len(data)
        compressed = 0
        if self.compress and len(data) > self.COMPRESSION_THRESHOLD:
            compressed = 1
            data = zlib.compress(data, self.COMPRESSION_LEVEL)
        header = _HEADER.pack(len(data), compressed)
        if len(data) < 16384:
            # Small frames: one concatenation is cheaper than building a gather list.
            self.stream.write(header + data + _FLUSHER)
        else:
            self.stream.writev([header, data, _FLUSHER])

    def recv(self) -> bytes:
        length, compressed = _HEADER.unpack(self.stream.read(_HEADER.size))
        if self.max_frame is not None and length > self.max_frame:
            self.stream.close()
            raise FrameTooLarge(f"peer announced a {length}-byte frame; the limit is {self.max_frame}")
        if length < _RECV_CHUNK:
            data = self.stream.read(length + len(_FLUSHER))[:-1]
            if compressed:
                data = self._inflate(data)
        else:
            buf = self.stream.read_growing(length + len(_FLUSHER))
            del buf[length:]
            # zlib reads the bytearray itself: copying a large compressed frame into bytes
            # first would be one more pass over it with the GIL held.
            data = self._inflate(buf) if compressed else bytes(buf)
        self.bytes_in += len(data)
        if data[:1] == _REQUEST:
            self.requests += 1
        return data

    def _inflate(self, data: bytes | bytearray) -> bytes:
        if self.max_frame is None:
            return zlib.decompress(data)
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, self.max_frame + 1)
        if len(out) > self.max_frame or inflater.unconsumed_tail:
            self.stream.close()
            raise FrameTooLarge(f"compressed frame inflates past the {self.max_frame}-byte limit")
        return out


_REQUEST = bytes([consts.MSG_REQUEST])


def make_channel(
    sock: socket.socket, compress: bool = False, max_frame: int | None = None, stall: float | None = None
) -> FastChannel:
    """Wrap a connected socket (plain or TLS) in a tuned channel; see FastSocketStream for ``stall``."""
    tune_socket(sock)
    return FastChannel(FastSocketStream(sock, stall), compress=compress, max_frame=max_frame)

"""Socket streams and channels tuned for throughput, wire-compatible with stock rpyc.

rpyc's ``SocketStream.write`` re-slices the remaining buffer after every 64 kB send (quadratic
in the frame size), its ``Channel.send`` copies the payload into header+data, and zlib is on for
every frame over 3 kB. Here a frame goes out with one gather ``sendmsg`` (no copy), is read
with ``recv_into`` a buffer of the right size, and is never compressed unless asked. The frame
format is unchanged (``!LB`` header, payload, ``\\n``), so a stock rpyc peer interoperates; the
receiver honours the per-frame compression flag either way.
"""

from __future__ import annotations

import socket
import zlib

from rpyc.core.channel import Channel
from rpyc.core.stream import SocketStream

_HEADER = Channel.FRAME_HEADER
_FLUSHER = Channel.FLUSHER
_RECV_CHUNK = 1 << 20


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: a frame split over several writes must not wait for a delayed ACK."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FastSocketStream(SocketStream):
    """A ``SocketStream`` whose reads and writes avoid quadratic slicing."""

    __slots__ = ()

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise EOFError."""
        sock = self.sock
        while view:
            try:
                n = sock.recv_into(view, min(len(view), _RECV_CHUNK))
            except InterruptedError:
                continue
            except TimeoutError:
                # The socket's timeout is the host's stall limit: a peer that stops mid-frame is gone.
                self.close()
                raise EOFError("peer stalled in the middle of a frame") from None
            except OSError as exc:
                self.close()
                raise EOFError(exc) from exc
            if not n:
                self.close()
                raise EOFError("connection closed by peer")
            view = view[n:]

    def read(self, count: int) -> bytes:
        # Small frames usually arrive whole: one recv, no buffer juggling.
        try:
            first = self.sock.recv(count)
        except InterruptedError:
            first = b""
        except TimeoutError:
            self.close()
            raise EOFError("peer stalled in the middle of a frame") from None
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc
        if len(first) == count:
            return first
        # Short or empty (EOF, timeout): read_into finishes the job or raises EOFError.
        buf = bytearray(count)
        buf[: len(first)] = first
        self.read_into(memoryview(buf)[len(first) :])
        return bytes(buf)

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

    def poll(self, timeout: float | None) -> bool:
        # A TLS socket may hold decrypted bytes the kernel no longer reports as readable.
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        return bool(super().poll(timeout))

    def writev(self, parts: list[bytes | memoryview]) -> None:
        """Send every part in order, as few system calls as the kernel allows."""
        sock = self.sock
        try:
            if not hasattr(sock, "sendmsg") or _is_tls(sock):
                for part in parts:
                    sock.sendall(part)
                return
            views = [memoryview(p) for p in parts if len(p)]
            while views:
                sent = sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc

    def write(self, data: bytes) -> None:
        self.writev([data])


def _is_tls(sock: socket.socket) -> bool:
    # SSLSocket.sendmsg raises NotImplementedError; it has its own record framing anyway.
    return type(sock).__name__ == "SSLSocket"


class FrameTooLarge(EOFError):
    """The peer announced a frame over the limit; the connection is closed unread."""


class FastChannel(Channel):
    """A ``Channel`` over a :class:`FastSocketStream`; compression only when enabled.

    ``max_frame`` bounds what a peer can make this side buffer: a header announcing more closes
    the connection before anything is read, and a compressed frame may not inflate past it.
    """

    __slots__ = ("max_frame",)

    def __init__(
        self, stream: FastSocketStream, compress: bool = False, max_frame: int | None = None
    ) -> None:
        super().__init__(stream, compress=compress)
        self.max_frame = max_frame

    def send(self, data: bytes) -> None:
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
        else:
            buf = self.stream.read_growing(length + len(_FLUSHER))
            del buf[length:]
            data = bytes(buf)
        if not compressed:
            return data
        if self.max_frame is None:
            return zlib.decompress(data)
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, self.max_frame + 1)
        if len(out) > self.max_frame or inflater.unconsumed_tail:
            self.stream.close()
            raise FrameTooLarge(f"compressed frame inflates past the {self.max_frame}-byte limit")
        return out


def make_channel(sock: socket.socket, compress: bool = False, max_frame: int | None = None) -> FastChannel:
    """Wrap a connected socket (plain or TLS) in a tuned channel."""
    tune_socket(sock)
    return FastChannel(FastSocketStream(sock), compress=compress, max_frame=max_frame)

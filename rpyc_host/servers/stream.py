"""The stream a host server serves a connection on: waiting for a request is the read itself.

rpyc waits for the next frame with ``poll()`` and then reads it, two system calls. Each one
releases the GIL, and with a thread per connection under load each release and re-take is a
futex hand-off between threads that costs more CPU than the call itself. Here the wait is one
blocking ``recv`` into the stream's buffer, bounded by the kernel's receive timeout
(``SO_RCVTIMEO``) instead of a ``poll`` timeout: one system call where there were two. The
timeout is set only when the wanted one moves by more than 1% (plus a millisecond), so a
connection waiting with the same idle limit sets it once in a while, not per request.

Reads in the middle of a frame keep ``MSG_DONTWAIT`` and the stall limit (the receive timeout
does not apply to them), and TLS sockets keep rpyc's poll (a record may need several reads).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from rpyc.lib import Timeout

from ..wire.transport import _BUFFERED, FastSocketStream

_TIMEVAL = struct.Struct("@ll")
_FOREVER = -1.0  # the receive timeout currently set: none (wait forever)


class ServingSocketStream(FastSocketStream):
    """A :class:`FastSocketStream` whose ``poll`` reads what it waits for (plain sockets)."""

    __slots__ = ("_plain", "_rcvtimeo")

    def __init__(self, sock: socket.socket, stall: float | None = None) -> None:
        super().__init__(sock, stall)
        # A plain socket in blocking mode: the only kind whose recv waits for the receive timeout.
        self._plain = self.stall is not None and sock.gettimeout() is None
        self._rcvtimeo = _FOREVER

    @property
    def buffered(self) -> int:
        if self._plain:  # no TLS layer to ask (and no getattr that misses, per request)
            return len(self._rbuf) - self._rpos
        return super().buffered

    def _set_rcvtimeo(self, seconds: float) -> None:
        whole = int(seconds)
        micro = int((seconds - whole) * 1e6)
        if not whole and not micro:
            micro = 1  # a zero timeval means no timeout at all
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micro))
        self._rcvtimeo = seconds

    def poll(self, timeout: Any) -> bool:
        """Whether data arrived within ``timeout`` (seconds, None, or rpyc's ``Timeout``); what
        arrived is kept for the next read. True at the peer's end too (the read then raises)."""
        if self._rpos < len(self._rbuf):
            return True
        if not self._plain or self.closed:
            return super().poll(timeout)
        left = timeout.timeleft() if isinstance(timeout, Timeout) else timeout
        sock = self.sock
        try:
            if left is not None and left <= 0:
                data = sock.recv(_BUFFERED, socket.MSG_DONTWAIT)
            else:
                if left is None:
                    if self._rcvtimeo != _FOREVER:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, 0))
                        self._rcvtimeo = _FOREVER
                elif self._rcvtimeo == _FOREVER or abs(self._rcvtimeo - left) > 0.001 + left / 100:
                    self._set_rcvtimeo(left)
                data = sock.recv(_BUFFERED)
        except (BlockingIOError, InterruptedError):
            return False  # the timeout passed (or a signal came) with nothing to read
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc
        if data:
            self._rbuf, self._rpos = data, 0
        # b"": the peer closed; the next read sees the same end and raises EOFError.
        return True

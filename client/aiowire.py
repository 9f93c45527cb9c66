"""Many asyncio tasks' requests leave in one write: a channel that gathers the frames sent
during one turn of the event loop and writes them together when the turn ends.

A frame is gathered only while :meth:`CoalescingChannel.gathering` is on (the asyncio client
turns it on around each asynchronous send, in the loop's thread); every other send (a blocking
call, rpyc deleting a remote reference, closing) first writes what was gathered, then its own
frame, so frames leave in the order they were sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rpyc_host.wire.transport import FastChannel, FastSocketStream

_HEADER = FastChannel.FRAME_HEADER
_FLUSHER = FastChannel.FLUSHER
GATHER_BELOW = 16384  # larger frames are written at once: no copy into the batch


class CoalescingChannel(FastChannel):
    """A :class:`FastChannel` whose small frames, sent from the loop, leave once per loop turn."""

    __slots__ = ("_batch", "_gathering", "_lock", "_loop", "_scheduled")

    def __init__(self, channel: FastChannel, loop: asyncio.AbstractEventLoop) -> None:
        stream: FastSocketStream = channel.stream
        super().__init__(stream, compress=channel.compress, max_frame=channel.max_frame)
        self._loop = loop
        self._lock = threading.Lock()
        self._batch: list[bytes] = []
        self._gathering = False
        self._scheduled = False

    @contextmanager
    def gathering(self) -> Iterator[None]:
        """Frames sent in this block (from the loop's thread) wait for the end of the turn."""
        self._gathering = True
        try:
            yield
        finally:
            self._gathering = False

    def send(self, data: bytes) -> None:
        if self._gathering and not self.compress and len(data) < GATHER_BELOW:
            with self._lock:
                self._batch.append(_HEADER.pack(len(data), 0) + data + _FLUSHER)
                if not self._scheduled:
                    self._scheduled = True
                    self._loop.call_soon(self.flush)
            return
        with self._lock:
            self._write_batch()
            super().send(data)

    def flush(self) -> None:
        """Write what was gathered (the loop calls this at the end of the turn)."""
        try:
            with self._lock:
                self._write_batch()
        except (EOFError, OSError):
            pass  # the connection is gone: the reader sees it too and fails the calls waiting

    def _write_batch(self) -> None:
        self._scheduled = False
        if self._batch:
            batch, self._batch = self._batch, []
            self.stream.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            super().close()


def coalesce(conn: Any, loop: asyncio.AbstractEventLoop) -> CoalescingChannel | None:
    """Put a :class:`CoalescingChannel` under ``conn`` (before anything else reads or writes
    it); None when its channel is not the client library's (it is then left as it is)."""
    channel = getattr(conn, "_channel", None)
    if type(channel) is not FastChannel:
        return None
    conn._channel = CoalescingChannel(channel, loop)
    return conn._channel

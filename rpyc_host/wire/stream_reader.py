"""The client's side of a streamed result: a local iterator over a host's :class:`Stream`.

:class:`~rpyc_host.wire.remote.WireConnection` turns every stream a host returns into a
:class:`StreamReader`. It fetches chunks of ``chunk`` items and keeps at most one more chunk
requested ahead (an asynchronous request) while the current one is consumed, so memory stays
bounded however long the stream. It closes the remote stream on :meth:`close`, at the end of a
``with`` block and when it is dropped (an early ``break``). An error the source raised arrives,
after the items produced before it, as its own type with a clean message.

Usage::

    with conn.root.count(10**6) as numbers:       # or numbers.chunked(4096) for bigger chunks
        for n in numbers:
            ...
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rpyc.core import consts

from .streams import CHUNK_BYTES, DEFAULT_CHUNK_ITEMS

CONFIG_KEY = "stream_chunk"  # connection config: items per chunk for this connection's streams


class StreamReader:
    """A local iterator over a remote stream; see the module docstring."""

    def __init__(self, conn: Any, ref: Any, chunk: int | None = None) -> None:
        self._conn = conn
        self._ref: Any = ref
        self._chunk = 0
        self.chunked(chunk or int(conn._config.get(CONFIG_KEY) or DEFAULT_CHUNK_ITEMS))
        self._items: Any = iter(())
        self._pending: Any = None  # the chunk requested ahead
        self._done = False  # the host said there is nothing more

    def chunked(self, items: int) -> StreamReader:
        """Ask for ``items`` per chunk from now on (the host serves at most 65,536); returns self."""
        if type(items) is not int or items < 1:
            raise ValueError(f"chunk must be an int >= 1, got {items!r}")
        self._chunk = items
        return self

    @property
    def closed(self) -> bool:
        return self._ref is None

    def _request(self) -> Any:
        return self._conn.async_request(
            consts.HANDLE_CALLATTR,
            self._ref,
            "next_chunk",
            (self._chunk, CHUNK_BYTES),
            (),
            timeout=None,  # bounded when read: a chunk read ahead may wait on a slow consumer
        )

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> Any:
        for item in self._items:  # the common case: the next item of the chunk at hand
            return item
        while True:
            if self._done or self._ref is None:
                raise StopIteration
            pending = self._pending if self._pending is not None else self._request()
            self._pending = None
            # The call timeout bounds this wait, from now: a reply read ahead may already sit
            # unread in the socket, however long the consumer took with the previous chunk.
            pending.set_expiry(self._conn._config["sync_request_timeout"])
            try:
                items, done = pending.value
            except BaseException:
                self._done = True  # the host closed the stream when it raised
                self._ref = None
                raise
            self._done = bool(done)
            if done:
                self._ref = None  # the host closed it: let rpyc release its reference now
            else:
                self._pending = self._request()  # read ahead while this chunk is consumed
            self._items = iter(items)
            for item in self._items:
                return item

    def close(self) -> None:
        """Close the remote stream (its generator's ``finally`` runs there); idempotent."""
        ref, self._ref = self._ref, None
        self._items = iter(())
        self._pending = None
        if ref is None or self._done or self._conn.closed:
            return
        try:
            self._conn.sync_request(consts.HANDLE_CALLATTR, ref, "close", (), ())
        except EOFError:
            pass  # the connection went away, and with it the stream

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped unfinished (a loop left early): ask the host to close it without waiting.
        ref = getattr(self, "_ref", None)
        if ref is None or self._done:
            return
        try:
            if not self._conn.closed:
                self._conn.async_request(consts.HANDLE_CALLATTR, ref, "close", (), ())
        except Exception:  # never raise from a finalizer
            pass

"""Streamed results: a remote iterator fetched in chunks instead of one round trip per item.

A host returns a :class:`Stream` when an exposed method's result is a generator or another
iterator. The client library asks it for chunks, ``next_chunk(max_items, max_bytes)`` giving
``(items, done)``: up to ``max_items`` plain values, fewer once they add up to about
``max_bytes``. A plain rpyc client sees an object with ``__iter__``/``__next__`` and iterates
it item by item exactly as it iterated the generator before.

Production happens only inside those calls (no thread per stream), in the call context the
stream was created with: its deadline also ends a stream left open past it. The source is
closed (``generator.close()``, so its ``finally`` blocks run) when the stream is exhausted,
fails, is closed by the client, dropped, or when its connection closes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from rpyc.core import brine

from . import context
from .errors import DeadlineExceeded

DEFAULT_CHUNK_ITEMS = 1024  # what a client asks for unless told otherwise
MAX_CHUNK_ITEMS = 65_536  # a larger request is served as this many
CHUNK_BYTES = 1 << 20  # a chunk stops growing once its items add up to about this much
PLAIN_TYPES = "None, bool, int, float, complex, str, bytes, and tuples or frozensets of them"

log = logging.getLogger(__name__)


def plain_size(item: Any) -> int:
    """About how many bytes ``item`` takes on the wire; -1 if brine cannot carry it by value."""
    kind = type(item)
    if kind is int or kind is float or kind is bool or item is None:
        return 9
    if kind is str or kind is bytes:
        return len(item) + 5
    if kind is tuple or kind is frozenset:
        total = 5
        for part in item:
            size = plain_size(part)
            if size < 0:
                return -1
            total += size
        return total
    return 17 if brine.dumpable(item) else -1


class Stream:
    """The server's side of one streamed result; see the module docstring.

    ``on_close`` runs once, when the source has been closed (the host gives back the stream's
    place in its budget there).
    """

    def __init__(
        self,
        source: Iterator[Any],
        ctx: context.CallContext | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._source: Iterator[Any] | None = source
        self._ctx = ctx
        self._on_close = on_close
        self._lock = threading.Lock()
        self._closing = False
        self._error: BaseException | None = None  # raised by the next call, after the items before it
        self.sent = 0  # items handed out so far

    @property
    def closed(self) -> bool:
        return self._source is None

    @property
    def expired(self) -> bool:
        return self._ctx is not None and self._ctx.expired()

    def exposed_next_chunk(self, max_items: int = DEFAULT_CHUNK_ITEMS, max_bytes: int = CHUNK_BYTES) -> Any:
        """``(items, done)``: up to ``max_items`` items (at most about ``max_bytes`` of them);
        ``done`` once the source is exhausted. The source's own error arrives after the items
        produced before it."""
        for name, value in (("max_items", max_items), ("max_bytes", max_bytes)):
            if type(value) is not int or value < 1:
                raise ValueError(f"next_chunk({name}): must be an int >= 1, got {value!r}")
        count = min(max_items, MAX_CHUNK_ITEMS)
        budget = min(max_bytes, CHUNK_BYTES)
        with self._lock:
            try:
                return self._chunk(count, budget)
            finally:
                if self._closing:
                    self._finish()

    def _chunk(self, count: int, budget: int) -> tuple[tuple[Any, ...], bool]:
        if self._error is not None:
            error, self._error = self._error, None
            self._finish()
            raise error
        source = self._source
        if source is None:
            return (), True
        self._check_deadline()
        items: list[Any] = []
        size = 0
        # The generator runs in the context the stream was created in; without one (no deadline
        # of the caller's own), in the context of the chunk request it is running for.
        token = context._CURRENT.set(self._ctx) if self._ctx is not None else None
        try:
            while len(items) < count and size < budget:
                try:
                    item = next(source)
                except StopIteration:
                    self._finish()
                    return tuple(items), True
                except BaseException as exc:  # the source's own error, after what it produced
                    return self._fail(items, exc)
                item_size = plain_size(item)
                if item_size < 0:
                    return self._fail(items, self._not_plain(item, self.sent + len(items) + 1))
                items.append(item)
                size += item_size
        finally:
            if token is not None:
                context._CURRENT.reset(token)
        self.sent += len(items)
        return tuple(items), False

    def _fail(self, items: list[Any], error: BaseException) -> tuple[tuple[Any, ...], bool]:
        if not items:
            self._finish()
            raise error
        # Kept without its traceback: the frames it holds would tie this stream in a cycle, and
        # a stream must be freed (and its generator closed) as soon as its client drops it.
        self._error = error.with_traceback(None)
        self.sent += len(items)
        return tuple(items), False

    @staticmethod
    def _not_plain(item: Any, index: int) -> TypeError:
        return TypeError(
            f"stream item {index} is a {type(item).__name__}, which cannot be streamed by value; "
            f"yield plain values ({PLAIN_TYPES}); the stream was closed"
        )

    def _check_deadline(self) -> None:
        if self.expired:
            self._finish()
            raise DeadlineExceeded(
                f"the stream outlived its call's deadline and was closed after {self.sent} items"
            )

    # -- a plain rpyc client iterates item by item -------------------------------------------------

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        with self._lock:
            source = self._source
            if source is None:
                raise StopIteration
            self._check_deadline()
            token = context._CURRENT.set(self._ctx) if self._ctx is not None else None
            try:
                item = next(source)
            except BaseException:
                self._finish()
                raise
            finally:
                if token is not None:
                    context._CURRENT.reset(token)
                if self._closing:
                    self._finish()
            self.sent += 1
            return item

    # -- closing -----------------------------------------------------------------------------------

    def exposed_close(self) -> None:
        """Close the source now (its ``finally`` blocks run); later chunks are empty and done."""
        if self._lock.acquire(blocking=False):
            try:
                self._finish()
            finally:
                self._lock.release()
        else:  # a chunk is being produced (another thread): it closes the source when it ends
            self._closing = True

    close = exposed_close

    def _finish(self) -> None:
        source, self._source = self._source, None
        if source is None:
            return
        closer = getattr(source, "close", None)
        try:
            if callable(closer):
                closer()
        except Exception:
            log.warning("closing a stream's source raised", exc_info=True)
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()

    def __del__(self) -> None:  # dropped by its client (rpyc's reference count reached zero)
        try:
            self.exposed_close()
        except Exception:  # never raise from a finalizer
            pass


STREAM_TYPE = f"{Stream.__module__}.{Stream.__qualname__}"  # how rpyc names a Stream's class

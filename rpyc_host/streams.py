"""Iterator results served as streams (:mod:`rpyc_host.wire.streams`), within the budget.

An exposed method that returns a generator or another iterator (not a plain value, not a file
object, not a live object with exposed methods) hands its client a
:class:`~rpyc_host.wire.streams.Stream` instead. Each open stream holds one ``open_streams``
in the connection's account (``limits.max_open_streams`` and ``..._per_connection``); past a
cap the call fails with an ``OSError`` (EMFILE) naming the limit, and the iterator is closed
unstarted. Every stream still open when its connection closes is closed then.
"""

from __future__ import annotations

import errno
import io
import weakref
from collections.abc import Iterator
from types import GeneratorType
from typing import Any

from rpyc.core.netref import BaseNetref

from .budget import CONFIG_KEY, Account, LimitExceeded
from .wire import context
from .wire.streams import Stream

RESOURCE = "open_streams"
_OPEN_KEY = "host_open_streams"  # connection config: that connection's open streams (weak)
_NEVER = (str, bytes, bytearray, memoryview, tuple, list, dict, set, frozenset, range, io.IOBase, Stream)


def streamable(result: Any) -> bool:
    """True for a generator or another iterator a client should read in chunks."""
    if type(result) is GeneratorType:
        return True
    kind = type(result)
    if issubclass(kind, BaseNetref):  # the client's own object, handed back: it stays theirs
        return False
    if not hasattr(kind, "__next__") or not hasattr(kind, "__iter__") or isinstance(result, _NEVER):
        return False
    # A live object with exposed methods is what the service meant to hand out: leave it be.
    return not any(name.startswith("exposed_") for name in dir(kind))


# Results that are never streams, checked first: most calls return one of these.
PLAIN_RESULTS = frozenset({int, float, str, bytes, bool, type(None), tuple, list, dict})


def as_stream(conn: Any, result: Any) -> Any:
    """``result`` as a stream when :func:`streamable`, else unchanged (see the module docstring)."""
    if type(result) in PLAIN_RESULTS or not streamable(result):
        return result
    config = conn._config
    account: Account | None = config.get(CONFIG_KEY)
    if account is None:  # not one of the host's connections: no budget to hold it in
        return Stream(result, _creating_context(conn))
    open_streams: weakref.WeakSet[Stream] | None = config.get(_OPEN_KEY)
    if open_streams is None:
        open_streams = config[_OPEN_KEY] = weakref.WeakSet()
        account.on_close(lambda: close_all(open_streams))
    for stale in [s for s in open_streams if s.expired]:  # past their deadline: make room
        stale.close()
    try:
        account.acquire(RESOURCE)
    except LimitExceeded as exc:
        _close_source(result)
        raise OSError(errno.EMFILE, f"stream not opened: {exc}") from None
    stream = Stream(result, _creating_context(conn), lambda: account.release(RESOURCE))
    open_streams.add(stream)
    return stream


def _creating_context(conn: Any) -> context.CallContext | None:
    """The context a stream keeps for its lifetime: the caller's own deadline (a
    ``context.deadline`` block), or None when the call's deadline is only the connection's
    timeout (derived by the host, or told with this call). That timeout bounds each chunk
    request, not the stream: a long stream read steadily is not cut off after one timeout."""
    raw = context._CURRENT.get()
    if isinstance(raw, context.Derived):
        return None
    ctx = context.current()
    told = conn.__dict__.get("_told_by_peer")
    if ctx is not None and ctx.deadline is not None and type(told) in (int, float):
        left = ctx.remaining()
        if left is not None and left >= told - 1.0:
            return None
    return ctx


def close_all(open_streams: weakref.WeakSet[Stream]) -> None:
    """Close every stream a connection still has open (it is closing)."""
    for stream in list(open_streams):
        stream.close()


def _close_source(source: Iterator[Any]) -> None:
    closer = getattr(source, "close", None)
    if callable(closer):
        closer()

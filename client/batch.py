"""Batched calls: many calls in one request instead of one round trip each.

Usage::

    import client

    with client.connect("demo") as conn:
        with client.batch(conn) as b:
            results = [b.root.add(i, i) for i in range(1000)]
        print([r.value for r in results])     # each .value raises that call's own error

    with pool.batch() as b:                   # a ServicePool: the batch goes to one instance
        b.root.add(1, 2)

Calls are recorded in the block and sent when it ends, in one request to a host (which runs
them in order; one failing call fails only itself) or, to a plain rpyc server without the
host's entry point, pipelined (every call sent before the first reply is read). A block left by
an exception sends nothing. A batch the host refuses whole (more than ``limits.max_batch_calls``)
or that fails on the way (a timeout, a dropped connection) raises from the end of the block,
and every result carries that error too.

Through a pool, a batch that fails after it was sent (the instance dropped the connection, timed
out) is retried on another instance only if every method in it is idempotent.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any

import rpyc
from rpyc.core.protocol import Connection

from rpyc_host.wire.batch import ENTRY
from rpyc_host.wire.remote import clean, describe, is_remote

from .byname import MethodsByName

if TYPE_CHECKING:
    from .pool import ServicePool, _Instance

# Calls a pipelined batch keeps unanswered at once: replies must be read before the socket
# buffers fill, or both sides would wait on each other.
PIPELINE_WINDOW = 128
_UNSENT = object()


class Result:
    """One batched call's outcome, available once the batch has been sent."""

    __slots__ = ("_error", "_value", "args", "kwargs", "method")

    def __init__(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self._value: Any = _UNSENT
        self._error: BaseException | None = None

    def _set(self, ok: bool, payload: Any) -> None:
        if ok:
            self._value, self._error = payload, None
        else:
            self._value, self._error = None, payload

    @property
    def ok(self) -> bool:
        """True if the call returned (False before the batch is sent)."""
        return self._error is None and self._value is not _UNSENT

    @property
    def error(self) -> BaseException | None:
        """The call's error (None if it returned or the batch is not sent yet)."""
        return self._error

    @property
    def value(self) -> Any:
        """What the call returned; raises its error instead if it failed."""
        if self._error is not None:
            raise self._error
        if self._value is _UNSENT:
            raise RuntimeError(f"{self.method}(): the batch has not been sent yet (leave its with block)")
        return self._value

    def __repr__(self) -> str:
        if self._value is _UNSENT and self._error is None:
            return f"<Result {self.method}: not sent>"
        return f"<Result {self.method}: {describe(self._error) if self._error else repr(self._value)}>"


class Batch:
    """Calls recorded for one flush; see the module docstring. Not thread-safe: one thread
    records and flushes."""

    def __init__(self, target: Any, idempotent: bool | None = None) -> None:
        self.target = target  # an rpyc connection or a ServicePool
        self.idempotent = idempotent
        self.results: list[Result] = []
        self.root = MethodsByName(self.call)
        self.sent = False

    def call(self, method: str, *args: Any, **kwargs: Any) -> Result:
        """Record ``method(*args, **kwargs)``; its :class:`Result` fills in at the flush."""
        if self.sent:
            raise RuntimeError("this batch has been sent; start a new one")
        result = Result(method, args, kwargs)
        self.results.append(result)
        return result

    def flush(self) -> list[Result]:
        """Send every recorded call (once) and fill in their results."""
        if self.sent:
            return self.results
        self.sent = True
        if not self.results:
            return self.results
        from .pool import ServicePool  # the pool imports this module for ServicePool.batch()

        if isinstance(self.target, ServicePool):
            outcomes = _run_on_pool(self.target, self.results, self._retry(self.target))
        else:
            outcomes = run_on(self.target, self.results)
        for result, (ok, payload) in zip(self.results, outcomes, strict=True):
            result._set(ok, payload)
        return self.results

    def _retry(self, pool: ServicePool) -> bool:
        if self.idempotent is not None:
            return self.idempotent
        return all(r.method in pool.idempotent for r in self.results)

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if typ is None:
            self.flush()


def batch(conn: Any, idempotent: bool | None = None) -> Batch:
    """A :class:`Batch` on ``conn`` (an rpyc connection, or a :class:`~client.ServicePool`)."""
    return Batch(conn, idempotent)


# -- sending ------------------------------------------------------------------------------------

_entries: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_entries_lock = threading.Lock()
_NO_ENTRY = object()


def _entry_of(conn: Any) -> Any:
    """The peer's batch entry point (cached per connection), or None for a plain rpyc server."""
    with _entries_lock:
        found = _entries.get(conn)
    if found is None:
        try:
            found = getattr(conn.root, ENTRY)
        except AttributeError:
            found = _NO_ENTRY
        with _entries_lock:
            _entries[conn] = found
    return None if found is _NO_ENTRY else found


def run_on(conn: Any, calls: list[Result]) -> list[tuple[bool, Any]]:
    """``(ok, value or error)`` for each call, sent over ``conn`` as one batch or pipelined.

    Raises: the batch's own error if the host refused it whole; connection errors (each
    result in ``calls`` carries the same error).
    """
    entry = _entry_of(conn)
    if entry is None:
        return _pipelined(conn, calls)
    wire = tuple((r.method, tuple(r.args), tuple(r.kwargs.items())) for r in calls)
    try:
        outcomes = entry(wire)
    except Exception as exc:  # refused whole, or the connection failed: every call carries it
        for result in calls:
            result._set(False, exc)
        raise
    if len(outcomes) != len(calls):
        raise ValueError(f"the batch of {len(calls)} calls came back with {len(outcomes)} outcomes")
    return [(True, payload) if ok else (False, _error(conn, payload)) for ok, payload in outcomes]


def _error(conn: Any, raw: Any) -> BaseException:
    # rpyc's own rebuild, then the plain type with the message alone (as WireConnection does).
    rebuilt: BaseException = clean(Connection._unbox_exc(conn, raw), raw)
    return rebuilt


def _pipelined(conn: Any, calls: list[Result]) -> list[tuple[bool, Any]]:
    """Every call sent with rpyc's async_ before waiting, at most PIPELINE_WINDOW unanswered."""
    timeout = conn._config.get("sync_request_timeout")
    bound: dict[str, Any] = {}
    outcomes: list[tuple[bool, Any]] = [(False, None)] * len(calls)
    pending: deque[tuple[int, Any]] = deque()

    def collect(index: int, res: Any) -> None:
        try:
            outcomes[index] = (True, res.value)
        except Exception as exc:  # the call's own error
            outcomes[index] = (False, exc)

    for index, call in enumerate(calls):
        if len(pending) >= PIPELINE_WINDOW:
            collect(*pending.popleft())
        try:
            method = bound.get(call.method)
            if method is None:
                method = bound[call.method] = rpyc.async_(getattr(conn.root, call.method))
            res = method(*call.args, **call.kwargs)
        except AttributeError as exc:  # no such method: that call's error
            outcomes[index] = (False, exc)
            continue
        if timeout:
            res.set_expiry(timeout)
        pending.append((index, res))
    while pending:
        collect(*pending.popleft())
    return outcomes


def _run_on_pool(pool: ServicePool, calls: list[Result], retry: bool) -> list[tuple[bool, Any]]:
    """The batch on one instance of ``pool``; after a send failure, on another only if ``retry``."""
    tried: set[tuple[str, int]] = set()
    errors: list[str] = []
    sent_failures = 0
    while True:
        candidates = pool._candidates(tried)
        if not candidates:
            raise pool._no_instance(errors)
        instance: _Instance = candidates[0]
        tried.add(instance.address)
        where = "{}:{}".format(*instance.address)
        try:
            conn = pool._connection(instance)
        except (OSError, EOFError) as exc:  # nothing was sent: always try another
            errors.append(f"{where}: {describe(exc)}")
            pool._failed(instance, exc)
            continue
        try:
            with pool._lock:
                instance.inflight += 1
            try:
                outcomes = run_on(conn, calls)
            finally:
                with pool._lock:
                    instance.inflight -= 1
        except (OSError, EOFError) as exc:
            if is_remote(exc):
                raise
            errors.append(f"{where}: {describe(exc)}")
            pool._failed(instance, exc)
            sent_failures += 1
            if not retry or sent_failures > pool.retries:
                raise
            continue
        with pool._lock:
            instance.calls += 1
            instance.failures = 0
        return outcomes

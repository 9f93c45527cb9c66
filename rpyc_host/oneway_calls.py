"""One-way methods: the caller gets None at once, the call runs later on its connection's worker.

Usage (in a service)::

    from rpyc_host import oneway

    @rpyc.exposed
    @oneway
    def log_event(self, kind: str, detail: str) -> None: ...

The host answers a one-way call as soon as its arguments are copied and it is queued, so plain
rpyc clients get the benefit too. Each connection's calls run in order on one worker thread,
started when the first call is queued and ended when the queue is empty. A call's error goes to
the server log (one line; the traceback at DEBUG) and to ``rpyc_host_oneway_errors_total``.

Bounds: ``limits.max_oneway_pending_per_connection`` calls queued for one connection and
``limits.max_oneway_pending`` for the service (:mod:`rpyc_host.budget`); past either the call
is refused with ``OSError`` (EAGAIN) naming the limit. Arguments must be plain values: a
callback or a live object of the client's would be gone by the time the call runs, so it is
refused with ``TypeError``.

Calls already queued when their client disconnects still run (they were accepted; the client
was told so): the worker ends once they are done. They count as calls in flight, so a graceful
stop waits for them within its grace period, and a forking server's connection process waits
for them (within the grace period) before it exits.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from rpyc.core.netref import BaseNetref

from . import logs
from .batching import MODEL_ATTR
from .budget import CONFIG_KEY, Account, LimitExceeded
from .wire import context

if TYPE_CHECKING:
    from .protocol import HostConnection

ONEWAY = "oneway"
PENDING = "oneway_pending"  # the ledger resource: max_oneway_pending(_per_connection)
WORKER_KEY = "host_oneway_worker"  # in the connection config, made at the first one-way call
BOOK_KEY = "host_oneway"  # the server's OnewayBook, in the connection config
MAX_DEPTH = 64

log = logging.getLogger("rpyc_host.oneway")

F = TypeVar("F", bound=Callable[..., Any])


def oneway(func: F) -> F:
    """Mark an exposed method one-way (see the module docstring); order with ``@rpyc.exposed``
    does not matter."""
    if not callable(func):
        raise TypeError(f"@oneway decorates a method, not a {type(func).__name__}")
    setattr(func, MODEL_ATTR, ONEWAY)
    return func


class OnewayBook:
    """Failed one-way calls by method, for ``/metrics`` (one per server)."""

    def __init__(self) -> None:
        self._errors: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count_error(self, method: str) -> None:
        with self._lock:
            self._errors[method] += 1

    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)


_Call = tuple[Callable[..., Any], str, tuple[Any, ...], dict[str, Any], context.CallContext | None]


class _Worker:
    """One connection's queue of accepted one-way calls, run in order on a thread of its own."""

    def __init__(self, conn: HostConnection) -> None:
        config = conn._config
        self.connid = str(config.get("connid") or "?")
        endpoints = config.get("endpoints")
        peer = endpoints[1] if isinstance(endpoints, tuple) and len(endpoints) == 2 else None
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.logger: logging.Logger = config.get("host_logger") or log
        self.service = str(config.get("host_service") or "?")
        self.book = config.get("host_calls")
        self.errors: OnewayBook | None = config.get(BOOK_KEY)
        self.tracker = config.get("host_tracker")
        # An account of its own in the service's ledger: the connection's account is settled
        # when it closes, but calls still queued then hold their place until they have run.
        owner: Account | None = config.get(CONFIG_KEY)
        self.account = owner.ledger.open_account(f"{self.connid} one-way") if owner is not None else None
        self.queue: deque[_Call] = deque()
        self.lock = threading.Lock()
        self.running = False

    def put(self, call: _Call) -> None:
        """Queue ``call``; LimitExceeded (nothing queued) past a cap."""
        if self.account is not None:
            self.account.acquire(PENDING)
        if self.tracker is not None:
            self.tracker.enter()  # before it is queued, so a drain never sees it missing
        with self.lock:
            self.queue.append(call)
            start = not self.running
            self.running = True
        if start:
            threading.Thread(target=self._run, name=f"{self.connid}-oneway", daemon=True).start()

    def _run(self) -> None:
        logs.set_connection(self.connid, self.peer)
        while True:
            with self.lock:
                if not self.queue:
                    self.running = False
                    return
                call = self.queue.popleft()
            self._one(call)

    def _one(self, call: _Call) -> None:
        func, name, args, kwargs, ctx = call
        failed = True
        started = time.perf_counter()
        token = context._CURRENT.set(ctx)
        try:
            func(*args, **kwargs)
            failed = False
        except Exception as exc:  # the caller is gone: the log and metrics are where it shows
            self.logger.warning("one-way call %s failed: %s: %s", name, type(exc).__name__, exc)
            self.logger.debug("one-way call %s traceback", name, exc_info=True)
            if self.errors is not None:
                self.errors.count_error(name)
        finally:
            context._CURRENT.reset(token)
            if self.book is not None:
                self.book.record(self.service, name, time.perf_counter() - started, failed)
            if self.account is not None:
                self.account.release(PENDING)
            if self.tracker is not None:
                self.tracker.exit()


def submit(
    conn: HostConnection, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Queue a one-way call whose arguments are already copied (HostConnection._handle_call).

    Raises:
        TypeError: an argument is (or holds) a remote object.
        OSError: EAGAIN, a ``max_oneway_pending`` cap is reached; nothing was queued.
    """
    name = str(getattr(func, "__name__", "call")).removeprefix("exposed_")
    for i, value in enumerate(args, 1):
        _check_plain(name, value, f"argument {i}", 0)
    for key, value in kwargs.items():
        _check_plain(name, value, f"argument {key!r}", 0)
    worker: _Worker | None = conn._config.get(WORKER_KEY)
    if worker is None:
        worker = conn._config.setdefault(WORKER_KEY, _Worker(conn))
    ctx = context.current()
    # The reply has been sent by the time it runs: the caller's deadline no longer applies.
    queued_ctx = replace(ctx, deadline=None) if ctx is not None else None
    try:
        worker.put((func, name, args, kwargs, queued_ctx))
    except LimitExceeded as exc:
        scope = "this connection" if exc.limit.endswith("_per_connection") else "the service"
        raise OSError(
            errno.EAGAIN,
            f"{name}() not queued: {scope} already has {exc.value} one-way calls waiting to run "
            f"(limits.{exc.limit}: {exc.value}); retry once they have run",
        ) from None


def _check_plain(method: str, value: Any, where: str, depth: int) -> None:
    if isinstance(value, BaseNetref):
        raise TypeError(
            f"{method}() is one-way: {where} is a remote object (a callback or live object), which "
            "would be gone by the time the call runs; pass plain values (str, bytes, numbers, "
            "tuples, lists, dicts)"
        )
    if depth >= MAX_DEPTH:
        return  # deeper than argument copying allows: nothing remote can be down there
    kind = type(value)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        for item in value:
            _check_plain(method, item, where, depth + 1)
    elif kind is dict:
        for key, item in value.items():
            _check_plain(method, key, where, depth + 1)
            _check_plain(method, item, where, depth + 1)

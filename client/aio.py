"""An asyncio client: calls that never block the event loop, many tasks sharing one connection.

Usage::

    import client.aio

    async with await client.aio.connect("demo") as conn:    # same arguments as client.connect
        print(await conn.root.add(1, 2))                     # or: await conn.call("add", 1, 2)
        results = await asyncio.gather(*(conn.root.add(i, i) for i in range(100)))
        async with asyncio.timeout(0.2):                     # the call's deadline: 200 ms
            await conn.root.slow()
        await conn.call("slow", timeout=0.5)                 # or per call

How it works: dialing (DNS, connect retries, TLS, the token) runs in a worker thread. Each call
is sent from the event loop with rpyc's asynchronous requests, so tasks pipeline over the one
socket; one background thread per connection reads the replies and completes each call's
asyncio future with ``loop.call_soon_threadsafe`` (replies that arrive together share one
wake-up). Small requests sent in one turn of the loop leave in one write
(:mod:`client.aiowire`); a large argument is written from the loop at once, so pass bulk data
through :mod:`client.files` instead.

Deadlines: a call's deadline is the nearest of ``timeout=``, the connection's ``timeout``, an
enclosing :func:`client.deadline` block, and an enclosing ``asyncio.timeout()`` (or, on Python
3.11, ``asyncio.wait_for``) of the calling task. It travels with the call, so the service sees
it (``context.current().remaining()``); when it passes the call raises
:class:`~client.DeadlineExceeded`. A cancelled task cancels its call's future; the late reply is
dropped when it arrives (rpyc has no way to stop the service's method, which runs to its end).

Errors a service raises arrive as their own type with the message alone, as with
:func:`client.connect`. Results are plain values; a live object a method returns is an ordinary
rpyc proxy, whose own calls block: keep them out of the event loop.

Pools and collectors: :func:`connect_service` and :class:`AsyncPooledCollector`
(:mod:`client.aiopool`).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import threading
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any

from rpyc.core import consts

from rpyc_host.wire import context
from rpyc_host.wire.errors import DeadlineExceeded

from . import connection as _sync
from .aiodeadline import enclosing_timeout
from .aiopool import AsyncPooledCollector, AsyncServicePool, connect_service
from .aiowire import coalesce
from .byname import MethodsByName

NOT_GATHERING: AbstractContextManager[object] = nullcontext()

__all__ = [
    "AsyncConnection",
    "AsyncPooledCollector",
    "AsyncServicePool",
    "connect",
    "connect_service",
]


async def connect(service: str | None = None, **options: Any) -> AsyncConnection:
    """Connect to a service: the arguments of :func:`client.connect`, dialed in a worker thread.

    Raises what :func:`client.connect` raises (ConfigError, AuthError, ConnectError).
    """
    loop = asyncio.get_running_loop()
    conn = await loop.run_in_executor(None, functools.partial(_sync.connect, service, **options))
    return AsyncConnection(conn, loop)


class AsyncConnection:
    """One rpyc connection driven from an event loop; see the module docstring.

    Every method must be called from the loop that made it (``connect``'s).
    """

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.sync = conn  # the blocking rpyc connection underneath (a WireConnection)
        self.loop = loop
        self.timeout = float(conn._config["sync_request_timeout"])
        self.root = MethodsByName(self.call)
        self._root_ref = conn.root  # fetched while dialing: no round trip here
        self._methods: dict[str, Any] = {}
        self._lookups: dict[str, asyncio.Task[Any]] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        self._deadlines = _Deadlines(loop)
        self._replies: list[tuple[asyncio.Future[Any], Any]] = []
        self._replies_lock = threading.Lock()
        self._drain_scheduled = False
        self._channel = coalesce(conn, loop)
        self._error: BaseException | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="client-aio-reader", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"AsyncConnection({self.sync._config.get('peer_service')!r}, pending={len(self._pending)})"

    @property
    def closed(self) -> bool:
        return bool(self.sync.closed) or self._error is not None

    @property
    def pending(self) -> int:
        """Calls sent whose reply this side still waits for."""
        return len(self._pending)

    async def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call the service's ``method``; ``timeout`` (seconds) narrows this call's deadline."""
        remote = self._methods.get(method)
        if remote is None:
            remote = await self._lookup(method, timeout)
        return await self._request(consts.HANDLE_CALL, (remote, args, tuple(kwargs.items())), timeout)

    async def _lookup(self, method: str, timeout: float | None) -> Any:
        """The remote bound method, looked up once however many tasks ask for it at once."""
        lookup = self._lookups.get(method)
        if lookup is None:
            request = self._request(consts.HANDLE_GETATTR, (self._root_ref, method), timeout)
            lookup = self._lookups[method] = self.loop.create_task(request)
            lookup.add_done_callback(functools.partial(self._looked_up, method))
        # A caller cancelled while waiting leaves the lookup running for the others.
        return await asyncio.shield(lookup)

    def _looked_up(self, method: str, lookup: asyncio.Task[Any]) -> None:
        self._lookups.pop(method, None)
        if not lookup.cancelled() and lookup.exception() is None:  # exception(): retrieved here
            self._methods[method] = lookup.result()

    async def _request(self, handler: int, args: tuple[Any, ...], timeout: float | None) -> Any:
        if self._error is not None or self.sync.closed:
            raise EOFError(f"the connection is closed ({self._error or 'closed by this side'})")
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        left = enclosing_timeout(self.loop)
        if left is not None:
            limit = min(limit, left)
        ctx = context.outgoing(limit)  # narrowed by any client.deadline block around the call
        remaining = ctx.remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it was sent")
        future: asyncio.Future[Any] = self.loop.create_future()
        with context.use(ctx), self._gathering():
            result = self.sync.async_request(handler, *args, timeout=remaining)
        self._pending.add(future)
        result.add_callback(lambda res: self._deliver(future, res))
        if result._is_ready:
            # The reader may have delivered the reply between the send and add_callback, after
            # rpyc ran its callbacks: settle it here (settling twice is harmless).
            _settle(future, result)
        if remaining is not None:
            self._deadlines.watch(future, remaining)
        try:
            return await future
        finally:
            self._pending.discard(future)  # at once: a done callback would run a loop turn later

    def _deliver(self, future: asyncio.Future[Any], result: Any) -> None:
        """In the reader thread: hand a reply to the loop. Replies that arrive together share
        one wake-up of the loop (each ``call_soon_threadsafe`` writes to its self-pipe)."""
        with self._replies_lock:
            self._replies.append((future, result))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _drain(self) -> None:
        with self._replies_lock:
            replies, self._replies = self._replies, []
            self._drain_scheduled = False
        for future, result in replies:
            _settle(future, result)

    def _gathering(self) -> AbstractContextManager[object]:
        return NOT_GATHERING if self._channel is None else self._channel.gathering()

    def _read(self) -> None:
        """The reader thread: serve the socket (replies, and the service's callbacks) until it
        closes, then fail whatever still waits."""
        error: BaseException
        try:
            while not self.sync.closed:
                self.sync.serve(1.0)
            error = EOFError("connection closed")
        except BaseException as exc:  # EOFError when the server goes away, OSError on a reset
            error = exc if not self._closing else EOFError("connection closed by this side")
        try:
            self.loop.call_soon_threadsafe(self._failed, error)
        except RuntimeError:
            pass  # the loop is already closed: nobody waits any more

    def _failed(self, error: BaseException) -> None:
        self._error = error
        for future in list(self._pending):
            if not future.done():
                future.set_exception(_copy_error(error))

    async def close(self) -> None:
        """Close the connection (in a worker thread: rpyc's close may wait for the server)."""
        if self._closing:
            return
        self._closing = True
        await self.loop.run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        try:
            self.sync.close()
        except Exception:  # already gone: closing is still done
            pass
        self._reader.join(timeout=5)

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return  # cancelled or past its deadline: the late reply is dropped
    if result._is_exc:
        future.set_exception(result._obj)
    else:
        future.set_result(result._obj)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("no reply before the call's deadline"))


class _Deadlines:
    """The deadlines of one connection's calls behind a single loop timer, armed for the
    earliest. A timer per call would fill the loop's timer heap, which finding an enclosing
    ``asyncio.timeout()`` searches on every call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._compact_at = 1024

    def watch(self, future: asyncio.Future[Any], seconds: float) -> None:
        """Fail ``future`` with DeadlineExceeded if it is not done ``seconds`` from now."""
        heap = self._heap
        if len(heap) >= self._compact_at:
            # Answered calls wait in the heap for their (long) deadlines: drop them in one pass,
            # at sizes that double, so the passes cost O(1) a call.
            heap[:] = [entry for entry in heap if not entry[2].done()]
            heapq.heapify(heap)
            self._compact_at = max(1024, 2 * len(heap))
        when = self.loop.time() + seconds
        heapq.heappush(heap, (when, next(self._order), future))
        if self._timer is None or when < self._timer.when():
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap, now = self._heap, self.loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            _expire(heapq.heappop(heap)[2])
        if heap:
            self._arm(heap[0][0])


def _copy_error(error: BaseException) -> BaseException:
    # One exception object raised in many tasks would collect every task's traceback.
    try:
        return type(error)(*error.args)
    except Exception:
        return EOFError(str(error))

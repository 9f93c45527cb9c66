"""asyncio faces for :class:`client.pool.ServicePool` and :class:`client.ingest.PooledCollector`.

Usage::

    pool = await client.aio.connect_service("static:127.0.0.1:18861,127.0.0.1:18862")
    async with pool:
        print(await pool.root.add(1, 2))           # or: await pool.call("add", 1, 2)
        async with AsyncPooledCollector(pool, topic="load") as collector:
            await collector.add({"load1": 0.4})
            await collector.flush()

The pool's discovery, connects, retries and calls are blocking code: each runs in a bounded
thread pool of the pool's own (``max_workers``, 8 by default), so the event loop never waits
and at most that many calls run at once (more wait their turn). The call context travels into
the worker (a :func:`client.deadline` block, and an ``asyncio.timeout()`` around the task
becomes the call's deadline). Cancelling a task stops waiting at once; the call in its worker
still runs to its end (or its deadline). A collector is not thread-safe, so each collector has
one worker of its own: ``add`` and ``flush`` run in the order they were awaited.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from rpyc_host.wire import context

from .aiodeadline import enclosing_timeout
from .byname import MethodsByName
from .ingest import PooledCollector
from .pool import ServicePool

T = TypeVar("T")

__all__ = ["AsyncPooledCollector", "AsyncServicePool", "connect_service"]


async def _in_worker(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in ``executor`` within this task's call context, narrowed by any enclosing
    ``asyncio.timeout()``."""
    loop = asyncio.get_running_loop()
    left = enclosing_timeout(loop)
    ctx = contextvars.copy_context()
    if left is not None:
        ctx.run(_narrow, left)
    return await loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args))


def _narrow(left: float) -> None:
    base = context.current() or context.CallContext()
    context._CURRENT.set(base.narrowed(max(left, 0.0)))


async def connect_service(
    service: str, registry: str | tuple[str, int] | None = None, *, max_workers: int = 8, **options: Any
) -> AsyncServicePool:
    """An :class:`AsyncServicePool` over :func:`client.connect_service` (the same arguments).

    The pool is built in a worker (an ``etcd://`` target starts its watch at once).
    """
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="client-aio-pool")
    try:
        pool = await _in_worker(executor, functools.partial(ServicePool, service, registry, **options))
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return AsyncServicePool(pool, executor)


class AsyncServicePool:
    """A :class:`~client.pool.ServicePool` whose calls are awaited; see the module docstring."""

    def __init__(self, pool: ServicePool, executor: ThreadPoolExecutor | None = None) -> None:
        self.sync = pool
        self._executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="client-aio-pool")
        self.root = MethodsByName(self.call)

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"

    @property
    def service(self) -> str:
        return self.sync.service

    async def call(self, method: str, *args: Any, idempotent: bool | None = None, **kwargs: Any) -> Any:
        """:meth:`ServicePool.call` in a worker."""
        call = functools.partial(self.sync.call, method, *args, idempotent=idempotent, **kwargs)
        return await _in_worker(self._executor, call)

    async def discover(self) -> tuple[tuple[str, int], ...]:
        return await _in_worker(self._executor, self.sync.discover)

    def instances(self) -> tuple[tuple[str, int], ...]:
        """Known live instances (no I/O)."""
        return self.sync.instances()

    def stats(self) -> Mapping[tuple[str, int], int]:
        """Calls answered by each known instance (no I/O)."""
        return self.sync.stats()

    async def close(self) -> None:
        """Close the pool's connections, then its workers (waiting for calls still running)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        self.sync.close()
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncServicePool:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncPooledCollector:
    """A :class:`~client.ingest.PooledCollector` awaited from asyncio: batching, retries, the
    spool and exactly-once delivery are the collector's; each step runs in its own worker.

    ``options`` are PooledCollector's (``batch_records``, ``spool``, ``timeout``, ...).
    """

    def __init__(self, pool: AsyncServicePool | ServicePool, *, topic: str, **options: Any) -> None:
        sync_pool = pool.sync if isinstance(pool, AsyncServicePool) else pool
        self.sync = PooledCollector(sync_pool, topic=topic, **options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client-aio-collector")

    @property
    def stats(self) -> Any:
        return self.sync.stats

    async def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record (sending a batch when one is full)."""
        await _in_worker(self._executor, self.sync.add, record)

    async def flush(self) -> None:
        """Send what is queued and wait until every record is stored or spooled."""
        await _in_worker(self._executor, self.sync.flush)

    async def close(self) -> None:
        """Flush and disconnect (what cannot be delivered stays in the spool)."""
        try:
            await _in_worker(self._executor, self.sync.close)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncPooledCollector:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

"""Group commit: batches submitted together are written in one transaction.

A submit hands its prepared :class:`~services.ingest.storage.BatchWrite` to the store's
:class:`GroupCommit` and waits. If no write is in progress in this process, the submitting
thread becomes the writer at once (a lone batch waits for nobody); otherwise it queues. The
writer takes what is queued when it starts, in arrival order and bounded by
:class:`GroupLimits`, writes it through the backend's ``write_group`` in one transaction,
commits, and wakes every waiter of that group with its own result: None (stored), the stored
receipt (the id was known: a duplicate), or the group's error. The first waiter still queued
then becomes the next writer.

A failed transaction stored nothing of its group, so every batch of it gets the same
(retryable) error. Problems with one batch are found before it is queued (the service
validates and processes first), so they never reach a group.

State is per process: a forked child starts with an empty queue and no writer, so it never
waits for a write that was in progress in its parent when it forked.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import BatchWrite, StoreError, rows_size

WriteGroup = Callable[[Sequence[BatchWrite]], list["str | None"]]
"""Writes batches in one transaction: per batch None (stored) or the receipt stored before."""


@dataclass(frozen=True)
class GroupLimits:
    """Bounds of one group: at most ``max_batches`` batches, ``max_records`` rows and
    ``max_bytes`` bytes of row text. A single batch over a bound still goes alone."""

    max_batches: int = 64
    max_records: int = 100_000
    max_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_batches", "max_records", "max_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"group {name} must be an integer >= 1, got {value!r}")


class _Waiter:
    __slots__ = ("batch", "done", "error", "result", "size")

    def __init__(self, batch: BatchWrite) -> None:
        self.batch = batch
        self.size = rows_size(batch.rows)
        self.done = False
        self.result: str | None = None
        self.error: BaseException | None = None


class _State:
    """The queue and writer flag of one process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition(threading.Lock())
        self.queue: deque[_Waiter] = deque()
        self.writing = False


@dataclass
class GroupStats:
    """Counts of this process's writer since it was created."""

    groups: int = 0
    batches: int = 0
    largest: int = 0


class GroupCommit:
    """The group-commit writer of one store (see the module docstring)."""

    def __init__(self, write_group: WriteGroup, limits: GroupLimits | None = None) -> None:
        self.write_group = write_group
        self.limits = limits or GroupLimits()
        self.stats = GroupStats()
        self._state = _State()

    def _here(self) -> _State:
        state = self._state
        if state.pid != os.getpid():  # a forked child: the parent's queue is not ours
            state = self._state = _State()
            self.stats = GroupStats()
        return state

    def write(self, batch: BatchWrite) -> str | None:
        """Store ``batch`` with whatever else is queued; None, or the receipt stored before."""
        state = self._here()
        me = _Waiter(batch)
        with state.cond:
            state.queue.append(me)
            while True:
                while state.writing and not me.done:
                    state.cond.wait()
                if me.done:
                    break
                state.writing = True
                group = self._take(state.queue)
                state.cond.release()
                try:
                    self._run(group)
                finally:
                    state.cond.acquire()
                    for waiter in group:
                        waiter.done = True
                    state.writing = False
                    state.cond.notify_all()
        if me.error is not None:
            raise me.error
        return me.result

    def _take(self, queue: deque[_Waiter]) -> list[_Waiter]:
        """The next group, in arrival order, within the limits (at least one batch)."""
        limits = self.limits
        group = [queue.popleft()]
        records, size = len(group[0].batch.rows), group[0].size
        while queue and len(group) < limits.max_batches:
            nxt = queue[0]
            if records + len(nxt.batch.rows) > limits.max_records or size + nxt.size > limits.max_bytes:
                break
            group.append(queue.popleft())
            records += len(nxt.batch.rows)
            size += nxt.size
        return group

    def _run(self, group: list[_Waiter]) -> None:
        """Write ``group`` and record each waiter's outcome (``done`` is set under the lock)."""
        interrupted: BaseException | None = None
        try:
            results = self.write_group([w.batch for w in group])
            if len(results) != len(group):
                raise StoreError(f"the store answered {len(results)} results for {len(group)} batches")
            for waiter, result in zip(group, results, strict=True):
                waiter.result = result
        except BaseException as exc:
            if not isinstance(exc, Exception):
                interrupted = exc  # KeyboardInterrupt, SystemExit: the writing thread re-raises it
            for waiter in group:
                waiter.error = _copy_error(exc)
        self.stats.groups += 1
        self.stats.batches += len(group)
        self.stats.largest = max(self.stats.largest, len(group))
        if interrupted is not None:
            raise interrupted


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh exception per waiter: one object raised in several threads would share (and
    keep growing) one traceback."""
    if isinstance(exc, StoreError):
        return type(exc)(str(exc))
    return StoreError(f"write failed, nothing of the batch was stored: {type(exc).__name__}: {exc}")

"""How many of a thread pool's workers poll for ready connections, and a watch on the busy ones.

Every worker waiting in ``epoll_wait`` is one more thread the kernel may wake for a ready
socket, each wake a context switch and a GIL hand-off: with 16 workers on 2 CPUs a pool of
short calls spends about half its time on that. So only about as many workers as there are
CPUs poll; the rest are parked. A watcher thread looks at the polling workers every
``STUCK_AFTER`` seconds, and for each one busy on the same ready socket for longer than that,
lets one parked worker poll too (up to ``pool_size``); once the slow request is done the pool
shrinks back. A blocking call therefore delays the connections behind it by a few ms at most.
With no worker busy the watcher sleeps until one starts, so an idle server has no timer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

# A request served longer than this (seconds) holds its worker's place: a parked worker is let
# in. Also the watcher's tick, so a stuck worker is noticed after 1x to 2x this.
STUCK_AFTER = 0.002
# Polling workers below which the pool never goes (if pool_size allows): with a single one, any
# call longer than STUCK_AFTER would stall every other connection until the watcher notices.
MIN_POLLING = 2


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def polling_workers(pool_size: int) -> int:
    """Workers that poll while none is held by a slow request: about one per CPU."""
    return min(pool_size, max(MIN_POLLING, cpus()))


class WorkerState:
    """One pool worker, as the pool and the watcher see it (plain attributes: set per request)."""

    __slots__ = ("away", "placed", "since")

    def __init__(self) -> None:
        self.away = False  # its request waits on the client; its place was handed over
        self.placed = False  # holds one of the pool's polling places
        self.since = 0.0  # monotonic start of what it is serving now; 0.0 while it polls


class Watch:
    """Counts polling workers held by one request for longer than ``STUCK_AFTER``."""

    def __init__(self, stuck_after: float = STUCK_AFTER) -> None:
        self.stuck_after = stuck_after
        # Replaced, never mutated, so the watcher reads it without a lock.
        self.workers: tuple[WorkerState, ...] = ()
        self._lock = threading.Lock()
        # True while the watcher sleeps until a worker starts serving: that worker wakes it.
        self.asleep = False
        self._wake = threading.Event()

    def add(self, worker: WorkerState) -> None:
        with self._lock:
            self.workers = (*self.workers, worker)

    def remove(self, worker: WorkerState) -> None:
        with self._lock:
            self.workers = tuple(w for w in self.workers if w is not worker)

    def wake(self) -> None:
        """A worker started serving while the watcher sleeps."""
        self.asleep = False
        self._wake.set()

    def stop(self) -> None:
        self._wake.set()

    def scan(self, now: float) -> tuple[int, bool]:
        """(polling workers held too long, whether any polling worker is busy at all)."""
        stuck = 0
        busy = False
        limit = self.stuck_after
        for worker in self.workers:
            since = worker.since
            if since and worker.placed:
                busy = True
                if now - since >= limit:
                    stuck += 1
        return stuck, busy

    def run(self, running: Callable[[], bool], apply: Callable[[int], None]) -> None:
        """Until ``running()`` is false: report the stuck count to ``apply`` every tick."""
        while running():
            stuck, busy = self.scan(time.monotonic())
            apply(stuck)
            if busy:
                time.sleep(self.stuck_after)
                continue
            self.asleep = True
            # A worker that started before ``asleep`` was set did not wake us: look once more.
            if self.scan(time.monotonic())[1]:
                self.asleep = False
                continue
            self._wake.wait(0.5)  # bounded, so a stop is noticed
            self._wake.clear()
            self.asleep = False

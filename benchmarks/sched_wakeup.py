"""How long a waking process waits for a core that a low-priority CPU hog holds (Linux).

    python benchmarks/sched_wakeup.py

The soak runs its attackers on the same cores as the server and the honest clients, at the
lowest CPU priority, so that their own CPU is not charged to the server. This measures what
"lowest" must mean. One process, pinned to core 0, sleeps 0.5 ms 3,000 times and records how
much later than asked it woke; beside it on the same core, a process that computes for 2 ms
and sleeps 0.5 ms in a loop runs at nice 19 or under SCHED_IDLE, or there is none. The
scheduler lets a nice-19 task that has just been given the core keep it for the rest of its
slice when a normal task wakes; a SCHED_IDLE task yields at once. Prints p50, p99 and the
worst of the oversleep for each, in interleaved runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from typing import Any

SLEEP = 0.0005
WAKEUPS = 3000


def hog(policy: str, stop: Any) -> None:
    """Compute for 2 ms, sleep 0.5 ms, until ``stop``; on core 0 at the lowest priority."""
    os.sched_setaffinity(0, {0})
    os.nice(19)
    if policy == "SCHED_IDLE":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    deadline = time.monotonic() + 60  # bounded even if the parent dies
    while not stop.is_set() and time.monotonic() < deadline:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.002:
            pass
        time.sleep(SLEEP)  # pacing: the hog's duty cycle


def oversleep(policy: str) -> list[float]:
    """Sorted oversleep (s) of WAKEUPS sleeps on core 0, beside a hog of ``policy`` (or none)."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = None if policy == "none" else ctx.Process(target=hog, args=(policy, stop))
    if proc is not None:
        proc.start()
    os.sched_setaffinity(0, {0})
    try:
        time.sleep(0.3)  # the hog is running (a spawn start takes ~0.1 s); not synchronisation
        late = []
        for _ in range(WAKEUPS):
            started = time.perf_counter()
            time.sleep(SLEEP)
            late.append(time.perf_counter() - started - SLEEP)
    finally:
        stop.set()
        if proc is not None:
            proc.join(10)
    return sorted(late)


def main() -> int:
    if not hasattr(os, "SCHED_IDLE"):
        print("Error: SCHED_IDLE is Linux-only", file=sys.stderr)
        return 2
    print(f"oversleep of {WAKEUPS} sleeps of {SLEEP * 1e3:g} ms on core 0 (µs)")
    print(f"{'beside':<22}{'p50':>8}{'p99':>8}{'worst':>9}")
    for policy in ("none", "nice 19", "SCHED_IDLE", "nice 19", "SCHED_IDLE"):
        late = oversleep(policy)
        p50, p99 = late[len(late) // 2], late[int(len(late) * 0.99)]
        label = "nothing" if policy == "none" else f"a hog at {policy}"
        print(f"{label:<22}{p50 * 1e6:>8.0f}{p99 * 1e6:>8.0f}{late[-1] * 1e6:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

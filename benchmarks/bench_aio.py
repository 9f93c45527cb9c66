"""The asyncio client beside the threaded client, against the same host, in one run.

    python benchmarks/bench_aio.py              # 3 interleaved rounds of 3 s
    python benchmarks/bench_aio.py --quick      # one short round, for CI smoke

One host process (``python -m rpyc_host``, threaded) serves ``AddService.add`` on 127.0.0.1.
In this benchmark's process, one after the other:

- ``threads``: 8 threads, each with its own ``client.connect`` and the bound method cached;
- ``aio, 1 connection``: 100 asyncio tasks sharing one ``client.aio`` connection (pipelined);
- ``aio, 8 connections``: the same 100 tasks spread over 8 connections.

Every loop stops at a call count or a time limit, whichever comes first; the host is stopped by
PID at the end. Rounds are interleaved and medians printed with the ratio to ``threads``; no
target is set: the ratio is the figure (on a shared 2-core machine, only within one run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import fmt, host_server, machine, save, table

CONFIG = """
server: {type: threaded}
services:
  add: {class: benchmarks.bench_service:AddService, port: 0}
"""
MAX_CALLS = 1_000_000
THREADS = 8
TASKS = 100


def threaded_rate(port: int, seconds: float, threads: int = THREADS) -> float:
    """Calls/s of ``threads`` threads, each on its own connection, calling for ``seconds``."""
    import client

    conns = [client.connect(host="127.0.0.1", port=port, timeout=30) for _ in range(threads)]
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        add = conns[i].root.add
        for _ in range(100):  # warm-up
            add(1, 2)
        start.wait(timeout=30)  # every thread warm: all start together
        calls = 0
        deadline = time.perf_counter() + seconds
        while calls < MAX_CALLS // threads and time.perf_counter() < deadline:
            add(1, 2)
            calls += 1
        counts[i] = calls

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    try:
        for w in workers:
            w.start()
        start.wait(timeout=30)
        started = time.perf_counter()
        for w in workers:
            w.join(timeout=seconds + 60)
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    return sum(counts) / elapsed


async def _aio_rate(port: int, seconds: float, connections: int, tasks: int = TASKS) -> float:
    import client.aio

    conns = [await client.aio.connect(host="127.0.0.1", port=port, timeout=30) for _ in range(connections)]
    try:
        for conn in conns:  # warm-up (and the method lookups)
            for _ in range(100):
                await conn.root.add(1, 2)
        counts = [0] * tasks
        stop_at = time.perf_counter() + seconds

        async def work(i: int) -> None:
            add = conns[i % connections].root.add
            calls = 0
            while calls < MAX_CALLS // tasks and time.perf_counter() < stop_at:
                await add(1, 2)
                calls += 1
            counts[i] = calls

        started = time.perf_counter()
        await asyncio.gather(*(work(i) for i in range(tasks)))
        return sum(counts) / (time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()


def aio_rate(port: int, seconds: float, connections: int) -> float:
    return asyncio.run(_aio_rate(port, seconds, connections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    rows: dict[str, list[float]] = {
        f"threads ({THREADS}, a connection each)": [],
        f"aio ({TASKS} tasks, 1 connection)": [],
        f"aio ({TASKS} tasks, {THREADS} connections)": [],
    }
    names = list(rows)
    with host_server(CONFIG, "add") as port:
        for _ in range(rounds):
            rows[names[0]].append(threaded_rate(port, seconds))
            rows[names[1]].append(aio_rate(port, seconds, 1))
            rows[names[2]].append(aio_rate(port, seconds, THREADS))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    base = medians[names[0]]
    print(f"add(1, 2) against one threaded host, loopback, {rounds} round(s) of {seconds:g} s\n")
    print(
        table(
            [["client", "calls/s (median)", "vs threads", "runs"]]
            + [[k, fmt(v), f"{v / base:.2f}x", " ".join(fmt(x) for x in rows[k])] for k, v in medians.items()]
        )
    )
    save("aio", {"machine": machine(), "seconds": seconds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The three workloads, each loop bounded in count and in time.

- :func:`sequential`: one client, ``add(1, 2)`` back to back: p50/p99 latency and calls/s;
- :func:`parallel`: N client processes at once: total calls/s and p99 over every call;
- :func:`bulk`: 1 MiB pieces of random bytes, MB/s (10^6 bytes/s);
- :func:`idle`: call p99 from one client, with no other connection and then with N idle ones.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import percentile
from benchmarks.peers.clients import System, open_client, open_idle

WARMUP = 200


def _timed_calls(add: Any, count: int, seconds: float) -> tuple[list[float], float]:
    lat: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    while len(lat) < count:
        t0 = clock()
        add(1, 2)
        t1 = clock()
        lat.append(t1 - t0)
        if t1 > deadline:
            break
    return lat, clock() - start


def _latency_figures(lat: list[float], elapsed: float) -> dict[str, float]:
    return {
        "p50_us": percentile(lat, 50) * 1e6,
        "p99_us": percentile(lat, 99) * 1e6,
        "calls_per_s": len(lat) / elapsed,
        "calls": len(lat),
    }


def _sequential_latencies(system: System, port: int, count: int, seconds: float) -> tuple[list[float], float]:
    client = open_client(system, port)
    try:
        add = client.add  # bound once, as the reference figures did
        for _ in range(WARMUP):
            add(1, 2)
        return _timed_calls(add, count, seconds)
    finally:
        client.close()


def sequential(system: System, port: int, count: int, seconds: float) -> dict[str, float]:
    return _latency_figures(*_sequential_latencies(system, port, count, seconds))


def _worker(system: System, port: int, count: int, seconds: float, barrier: Any, out: Any) -> None:
    try:
        client = open_client(system, port)
        add = client.add
        for _ in range(WARMUP):
            add(1, 2)
    except BaseException as exc:
        barrier.abort()
        out.put(("error", repr(exc)))
        raise
    try:
        barrier.wait(120)
        lat, elapsed = _timed_calls(add, count, seconds)
        out.put((len(lat), elapsed, lat))
    finally:
        client.close()


def parallel(
    system: System, port: int, clients: int, seconds: float, count: int = 500_000
) -> dict[str, float]:
    """``clients`` processes connect and warm up, start together, and call for ``seconds``."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(system, port, count, seconds, barrier, out), daemon=True)
        for _ in range(clients)
    ]
    try:
        for proc in procs:
            proc.start()
        try:
            barrier.wait(120)
        except threading.BrokenBarrierError:
            why = out.get(timeout=10) if not out.empty() else ("error", "no client reported")
            raise RuntimeError(f"{system.name}: a client could not start: {why[1]}") from None
        results = [out.get(timeout=seconds + 120) for _ in procs]
        errors = [r[1] for r in results if r[0] == "error"]
        if errors:
            raise RuntimeError(f"{system.name}: a client failed: {errors[0]}")
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    calls = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    return {
        "calls_per_s": calls / wall,
        "p99_us": percentile([x for r in results for x in r[2]], 99) * 1e6,
        "calls": calls,
    }


def bulk(system: System, port: int, pieces: list[bytes], source: Path, seconds: float) -> dict[str, float]:
    """MB/s moving ``pieces`` (or as many as ``seconds`` allow: stock rpyc and XML-RPC are slow)."""
    client = open_client(system, port, system.bulk)
    try:
        client.prepare(source)
        start = time.perf_counter()
        sent = client.bulk(pieces, seconds, source)
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    return {"mb_per_s": sent / elapsed / 1e6, "mib_sent": sent / (1 << 20), "seconds": elapsed}


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the forking server's), in KiB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def idle(
    system: System, port: int, pid: int, idle_count: int, count: int, seconds: float, open_seconds: float
) -> dict[str, float]:
    """Call p99 with no other connection, then with ``idle_count`` idle ones held open.

    "None" pools the calls made before the idle connections opened and after they closed, so
    a noisy moment on one side of the test does not decide the ratio. Opening stops at
    ``open_seconds``; ``opened`` says how many were really held.
    """
    before, _ = _sequential_latencies(system, port, count // 2, seconds / 2)
    rss_before = rss_kib(pid)
    closers = []
    try:
        deadline = time.monotonic() + open_seconds
        started = time.perf_counter()
        while len(closers) < idle_count and time.monotonic() < deadline:
            closers.append(open_idle(system, port))
        open_s = time.perf_counter() - started
        time.sleep(0.5)  # let the server settle (threads parked, forked children running)
        held = sequential(system, port, count, seconds)
        rss_after = rss_kib(pid)
    finally:
        for close in closers:
            try:
                close()
            except Exception:
                pass
    time.sleep(0.5)  # let the server reap what closed (threads, forked children)
    after, _ = _sequential_latencies(system, port, count - count // 2, seconds / 2)
    none = _latency_figures(before + after, 1.0)
    return {
        "p99_none_us": none["p99_us"],
        "p99_idle_us": held["p99_us"],
        "p50_none_us": none["p50_us"],
        "p50_idle_us": held["p50_us"],
        "ratio": held["p99_us"] / none["p99_us"],
        "opened": len(closers),
        "open_s": open_s,
        "server_rss_mib": (rss_after - rss_before) / 1024,
    }

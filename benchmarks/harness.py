"""Shared pieces of the benchmarks: server processes, bounded call loops, ratio tables.

Every loop is bounded in count and in time; every server runs in its own process on
127.0.0.1 and is stopped by PID when the benchmark ends.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rpyc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


@contextmanager
def ready_server(argv: list[str], timeout: float = 30, what: str = "server") -> Iterator[tuple[int, int]]:
    """Run ``argv`` from the project root; it must print ``READY <port>``. Yields (port, pid) and
    stops the process by PID on exit, whatever happens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        port = 0
        while not port and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {what} exited before it was ready")
            if line.startswith("READY "):
                port = int(line.split()[1])
        if not port:
            raise RuntimeError(f"the {what} was not ready within {timeout} s")
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def python_server(code: str, *args: str, timeout: float = 30) -> Any:
    """``python -c code args`` as a :func:`ready_server`."""
    return ready_server([sys.executable, "-c", code, *args], timeout, what=f"server {code[:40]!r}")


@contextmanager
def host_server(config_text: str, name: str, timeout: float = 30) -> Iterator[int]:
    """``python -m rpyc_host`` with a config; yields the real port of service ``name``."""
    from rpyc_host.testing import ServerProcess

    path = RESULTS / f"bench-{os.getpid()}-{name}.yaml"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text)
    proc = ServerProcess(path, cwd=ROOT, ready_timeout=timeout)  # cwd: benchmarks.* services import
    try:
        proc.start()
        yield proc.address(name)[1]
    finally:
        proc.stop()
        path.unlink(missing_ok=True)


def timed_calls(add: Any, count: int, seconds: float, every_1000: Any = None) -> dict[str, float]:
    """Call ``add(1, 2)`` after a warm-up, bounded by count and time: p50/p99 (µs) and calls/s.
    ``every_1000()`` runs after each thousand calls (outside the timing of any one call)."""
    for _ in range(200):  # warm-up
        add(1, 2)
    lat: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds
    while len(lat) < count and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        add(1, 2)
        lat.append(time.perf_counter() - t0)
        if every_1000 is not None and len(lat) % 1000 == 0:
            every_1000()
    elapsed = time.perf_counter() - start
    return {
        "p50_us": percentile(lat, 50) * 1e6,
        "p99_us": percentile(lat, 99) * 1e6,
        "calls_per_s": len(lat) / elapsed,
        "calls": len(lat),
    }


def sequential_calls(port: int, count: int, seconds: float) -> dict[str, float]:
    """One client, ``add`` cached: p50/p99 latency (µs) and calls/s, bounded by count and time."""
    with rpyc.connect("127.0.0.1", port) as conn:
        return timed_calls(conn.root.add, count, seconds)


def in_memory_provider(ratio: float = 1.0) -> tuple[Any, Any]:
    """``(provider, exporter)``: an SDK tracer provider sampling ``ratio`` of the traces (a child
    follows its parent's decision) into an in-memory exporter through a batch processor."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter))  # what a deployment would use
    return provider, exporter


# The tracing a switchable host process (benchmarks.bench_service.TracedAddService) runs
# with: one provider recording every trace to memory, made on the first switch.
_switched: tuple[Any, Any] | None = None


def switch_tracing(mode: str) -> bool:
    """In a benchmark's host process: tracing off (``off``), or on with every trace recorded
    to memory and a SERVER span for every call (``all``) or only for a call without a
    sampled caller (``roots``, what ``RPYC_HOST_SERVER_SPANS=roots`` does). True when on."""
    global _switched
    from rpyc_host.wire import tracing

    if mode not in ("off", "all", "roots"):
        raise ValueError(f"tracing mode must be off, all or roots, got {mode!r}")
    tracing.disable()
    if mode == "off":
        return False
    if _switched is None:
        _switched = in_memory_provider(1.0)
    os.environ[tracing.SERVER_SPANS_VARIABLE] = mode
    return tracing.configure(_switched[0])


def clear_switched() -> None:
    """Drop the spans a switchable host recorded so far (its memory stays flat)."""
    if _switched is not None:
        _switched[1].clear()


def interleaved_context_calls(
    ports: Mapping[str, int],
    slices: int,
    seconds: float,
    before: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Each mode of ``ports`` (mode -> port of the host it calls) over ``client.connect``
    connections open together: ``context off`` (the connection sends no call context),
    ``context on`` (the default), ``tracing on`` (context and a CLIENT span per call, exported
    to memory; the same for ``tracing on, client spans only``, to a host that makes no SERVER
    span under it) or ``tracing, 1 in 10 sampled``. Measured in ``slices`` rounds of one slice
    of ``seconds`` per mode, the order rotating every round: the machine's slow and fast
    spells, which last seconds on a shared box, fall on every mode alike. Tracing is on
    (in-memory exporter, cleared every thousand calls) during the slices of the tracing modes
    and off during the others; ``before(mode)`` runs before each slice, with this process's
    tracing off (to switch the host's). Returns each mode's slices."""
    import client
    from rpyc_host.wire import tracing

    made = {m: in_memory_provider(0.1 if "1 in 10" in m else 1.0) for m in ports if m.startswith("tracing")}
    modes = list(ports)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with ExitStack() as stack:
        adds = {}
        for mode in modes:
            conn = stack.enter_context(client.connect(host="127.0.0.1", port=ports[mode]))
            if mode == "context off":
                conn.peer_speaks_context = False
            adds[mode] = conn.root.add
        try:
            for i in range(slices):
                for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                    provider, exporter = made.get(mode, (None, None))
                    tracing.disable()
                    if before is not None:
                        before(mode)
                    if provider is not None:
                        tracing.configure(provider)
                    clear = exporter.clear if exporter is not None else None
                    runs[mode].append(timed_calls(adds[mode], 1_000_000, seconds, clear))
        finally:
            tracing.disable()
    return runs


def setup_rate(dial: Callable[[], Any], count: int, seconds: float) -> float:
    """``dial()`` a connection, make a first call, close it: how many per second, bounded by
    ``count`` and ``seconds``."""
    done = 0
    start = time.perf_counter()
    while done < count and time.perf_counter() - start < seconds:
        conn = dial()
        try:
            assert conn.root.add(1, 2) == 3
        finally:
            conn.close()
        done += 1
    return done / (time.perf_counter() - start)


def _client_worker(port: int, seconds: float, max_calls: int, start_at: float, out: Any) -> None:
    with rpyc.connect("127.0.0.1", port) as conn:
        add = conn.root.add
        add(1, 2)
        while time.time() < start_at:
            time.sleep(0.001)
        lat: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(lat) < max_calls and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            add(1, 2)
            lat.append(time.perf_counter() - t0)
    out.put((len(lat), sum(lat), sorted(lat)[:: max(1, len(lat) // 2000)]))


def run_clients(
    worker: Callable[..., None], args: tuple[Any, ...], clients: int, seconds: float
) -> list[Any]:
    """Start ``clients`` spawned processes running ``worker(*args, start_at, out)``; each connects,
    waits until ``start_at`` so all call together, and puts one result on ``out``."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.0 + 0.1 * clients  # let every process connect first
    procs = [ctx.Process(target=worker, args=(*args, start_at, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        return [out.get(timeout=seconds + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def parallel_calls(port: int, clients: int, seconds: float, max_calls: int = 200_000) -> dict[str, float]:
    """``clients`` processes calling ``add`` at once for ``seconds``: total calls/s and p99."""
    results = run_clients(_client_worker, (port, seconds, max_calls), clients, seconds)
    total = sum(r[0] for r in results)
    samples = [s for r in results for s in r[2]]
    return {"calls_per_s": total / seconds, "p99_us": percentile(samples, 99) * 1e6, "calls": total}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rpyc": rpyc.__version__,
        "platform": platform.platform(),
    }


def print_checks(checks: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    """Print each target as a ``[PASS]``/``[MISS]`` line; returns them as JSON-ready rows."""
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'MISS'}] {text}")
    return [{"check": text, "ok": ok} for text, ok in checks]


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"

"""1,000 small calls batched against sequential, on loopback and through a delaying proxy.

    python benchmarks/bench_batch.py              # full run (~1 minute)
    python benchmarks/bench_batch.py --quick      # a few seconds, for CI smoke

The threaded host serves ``AddService.add`` from its own process on 127.0.0.1. One client
makes 1,000 ``add(i, i)`` calls three ways: sequentially (the bound method cached: one round
trip a call), as one ``client.batch`` (one request), and as a batch against a bare rpyc
ThreadedServer, which has no batch entry point (the client pipelines the calls instead). The
same runs go through a TCP proxy in this process that holds every chunk 5 ms in each direction
(10 ms a round trip, like two machines a few hundred km apart). Ratios are from one run.
Targets: batch >= 3x sequential on loopback, >= 50x through the proxy.
"""

from __future__ import annotations

import argparse
import heapq
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import client
from benchmarks.bench_host import BARE, HOST_CONFIG
from benchmarks.harness import fmt, host_server, machine, print_checks, python_server, save, table

DELAY = 0.005  # seconds each chunk is held, each way


class DelayProxy:
    """Relays TCP connections to ``target``, holding every chunk ``delay`` seconds each way
    (bytes keep flowing meanwhile: a long pipe, not a slow one)."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="delay-accept", daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                near, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            far = socket.create_connection(self.target, timeout=10)
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
            self.sockets += [near, far]
            for src, dst in ((near, far), (far, near)):
                self._start(self._pipe, src, dst)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        held: list[tuple[float, int, bytes]] = []
        ready = threading.Condition()
        seq = iter(range(1 << 62))

        def send_due() -> None:
            while True:
                with ready:
                    while not held:
                        ready.wait()
                    due, _, chunk = held[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        ready.wait(wait)
                        continue
                    heapq.heappop(held)
                try:
                    if not chunk:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(chunk)
                except OSError:  # the proxy is closing
                    return

        self._start(send_due)
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            with ready:
                heapq.heappush(held, (time.monotonic() + self.delay, next(seq), chunk))
                ready.notify()
            if not chunk:
                return

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


@contextmanager
def delay_proxy(port: int, delay: float = DELAY) -> Iterator[int]:
    proxy = DelayProxy(("127.0.0.1", port), delay)
    try:
        yield proxy.port
    finally:
        proxy.close()


def sequential(port: int, calls: int, limit: float = 60.0) -> float:
    """Seconds for ``calls`` sequential ``add`` calls (bound method cached); past ``limit``
    seconds the loop stops and the time is scaled from the calls made."""
    with client.connect(host="127.0.0.1", port=port, timeout=60) as conn:
        add = conn.root.add
        add(0, 0)  # warm-up: the lookup and first round trip
        started = time.perf_counter()
        deadline = started + limit
        done = 0
        while done < calls and time.perf_counter() < deadline:
            add(done, done)
            done += 1
        return (time.perf_counter() - started) * calls / done


def batched(port: int, calls: int) -> float:
    """Seconds for ``calls`` ``add`` calls in one ``client.batch`` (checking every result)."""
    with client.connect(host="127.0.0.1", port=port, timeout=60) as conn:
        with client.batch(conn) as warm:  # warm-up: finds the entry point (or that there is none)
            warm.root.add(0, 0)
        started = time.perf_counter()
        with client.batch(conn) as b:
            results = [b.root.add(i, i) for i in range(calls)]
        elapsed = time.perf_counter() - started
        if [r.value for r in results] != [2 * i for i in range(calls)]:
            raise AssertionError("the batch returned wrong results")
        return elapsed


def best_of(runs: int, measure: Callable[[int, int], float], port: int, calls: int) -> float:
    return min(measure(port, calls) for _ in range(runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    calls = args.calls
    loop_runs, far_runs = (1, 1) if args.quick else (5, 1)
    far_calls = min(calls, 200) if args.quick else calls  # sequential through the proxy: 10 ms a call

    seconds: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        host_port = stack.enter_context(host_server(HOST_CONFIG.format(type="threaded", extra=""), "add"))
        bare_port = stack.enter_context(python_server(BARE))[0]
        for path, n, runs, wrap in (
            ("loopback", calls, loop_runs, None),
            (f"proxy {DELAY * 1000:g} ms each way", far_calls, far_runs, delay_proxy),
        ):
            host = stack.enter_context(wrap(host_port)) if wrap else host_port
            bare = stack.enter_context(wrap(bare_port)) if wrap else bare_port
            seconds[path] = {
                "calls": n,
                "host sequential": best_of(runs, sequential, host, n),
                "host batch": best_of(runs, batched, host, n),
                "bare rpyc sequential": best_of(runs, sequential, bare, n),
                "bare rpyc batch (pipelined)": best_of(runs, batched, bare, n),
            }

    rows = [["path", "calls", "way", "seconds", "calls/s", "x sequential"]]
    for path, figures in seconds.items():
        n = int(figures["calls"])
        for way in ("host sequential", "host batch", "bare rpyc sequential", "bare rpyc batch (pipelined)"):
            base = figures["bare rpyc sequential" if way.startswith("bare") else "host sequential"]
            rows.append(
                [
                    path,
                    str(n),
                    way,
                    f"{figures[way]:.4f}",
                    fmt(n / figures[way]),
                    f"{base / figures[way]:.1f}",
                ]
            )
    print(table(rows))
    near, far = seconds["loopback"], seconds[f"proxy {DELAY * 1000:g} ms each way"]
    loop_ratio = near["host sequential"] / near["host batch"]
    far_ratio = far["host sequential"] / far["host batch"]
    pipe_ratio = far["bare rpyc sequential"] / far["bare rpyc batch (pipelined)"]
    checks = [
        (f"batch on loopback: {loop_ratio:.1f}x sequential (target >= 3)", loop_ratio >= 3),
        (f"batch through the proxy: {far_ratio:.1f}x sequential (target >= 50)", far_ratio >= 50),
        (f"pipelined fallback through the proxy: {pipe_ratio:.1f}x sequential (no target)", True),
    ]
    print()
    print_checks(checks)
    path = save(
        "batch",
        {
            "machine": machine(),
            "seconds": seconds,
            "checks": [{"check": t, "ok": ok} for t, ok in checks],
        },
    )
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many idle connections on the threadpool server, and connection set-up rate per server type.

    python benchmarks/bench_connections.py              # 10,000 idle connections (2-3 minutes)
    python benchmarks/bench_connections.py --quick      # 1,000, for CI smoke

Idle connections: a child process opens ``--count`` TCP connections to a host ``threadpool``
server and leaves them silent (the server has accepted each and built its rpyc connection, as
for a client between calls). Meanwhile one more client calls ``add`` sequentially; its p99 is
compared with the p99 of the same loop with no idle connections, measured before and after
(their mean is the baseline); each figure is the median-p99 run of three. Calls are measured
only once this process has read the server's log line for every connection opened (or
closed). The server's RSS and thread count are read from /proc before and with the
connections open. Target: p99 with the idle connections <= 1.5x without.

Limits raised in this benchmark's config only (the defaults stay): ``limits.max_connections``
(1,000 by default) and ``limits.max_connections_per_ip`` (200) to the connection count plus a
margin, since every idle connection comes from 127.0.0.1. This process and the child raise
their RLIMIT_NOFILE soft limit towards the hard limit (the server, started from here, inherits it);
if the hard limit is too low the count is lowered to fit, and the output says so.

Set-up rate: connect, first call (``conn.root.add(1, 2)``), close, in a loop bounded in count and
time, for bare rpyc's ThreadedServer and the host's ``threaded``, ``threadpool`` and
``forking`` servers.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rpyc

from benchmarks.bench_host import BARE
from benchmarks.harness import (
    fmt,
    machine,
    print_checks,
    python_server,
    save,
    sequential_calls,
    setup_rate,
    table,
)
from rpyc_host.testing import ServerProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
HOST_CONFIG = """
server: {{type: {type}, pool_size: 16}}
services:
  add: {{class: benchmarks.bench_service:AddService, port: 0}}
limits: {{max_connections: {max_conns}, max_connections_per_ip: {max_conns}}}
"""
KINDS = ("threaded", "threadpool", "forking")


def status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status (``VmRSS`` in KiB, ``Threads``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted``; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def start_host(stack: ExitStack, kind: str, max_conns: int, work: Path) -> ServerProcess:
    path = work / f"bench-connections-{kind}.yaml"
    path.write_text(HOST_CONFIG.format(type=kind, max_conns=max_conns))
    proc = ServerProcess(path, cwd=ROOT)
    stack.callback(proc.stop)
    proc.start()
    return proc


def wait_logged(proc: ServerProcess, text: str, count: int) -> None:
    """Wait until ``count`` log lines with ``text`` have been read from the server: the server
    logs a line per connection opened and closed, and a thread of this process reads them, so
    until it has, the calls measured here would share this process with it."""
    wait_until(
        lambda: sum(text in line for line in list(proc.lines)) >= count, 120, f"{count} '{text}' lines"
    )


def open_idle(port: int, pid: int, count: int, seconds: float) -> list[socket.socket]:
    """``count`` connections the server has accepted (its fd count shows them), within ``seconds``."""
    base = open_fds(pid)
    socks: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    try:
        while len(socks) < count and time.monotonic() < deadline:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            if len(socks) % 500 == 0:  # keep within the listen backlog
                _wait_accepted(pid, base + len(socks))
        _wait_accepted(pid, base + len(socks))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _hold(port: int, pid: int, count: int, seconds: float, pipe: Any) -> None:
    """In a child process: open the idle connections, report how many, hold them until told."""
    raise_nofile(count + 1000)
    socks = open_idle(port, pid, count, seconds)
    pipe.send(len(socks))
    pipe.poll(600)  # until the parent says stop (or gives up)
    for s in socks:
        s.close()


@contextmanager
def idle_connections(port: int, pid: int, count: int, seconds: float) -> Iterator[int]:
    """``count`` idle connections held by a child process (so this one, which measures, holds
    none of them); yields how many it opened and closes them on exit."""
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_hold, args=(port, pid, count, seconds, theirs), daemon=True)
    child.start()
    try:
        if not mine.poll(seconds + 30):
            raise RuntimeError(f"the idle connections were not open within {seconds + 30:.0f} s")
        yield int(mine.recv())
    finally:
        if child.is_alive():
            mine.send("stop")
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)


def calls_p99(port: int, calls: int, seconds: float, segments: int = 3) -> dict[str, float]:
    """``sequential_calls`` in ``segments`` runs; the run with the median p99 (a moment of the
    shared machine's load hits one run, not the figure)."""
    runs = [sequential_calls(port, calls // segments, seconds / segments) for _ in range(segments)]
    return sorted(runs, key=lambda r: r["p99_us"])[segments // 2]


def _wait_accepted(pid: int, fds: int) -> None:
    wait_until(lambda: open_fds(pid) >= fds, 30, f"the server holding {fds} fds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 connections and short loops (smoke test)")
    parser.add_argument("--count", type=int, default=10_000, help="idle connections to hold")
    args = parser.parse_args(argv)
    count = 1000 if args.quick else args.count
    calls, call_secs = (2_000, 3.0) if args.quick else (10_000, 8.0)
    setups, setup_secs = (100, 3.0) if args.quick else (500, 8.0)

    # Each side holds one fd per connection plus its own (logs, pipes, listeners).
    soft = raise_nofile(count + 1000)
    notes = []
    if soft < count + 200:
        fitted = soft - 200
        notes.append(f"RLIMIT_NOFILE hard limit is {soft}: holding {fitted} connections instead of {count}")
        count = fitted
    max_conns = count + 100
    result: dict[str, Any] = {"machine": machine(), "count": count, "nofile_soft": soft, "notes": notes}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-conns-") as tmp:
        work = Path(tmp)
        proc = start_host(stack, "threadpool", max_conns, work)
        port, pid = proc.address("add")[1], proc.pid
        before = calls_p99(port, calls, call_secs)
        wait_logged(proc, "disconnected after", 3)  # its connections gone: a steady fd count
        rss0, threads0 = status(pid, "VmRSS"), status(pid, "Threads")
        t0 = time.perf_counter()
        with idle_connections(port, pid, count, 300) as opened:
            opened_s = time.perf_counter() - t0
            wait_logged(proc, "] connected", opened + 3)  # and the 3 measuring runs before
            rss1, threads1 = status(pid, "VmRSS"), status(pid, "Threads")
            idle = calls_p99(port, calls, call_secs)
        if opened < count:
            notes.append(f"only {opened} of {count} connections opened within the time allowed")
            count = opened
        wait_logged(proc, "disconnected after", opened + 6)
        after = calls_p99(port, calls, call_secs)
        baseline = statistics.mean([before["p99_us"], after["p99_us"]])
        result["idle"] = {
            "before": before,
            "with_idle": idle,
            "after": after,
            "rss_kib": [rss0, rss1],
            "threads": [threads0, threads1],
            "open_seconds": opened_s,
        }
        ports = {"bare rpyc threaded": stack.enter_context(python_server(BARE))[0]}
        for kind in KINDS:
            ports[f"host {kind}"] = start_host(stack, kind, max_conns, work).address("add")[1]
        rates: dict[str, list[float]] = {name: [] for name in ports}
        for r in range(1 if args.quick else 3):
            order = list(ports)[r:] + list(ports)[:r]
            for name in order:
                rates[name].append(
                    setup_rate(functools.partial(rpyc.connect, "127.0.0.1", ports[name]), setups, setup_secs)
                )
        rate = {name: statistics.median(v) for name, v in rates.items()}
        result["setup_per_s"] = rates

    load = os.getloadavg()
    print(f"{result['machine']['date']}  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for note in notes:
        print(f"NOTE: {note}")
    print(f"\n{count:,} idle connections on the host threadpool server (opened in {opened_s:.1f} s)")
    rows = [["sequential add()", "p50 us", "p99 us", "calls/s", "p99 x idle-free"]]
    for label, r in (
        ("idle-free, before", before),
        (f"with {count:,} idle", idle),
        ("idle-free, after", after),
    ):
        rows.append(
            [
                label,
                fmt(r["p50_us"]),
                fmt(r["p99_us"]),
                fmt(r["calls_per_s"]),
                f"{r['p99_us'] / baseline:.2f}",
            ]
        )
    print(table(rows))
    grow = (rss1 - rss0) / 1024
    print(
        f"server RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB (+{grow:.1f} MiB, "
        f"{(rss1 - rss0) / max(1, count):.1f} KiB per connection); threads {threads0} -> {threads1}"
    )
    bare = rate["bare rpyc threaded"]
    rows = [["connect + first call + close", "per second", "x bare"]]
    for name, value in rate.items():
        rows.append([name, fmt(value), f"{value / bare:.2f}"])
    print()
    print(table(rows))
    ratio = idle["p99_us"] / baseline
    checks = [(f"p99 with {count:,} idle connections = {ratio:.2f}x idle-free (target <= 1.5)", ratio <= 1.5)]
    print()
    print_checks(checks)
    result["checks"] = [{"check": t, "ok": ok} for t, ok in checks]
    print(f"\nJSON: {save('connections', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

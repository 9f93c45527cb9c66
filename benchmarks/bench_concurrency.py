"""Throughput under concurrency: N client processes calling at once, host beside bare rpyc.

    python benchmarks/bench_concurrency.py              # five interleaved rounds (~2 minutes)
    python benchmarks/bench_concurrency.py --quick      # one short round, for CI smoke

Each system serves the same ``AddService.add`` from its own process on 127.0.0.1: bare rpyc's
ThreadedServer and the host's ``threaded`` and ``threadpool`` servers. Each client process
uses plain ``rpyc.connect`` with the bound method cached. Rounds interleave the systems (host,
bare, host, bare ...), so a noisy moment of a shared machine hits both sides of a ratio; every
round's ratio is printed and the spread (min..max) beside the median.

Beside calls/s and p99, the server process's CPU time per call (utime + stime from
/proc/<pid>/stat, before and after) shows whether a swing comes from the server's own work or
from the machine (a server that spends the same CPU per call but serves fewer calls was not
given the CPU). Targets (ratios from this run): aggregate calls/s >= 1.0x bare and p99 <= 1.2x
bare, for both host servers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_files import cpu_of
from benchmarks.bench_host import BARE
from benchmarks.harness import fmt, machine, parallel_calls, print_checks, python_server, save, table
from rpyc_host.testing import ServerProcess

HOST_CONFIG = """
server: {{type: {type}, pool_size: 16}}
services:
  add: {{class: benchmarks.bench_service:AddService, port: 0}}
"""
BARE_NAME = "bare rpyc threaded"
HOSTS = ("host threaded", "host threadpool")


def _host(stack: ExitStack, kind: str, work: Path) -> tuple[int, int]:
    path = work / f"bench-concurrency-{kind}.yaml"
    path.write_text(HOST_CONFIG.format(type=kind))
    proc = ServerProcess(path, cwd=Path(__file__).resolve().parent.parent)
    stack.callback(proc.stop)
    proc.start()
    assert proc.proc is not None
    return proc.address("add")[1], proc.proc.pid


def measure(port: int, pid: int, clients: int, seconds: float) -> dict[str, float]:
    """One parallel run with the server's CPU time per call."""
    before = cpu_of(pid)
    result = parallel_calls(port, clients, seconds)
    cpu = cpu_of(pid) - before
    result["server_cpu_us_per_call"] = cpu / max(1, result["calls"]) * 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="calling time per run")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    seconds = 1.0 if args.quick else args.seconds

    import tempfile

    runs: dict[str, list[dict[str, float]]] = {n: [] for n in (BARE_NAME, *HOSTS)}
    # Each host run's ratios to the bare run just before or after it (the same round).
    ratios: dict[str, list[tuple[float, float]]] = {n: [] for n in HOSTS}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-conc-") as tmp:
        where = {BARE_NAME: stack.enter_context(python_server(BARE))}
        for name in HOSTS:
            where[name] = _host(stack, name.split()[1], Path(tmp))
        for r in range(rounds):
            # host, bare, host, bare: each host run has a bare run beside it; the order flips
            # every round so neither side always goes first.
            for name in HOSTS if r % 2 == 0 else HOSTS[::-1]:
                pair = [name, BARE_NAME] if r % 2 == 0 else [BARE_NAME, name]
                got: dict[str, dict[str, float]] = {}
                for system in pair:
                    got[system] = measure(*where[system], args.clients, seconds)
                    runs[system].append(got[system])
                    print(
                        f"round {r + 1}/{rounds} {system}: {fmt(got[system]['calls_per_s'])} calls/s, "
                        f"p99 {fmt(got[system]['p99_us'])} us",
                        file=sys.stderr,
                        flush=True,
                    )
                host, bare = got[name], got[BARE_NAME]
                ratios[name].append(
                    (host["calls_per_s"] / bare["calls_per_s"], host["p99_us"] / bare["p99_us"])
                )

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rows = [
        [
            "system",
            f"{args.clients}-client calls/s",
            "x bare (median, min..max)",
            "p99 us",
            "x bare (median, min..max)",
            "server CPU us/call",
        ]
    ]
    for name in (BARE_NAME, *HOSTS):
        if name == BARE_NAME:
            calls_cell = p99_cell = "1.00"
        else:
            c = [x[0] for x in ratios[name]]
            p = [x[1] for x in ratios[name]]
            calls_cell = f"{statistics.median(c):.2f} ({min(c):.2f}..{max(c):.2f})"
            p99_cell = f"{statistics.median(p):.2f} ({min(p):.2f}..{max(p):.2f})"
        rows.append(
            [
                name,
                fmt(med(name, "calls_per_s")),
                calls_cell,
                fmt(med(name, "p99_us")),
                p99_cell,
                fmt(med(name, "server_cpu_us_per_call"), 1),
            ]
        )
    info = machine()
    print(f"{info['date']}  {rounds} round(s) of {seconds:g} s, {args.clients} client processes, medians")
    print(table(rows))
    checks: list[tuple[str, bool]] = []
    for name in HOSTS:
        c = statistics.median(x[0] for x in ratios[name])
        p = statistics.median(x[1] for x in ratios[name])
        checks.append((f"{name}: calls/s {c:.2f}x bare (target >= 1.0)", c >= 1.0))
        checks.append((f"{name}: p99 {p:.2f}x bare (target <= 1.2)", p <= 1.2))
    print()
    print_checks(checks)
    data: dict[str, Any] = {
        "machine": info,
        "rounds": rounds,
        "seconds": seconds,
        "runs": runs,
        "ratios": ratios,
        "checks": [{"check": t, "ok": ok} for t, ok in checks],
    }
    print(f"\nJSON: {save('concurrency', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

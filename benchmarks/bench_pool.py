"""Calls/s through the client pool with 1, 2 and 3 instances, beside one direct connection.

    python benchmarks/bench_pool.py [--clients 8] [--seconds 3] [--rounds 2]

A registry (``python -m rpyc_host.registry``) and three demo instances (``python server.py``)
run on 127.0.0.1; ``--clients`` processes call ``add(1, 2)``:

- ``direct``: ``client.connect`` to instance 1, bound method cached (the floor for one call);
- ``pool xN``: ``client.connect_service`` limited to N instances, round-robin.

Rounds are interleaved so a noisy machine hurts every row alike; the medians are printed with
ratios to ``direct``. Every loop is bounded in count and time; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import RESULTS, fmt, machine, save, table
from rpyc_host.testing import RegistryProcess, ServerProcess, wait_until

MAX_CALLS = 500_000


def _worker(mode: str, target: Any, seconds: float, start_at: float, out: Any) -> None:
    import client

    if mode == "direct":
        conn = client.connect(host="127.0.0.1", port=target, timeout=10)
        call = conn.root.add
        closer = conn.close
    else:
        registry, allowed = target
        pool = client.connect_service("DEMO", registry=registry, timeout=10, rediscover=3600)
        pool.discover()
        with pool._lock:  # keep the first N instances only: the bench compares 1, 2, 3
            for address in [a for a in pool._instances if a not in allowed]:
                pool._instances.pop(address)
        call = pool.root.add
        closer = pool.close
    for _ in range(100):  # connect everywhere and warm up
        call(1, 2)
    while time.time() < start_at:
        time.sleep(0.001)
    calls = 0
    deadline = time.perf_counter() + seconds
    while calls < MAX_CALLS and time.perf_counter() < deadline:
        call(1, 2)
        calls += 1
    closer()
    out.put(calls)


def run(mode: str, target: Any, clients: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.5 + 0.15 * clients
    procs = [ctx.Process(target=_worker, args=(mode, target, seconds, start_at, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return total / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    with RegistryProcess() as registry:
        try:
            for i in range(3):
                path = RESULTS / f"bench-pool-{os.getpid()}-{i}.yaml"
                path.write_text(
                    "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"
                    f"registry: {{enabled: true, host: 127.0.0.1, port: {registry.port}, interval: 5}}\n"
                    "server: {grace_period: 0}\n"
                )
                proc = ServerProcess(path)
                servers.append(proc)
                proc.start()
            addresses = [p.address("demo") for p in servers]
            wait_until(lambda: set(addresses) <= set(registry.discover("DEMO")), 10, "3 instances registered")
            rows: dict[str, list[float]] = {"direct": [], "pool x1": [], "pool x2": [], "pool x3": []}
            for _ in range(args.rounds):
                rows["direct"].append(run("direct", addresses[0][1], args.clients, args.seconds))
                for n in (1, 2, 3):
                    target = (registry.spec, set(addresses[:n]))
                    rows[f"pool x{n}"].append(run("pool", target, args.clients, args.seconds))
        finally:
            for proc in servers:
                proc.stop()
                proc.config and Path(proc.config).unlink(missing_ok=True)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    base = medians["direct"]
    print(
        f"{args.clients} client processes, {args.seconds:.0f} s x {args.rounds} rounds, add(1, 2), loopback\n"
    )
    print(
        table(
            [["path", "calls/s (median)", "vs direct", "runs"]]
            + [[k, fmt(v), f"{v / base:.2f}x", " ".join(fmt(x) for x in rows[k])] for k, v in medians.items()]
        )
    )
    save("pool", {"machine": machine(), "clients": args.clients, "seconds": args.seconds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

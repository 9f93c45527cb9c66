"""``python -m benchmarks.peers``: start every server, run the workloads in rounds, report.

Systems are measured in interleaved rounds (the order rotates each round) and the median
round is reported, so a noisy moment on a shared machine hits every system alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, machine
from benchmarks.peers import workloads
from benchmarks.peers.clients import System
from benchmarks.peers.report import (
    BARE,
    FILES,
    FILES_DOWN,
    FILES_DOWN_MEMORY,
    FILES_DOWN_SHA256,
    FILES_MEMORY,
    FILES_SHA256,
    FLOOR,
    HOST,
    TOKEN,
    Results,
    medians,
    write_json,
)
from benchmarks.peers.servers import host_server, peer_server

MiB = 1 << 20

SYSTEMS = [
    System(HOST, "host:threaded", client="rpyc", bulk="host"),
    System(TOKEN, "host:threaded", client="rpyc", bulk=None, token=True),
    System("host threadpool", "host:threadpool", client="rpyc", bulk="host"),
    System("host forking", "host:forking", client="rpyc", bulk="host"),
    System(FILES, "host:files", client=None, bulk="files"),
    System(FILES_SHA256, "host:files", client=None, bulk="files-sha256"),
    System(FILES_DOWN, "host:files", client=None, bulk="files-down"),
    System(FILES_DOWN_SHA256, "host:files", client=None, bulk="files-down-sha256"),
    System(FILES_MEMORY, "host:files-memory", client=None, bulk="files-memory"),
    System(FILES_DOWN_MEMORY, "host:files-memory", client=None, bulk="files-down-memory"),
    System(BARE, "rpyc", client="rpyc", bulk="rpyc", peer=True),
    System("Pyro5", "pyro5", client="pyro5", bulk="pyro5", peer=True),
    System("gRPC", "grpc", client="grpc", bulk="grpc", peer=True),
    System("XML-RPC", "xmlrpc", client="xmlrpc", bulk="xmlrpc", peer=True),
    System(FLOOR, "raw", client="raw", bulk="raw"),
]


@dataclass(frozen=True)
class Settings:
    """How long and how much; every loop stops at whichever bound comes first."""

    rounds: int
    seq_calls: int
    seq_seconds: float
    par_seconds: float
    bulk_mib: int
    bulk_seconds: float
    idle_count: int
    idle_calls: int
    idle_seconds: float
    idle_open_seconds: float


MODES = {
    "quick": Settings(1, 3_000, 1.0, 1.5, 64, 3.0, 1000, 2_000, 1.0, 30.0),
    "full": Settings(3, 20_000, 3.0, 4.0, 256, 10.0, 1000, 5_000, 2.0, 30.0),
}


def _start(stack: ExitStack, system: System) -> tuple[int, int]:
    kind = system.server
    if kind == "host:files":
        return stack.enter_context(host_server("threaded", files=True))
    if kind == "host:files-memory":
        return stack.enter_context(host_server("threaded", files_in_memory=True))
    if kind.startswith("host:"):
        return stack.enter_context(host_server(kind.split(":", 1)[1], token=system.token))
    return stack.enter_context(peer_server(kind))


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(systems: list[System], s: Settings, clients: int, work: Path) -> dict[str, Any]:
    """Every workload on every system, ``s.rounds`` times; the raw figures of each round."""
    pieces = [os.urandom(MiB) for _ in range(s.bulk_mib)]
    source = work / "bulk.bin"
    with open(source, "wb") as f:
        for piece in pieces:
            f.write(piece)
    out: dict[str, list[dict[str, dict[str, float]]]] = {
        "sequential": [],
        "parallel": [],
        "bulk": [],
        "idle": [],
    }
    with ExitStack() as stack:
        where = {}
        for system in systems:
            where[system.name] = _start(stack, system)
        _log(f"{len(systems)} servers up")
        for r in range(s.rounds):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            calls = [x for x in order if x.client]
            seq, par, bulk, idle = {}, {}, {}, {}
            for x in calls:
                _log(f"round {r + 1}/{s.rounds}: sequential {x.name}")
                seq[x.name] = workloads.sequential(x, where[x.name][0], s.seq_calls, s.seq_seconds)
            for x in calls:
                _log(f"round {r + 1}/{s.rounds}: {clients} processes {x.name}")
                par[x.name] = workloads.parallel(x, where[x.name][0], clients, s.par_seconds)
            for x in order:
                if x.bulk:
                    _log(f"round {r + 1}/{s.rounds}: bulk {x.name}")
                    bulk[x.name] = workloads.bulk(x, where[x.name][0], pieces, source, s.bulk_seconds)
            for x in calls:
                _log(f"round {r + 1}/{s.rounds}: {s.idle_count} idle connections {x.name}")
                port, pid = where[x.name]
                idle[x.name] = workloads.idle(
                    x, port, pid, s.idle_count, s.idle_calls, s.idle_seconds, s.idle_open_seconds
                )
            out["sequential"].append(seq)
            out["parallel"].append(par)
            out["bulk"].append(bulk)
            out["idle"].append(idle)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description="The host beside its peers, in one run."
    )
    parser.add_argument("--quick", action="store_true", help="one short round (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (default: 1 quick, 3 full)")
    parser.add_argument("--clients", type=int, default=8, help="client processes for the parallel test")
    parser.add_argument(
        "--only", help="comma-separated system names to run (e.g. 'host threaded,bare rpyc threaded')"
    )
    parser.add_argument("--docs", action="store_true", help="also write docs/performance.{json,png}")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    if args.rounds:
        settings = Settings(args.rounds, *list(settings.__dict__.values())[1:])
    systems = SYSTEMS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        unknown = [w for w in wanted if w not in {s.name for s in SYSTEMS}]
        if unknown:
            parser.error(f"unknown system {unknown[0]!r}; expected one of {sorted(s.name for s in SYSTEMS)}")
        systems = [s for s in SYSTEMS if s.name in wanted]
    # 1,000 idle connections: this process holds them, and the servers (started from here) accept them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        raw = measure(systems, settings, args.clients, Path(tmp))
    results = Results(
        systems,
        medians(raw["sequential"]),
        medians(raw["parallel"]),
        medians(raw["bulk"]),
        medians(raw["idle"]),
        args.clients,
        settings.idle_count,
    )
    info = machine()
    meta = {
        "machine": info,
        "mode": mode,
        "settings": settings.__dict__,
        "seconds": time.monotonic() - started,
    }
    print(
        f"{info['date']}  {mode} run, {settings.rounds} round(s), medians; Python {info['python']}, "
        f"rpyc {info['rpyc']}, {info['cpus']} CPUs, 127.0.0.1"
    )
    print()
    print(results.text())
    data = results.to_json(meta, raw)
    write_json(RESULTS / "peers.json", data)
    (RESULTS / "peers.md").write_text(results.markdown() + "\n")
    title = f"rpyc-host and its peers, {info['date'][:10]}, {info['cpus']} CPUs, Python {info['python']}"
    results.chart(RESULTS / "peers.png", title)
    paths = [RESULTS / "peers.json", RESULTS / "peers.md", RESULTS / "peers.png"]
    if args.docs:
        write_json(ROOT / "docs" / "performance.json", data)
        results.chart(ROOT / "docs" / "performance.png", title)
        paths += [ROOT / "docs" / "performance.json", ROOT / "docs" / "performance.png"]
    print(
        f"\n{time.monotonic() - started:.0f} s; wrote " + ", ".join(str(p.relative_to(ROOT)) for p in paths)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

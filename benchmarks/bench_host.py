"""Small calls through the host, per server type, beside a bare rpyc ThreadedServer.

    python benchmarks/bench_host.py              # full run (~1 minute)
    python benchmarks/bench_host.py --quick      # a few seconds, for CI smoke

Each system serves the same ``AddService.add`` from its own process on 127.0.0.1; clients use
plain ``rpyc.connect`` with the bound method cached. Systems are measured in interleaved rounds
and the median round is reported, so a noisy moment hits every system alike. Targets (ratios
from this run): host ``threaded`` >= 0.95x bare calls/s; ``threadpool`` p50 <= 1.5x ``threaded``.

Call contexts: the same threaded host called through ``client.connect`` with the call context
off and on (the default), and on with OpenTelemetry tracing at both ends (in-memory
exporters), every trace recorded or one in ten, and every trace recorded with the server
making no SERVER span where the caller's CLIENT span covers the call
(``RPYC_HOST_SERVER_SPANS=roots``); all five over connections open together to one host
process, whose own tracing is switched to each mode's before its slice, in alternating
one-second slices whose order rotates, so the machine's slow spells fall on every mode alike.
Targets: context on >= 0.97x, tracing on and 1 in 10 sampled >= 0.90x the calls/s with the
context off. Spans are lean here (the SDK's provider and batch processor:
rpyc_host/wire/leanspan.py); what a traced call also pays is carrying its context, which
``bench_context_cpu.py``'s ``context sent, no trace`` row measures alone. The sampled row
shows the cost a deployment that samples pays, the client-spans-only row what one span per
call costs.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rpyc

from benchmarks.harness import (
    fmt,
    host_server,
    interleaved_context_calls,
    machine,
    median_of,
    parallel_calls,
    print_checks,
    python_server,
    save,
    sequential_calls,
    table,
)

BARE = """
import rpyc, sys
from rpyc.utils.server import ThreadedServer
from benchmarks.bench_service import AddService
server = ThreadedServer(AddService, hostname="127.0.0.1", port=0)
server._listen()
print("READY", server.port, flush=True)
server.start()
"""

HOST_CONFIG = """
server: {{type: {type}, pool_size: 16}}
services:
  add: {{class: benchmarks.bench_service:AddService, port: 0}}
{extra}
"""
METRICS_ON = "metrics: {enabled: true, port: 0}"
# The threaded host whose tracing is switched between slices (TracedAddService.switch_tracing):
# every context mode is served by this one process. Identical host processes measured side by
# side here differed by up to 14% in calls/s, more than the costs being compared.
SWITCHED = """
import threading
from benchmarks import harness
from rpyc_host.testing import running_host
config = "services:\\n  add: {class: benchmarks.bench_service:TracedAddService, port: 0}\\n"
with running_host(config) as host:
    print("READY", host.address("add")[1], flush=True)
    while True:
        threading.Event().wait(1.0)
        harness.clear_switched()
"""
# Each context mode, in the order printed, and the host's tracing during its slices: off for
# the context rows; every trace recorded for the tracing rows, with no SERVER span under a
# CLIENT one for the client-spans-only row.
HOST_TRACING = {
    "context off": "off",
    "context on": "off",
    "tracing on": "all",
    "tracing, 1 in 10 sampled": "all",
    "tracing on, client spans only": "roots",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    seq_calls, seq_secs = (2_000, 2.0) if args.quick else (10_000, 5.0)
    par_secs = 1.0 if args.quick else 3.0

    systems = [
        "bare rpyc threaded",
        "host threaded",
        "host threaded+metrics",
        "host threadpool",
        "host forking",
    ]
    seq: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    par: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    with ExitStack() as stack:
        ports = {"bare rpyc threaded": stack.enter_context(python_server(BARE))[0]}
        for kind in ("threaded", "threadpool", "forking"):
            config = HOST_CONFIG.format(type=kind, extra="")
            ports[f"host {kind}"] = stack.enter_context(host_server(config, "add"))
        config = HOST_CONFIG.format(type="threaded", extra=METRICS_ON)
        ports["host threaded+metrics"] = stack.enter_context(host_server(config, "add"))
        switched_port = stack.enter_context(python_server(SWITCHED))[0]
        context_ports = dict.fromkeys(HOST_TRACING, switched_port)
        control = stack.enter_context(rpyc.connect("127.0.0.1", switched_port))

        def switch(mode: str) -> None:
            control.root.switch_tracing(HOST_TRACING[mode])

        ctx: dict[str, list[dict[str, float]]] = {m: [] for m in context_ports}
        for round_ in range(rounds):
            # Rotate the order each round: whoever goes first or follows a heavy run is not
            # always the same system (identical servers differed by 10% in a fixed order).
            order = systems[round_ % len(systems) :] + systems[: round_ % len(systems)]
            for name in order:
                seq[name].append(sequential_calls(ports[name], seq_calls, seq_secs))
            for name in order:
                par[name].append(parallel_calls(ports[name], args.clients, par_secs))
            # Every context mode in slices over connections open together, the order rotating
            # each slice: the machine's slow and fast spells fall on every mode alike.
            for mode, slices in interleaved_context_calls(context_ports, 6, seq_secs / 5, switch).items():
                ctx[mode].extend(slices)

    s = {k: median_of(v) for k, v in seq.items()}
    p = {k: median_of(v) for k, v in par.items()}
    bare_s, bare_p = s["bare rpyc threaded"], p["bare rpyc threaded"]
    rows = [
        [
            "system",
            "seq p50 us",
            "seq p99 us",
            "seq calls/s",
            "x bare",
            f"{args.clients}-client calls/s",
            "x bare",
            f"{args.clients}-client p99 us",
        ]
    ]
    for name in systems:
        rows.append(
            [
                name,
                fmt(s[name]["p50_us"]),
                fmt(s[name]["p99_us"]),
                fmt(s[name]["calls_per_s"]),
                f"{s[name]['calls_per_s'] / bare_s['calls_per_s']:.2f}",
                fmt(p[name]["calls_per_s"]),
                f"{p[name]['calls_per_s'] / bare_p['calls_per_s']:.2f}",
                fmt(p[name]["p99_us"]),
            ]
        )
    print(table(rows))
    c = {k: median_of(v) for k, v in ctx.items()}
    off = c["context off"]["calls_per_s"]
    ctx_rows = [["client.connect, host threaded", "seq p50 us", "seq p99 us", "seq calls/s", "x context off"]]
    for mode in ctx:
        ctx_rows.append(
            [
                mode,
                fmt(c[mode]["p50_us"]),
                fmt(c[mode]["p99_us"]),
                fmt(c[mode]["calls_per_s"]),
                f"{c[mode]['calls_per_s'] / off:.3f}",
            ]
        )
    print()
    print(table(ctx_rows))
    context_ratio = c["context on"]["calls_per_s"] / off
    tracing_ratio = c["tracing on"]["calls_per_s"] / off
    sampled_ratio = c["tracing, 1 in 10 sampled"]["calls_per_s"] / off
    threaded_ratio = s["host threaded"]["calls_per_s"] / bare_s["calls_per_s"]
    pool_ratio = s["host threadpool"]["p50_us"] / s["host threaded"]["p50_us"]
    metrics_ratio = s["host threaded+metrics"]["calls_per_s"] / s["host threaded"]["calls_per_s"]
    checks = [
        (
            f"host threaded sequential calls/s = {threaded_ratio:.2f}x bare (target >= 0.95)",
            threaded_ratio >= 0.95,
        ),
        (f"host threadpool p50 = {pool_ratio:.2f}x host threaded p50 (target <= 1.5)", pool_ratio <= 1.5),
        (
            f"metrics on: {metrics_ratio:.3f}x the calls/s with metrics off (target >= 0.95: <= 5% overhead)",
            metrics_ratio >= 0.95,
        ),
        (f"call context on: {context_ratio:.3f}x context off (target >= 0.97)", context_ratio >= 0.97),
        (f"tracing on: {tracing_ratio:.3f}x context off (target >= 0.90)", tracing_ratio >= 0.90),
        (
            f"tracing, 1 in 10 sampled: {sampled_ratio:.3f}x context off (target >= 0.90)",
            sampled_ratio >= 0.90,
        ),
    ]
    print()
    print_checks(checks)
    path = save(
        "host",
        {
            "machine": machine(),
            "rounds": rounds,
            "sequential": s,
            "parallel": p,
            "context": c,
            "checks": [{"check": t, "ok": ok} for t, ok in checks],
        },
    )
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU time per call of the call context and tracing, client and server, beside the context off.

    python benchmarks/bench_context_cpu.py              # full run (~1 minute)
    python benchmarks/bench_context_cpu.py --quick      # a few seconds, for CI smoke

``bench_host.py``'s context rows count calls per second, which on a loaded machine moves with
whatever else runs (p99 and so calls/s swing by tens of percent between identical servers).
CPU time per call does not wait on the scheduler: this measures it from ``/proc/<pid>/stat`` for
the server process and ``time.process_time()`` for the client, for the same ``client.connect``
modes, in short bursts that alternate between modes so a noisy moment hits every mode alike.
Each figure is the CPU microseconds one call costs, and the extra over the context off.
``context sent, no trace`` runs the calls in a ``context.deadline()`` block, so each carries
its context (as every traced call must) with no span at either end: the floor under the
tracing rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rpyc

from benchmarks.bench_host import SWITCHED
from benchmarks.harness import python_server, table

MODES = (
    "context off",
    "context on",
    "context sent, no trace",
    "tracing, 1 in 10 sampled",
    "tracing on",
    "tracing on, client spans only",
)
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def providers() -> dict[str, tuple[Any, Any]]:
    """A tracer provider (and its in-memory exporter) per sampling ratio the modes use."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    made = {}
    for name, ratio in (("sampled", 0.1), ("all", 1.0)):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        made[name] = (provider, exporter)
    return made


def main(argv: list[str] | None = None) -> int:
    import client
    from rpyc_host.wire import context, tracing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    args = parser.parse_args(argv)
    rounds, burst = (2, 500) if args.quick else (10, 3000)
    made = providers()
    client_cpu = dict.fromkeys(MODES, 0.0)
    server_cpu = dict.fromkeys(MODES, 0.0)
    with ExitStack() as stack:
        # One host process serves every mode, its own tracing switched to the mode's before
        # each burst (identical host processes differ here by more than these costs).
        port, pid = stack.enter_context(python_server(SWITCHED))
        control = stack.enter_context(rpyc.connect("127.0.0.1", port))
        conns = {mode: stack.enter_context(client.connect(host="127.0.0.1", port=port)) for mode in MODES}
        conns["context off"].peer_speaks_context = False
        setup = {  # mode -> (the host's tracing, this process's provider name or None)
            "context off": ("off", None),
            "context on": ("off", None),
            "context sent, no trace": ("off", None),
            "tracing, 1 in 10 sampled": ("all", "sampled"),
            "tracing on": ("all", "all"),
            "tracing on, client spans only": ("roots", "all"),  # RPYC_HOST_SERVER_SPANS=roots
        }
        for round_ in range(rounds):
            turn = round_ % len(MODES)
            for mode in MODES[turn:] + MODES[:turn]:
                host_tracing, provider = setup[mode]
                control.root.switch_tracing(host_tracing)
                add = conns[mode].root.add
                if provider is not None:
                    tracing.configure(made[provider][0])
                try:
                    with ExitStack() as block:
                        if mode == "context sent, no trace":
                            # Shorter than the connection timeout, with a request id: the
                            # context goes as it is, with no copy made per call.
                            block.enter_context(context.deadline(20.0, request_id="bench"))
                        for _ in range(100):  # warm-up, outside the measurement
                            add(1, 2)
                        mine, theirs = time.process_time(), process_cpu(pid)
                        for _ in range(burst):
                            add(1, 2)
                        client_cpu[mode] += time.process_time() - mine
                        server_cpu[mode] += process_cpu(pid) - theirs
                finally:
                    tracing.disable()
                    for _, exporter in made.values():
                        exporter.clear()
    calls = rounds * burst
    per = {m: (client_cpu[m] / calls * 1e6, server_cpu[m] / calls * 1e6) for m in MODES}
    off = sum(per["context off"])
    rows = [["mode", "client CPU us/call", "server CPU us/call", "total", "extra over off", "x off"]]
    for mode in MODES:
        mine, theirs = per[mode]
        rows.append(
            [
                mode,
                f"{mine:.1f}",
                f"{theirs:.1f}",
                f"{mine + theirs:.1f}",
                f"{mine + theirs - off:+.1f}",
                f"{(mine + theirs) / off:.3f}",
            ]
        )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

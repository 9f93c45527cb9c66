"""CPU microseconds per span: the OpenTelemetry SDK's ``start_span`` + ``end`` beside a lean span.

    python benchmarks/bench_spans.py              # full run (a few seconds)
    python benchmarks/bench_spans.py --quick      # smoke

No sockets: each row is one span made and ended in this process, the way a call's span is
(a SERVER span child of a sampled remote traceparent, whose own traceparent is handed on and
which is OpenTelemetry's current span while the call runs; a CLIENT span starting a trace),
exported through a ``BatchSpanProcessor`` to memory, the processor a deployment uses. Rows
alternate in rounds and the median round is reported; the ratio is within the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import table

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"


def server_span(tracing: Any) -> None:
    span = tracing.start_server_span("demo", "add", PARENT, None)
    tracing.headers_of(span)
    token = tracing.attach(span)
    tracing.detach(token)
    tracing.end_span(span, None)


def client_span(tracing: Any) -> None:
    span, _, _ = tracing.start_call("demo", "add", None, None)
    tracing.end_span(span, None)


def per_span(tracing: Any, work: Any, count: int, clear: Any) -> float:
    """CPU microseconds one ``work(tracing)`` costs, over ``count`` spans."""
    for _ in range(200):
        work(tracing)
    clear()
    start = time.process_time()
    for i in range(count):
        work(tracing)
        if i % 1000 == 999:
            clear()  # keeps memory flat; the spans were made and exported all the same
    return (time.process_time() - start) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from rpyc_host.wire import tracing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    args = parser.parse_args(argv)
    rounds, count = (1, 2000) if args.quick else (5, 20000)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    # A queue that holds a burst: a loop making spans outruns the export thread.
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=count + 1000))
    results: dict[tuple[str, bool], list[float]] = {}
    try:
        for _ in range(rounds):
            for lean in (False, True):
                tracing.disable()
                tracing.configure(provider, lean=lean)
                assert tracing.lean() is lean
                for name, work in (("SERVER span", server_span), ("CLIENT span, new trace", client_span)):
                    results.setdefault((name, lean), []).append(
                        per_span(tracing, work, count, exporter.clear)
                    )
    finally:
        tracing.disable()
        provider.shutdown()
    rows = [["span", "SDK us/span", "lean us/span", "lean x SDK"]]
    for name in ("SERVER span", "CLIENT span, new trace"):
        sdk = statistics.median(results[(name, False)])
        lean_us = statistics.median(results[(name, True)])
        rows.append([name, f"{sdk:.1f}", f"{lean_us:.1f}", f"{lean_us / sdk:.2f}"])
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

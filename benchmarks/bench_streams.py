"""Iterating a remote generator: streamed in chunks against rpyc's netref, item by item.

    python benchmarks/bench_streams.py              # 100,000 items per way (~1 minute)
    python benchmarks/bench_streams.py --quick      # 10,000 items, for CI smoke

Each server runs in its own process on 127.0.0.1 and serves ``CountService.count(n)``, a
generator of small ints: a bare rpyc ``ThreadedServer``, and the host (threaded). Each client
runs in a fresh process (so its peak RSS is its own) and reads until it has every item or its
time is up (the item-by-item ways are slow). Ways: plain ``rpyc.connect`` iterating the netref
of the bare server (one round trip per item), the same client against the host (the stream's
``__next__``, still one per item), and ``client.connect`` reading the host's stream in chunks
(1024 items, one chunk read ahead; and 64). Target (ratio from this run): streamed >= 20x the
items/s of rpyc's netref iteration. Peak RSS: the client's ``ru_maxrss``, the server's
``VmHWM`` after every way has run against it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import fmt, host_server, machine, print_checks, python_server, save, table

BARE = """
from rpyc.utils.server import ThreadedServer
from benchmarks.bench_service import CountService
server = ThreadedServer(CountService, hostname="127.0.0.1", port=0)
server._listen()
print("READY", server.port, flush=True)
server.start()
"""
HOST_CONFIG = """
server: {type: threaded}
services:
  count: {class: benchmarks.bench_service:CountService, port: 0}
"""
WAYS = {
    "rpyc netref, bare ThreadedServer": ("bare", "netref", 0),
    "rpyc netref, host threaded": ("host", "netref", 0),
    "client.connect stream, chunk 1024": ("host", "stream", 1024),
    "client.connect stream, chunk 64": ("host", "stream", 64),
}


def _read(port: int, how: str, chunk: int, items: int, seconds: float, out: Any) -> None:
    """Read up to ``items`` items within ``seconds``; send (items read, seconds, peak RSS KiB)."""
    import rpyc

    import client

    if how == "netref":
        conn = rpyc.connect("127.0.0.1", port)
        source = conn.root.count(items)
    else:
        conn = client.connect(host="127.0.0.1", port=port, stream_chunk=chunk)
        source = conn.root.count(items)
    got = 0
    start = time.perf_counter()
    deadline = start + seconds
    for got, _ in enumerate(source, 1):
        if got % 256 == 0 and time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    del source
    conn.close()
    out.send((got, elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run_way(port: int, how: str, chunk: int, items: int, seconds: float) -> tuple[int, float, int]:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_read, args=(port, how, chunk, items, seconds, send))
    proc.start()
    try:
        if not receive.poll(seconds + 60):
            raise RuntimeError(f"the {how} client did not finish within {seconds + 60:.0f} s")
        result: tuple[int, float, int] = receive.recv()
        return result
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--items", type=int, default=100_000)
    args = parser.parse_args(argv)
    items = 10_000 if args.quick else args.items
    seconds = 5.0 if args.quick else 30.0  # per way; the item-by-item ways may stop early
    import rpyc

    results: dict[str, dict[str, float]] = {}
    server_peak: dict[str, int] = {}
    with ExitStack() as stack:
        ports = {
            "bare": stack.enter_context(python_server(BARE))[0],
            "host": stack.enter_context(host_server(HOST_CONFIG, "count")),
        }
        for name, (server, how, chunk) in WAYS.items():
            got, elapsed, rss = run_way(ports[server], how, chunk, items, seconds)
            results[name] = {
                "items": got,
                "seconds": elapsed,
                "items_per_s": got / elapsed,
                "client_rss_kib": rss,
            }
        for server, port in ports.items():
            with rpyc.connect("127.0.0.1", port) as conn:
                server_peak[server] = int(conn.root.peak_rss_kib())

    base = results["rpyc netref, bare ThreadedServer"]["items_per_s"]
    rows = [["way", "items", "seconds", "items/s", "x netref", "client peak RSS MiB", "server"]]
    for name, (server, _, _) in WAYS.items():
        r = results[name]
        rows.append(
            [
                name,
                fmt(r["items"]),
                f"{r['seconds']:.2f}",
                fmt(r["items_per_s"]),
                f"{r['items_per_s'] / base:.1f}",
                f"{r['client_rss_kib'] / 1024:.1f}",
                server,
            ]
        )
    print(table(rows))
    print(
        "\nserver peak RSS: "
        + ", ".join(f"{server} {kib / 1024:.1f} MiB" for server, kib in server_peak.items())
    )
    ratio = results["client.connect stream, chunk 1024"]["items_per_s"] / base
    complete = results["client.connect stream, chunk 1024"]["items"] == items
    checks = [
        (f"streamed (chunk 1024) = {ratio:.1f}x rpyc netref items/s (target >= 20)", ratio >= 20),
        (f"the stream delivered all {fmt(items)} items", complete),
    ]
    print()
    print_checks(checks)
    path = save(
        "streams",
        {
            "machine": machine(),
            "items": items,
            "ways": results,
            "server_peak_rss_kib": server_peak,
            "checks": [{"check": t, "ok": ok} for t, ok in checks],
        },
    )
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

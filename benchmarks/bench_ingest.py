"""Ingest throughput, end to end, beside a direct SQLite insert of the same records.

    .venv/bin/python benchmarks/bench_ingest.py            # 200,000 records per run
    .venv/bin/python benchmarks/bench_ingest.py --quick    # 50,000: a smoke run

What is measured, in one run (ratios are comparable, absolute figures are not: the machine has
2 cores and is shared):

- end to end: ``Collector`` processes (1 per round, then 4 at once) encode records of ~200 bytes into
  batches of 1,000, submit them over loopback to ``python server.py`` (its own process, threaded
  server) where each record is decoded, run through a processor (:func:`enrich`) and committed
  to SQLite (WAL, synchronous=FULL) before the receipt comes back;
- the ceiling: one process serializing each record (with the collector's JSON encoder) and doing
  ``executemany`` + ``COMMIT`` per 1,000 records into a fresh SQLite file with the same tables,
  WAL and synchronous level (no RPC, no validation, no processor); also the insert alone (rows
  serialized beforehand), for reference. The ceiling and the single-collector run alternate for
  ``--rounds`` rounds and the medians are reported: the machine is shared.

Prints records/s, the ratio to the ceiling and the p99 batch latency (from sending a batch to
the collector reading its receipt). Targets: >= 100,000 records/s from one collector and
>= 0.5 of the ceiling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.ingest import _ENCODE as fast_dumps  # noqa: E402
from client.ingest import Collector, Receipt  # noqa: E402
from rpyc_host.testing import ServerProcess  # noqa: E402
from services.ingest.storage.sqlite import SCHEMA  # noqa: E402

BATCH = 1000
CONFIG = """
server: {{type: threaded, host: 127.0.0.1}}
services:
  ingest:
    class: services.ingest:IngestService
    port: 0
    options:
      database: "sqlite:///{db}"
      processor: "benchmarks.bench_ingest:enrich"
      schema: {{seq: int, host: str, level: str}}
logging: {{level: INFO}}
"""


def enrich(record: dict[str, Any]) -> dict[str, Any] | None:
    """The benchmark's processor: normalise one field, drop nothing."""
    record["level"] = record["level"].upper()
    return record


def make_records(n: int, worker: int = 0) -> list[dict[str, Any]]:
    """``n`` records of ~200 bytes as JSON, numbered."""
    return [
        {
            "seq": worker * 10_000_000 + i,
            "host": f"web-{worker:02d}",
            "ts": 1_700_000_000.0 + i / 1000,
            "level": "info",
            "msg": f"GET /api/v1/items/{i % 977} 200 {i % 13}ms " + "x" * 90,
            "bytes": i % 65536,
        }
        for i in range(n)
    ]


def _collect(address: tuple[str, int], worker: int, n: int, max_seconds: float, start: Any, out: Any) -> None:
    """One collector process: wait for the start signal, send ``n`` records, report timings."""
    records = make_records(n, worker)
    latencies: list[float] = []

    def on_receipt(receipt: Receipt, latency: float) -> None:
        latencies.append(latency)

    start.wait(60)
    began = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    sent = 0
    with Collector(
        None, host=address[0], port=address[1], topic=f"bench-{worker}", on_receipt=on_receipt
    ) as col:
        for i, record in enumerate(records):
            col.add(record)
            if i % BATCH == 0 and time.monotonic() > deadline:
                break
            sent = i + 1
    ended = time.perf_counter()
    out.put((worker, col.stats.accepted, sent, began, ended, latencies))


def end_to_end(address: tuple[str, int], collectors: int, n: int, max_seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_collect, args=(address, w, n, max_seconds, start, out)) for w in range(collectors)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.5 * collectors)  # let the children import and build their records
    start.set()
    results = [out.get(timeout=max_seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
            raise RuntimeError(f"collector process {p.pid} did not exit")
    accepted = sum(r[1] for r in results)
    wall = max(r[4] for r in results) - min(r[3] for r in results)
    latencies = sorted(lat for r in results for lat in r[5])
    return {
        "records": accepted,
        "records_per_s": accepted / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def ceiling(path: Path, records: list[dict[str, Any]], serialize: bool) -> float:
    """records/s of a direct executemany into a fresh file with the service's tables."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    # The same fast encoder the collector uses, so the ceiling is not flattered by a slower one.
    dumps = fast_dumps
    rows = None if serialize else [dumps(r) for r in records]
    began = time.perf_counter()
    for k in range(0, len(records), BATCH):
        chunk = [dumps(r) for r in records[k : k + BATCH]] if rows is None else rows[k : k + BATCH]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO records (data) VALUES (?)", [(d,) for d in chunk])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    os.sync()  # write back now, not during the next measurement
    return len(records) / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--records", type=int, default=200_000, help="records per collector (default: 200000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="ceiling/end-to-end pairs to run (default: 3)")
    parser.add_argument("--quick", action="store_true", help="50,000 records per collector, 2 rounds")
    parser.add_argument(
        "--collectors", type=int, default=4, help="concurrent collectors in phase 2 (default: 4)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="time limit per collector (default: 60)"
    )
    args = parser.parse_args(argv)
    n, rounds = (50_000, 2) if args.quick else (args.records, args.rounds)
    records = make_records(n)
    size = len(json.dumps(records[0]))
    rows: list[tuple[str, float, float, dict[str, float] | None]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmpdir = Path(tmp)
        config = tmpdir / "config.yaml"
        config.write_text(CONFIG.format(db=tmpdir / "ingest.db"))
        with ServerProcess(config, cwd=ROOT) as server:
            address = server.address("ingest")
            # Ceiling and end to end alternate, so a neighbour's load hits both alike; each ratio
            # compares figures taken seconds apart.
            for r in range(rounds):
                direct = ceiling(tmpdir / f"direct-{r}.db", records, serialize=True)
                insert_only = ceiling(tmpdir / f"insert-{r}.db", records, serialize=False)
                rows.append((f"round {r + 1}: ceiling (dumps + executemany)", direct, direct, None))
                rows.append((f"round {r + 1}: insert only (pre-serialized)", insert_only, direct, None))
                one = end_to_end(address, 1, n, args.max_seconds)
                rows.append((f"round {r + 1}: end to end, 1 collector", one["records_per_s"], direct, one))
            direct = ceiling(tmpdir / "direct-many.db", records, serialize=True)
            many = end_to_end(address, args.collectors, n, args.max_seconds)
            rows.append(("ceiling (dumps + executemany)", direct, direct, None))
            rows.append((f"end to end, {args.collectors} collectors", many["records_per_s"], direct, many))
    print(f"{n:,} records of {size} bytes per collector, batches of {BATCH}, WAL + synchronous=FULL")
    print(f"{'path':<46} {'records/s':>10} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for label, rate, ref, lat in rows:
        extra = f" {lat['p50_ms']:>7.1f} {lat['p99_ms']:>7.1f}" if lat else ""
        print(f"{label:<46} {rate:>10,.0f} {rate / ref:>6.2f}{extra}")
    singles = [(rate, rate / ref, lat) for label, rate, ref, lat in rows if "1 collector" in label]
    rate = statistics.median(s[0] for s in singles)
    ratio = statistics.median(s[1] for s in singles)
    p99 = statistics.median(s[2]["p99_ms"] for s in singles if s[2])
    print(
        f"1 collector, median of {len(singles)}: {rate:,.0f} records/s, "
        f"{ratio:.2f} of the ceiling, p99 {p99:.1f} ms"
    )
    ok = rate >= 100_000 and ratio >= 0.5
    print("targets (>= 100,000 records/s and >= 0.5 of the ceiling): " + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest throughput, end to end, beside direct inserts of the same records into the same tables.

    .venv/bin/python benchmarks/bench_ingest.py                 # 200,000 records per collector
    .venv/bin/python benchmarks/bench_ingest.py --quick         # 50,000: a smoke run
    .venv/bin/python benchmarks/bench_ingest.py --postgres URL  # an existing server (admin URL)
    .venv/bin/python benchmarks/bench_ingest.py --no-postgres   # SQLite only

What is measured, in one run (ratios are comparable, absolute figures are not: the machine has
2 cores and is shared):

- end to end: ``Collector`` processes (1 per round, then 4 at once) encode records of ~200 bytes
  into batches of 1,000, keep ``--window`` batches in flight (each round also runs one
  collector with a single batch in flight, for the gain of the window) and submit them over
  loopback to ``python server.py`` (its own process, threaded server) where each record is
  decoded, checked against a schema, run through a processor (:func:`enrich`) and committed
  before the receipt comes back. Batches of several collectors that arrive together are
  committed in one transaction (group commit); the four collectors run once more against a
  server with ``group_max_batches: 1`` (a transaction per batch), for the gain of grouping in
  the same run;
- the SQLite ceiling: one process serializing each record (with the collector's JSON encoder)
  and doing ``executemany`` + ``COMMIT`` per 1,000 records into a fresh file with the same
  tables, WAL and synchronous=FULL (no RPC, no validation, no processor); also the insert alone
  (rows serialized beforehand), for reference;
- the PostgreSQL ceilings: the same records by ``COPY`` and by ``executemany`` + ``COMMIT`` per
  1,000 into the service's own ``ingest_records`` table in a fresh database; the end-to-end runs
  then store into another fresh database of the same server. Without ``--postgres`` a
  throwaway cluster is started on 127.0.0.1 (``initdb`` + ``pg_ctl``, as the tests do).

Ceilings and end-to-end runs alternate for ``--rounds`` rounds and medians are reported: the
machine is shared. Prints records/s, the ratio to the ceiling, the CPU time per record of the
writing process (the ceiling's; the ingest server's, from /proc) and of the collectors, which a
neighbour's load does not change, and the batch latency (from sending a batch to the collector
reading its receipt). Targets: one collector >= 0.6 of the ceiling,
four collectors together >= 1.0 of the (single-writer) ceiling.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import pwd
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_files import cpu_of  # noqa: E402
from client.ingest import _ENCODE as fast_dumps  # noqa: E402
from client.ingest import Collector, Receipt  # noqa: E402
from rpyc_host.testing import ServerProcess  # noqa: E402
from services.ingest.storage import open_store  # noqa: E402
from services.ingest.storage.sqlite import SCHEMA  # noqa: E402

BATCH = 1000
CONFIG = """
server: {{type: threaded, host: 127.0.0.1}}
services:
  ingest:
    class: services.ingest:IngestService
    port: 0
    options:
      database: "{db}"
      processor: "benchmarks.bench_ingest:enrich"
      schema: {{seq: int, host: str, level: str}}
      group_max_batches: {group}
logging: {{level: INFO}}
"""
UNGROUPED = " (group commit off)"
SINGLE = " (window 1)"


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


def _collect(
    address: tuple[str, int], worker: int, n: int, max_seconds: float, window: int, start: Any, out: Any
) -> None:
    """One collector process: wait for the start signal, send ``n`` records, report timings."""
    records = make_records(n, worker)
    latencies: list[float] = []

    def on_receipt(receipt: Receipt, latency: float) -> None:
        latencies.append(latency)

    start.wait(60)
    began, cpu = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + max_seconds
    sent = 0
    with Collector(
        None,
        host=address[0],
        port=address[1],
        topic=f"bench-{worker}",
        on_receipt=on_receipt,
        window=window,
    ) as col:
        for i, record in enumerate(records):
            col.add(record)
            if i % BATCH == 0 and time.monotonic() > deadline:
                break
            sent = i + 1
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    out.put((worker, col.stats.accepted, sent, began, ended, latencies, cpu))


def end_to_end(
    address: tuple[str, int], collectors: int, n: int, max_seconds: float, window: int, server_pid: int
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_collect, args=(address, w, n, max_seconds, window, start, out))
        for w in range(collectors)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.5 * collectors)  # let the children import and build their records
    server_cpu = cpu_of(server_pid)
    start.set()
    results = [out.get(timeout=max_seconds + 120) for _ in procs]
    server_cpu = cpu_of(server_pid) - server_cpu
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
        "cpu_us": server_cpu / accepted * 1e6,
        "collector_cpu_us": sum(r[6] for r in results) / accepted * 1e6,
    }


def ceiling(path: Path, records: list[dict[str, Any]], serialize: bool) -> tuple[float, float]:
    """(records/s, CPU µs per record) of a direct executemany into a fresh file with the
    service's tables."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    # The same fast encoder the collector uses, so the ceiling is not flattered by a slower one.
    dumps = fast_dumps
    rows = None if serialize else [dumps(r) for r in records]
    began, cpu = time.perf_counter(), time.process_time()
    for k in range(0, len(records), BATCH):
        chunk = [dumps(r) for r in records[k : k + BATCH]] if rows is None else rows[k : k + BATCH]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO records (data) VALUES (?)", [(d,) for d in chunk])
        conn.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    conn.close()
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    os.sync()  # write back now, not during the next measurement
    return len(records) / elapsed, cpu / len(records) * 1e6


def pg_ceiling(url: str, records: list[dict[str, Any]], copy: bool) -> tuple[float, float]:
    """(records/s, client CPU µs per record) of COPY (or executemany) + COMMIT per 1,000 into
    the service's own table."""
    import psycopg

    store = open_store(url)  # creates the service's tables
    store.close()
    dumps = fast_dumps
    with psycopg.connect(url) as conn:
        topic = conn.execute("INSERT INTO ingest_topics (name) VALUES ('direct') RETURNING id").fetchone()
        conn.commit()
        assert topic is not None
        topic_id = topic[0]
        began, cpu = time.perf_counter(), time.process_time()
        for k in range(0, len(records), BATCH):
            chunk = [dumps(r) for r in records[k : k + BATCH]]
            with conn.cursor() as cur:
                if copy:
                    with cur.copy("COPY ingest_records (topic_id, data) FROM STDIN") as out:
                        for row in chunk:
                            out.write_row((topic_id, row))
                else:
                    cur.executemany(
                        "INSERT INTO ingest_records (topic_id, data) VALUES (%s, %s)",
                        [(topic_id, row) for row in chunk],
                    )
            conn.commit()
        cpu = time.process_time() - cpu
        return len(records) / (time.perf_counter() - began), cpu / len(records) * 1e6


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise SystemExit(f"PostgreSQL's {name} is not installed: use --postgres URL or --no-postgres")
    return found


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A PostgreSQL cluster in a temp dir on 127.0.0.1 (trust auth); its admin URL. Stopped after."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    data = Path(tempfile.mkdtemp(prefix="bench-ingest-pg-"))
    user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(data, owner.pw_uid, owner.pw_gid)
        user = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*user, *args], capture_output=True, text=True, timeout=120)

    try:
        result = run(initdb, "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if result.returncode != 0:
            raise SystemExit(f"initdb failed: {result.stderr.strip()}")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
        result = run(pg_ctl, "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o", options, "start")
        if result.returncode != 0:
            raise SystemExit(f"pg_ctl start failed: {result.stderr.strip()}")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(pg_ctl, "-D", str(data / "db"), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def fresh_databases(admin_url: str) -> Iterator[Callable[[], str]]:
    """``new()`` creates an empty database on the server and returns its URL; all are dropped after."""
    import psycopg

    made: list[str] = []

    def new() -> str:
        name = f"bench_ingest_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{admin_url.rpartition('/')[0]}/{name}"

    try:
        yield new
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            for name in made:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


Row = tuple[str, float, float, "dict[str, float]"]
Measured = list[tuple[str, tuple[float, float]]]
"""(name, (records/s, CPU µs per record)) of each ceiling of a round; the first is the reference."""


def run_backend(
    label: str,
    database: str,
    ungrouped_database: str,
    tmpdir: Path,
    ceilings: Callable[[int], Measured],
    records: list[dict[str, Any]],
    args: argparse.Namespace,
    rounds: int,
) -> list[Row]:
    """Alternate ceilings and one collector for ``rounds``, then a ceiling and 4 collectors, then
    4 collectors again against a server with ``group_max_batches: 1`` (a transaction per batch,
    as without group commit) on ``ungrouped_database``.

    ``ceilings(r)`` measures and returns ``(name, (records/s, CPU µs/record))`` pairs; the
    first is the reference the end-to-end rates are divided by.
    """
    n = len(records)
    rows: list[Row] = []
    config = tmpdir / f"config-{label}.yaml"
    config.write_text(CONFIG.format(db=database, group=64))
    with ServerProcess(config, cwd=ROOT) as server:
        address, pid = server.address("ingest"), server.pid
        # Ceilings and end to end alternate, so a neighbour's load hits both alike; each ratio
        # compares figures taken seconds apart.
        for r in range(rounds):
            measured = ceilings(r)
            ref = measured[0][1][0]
            rows += [
                (f"{label} round {r + 1}: {name}", rate, ref, {"cpu_us": cpu})
                for name, (rate, cpu) in measured
            ]
            if args.window > 1:  # the same collector with one batch in flight, for the gain
                single = end_to_end(address, 1, n, args.max_seconds, 1, pid)
                name = f"{label} round {r + 1}: end to end, 1 collector{SINGLE}"
                rows.append((name, single["records_per_s"], ref, single))
            one = end_to_end(address, 1, n, args.max_seconds, args.window, pid)
            rows.append((f"{label} round {r + 1}: end to end, 1 collector", one["records_per_s"], ref, one))
        measured = ceilings(rounds)
        ref = measured[0][1][0]
        rows += [(f"{label}: {name}", rate, ref, {"cpu_us": cpu}) for name, (rate, cpu) in measured]
        many = end_to_end(address, args.collectors, n, args.max_seconds, args.window, pid)
        rows.append((f"{label}: end to end, {args.collectors} collectors", many["records_per_s"], ref, many))
    config.write_text(CONFIG.format(db=ungrouped_database, group=1))
    with ServerProcess(config, cwd=ROOT) as server:
        off = end_to_end(
            server.address("ingest"), args.collectors, n, args.max_seconds, args.window, server.pid
        )
        label_off = f"{label}: end to end, {args.collectors} collectors{UNGROUPED}"
        rows.append((label_off, off["records_per_s"], ref, off))
    return rows


def summary(label: str, rows: list[Row], collectors: int) -> list[str]:
    singles = [(rate / ref, lat) for name, rate, ref, lat in rows if name.endswith("1 collector")]
    many = [rate / ref for name, rate, ref, _ in rows if name.endswith(f"{collectors} collectors")]
    one = statistics.median(s[0] for s in singles)
    p99 = statistics.median(s[1]["p99_ms"] for s in singles)
    lines = [
        f"{label}: 1 collector, median of {len(singles)}: {one:.2f} of the ceiling, p99 {p99:.1f} ms "
        f"(target >= 0.6: {'met' if one >= 0.6 else 'NOT met'})",
        f"{label}: {collectors} collectors together: {many[0]:.2f} of the single-writer ceiling "
        f"(target >= 1.0: {'met' if many[0] >= 1.0 else 'NOT met'})",
    ]
    windowless = [rate / ref for name, rate, ref, _ in rows if name.endswith(SINGLE)]
    if windowless:
        lines.insert(
            1,
            f"{label}: 1 collector with one batch in flight, median of {len(windowless)}: "
            f"{statistics.median(windowless):.2f} of the ceiling",
        )
    off = [rate / ref for name, rate, ref, _ in rows if name.endswith(UNGROUPED)]
    if off:
        lines.append(
            f"{label}: {collectors} collectors with group commit: {many[0] / off[0]:.2f}x the rate "
            f"with a transaction per batch (group_max_batches=1)"
        )
    return lines


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
    parser.add_argument(
        "--window", type=int, default=4, help="batches each collector keeps in flight (default: 4)"
    )
    parser.add_argument("--postgres", metavar="URL", help="admin URL of a PostgreSQL server to use")
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    args = parser.parse_args(argv)
    n, rounds = (50_000, 2) if args.quick else (args.records, args.rounds)
    records = make_records(n)
    size = len(json.dumps(records[0]))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmpdir = Path(tmp)

        def sqlite_ceilings(r: int) -> Measured:
            return [
                ("ceiling (dumps + executemany)", ceiling(tmpdir / f"direct-{r}.db", records, True)),
                ("insert only (pre-serialized)", ceiling(tmpdir / f"insert-{r}.db", records, False)),
            ]

        db, off = f"sqlite:///{tmpdir / 'ingest.db'}", f"sqlite:///{tmpdir / 'ungrouped.db'}"
        rows += run_backend("sqlite", db, off, tmpdir, sqlite_ceilings, records, args, rounds)
        if not args.no_postgres:
            with (
                nullcontext(args.postgres) if args.postgres else throwaway_postgres() as admin,
                fresh_databases(admin) as new_database,
            ):

                def pg_ceilings(r: int) -> Measured:
                    return [
                        ("ceiling (dumps + COPY)", pg_ceiling(new_database(), records, copy=True)),
                        ("dumps + executemany", pg_ceiling(new_database(), records, copy=False)),
                    ]

                rows += run_backend(
                    "postgres", new_database(), new_database(), tmpdir, pg_ceilings, records, args, rounds
                )
    load = os.getloadavg()
    print(
        f"{n:,} records of {size} bytes per collector, batches of {BATCH}, {args.window} in flight; "
        "SQLite WAL + synchronous=FULL"
    )
    print(f"load average before printing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    print(
        "cpu: CPU µs per record of the writing process (the ceiling's, or the ingest server's; "
        "PostgreSQL's own not counted); coll: the collectors' together"
    )
    print(f"{'path':<56} {'records/s':>10} {'ratio':>6} {'cpu':>6} {'coll':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for label, rate, ref, lat in rows:
        extra = ""
        if "p50_ms" in lat:
            extra = f" {lat['collector_cpu_us']:>6.2f} {lat['p50_ms']:>7.1f} {lat['p99_ms']:>7.1f}"
        print(f"{label:<56} {rate:>10,.0f} {rate / ref:>6.2f} {lat['cpu_us']:>6.2f}{extra}")
    for backend in ("sqlite", "postgres"):
        mine = [row for row in rows if row[0].startswith(backend)]
        if mine:
            print("\n".join(summary(backend, mine, args.collectors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

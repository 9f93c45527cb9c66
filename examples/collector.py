"""Collect something real on this machine and send it to the ingest service.

    python examples/collector.py                          # /proc load and memory, every 5 s, forever
    python examples/collector.py --interval 1 --count 10  # ten samples, one a second
    python examples/collector.py --follow /var/log/app.log --topic app-log   # lines appended to a log

Samples go through :class:`client.ingest.Collector`: batched, retried with the same batch id,
spooled to ``var/collector-<topic>.spool`` while the service is down and replayed when it is back.
Stop with Ctrl-C: what was collected is flushed (or left in the spool) before exiting.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.errors import ClientError, ConfigError
from client.ingest import Collector

log = logging.getLogger("collector")


def proc_sample(host: str, seq: int) -> dict[str, Any]:
    """Load averages and memory figures from /proc, as one record."""
    load1, load5, load15, running, _ = Path("/proc/loadavg").read_text().split()
    mem: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
            mem[key] = int(rest.split()[0]) * 1024
    return {
        "seq": seq,
        "host": host,
        "ts": time.time(),
        "load1": float(load1),
        "load5": float(load5),
        "load15": float(load15),
        "runnable": int(running.split("/")[0]),
        "mem_total": mem.get("MemTotal", 0),
        "mem_available": mem.get("MemAvailable", 0),
        "swap_used": mem.get("SwapTotal", 0) - mem.get("SwapFree", 0),
    }


def follow(path: Path, interval: float, stop: threading.Event) -> Iterator[str | None]:
    """Lines appended to ``path`` from now on; None when there is nothing new (once per poll)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(0, os.SEEK_END)
        log.info("following %s from byte %d", path, f.tell())
        pending = ""
        while not stop.is_set():
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending.rstrip("\n")
                    pending = ""
                continue
            if f.tell() > path.stat().st_size:  # truncated (rotated in place): start over
                f.seek(0)
            yield None
            stop.wait(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--service", default="ingest", help="service name in the config (default: ingest)")
    parser.add_argument("--config", help="config file (default: $RPYC_HOST_CONFIG or config.yaml)")
    parser.add_argument("--host", help="connect here instead of the configured host")
    parser.add_argument("--port", type=int, help="connect here instead of the configured port")
    parser.add_argument("--topic", help="topic (default: proc-samples, or log-lines with --follow)")
    parser.add_argument("--follow", type=Path, metavar="FILE", help="send lines appended to FILE instead")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default: 5)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many records (default: never)")
    parser.add_argument("--batch", type=int, default=100, help="records per batch (default: 100)")
    parser.add_argument(
        "--window", type=int, default=1, help="batches in flight at once, for fast --follow (default: 1)"
    )
    parser.add_argument("--flush-every", type=float, default=10.0, help="send a partial batch after (s)")
    parser.add_argument("--spool", type=Path, help="spool file (default: var/collector-<topic>.spool)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    topic = args.topic or ("log-lines" if args.follow else "proc-samples")
    if args.follow is not None and not args.follow.is_file():
        print(f"Error: --follow {str(args.follow)!r} is not a file", file=sys.stderr)
        return 2
    # An Event, not a flag: the wait between samples ends as soon as SIGTERM or Ctrl-C arrives.
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    hostname = socket.gethostname()
    try:
        collector = Collector(
            args.service if args.host is None else None,
            topic=topic,
            host=args.host,
            port=args.port,
            config=args.config,
            batch_records=args.batch,
            window=args.window,
            spool=args.spool or Path("var") / f"collector-{topic}.spool",
        )
    except (ValueError, ClientError) as exc:  # a bad option or config: one line, not a traceback
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    sent, last_flush = 0, time.monotonic()
    lines = follow(args.follow, min(args.interval, 0.5), stop) if args.follow else None
    try:
        try:
            while not stop.is_set() and (args.count == 0 or sent < args.count):
                if lines is None:
                    collector.add(proc_sample(hostname, sent))
                    sent += 1
                else:
                    line = next(lines, None)
                    if line is not None:
                        collector.add({"seq": sent, "host": hostname, "ts": time.time(), "line": line})
                        sent += 1
                if time.monotonic() - last_flush >= args.flush_every:
                    collector.flush()
                    last_flush = time.monotonic()
                if lines is None and (args.count == 0 or sent < args.count):
                    stop.wait(args.interval)
        finally:
            collector.close()
    except ConfigError as exc:  # the service cannot be found from the config: say so and stop
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    s = collector.stats
    log.info(
        "collected %d record(s): %d stored, %d rejected, %d batch(es) spooled, %d replayed",
        sent,
        s.accepted,
        s.rejected,
        s.spooled,
        s.replayed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

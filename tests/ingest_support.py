"""What the ingest tests share: a host config on SQLite, JSON-lines payloads, and writer
threads that submit batches (some ids sent by every writer) and hand back every receipt."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rpyc


def config(db: Path, server_type: str = "threaded", **options: Any) -> str:
    """One ingest service on SQLite at ``db``, on ``server_type``, with extra ``options``."""
    opts = json.dumps({"database": f"sqlite:///{db}", **options})
    return f"""
server: {{type: {server_type}, host: 127.0.0.1}}
services:
  ingest:
    class: services.ingest:IngestService
    port: 0
    options: {opts}
"""


def lines(*records: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _plain(w: int, b: int, i: int) -> dict[str, Any]:
    return {"w": w, "b": b, "i": i}


def named_record(w: int, b: int, i: int) -> dict[str, Any]:
    """A record with a name the ``SHOUT`` processor upper-cases (a backslash and a non-ASCII
    letter in it, so escaping is exercised on the way to the database)."""
    return {"w": w, "b": b, "i": i, "name": f"n\\{i}é"}


def submit_from_threads(
    addresses: Sequence[tuple[str, int]],
    writers: int,
    batches: int,
    size: int,
    shared: int = 0,
    record: Callable[[int, int, int], dict[str, Any]] = _plain,
) -> list[tuple[Any, ...]]:
    """``writers`` threads, writer ``w`` on ``addresses[w % len(addresses)]``, each submit
    ``batches`` batches of ``size`` records to topic ``load``. The first ``shared`` batch ids
    are sent by every writer (``shared-<b>``), the rest are the writer's own (``w<w>-b<b>``).
    Fails the test if a writer raised or did not finish; returns every receipt."""
    receipts: list[tuple[Any, ...]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def write(w: int) -> None:
        try:
            with rpyc.connect(*addresses[w % len(addresses)]) as conn:
                submit = conn.root.submit
                for b in range(batches):
                    batch_id = f"shared-{b}" if b < shared else f"w{w}-b{b}"
                    receipt = tuple(submit("load", lines(*(record(w, b, i) for i in range(size))), batch_id))
                    with lock:
                        receipts.append(receipt)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a writer thread did not finish in 90 s"
    assert errors == []
    assert len(receipts) == writers * batches
    return receipts


def first_stored_ids(writers: int, batches: int, shared: int) -> list[str]:
    """The batch ids ``submit_from_threads`` stores once each, sorted."""
    return sorted(
        [f"shared-{b}" for b in range(shared)]
        + [f"w{w}-b{b}" for w in range(writers) for b in range(shared, batches)]
    )

"""The collector's window: several batches in flight at once, each acknowledged only after its
commit, grouped by the service's writer, and stored exactly once when the server dies with the
window full; on real SQLite files, real rpyc connections and real server processes."""

from __future__ import annotations

import json
import signal
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.ingest import Collector
from rpyc_host.testing import ServerProcess, running_host, wait_until
from services.ingest import IngestService
from services.ingest.storage.group import GroupCommit
from tests.helpers import ingest_config


@pytest.fixture
def lock_holder() -> Iterator[list[sqlite3.Connection]]:
    """Connections holding SQLite's write lock (``BEGIN IMMEDIATE``); rolled back at the end."""
    held: list[sqlite3.Connection] = []
    yield held
    for conn in held:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def hold_write_lock(path: Path, held: list[sqlite3.Connection]) -> sqlite3.Connection:
    """Take the database's write lock, so the service's writer waits and batches queue."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    held.append(conn)
    return conn


def queued(group: GroupCommit) -> int:
    """Batches waiting behind the writer (-1: no write in progress)."""
    state = group._here()
    with state.cond:
        return len(state.queue) if state.writing else -1


def stored(db: Path) -> tuple[int, int, int]:
    """(rows, distinct seq values, sum of seq) in the records table."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT json_extract(data, '$.seq')), "
            "coalesce(sum(json_extract(data, '$.seq')), 0) FROM records"
        ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def test_window_must_be_a_small_positive_integer() -> None:
    for bad in (0, 17, 2.0, "2"):
        with pytest.raises(ValueError, match=r"window must be an integer from 1 to 16, got"):
            Collector(None, host="127.0.0.1", port=1, topic="t", window=bad)  # type: ignore[arg-type]


def test_a_window_keeps_batches_in_flight_and_each_is_acknowledged_after_one_grouped_commit(
    tmp_path: Path, lock_holder: list[sqlite3.Connection]
) -> None:
    db = tmp_path / "ingest.db"
    with running_host(ingest_config(db)) as host:
        service: IngestService = host.hosted[0].service
        group: GroupCommit = service.store._group  # type: ignore[attr-defined]
        address = host.address("ingest")
        blocker = hold_write_lock(db, lock_holder)
        with Collector(None, host=address[0], port=address[1], topic="w", batch_records=10, window=3) as c:
            for seq in range(30):  # three batches: none waits for a receipt
                c.add({"seq": seq})
            # The first batch's submit is the writer (waiting for the lock), the other two
            # are queued behind it: three batches in flight over three connections.
            wait_until(lambda: queued(group) == 2, 20, "two batches queued behind the writer")
            assert len(service_connections(host)) == 3
            assert c.stats.batches == 0 and stored(db)[0] == 0  # no receipt before the commit
            blocker.execute("COMMIT")
            c.flush()
            assert (c.stats.batches, c.stats.accepted, c.stats.duplicates) == (3, 30, 0)
        # The lone first batch, then the two that queued together in one transaction.
        assert (group.stats.groups, group.stats.batches, group.stats.largest) == (2, 3, 2)
    assert stored(db) == (30, 30, sum(range(30)))


def service_connections(host: object) -> list[object]:
    return list(host.hosted[0].server.connections)  # type: ignore[attr-defined]


def test_sigkill_with_the_window_full_then_resending_stores_each_batch_once(
    tmp_path: Path, servers: list[ServerProcess], lock_holder: list[sqlite3.Connection]
) -> None:
    db, cfg = tmp_path / "ingest.db", tmp_path / "config.yaml"
    cfg.write_text(ingest_config(db, metrics=True))
    servers.append(ServerProcess(cfg).start())
    host, port = servers[0].address("ingest")
    cfg.write_text(ingest_config(db, port, metrics=True))  # the restart binds the same port
    collector = Collector(
        None, host=host, port=port, topic="k", batch_records=10, window=4, timeout=10, backoff=0.05
    )
    try:
        for seq in range(20):  # two batches acknowledged before the kill
            collector.add({"seq": seq})
        collector.flush()
        assert collector.stats.accepted == 20
        blocker = hold_write_lock(db, lock_holder)
        for seq in range(20, 60):  # four batches in flight, none committed
            collector.add({"seq": seq})
        assert len(collector._inflight) == 4
        wait_until(lambda: calls_in_flight(servers[0]) == 4, 20, "four submits to reach the server")
        servers[0].stop(signal.SIGKILL)
        blocker.execute("ROLLBACK")
        servers.append(ServerProcess(cfg).start())
        assert stored(db)[0] == 20  # nothing of the window was committed
        collector.flush()  # every batch of the window fails, is resent under its id, stored
        assert (collector.stats.batches, collector.stats.accepted) == (6, 60)
        collector.add({"seq": 60})
        collector.flush()
    finally:
        collector.close()
    servers[-1].stop()
    assert stored(db) == (61, 61, sum(range(61)))
    with sqlite3.connect(db) as conn:
        batches, records = conn.execute("SELECT batches, records FROM totals").fetchone()
    assert (batches, records) == (7, 61)


def calls_in_flight(server: ServerProcess) -> float:
    """``rpyc_host_calls_in_flight`` of the ingest service, from the server's /metrics."""
    metrics_host, metrics_port = server.ready["metrics"]
    with urllib.request.urlopen(f"http://{metrics_host}:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith('rpyc_host_calls_in_flight{service="ingest"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_window_stream_stores_every_record_once(tmp_path: Path) -> None:
    db = tmp_path / "ingest.db"
    with running_host(ingest_config(db)) as host:
        address = host.address("ingest")
        with Collector(None, host=address[0], port=address[1], topic="s", batch_records=7, window=4) as c:
            for seq in range(1000):
                c.add({"seq": seq, "pad": "x" * (seq % 50)})
        assert c.stats.accepted == 1000
    with sqlite3.connect(db) as conn:
        data = [json.loads(d) for (d,) in conn.execute("SELECT data FROM records ORDER BY id")]
    assert sorted(r["seq"] for r in data) == list(range(1000))
    # Batches in flight together may commit in any order, but each batch is stored whole, in order.
    position = {r["seq"]: i for i, r in enumerate(data)}
    for first in range(0, 1000, 7):
        batch = [{"seq": s, "pad": "x" * (s % 50)} for s in range(first, min(first + 7, 1000))]
        at = position[first]
        assert data[at : at + len(batch)] == batch

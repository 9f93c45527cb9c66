"""Fault test: the server is SIGKILLed twice while a collector streams numbered records, and
restarted on the same port; every record must end up stored exactly once."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from client.ingest import Collector
from rpyc_host.testing import ServerProcess, wait_until
from tests.helpers import ingest_config


def drain(collector: Collector) -> None:
    """Flush until the spool is replayed, then close. A collector that failed to reach the
    service waits ``down_interval`` before trying again, so the stream can end inside that
    pause, when a single flush would leave the last batches in the spool (still safe, but not
    yet stored)."""
    spool = collector.spool
    assert spool is not None

    def flushed() -> bool:
        collector.flush()
        return not spool.exists()

    wait_until(flushed, 30, "the collector's spool to be replayed")
    collector.close()


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 4])
def test_sigkill_twice_mid_stream_stores_every_record_exactly_once(
    tmp_path: Path, servers: list[ServerProcess], window: int
) -> None:
    """With a window of 4 the kills land with several batches in flight: some committed but
    not acknowledged (answered "duplicate" when resent), some not yet committed."""
    db, cfg = tmp_path / "ingest.db", tmp_path / "config.yaml"
    cfg.write_text(ingest_config(db, 0))
    servers.append(ServerProcess(cfg).start())
    host, port = servers[0].address("ingest")
    cfg.write_text(ingest_config(db, port))  # restarts bind the port the first server got

    collector = Collector(
        None,
        host=host,
        port=port,
        topic="fault",
        batch_records=500,
        spool=tmp_path / "collector.spool",
        timeout=5,
        retries=3,
        backoff=0.02,
        down_interval=0.1,
        window=window,
    )
    restarted = threading.Event()
    failures: list[BaseException] = []
    kills: list[tuple[int, int]] = []  # (records acknowledged, batches spooled) at each kill

    def kill_and_restart() -> None:
        try:
            for _ in range(2):
                target = collector.stats.accepted + 15_000
                wait_until(lambda t=target: collector.stats.accepted >= t, 30, "records to be stored")  # type: ignore[misc]
                servers[-1].stop(signal.SIGKILL)
                spooled = collector.stats.spooled
                kills.append((collector.stats.accepted, spooled))
                wait_until(lambda s=spooled: collector.stats.spooled > s, 30, "the collector to spool")  # type: ignore[misc]
                servers.append(ServerProcess(cfg).start())
                assert servers[-1].address("ingest") == (host, port)
            restarted.set()
        except BaseException as exc:
            failures.append(exc)
            restarted.set()

    killer = threading.Thread(target=kill_and_restart, name="killer")
    killer.start()
    sent, after_restart, deadline = 0, 0, time.monotonic() + 60
    try:
        # Stream until both kills are done, then 10,000 more; bounded in count and time.
        while after_restart < 10_000 and sent < 2_000_000 and time.monotonic() < deadline:
            collector.add({"seq": sent, "pad": "p" * 40})
            sent += 1
            if restarted.is_set():
                after_restart += 1
        drain(collector)
    finally:
        killer.join(timeout=60)
    assert not killer.is_alive()
    assert failures == []
    assert len(kills) == 2 and after_restart == 10_000, (kills, sent)
    assert collector.stats.spooled >= 2 and collector.stats.replayed >= 2
    assert collector.stats.accepted == sent  # each record acknowledged once, duplicates or not
    assert not (tmp_path / "collector.spool").exists()

    servers[-1].stop()
    with sqlite3.connect(db) as conn:
        total, distinct, checksum = conn.execute(
            "SELECT count(*), count(DISTINCT json_extract(data, '$.seq')), sum(json_extract(data, '$.seq')) "
            "FROM records"
        ).fetchone()
        stats = conn.execute("SELECT records, duplicates FROM totals").fetchone()
        # The last record sent, stored whole (batches in flight together may commit in any order).
        sample = json.loads(
            conn.execute(
                "SELECT data FROM records WHERE json_extract(data, '$.seq') = ?", (sent - 1,)
            ).fetchone()[0]
        )
    assert (total, distinct, checksum) == (sent, sent, sent * (sent - 1) // 2)
    assert stats[0] == sent
    assert sample == {"seq": sent - 1, "pad": "p" * 40}


@pytest.mark.slow
def test_sigkill_twice_with_concurrent_collectors_stores_every_record_exactly_once(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """Three collectors at once, so kills land on groups of batches committed together."""
    db, cfg = tmp_path / "ingest.db", tmp_path / "config.yaml"
    cfg.write_text(ingest_config(db, 0))
    servers.append(ServerProcess(cfg).start())
    host, port = servers[0].address("ingest")
    cfg.write_text(ingest_config(db, port))
    collectors = [
        Collector(
            None,
            host=host,
            port=port,
            topic="fault",
            batch_records=300,
            spool=tmp_path / f"collector-{c}.spool",
            timeout=5,
            retries=3,
            backoff=0.02,
            down_interval=0.1,
        )
        for c in range(3)
    ]
    restarted = threading.Event()
    failures: list[BaseException] = []
    kills = 0

    def accepted() -> int:
        return sum(c.stats.accepted for c in collectors)

    def spooled() -> int:
        return sum(c.stats.spooled for c in collectors)

    def kill_and_restart() -> None:
        nonlocal kills
        try:
            for _ in range(2):
                target = accepted() + 15_000
                wait_until(lambda t=target: accepted() >= t, 60, "records to be stored")  # type: ignore[misc]
                servers[-1].stop(signal.SIGKILL)
                kills += 1
                before = spooled()
                wait_until(lambda s=before: spooled() > s, 30, "a collector to spool")  # type: ignore[misc]
                servers.append(ServerProcess(cfg).start())
                assert servers[-1].address("ingest") == (host, port)
        except BaseException as exc:
            failures.append(exc)
        finally:
            restarted.set()

    sent = [0] * len(collectors)

    def stream(c: int) -> None:
        collector, after_restart, deadline = collectors[c], 0, time.monotonic() + 90
        try:
            # Until both kills are done, then 3,000 more; bounded in count and time.
            while after_restart < 3_000 and sent[c] < 1_000_000 and time.monotonic() < deadline:
                collector.add({"c": c, "seq": sent[c]})
                sent[c] += 1
                if restarted.is_set():
                    after_restart += 1
            drain(collector)
        except BaseException as exc:
            failures.append(exc)

    killer = threading.Thread(target=kill_and_restart, name="killer")
    streams = [threading.Thread(target=stream, args=(c,), name=f"collector-{c}") for c in range(3)]
    killer.start()
    for t in streams:
        t.start()
    for t in [killer, *streams]:
        t.join(timeout=110)
    assert not any(t.is_alive() for t in [killer, *streams])
    assert failures == []
    assert kills == 2
    assert sum(c.stats.replayed for c in collectors) >= 2
    for c, collector in enumerate(collectors):
        assert collector.stats.accepted == sent[c]
        assert not (tmp_path / f"collector-{c}.spool").exists()

    servers[-1].stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT json_extract(data, '$.c'), count(*), count(DISTINCT json_extract(data, '$.seq')), "
            "sum(json_extract(data, '$.seq')) FROM records GROUP BY 1 ORDER BY 1"
        ).fetchall()
        total = conn.execute("SELECT records FROM totals").fetchone()[0]
    assert rows == [(c, n, n, n * (n - 1) // 2) for c, n in enumerate(sent)]
    assert total == sum(sent)

"""client.ingest.Collector, the ``python -m client ingest`` commands and examples/collector.py,
against real in-process hosts and real SQLite files."""

from __future__ import annotations

import collections
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import rpyc

from client.ingest import BatchRejected, Collector, DeliveryError, Receipt, encode_batch, submit
from rpyc_host.host import Host
from rpyc_host.testing import run_cli, running_host, wait_until
from tests.helpers import ROOT


def config(db: Path, port: int = 0, **options: Any) -> str:
    opts = json.dumps({"database": f"sqlite:///{db}", **options})
    return f"""
services:
  ingest:
    class: services.ingest:IngestService
    port: {port}
    options: {opts}
"""


@contextmanager
def ingest_host(db: Path, port: int = 0, **options: Any) -> Iterator[Host]:
    with running_host(config(db, port, **options)) as host:
        yield host


def count(address: tuple[str, int], topic: str | None = None) -> int:
    with rpyc.connect(*address) as conn:
        return int(conn.root.count(topic))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ingest.db"


@pytest.fixture
def free_port(db: Path) -> int:
    """A port an ingest host was bound to and has released (so a test can bring it back)."""
    with ingest_host(db) as host:
        return host.address("ingest")[1]


def test_collector_batches_with_distinct_ids(db: Path) -> None:
    receipts: list[Receipt] = []
    with ingest_host(db) as host:
        address = host.address("ingest")
        with Collector(
            None,
            host=address[0],
            port=address[1],
            topic="t",
            batch_records=10,
            on_receipt=lambda r, _: receipts.append(r),
        ) as col:
            for i in range(25):
                col.add({"seq": i})
        assert [r.accepted for r in receipts] == [10, 10, 5]
        assert len({r.batch_id for r in receipts}) == 3
        assert col.stats.accepted == 25 and col.stats.batches == 3
        assert count(address, "t") == 25


def test_collector_seals_on_batch_bytes(db: Path) -> None:
    receipts: list[Receipt] = []
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        record = {"seq": 0, "pad": "x" * 90}
        size = len(json.dumps(record)) + 1
        with Collector(
            None, host=h, port=p, topic="t", batch_bytes=5 * size, on_receipt=lambda r, _: receipts.append(r)
        ) as col:
            for i in range(12):
                col.add({**record, "seq": i})
    assert [r.accepted for r in receipts] == [5, 5, 2]


def test_non_ascii_and_dict_subclass_records_are_sent_escaped_and_counted_in_bytes(db: Path) -> None:
    """A batch's size is counted in the bytes sent: lines are ASCII (the encoder escapes
    everything else), so a record of accented text seals batches as its escaped length."""
    receipts: list[Receipt] = []
    sent = [{"seq": i, "name": "é☃ \U0001f600 \u2028" * 3} for i in range(6)]
    sent.append(collections.OrderedDict(seq=6, name="ü"))  # a dict subclass: encode_record's path
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        size = len(json.dumps(sent[0]).encode()) + 1
        assert size > len(json.dumps(sent[0], ensure_ascii=False)) + 1
        with Collector(
            None, host=h, port=p, topic="t", batch_bytes=3 * size, on_receipt=lambda r, _: receipts.append(r)
        ) as col:
            for record in sent:
                col.add(record)
        with rpyc.connect(h, p) as conn:
            stored = [json.loads(d) for _, d in conn.root.query("t")]
    assert [r.accepted for r in receipts] == [3, 3, 1]
    assert stored == [dict(r) for r in sent]


def test_records_that_are_not_json_compatible_fail_at_add(db: Path) -> None:
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        with Collector(None, host=h, port=p, topic="t") as col:
            with pytest.raises(TypeError, match="record is not JSON-compatible: Object of type set"):
                col.add({"s": {1, 2}})
            with pytest.raises(ValueError, match="record is not JSON-compatible: Out of range float"):
                col.add({"x": float("nan")})
            circular: dict[str, Any] = {}
            circular["self"] = circular
            with pytest.raises(
                ValueError, match="record is not JSON-compatible: nested too deeply or circular"
            ):
                col.add(circular)
            with pytest.raises(TypeError, match="a record must be a dict, got list"):
                col.add([1, 2])  # type: ignore[arg-type]
            col.add({"ok": 1})
        assert col.stats.accepted == 1


def test_rejected_records_are_reported_in_the_receipt(db: Path) -> None:
    with ingest_host(db, schema={"seq": "int"}) as host, rpyc.connect(*host.address("ingest")) as conn:
        receipt = submit(conn, "t", [{"seq": 1}, {"seq": "two"}], "r1")
    assert receipt == Receipt("r1", 1, 0, ((1, "field 'seq' must be int, got a string 'two'"),), False)


def test_collector_retries_the_same_batch_until_the_service_is_back(db: Path, free_port: int) -> None:
    col = Collector(
        None, host="127.0.0.1", port=free_port, topic="t", retries=20, backoff=0.02, max_backoff=0.1
    )

    def start_when_retrying() -> None:
        wait_until(lambda: col.stats.retries >= 2, 20, "the collector to retry")
        with ingest_host(db, port=free_port):
            wait_until(lambda: col.stats.accepted == 3, 20, "the batch to be stored")

    helper = threading.Thread(target=start_when_retrying)
    helper.start()
    try:
        for i in range(3):
            col.add({"seq": i})
        col.flush()  # blocks in the retry loop until the host is up
    finally:
        helper.join(timeout=30)
        col.close()
    assert not helper.is_alive()
    assert col.stats.retries >= 2 and col.stats.accepted == 3 and col.stats.spooled == 0


def test_spool_keeps_batches_while_down_and_replays_them_in_order(
    tmp_path: Path, db: Path, free_port: int
) -> None:
    spool = tmp_path / "collector.spool"
    down = Collector(
        None,
        host="127.0.0.1",
        port=free_port,
        topic="t",
        batch_records=10,
        spool=spool,
        retries=1,
        backoff=0.01,
    )
    for i in range(35):
        down.add({"seq": i})
    down.close()
    assert down.stats.spooled == 4 and down.stats.accepted == 0
    assert spool.stat().st_size > 35 * len('{"seq": 0}')
    # A later run (or the same collector once the service is back) replays the spool first.
    with ingest_host(db, port=free_port) as host:
        with Collector(
            None, host="127.0.0.1", port=free_port, topic="t", batch_records=10, spool=spool
        ) as col:
            col.add({"seq": 35})
        assert col.stats.replayed == 4 and col.stats.accepted == 36
        assert not spool.exists()
        with rpyc.connect(*host.address("ingest")) as conn:
            seqs = [json.loads(d)["seq"] for _, d in conn.root.query("t", 0, 100)]
    assert seqs == list(range(36))


def test_collector_spools_when_the_service_dies_and_recovers_when_it_returns(
    tmp_path: Path, db: Path, free_port: int
) -> None:
    spool = tmp_path / "c.spool"
    col = Collector(
        None,
        host="127.0.0.1",
        port=free_port,
        topic="t",
        batch_records=5,
        spool=spool,
        retries=1,
        backoff=0.01,
        down_interval=0.05,
    )
    with ingest_host(db, port=free_port):
        for i in range(10):
            col.add({"seq": i})
        col.flush()
        assert col.stats.accepted == 10
    for i in range(10, 20):  # the host is gone: these go to the spool
        col.add({"seq": i})
    col.flush()
    assert col.stats.spooled == 2
    with ingest_host(db, port=free_port) as host:
        wait_until(lambda: time.monotonic() > col._down_until, 5, "the down interval to pass")
        for i in range(20, 25):
            col.add({"seq": i})
        col.close()
        assert col.stats.replayed == 2 and col.stats.accepted == 25
        assert count(host.address("ingest"), "t") == 25


def test_without_a_spool_an_undeliverable_batch_raises(free_port: int) -> None:
    col = Collector(None, host="127.0.0.1", port=free_port, topic="t", retries=1, backoff=0.01)
    col.add({"seq": 1})
    with pytest.raises(DeliveryError, match=r"not delivered after 2 attempts: ConnectError: cannot connect"):
        col.flush()


def test_a_batch_the_service_refuses_is_kept_aside_not_retried(tmp_path: Path, db: Path) -> None:
    spool = tmp_path / "c.spool"
    with ingest_host(db, max_batch_records=2) as host:
        h, p = host.address("ingest")
        col = Collector(None, host=h, port=p, topic="t", batch_records=3, spool=spool)
        with pytest.raises(BatchRejected, match="over max_batch_records=2; split it"):
            for i in range(3):
                col.add({"seq": i})
            col.flush()
        col.close()
        assert col.stats.rejected_batches == 1 and col.stats.retries == 0
        assert (
            (tmp_path / "c.spool.rejected").read_bytes().endswith(encode_batch({"seq": i} for i in range(3)))
        )


# -- the command line ----------------------------------------------------------------------------


def test_cli_count_topics_query_stats(db: Path) -> None:
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        with rpyc.connect(h, p) as conn:
            conn.root.submit("load", encode_batch({"i": i} for i in range(3)), "b1")
        target = ("--host", h, "--port", str(p))
        counted = run_cli("-m", "client", "ingest", "count", *target)
        assert (counted.returncode, counted.stdout) == (0, "3\n")
        topics = run_cli("-m", "client", "ingest", "topics", *target)
        assert topics.stdout == "load\n"
        query = run_cli("-m", "client", "ingest", "query", "load", "--limit", "2", *target)
        assert query.returncode == 0
        assert [json.loads(line)["record"] for line in query.stdout.splitlines()] == [{"i": 0}, {"i": 1}]
        assert "--after-id 2" in query.stderr
        stats = run_cli("-m", "client", "ingest", "stats", *target)
        assert json.loads(stats.stdout)["records"] == 3
        bad = run_cli("-m", "client", "ingest", "query", "load", "--limit", "0", *target)
        assert bad.returncode == 1
        assert (
            "Error: ingest: ValueError: query: limit must be an integer from 1 to 10000, got 0" in bad.stderr
        )
        assert "Traceback" not in bad.stderr


def test_cli_reports_an_unreachable_service(free_port: int) -> None:
    result = run_cli("-m", "client", "ingest", "count", "--host", "127.0.0.1", "--port", str(free_port))
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: cannot connect to 'ingest' at 127.0.0.1:{free_port} after")


def test_example_collector_sends_proc_samples(tmp_path: Path, db: Path) -> None:
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        result = run_cli(
            "examples/collector.py",
            *("--host", h, "--port", str(p), "--count", "3", "--interval", "0.01"),
            *("--spool", str(tmp_path / "s.spool")),
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        with rpyc.connect(h, p) as conn:
            rows = conn.root.query("proc-samples", 0, 10)
    samples = [json.loads(d) for _, d in rows]
    assert [s["seq"] for s in samples] == [0, 1, 2]
    assert all(s["mem_total"] > 0 and s["load1"] >= 0 for s in samples)


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (("--window", "0"), "window must be an integer from 1 to 16, got 0"),
        (("--batch", "0"), "batch_records and batch_bytes must be >= 1"),
        (("--service", "nope"), "no service named 'nope'"),
    ],
)
def test_example_collector_says_a_bad_option_in_one_line(option: tuple[str, str], named: str) -> None:
    result = run_cli("examples/collector.py", "--count", "1", *option, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"Error: {result.stderr.strip()[7:]}"]
    assert named in result.stderr and "Traceback" not in result.stderr


def test_example_collector_follows_a_log_file(tmp_path: Path, db: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("old line, not sent\n")
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        args = ["--host", h, "--port", str(p), "--follow", str(log), "--count", "2", "--interval", "0.01"]
        proc = subprocess.Popen(
            [sys.executable, "examples/collector.py", *args, "--spool", str(tmp_path / "s")],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        output: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [output.put(line) for line in proc.stderr or ()], daemon=True).start()
        try:
            deadline = time.monotonic() + 20
            while "following" not in output.get(timeout=max(0.1, deadline - time.monotonic())):
                pass
            with open(log, "a") as f:
                f.write("first new line\nsecond new line\n")
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        with rpyc.connect(h, p) as conn:
            lines = [json.loads(d)["line"] for _, d in conn.root.query("log-lines", 0, 10)]
    assert lines == ["first new line", "second new line"]


def test_example_collector_stops_at_once_on_sigterm(tmp_path: Path, db: Path) -> None:
    """SIGTERM ends the wait between samples: the collector stops in seconds, not after --interval."""
    with ingest_host(db) as host:
        h, p = host.address("ingest")
        args = ["--host", h, "--port", str(p), "--interval", "60", "--batch", "1"]
        proc = subprocess.Popen(
            [sys.executable, "examples/collector.py", *args, "--spool", str(tmp_path / "s")],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: count((h, p), "proc-samples") == 1, 30, "the first sample to be stored")
            proc.terminate()
            assert proc.wait(timeout=10) == 0  # the interval is 60 s: this is the signal's doing
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert count((h, p), "proc-samples") == 1

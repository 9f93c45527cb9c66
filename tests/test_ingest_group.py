"""Group commit in the ingest service: batches that arrive together share one SQLite transaction,
each acknowledged after its commit, with duplicates, storage failures and bad batches handled per
batch; on real SQLite files (one on a tiny tmpfs for a full disk) and real rpyc connections."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import rpyc

from client.ingest import Collector
from rpyc_host.testing import LocalService, running_host, wait_until
from services.ingest import IngestService
from services.ingest.fastpath import encode_all
from services.ingest.storage import BatchWrite, StoreBusy, StoreError
from services.ingest.storage.group import GroupCommit, GroupLimits
from services.ingest.storage.sqlite import SQLiteStore
from tests.ingest_support import config, first_stored_ids, lines, named_record, submit_from_threads
from tests.test_ingest_service import SHOUT


def batch(batch_id: str, *rows: str, topic: str = "t") -> BatchWrite:
    return BatchWrite(topic, batch_id, rows, receipt=f"receipt-{batch_id}-{rows[0] if rows else ''}")


class Blocker:
    """Holds SQLite's write lock from another connection, so the group writer's next
    transaction waits and the submits behind it queue up into one group."""

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("COMMIT")
            self.conn.close()
            self.conn = None


@pytest.fixture
def hold() -> Iterator[Any]:
    """``hold(path)`` takes SQLite's write lock; released when the test ends at the latest
    (before the submitters are joined: listed after them, this fixture is torn down first)."""
    held: list[Blocker] = []

    def take(path: Path) -> Blocker:
        held.append(Blocker(path))
        return held[-1]

    yield take
    for blocker in held:
        blocker.release()


def queued(group: GroupCommit) -> int:
    """Batches waiting behind the writer of this process (read under the writer's lock)."""
    state = group._here()
    with state.cond:
        return len(state.queue) if state.writing else -1


def wait_queued(group: GroupCommit, n: int, timeout: float) -> None:
    wait_until(lambda: queued(group) == n, timeout, f"{n} batches queued behind the writer")


class Submitters:
    """Threads that each call ``fn(*args)`` once, started one at a time in a known queue order."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.results: dict[str, Any] = {}

    def start(self, name: str, fn: Any, *args: Any) -> None:
        def run() -> None:
            try:
                self.results[name] = fn(*args)
            except BaseException as exc:
                self.results[name] = exc

        thread = threading.Thread(target=run, name=name)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a submitter is still waiting"


@pytest.fixture
def submitters() -> Iterator[Submitters]:
    started = Submitters()
    yield started
    started.join()


# -- the store's writer ------------------------------------------------------------------------


def test_batches_queued_together_are_one_transaction_with_duplicates_first_wins(
    tmp_path: Path, submitters: Submitters, hold: Any
) -> None:
    path = tmp_path / "group.db"
    store = SQLiteStore(path)
    try:
        assert store.write(batch("old", '{"v": "old"}')) is None
        blocker = hold(path)
        submitters.start("lead", store.write, batch("lead", '{"v": "lead"}'))
        wait_until(lambda: queued(store._group) == 0, 10, "the first submit to become the writer")
        order = [
            batch("a", '{"v": "a1"}', '{"v": "a1b"}'),
            batch("b", '{"v": "b"}', topic="other"),
            batch("a", '{"v": "a2"}'),  # the same id later in the same group
            batch("lead", '{"v": "lead2"}'),  # an id of the previous group
            batch("old", '{"v": "old2"}'),  # an id stored long before
            batch("empty"),  # every record rejected: a batch row and no records
        ]
        for i, queued_batch in enumerate(order):
            submitters.start(f"{i}", store.write, queued_batch)
            wait_queued(store._group, i + 1, 10)
        blocker.release()
        submitters.join()
        results = submitters.results
        assert results["lead"] is None
        assert [results[str(i)] for i in range(len(order))] == [
            None,
            None,
            order[0].receipt,
            'receipt-lead-{"v": "lead"}',
            'receipt-old-{"v": "old"}',
            None,
        ]
        assert (store._group.stats.groups, store._group.stats.largest) == (3, len(order))
        data = [d for _, d in store.query("t", 0, 100)]
        assert data == ['{"v": "old"}', '{"v": "lead"}', '{"v": "a1"}', '{"v": "a1b"}']
        assert [d for _, d in store.query("other", 0, 100)] == ['{"v": "b"}']
        stats = store.stats()
        assert (stats.records, stats.batches, stats.duplicates) == (5, 5, 3)
        assert store.count("t") == 4 and store.count("other") == 1
    finally:
        store.close()
    # What the receipts promised is in the file, after a reopen.
    again = SQLiteStore(path)
    try:
        assert again.write(batch("a", '{"v": "a3"}')) == order[0].receipt
        assert again.write(batch("empty", '{"v": "late"}')) == order[5].receipt
    finally:
        again.close()


def test_a_lone_batch_is_written_at_once_by_its_own_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "lone.db")
    try:
        for i in range(5):
            assert store.write(batch(f"b{i}", '{"i": 1}')) is None
        assert (store._group.stats.groups, store._group.stats.largest) == (5, 1)
    finally:
        store.close()


def test_the_service_options_bound_the_groups(tmp_path: Path) -> None:
    options: dict[str, Any] = {"group_max_batches": 2, "group_max_records": 300, "group_max_bytes": 4096}
    with running_host(config(tmp_path / "ingest.db", **options)) as host:
        service: IngestService = host.hosted[0].service
        assert service.store._group.limits == GroupLimits(2, 300, 4096)  # type: ignore[attr-defined]
    defaults = IngestService(database=f"sqlite:///{tmp_path / 'defaults.db'}")
    try:
        assert defaults.group == GroupLimits(64, 100_000, 32 * 1024 * 1024)
    finally:
        defaults.close()


def test_groups_are_bounded_by_batches_records_and_bytes(
    tmp_path: Path, submitters: Submitters, hold: Any
) -> None:
    path = tmp_path / "bounded.db"
    store = SQLiteStore(path, group=GroupLimits(max_batches=3, max_records=5, max_bytes=1000))
    sizes: list[int] = []
    original = store._write_group

    def recording(group: Any) -> list[str | None]:
        sizes.append(len(group))
        return original(group)

    store._group.write_group = recording
    try:
        blocker = hold(path)
        submitters.start("lead", store.write, batch("lead", "{}"))
        wait_until(lambda: queued(store._group) == 0, 10, "the first submit to become the writer")
        queue = [
            batch("1", "{}"),
            batch("2", "{}"),
            batch("3", "{}"),
            batch("4", "{}"),  # max_batches=3: starts the next group
            batch("5", *["{}"] * 4),  # 1 + 4 records: fits max_records=5
            batch("6", "{}"),  # a sixth record: next group
            batch("7", '"' + "x" * 1200 + '"'),  # over max_bytes alone: a group of its own
            batch("8", "{}"),
        ]
        for i, queued_batch in enumerate(queue):
            submitters.start(queued_batch.batch_id, store.write, queued_batch)
            wait_queued(store._group, i + 1, 10)
        blocker.release()
        submitters.join()
        assert all(submitters.results[b.batch_id] is None for b in queue)
        assert sizes == [1, 3, 2, 1, 1, 1]
        assert store.count("t") == 1 + 3 + 1 + 4 + 1 + 1 + 1
    finally:
        store.close()
    with pytest.raises(ValueError, match="group max_records must be an integer >= 1, got 0"):
        GroupLimits(max_records=0)


def test_a_busy_database_fails_every_batch_of_the_group_and_stores_none(
    tmp_path: Path, submitters: Submitters, hold: Any
) -> None:
    path = tmp_path / "busy.db"
    store = SQLiteStore(path, busy_timeout=3)
    try:
        blocker = hold(path)
        submitters.start("lead", store.write, batch("lead", "{}"))
        wait_until(lambda: queued(store._group) == 0, 10, "the first submit to become the writer")
        for i in range(4):
            submitters.start(f"b{i}", store.write, batch(f"b{i}", f'{{"i": {i}}}'))
            wait_queued(store._group, i + 1, 10)
        submitters.join()
        blocker.release()
        errors = [submitters.results[f"b{i}"] for i in range(4)]
        assert all(type(e) is StoreBusy for e in errors), errors
        assert all("retry with the same batch id" in str(e) for e in errors)
        assert len({id(e) for e in errors}) == 4  # each waiter raises its own exception
        assert store.count() == 0
        assert [store.write(batch(f"b{i}", f'{{"i": {i}}}')) for i in range(4)] == [None] * 4
        assert store.count() == 4
    finally:
        store.close()


# -- a full disk ---------------------------------------------------------------------------------


class TinyDisk:
    """A 1 MiB tmpfs mounted in a temp dir (unmounted by the fixture), filled on demand."""

    def __init__(self, mountpoint: Path) -> None:
        self.path = mountpoint
        self.filler = mountpoint / "filler"

    def fill(self, leave: int) -> None:
        """Take all free space but ``leave`` bytes."""
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        with open(self.filler, "wb") as f:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
            os.fsync(f.fileno())

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs and must run as root (CI does)", pytrace=False)
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], check=True, timeout=30
    )
    try:
        yield TinyDisk(mountpoint)
    finally:
        if subprocess.run(["umount", str(mountpoint)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=30)


def test_a_full_disk_fails_every_batch_of_the_group_and_stores_none(
    tiny_disk: TinyDisk, submitters: Submitters, hold: Any
) -> None:
    db = tiny_disk.path / "ingest.db"
    big = [{"seq": i, "pad": "p" * 200} for i in range(300)]  # ~66 kB per batch
    with running_host(config(db)) as host:
        service: IngestService = host.hosted[0].service
        group = service.store._group  # type: ignore[attr-defined]
        address = host.address("ingest")

        def submit(topic: str, payload: bytes, batch_id: str) -> Any:
            with rpyc.connect(*address) as conn:
                return conn.root.submit(topic, payload, batch_id)

        assert submit("t", lines({"seq": -1}), "before")[1] == 1
        tiny_disk.fill(leave=64 * 1024)
        blocker = hold(db)
        submitters.start("pacer", submit, "t", lines({"seq": -2}), "pacer")
        wait_until(lambda: queued(group) == 0, 10, "the pacer to become the writer")
        for i in range(4):
            submitters.start(f"c{i}", submit, "t", lines(*big), f"c{i}")
            wait_queued(group, i + 1, 20)
        blocker.release()
        submitters.join()
        assert submitters.results["pacer"][1] == 1
        errors = [submitters.results[f"c{i}"] for i in range(4)]
        assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in errors), errors
        assert all("full" in str(e) and "retry with the same batch id" in str(e) for e in errors), errors
        assert group.stats.largest == 4
        with rpyc.connect(*address) as conn:
            assert conn.root.count("t") == 2  # nothing of the failed group
            assert dict(conn.root.stats())["batches"] == 2
        tiny_disk.free()
        for i in range(4):
            assert submit("t", lines(*big), f"c{i}")[1:] == (300, 0, (), False)
        with rpyc.connect(*address) as conn:
            assert conn.root.count("t") == 2 + 4 * 300


# -- over rpyc: threads and collector processes ------------------------------------------------


def test_a_bad_batch_is_refused_alone_while_its_neighbours_are_grouped(
    tmp_path: Path, submitters: Submitters, hold: Any
) -> None:
    db = tmp_path / "ingest.db"
    with running_host(config(db, schema={"seq": "int"}, max_batch_records=5)) as host:
        service: IngestService = host.hosted[0].service
        group = service.store._group  # type: ignore[attr-defined]
        address = host.address("ingest")

        def submit(payload: bytes, batch_id: str) -> Any:
            with rpyc.connect(*address) as conn:
                return conn.root.submit("t", payload, batch_id)

        blocker = hold(db)
        submitters.start("lead", submit, lines({"seq": 0}), "lead")
        wait_until(lambda: queued(group) == 0, 10, "the first submit to become the writer")
        submitters.start("good1", submit, lines({"seq": 1}, {"seq": "x"}), "good1")
        wait_until(lambda: queued(group) == 1, 10, "one batch queued")
        # Oversize: refused before it is queued, while the writer is still held up.
        with pytest.raises(ValueError, match="over max_batch_records=5"):
            submit(lines(*({"seq": i} for i in range(6))), "huge")
        submitters.start("good2", submit, lines({"seq": 2}), "good2")
        wait_until(lambda: queued(group) == 2, 10, "two batches queued")
        blocker.release()
        submitters.join()
        assert submitters.results["good1"] == (
            "good1",
            1,
            0,
            ((1, "field 'seq' must be int, got a string 'x'"),),
            False,
        )
        assert submitters.results["good2"] == ("good2", 1, 0, (), False)
        assert group.stats.largest == 2
        with rpyc.connect(*address) as conn:
            assert conn.root.count("t") == 3
            assert dict(conn.root.stats())["rejects"] == 1


def _collect(address: tuple[str, int], worker: int, batches: int, size: int) -> None:
    """A collector process: ``batches`` batches of numbered records under its own topic."""
    with Collector(None, host=address[0], port=address[1], topic="many", batch_records=size) as col:
        for i in range(batches * size):
            col.add({"w": worker, "i": i})
    if col.stats.accepted != batches * size:
        raise SystemExit(f"collector {worker}: {col.stats.accepted} of {batches * size} acknowledged")


@contextmanager
def ingest_server(db: Path, server_type: str, start_server: Any, write_config: Any) -> Iterator[Any]:
    """The threaded host in this process (its writer can be inspected); the forking one as
    ``python server.py``, so its children fork from a clean process, as in production, not from
    the test process and whatever threads earlier tests left in it."""
    if server_type == "threaded":
        with running_host(config(db, server_type)) as host:
            yield host
    else:
        yield start_server(write_config(config(db, server_type)))


@pytest.mark.parametrize("server_type", ["threaded", "forking"])
def test_many_threads_and_collector_processes_store_every_record_once(
    tmp_path: Path, server_type: str, start_server: Any, write_config: Any
) -> None:
    db = tmp_path / "ingest.db"
    writers, batches, size, shared = 6, 12, 50, 4
    with ingest_server(db, server_type, start_server, write_config) as host:
        address = host.address("ingest")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_collect, args=(address, p, 8, 100)) for p in range(2)]
        try:
            for p in procs:
                p.start()
            # The first `shared` ids are sent by every writer: one stores, the rest are
            # duplicates, in the same group or in later ones.
            receipts = submit_from_threads([address], writers, batches, size, shared)
            for p in procs:
                p.join(timeout=90)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)
        assert [p.exitcode for p in procs] == [0, 0]
        if server_type == "threaded":  # one writer for every connection: submits overlapped
            writer = host.hosted[0].service.store._group
            # Repeats of a shared id seen before processing never reach the writer.
            assert writers * (batches - shared) + shared + 2 * 8 <= writer.stats.batches
            assert writer.stats.groups < writer.stats.batches
        assert sorted(r[0] for r in receipts if not r[4]) == first_stored_ids(writers, batches, shared)
        assert all(r[1:4] == (size, 0, ()) for r in receipts)
        with rpyc.connect(*address) as conn:
            stored = writers * (batches - shared) * size + shared * size
            assert conn.root.count("load") == stored
            assert conn.root.count("many") == 2 * 8 * 100
            stats = dict(conn.root.stats())
            assert stats["duplicates"] == (writers - 1) * shared
            assert stats["batches"] == writers * (batches - shared) + shared + 2 * 8
    with sqlite3.connect(db) as check:
        rows = check.execute(
            "SELECT json_extract(data, '$.w'), json_extract(data, '$.b'), json_extract(data, '$.i'), "
            "count(*) FROM records GROUP BY 1, 2, 3 HAVING count(*) > 1"
        ).fetchall()
        assert rows == []
        # A shared id stores the records of exactly one writer.
        owners = check.execute(
            "SELECT b.batch_id, count(DISTINCT json_extract(r.data, '$.w')) FROM batches b "
            "JOIN records r ON r.id BETWEEN b.first_id AND b.last_id "
            "WHERE b.batch_id LIKE 'shared-%' GROUP BY 1"
        ).fetchall()
        assert sorted(owners) == [(f"shared-{b}", 1) for b in range(shared)]


def test_an_unexpected_error_reaches_the_waiter_as_a_store_error() -> None:
    def broken(group: Any) -> list[str | None]:
        raise RuntimeError("bug")

    writer = GroupCommit(broken)
    with pytest.raises(StoreError, match="nothing of the batch was stored: RuntimeError: bug"):
        writer.write(batch("x", "{}"))


def test_a_line_that_cannot_be_utf8_is_rejected_alone_not_failing_its_group(
    tmp_path: Path, submitters: Submitters, hold: Any
) -> None:
    """In-process callers (the HTTP gateway) can pass a str with lone surrogates, which rpyc
    never carries; such a line is rejected by itself before the batch joins a group."""
    db = tmp_path / "ingest.db"
    with LocalService(IngestService, database=f"sqlite:///{db}") as local:
        group = local.service.store._group
        blocker = hold(db)
        submitters.start("lead", local.root.submit, "t", '{"seq": 0}\n', "lead")
        wait_until(lambda: queued(group) == 0, 10, "the first submit to become the writer")
        submitters.start("odd", local.root.submit, "t", '{"seq": 1}\n{"s": "\ud800"}\n{"seq": 2}\n', "odd")
        wait_queued(group, 1, 10)
        submitters.start("good", local.root.submit, "t", '{"seq": 3}\n', "good")
        wait_queued(group, 2, 10)
        blocker.release()
        submitters.join()
        assert submitters.results["odd"] == ("odd", 2, 0, ((1, "not UTF-8 text"),), False)
        assert submitters.results["good"] == ("good", 1, 0, (), False)
        assert group.stats.largest == 2
        assert [d for _, d in local.root.query("t", 0, 10)] == [
            '{"seq": 0}',
            '{"seq": 1}',
            '{"seq": 2}',
            '{"seq": 3}',
        ]


def test_json_lines_blocks_and_plain_rows_in_one_group_are_stored_exactly(
    tmp_path: Path, submitters: Submitters, hold: Any
) -> None:
    path = tmp_path / "group.db"
    store = SQLiteStore(path)
    odd = {"p": 'C:\\dir "q"', "c": "\t\r\n\x00", "u": "é ☃ \u2028", "n": -0.0, "big": 2**63}

    def block(*records: dict[str, Any]) -> Any:
        rows = encode_all(list(records))
        assert rows is not None
        return rows

    try:
        blocker = hold(path)
        submitters.start("lead", store.write, batch("lead", '{"v": "lead"}'))
        wait_until(lambda: queued(store._group) == 0, 10, "the first submit to become the writer")
        order = [
            BatchWrite("t", "j", block(odd, {"v": 2}), "receipt-j", rejected=1, nbytes=5),
            batch("p", '{"a":\t1}', topic="other"),
            BatchWrite("t", "j", block({"v": "again"}), "receipt-j-second"),  # same id, same group
            BatchWrite("t", "k", block({"v": 3}), "receipt-k"),
        ]
        for i, queued_batch in enumerate(order):
            submitters.start(f"{i}", store.write, queued_batch)
            wait_queued(store._group, i + 1, 10)
        blocker.release()
        submitters.join()
        assert [submitters.results[k] for k in ("lead", "0", "1", "2", "3")] == [
            None,
            None,
            None,
            "receipt-j",
            None,
        ]
        stored = store.query("t", 0, 100)
        assert [d for _, d in stored] == ['{"v": "lead"}', *block(odd, {"v": 2}), '{"v":3}']
        assert json.loads(stored[1][1]) == odd
        # Ids in queue order across topics: batch "p" of the other topic took 4.
        assert [i for i, _ in stored] == [1, 2, 3, 5]
        assert store.query("other", 0, 100) == ((4, '{"a":\t1}'),)
        stats = store.stats()
        assert (stats.records, stats.batches, stats.rejects, stats.duplicates, stats.bytes) == (5, 4, 1, 1, 5)
    finally:
        store.close()


def test_processed_batches_from_many_connections_are_stored_once(tmp_path: Path) -> None:
    """Batches through the processor (the JsonLines path) from many connections, some ids sent
    by every writer: each id stored once, and the records are the processor's output."""
    db = tmp_path / "ingest.db"
    writers, batches, size, shared = 6, 10, 40, 4
    with running_host(config(db, processor=SHOUT, schema={"w": "int", "name": "str"})) as host:
        receipts = submit_from_threads([host.address("ingest")], writers, batches, size, shared, named_record)
        writer = host.hosted[0].service.store._group
        assert writer.stats.groups < writer.stats.batches  # submits overlapped into groups
    assert all(r[1:4] == (size, 0, ()) for r in receipts)
    assert sorted(r[0] for r in receipts if not r[4]) == first_stored_ids(writers, batches, shared)
    with sqlite3.connect(db) as check:
        rows = [json.loads(d) for (d,) in check.execute("SELECT data FROM records ORDER BY id")]
        owners = check.execute(
            "SELECT b.batch_id, count(DISTINCT json_extract(r.data, '$.w')), count(*) FROM batches b "
            "JOIN records r ON r.id BETWEEN b.first_id AND b.last_id "
            "WHERE b.batch_id LIKE 'shared-%' GROUP BY 1"
        ).fetchall()
    assert len(rows) == (shared + writers * (batches - shared)) * size
    assert len({(r["w"], r["b"], r["i"]) for r in rows}) == len(rows)
    assert all(r["name"] == f"N\\{r['i']}É" for r in rows)
    assert sorted(owners) == [(f"shared-{b}", 1, size) for b in range(shared)]

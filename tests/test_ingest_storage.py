"""services.ingest.storage: URL parsing, durability settings, lock contention and fork safety,
on real SQLite files."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import pytest
import rpyc

from rpyc_host.testing import running_host
from services.ingest.storage import BACKENDS, BatchWrite, StoreBusy, StoreError, open_store
from services.ingest.storage.postgres import PostgresStore
from services.ingest.storage.sqlite import SQLiteStore


def batch(batch_id: str, *rows: str, topic: str = "t") -> BatchWrite:
    return BatchWrite(topic, batch_id, rows, receipt=f"[{len(rows)}, 0, []]")


def test_registry_maps_schemes_to_backends() -> None:
    assert dict(BACKENDS) == {"postgresql": PostgresStore, "sqlite": SQLiteStore}
    with pytest.raises(
        ValueError,
        match=r"unknown scheme 'sqlit' \(did you mean 'sqlite'\?\); known schemes: postgresql, sqlite",
    ):
        open_store("sqlit:///x.db")
    with pytest.raises(ValueError, match="no scheme"):
        open_store("var/ingest.db")
    with pytest.raises(TypeError, match="database must be a URL string"):
        open_store(5)  # type: ignore[arg-type]


def test_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///var/ingest.db")
    assert (tmp_path / "var" / "ingest.db").is_file()
    relative.close()
    absolute = open_store(f"sqlite:///{tmp_path / 'abs' / 'x.db'}")  # sqlite:////tmp/...
    assert (tmp_path / "abs" / "x.db").is_file()
    absolute.close()


def test_wal_and_synchronous_levels(tmp_path: Path) -> None:
    full = SQLiteStore.from_url(f"sqlite:///{tmp_path / 'full.db'}")
    normal = SQLiteStore.from_url(f"sqlite:///{tmp_path / 'normal.db'}?synchronous=normal&busy_timeout=2")
    try:
        assert full._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert full._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert normal._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert normal.busy_timeout == 2.0
    finally:
        full.close()
        normal.close()
    with pytest.raises(ValueError, match="synchronous='off' is not one of extra, full, normal"):
        SQLiteStore.from_url(f"sqlite:///{tmp_path / 'x.db'}?synchronous=off")
    with pytest.raises(ValueError, match="busy_timeout must be seconds, got 'soon'"):
        SQLiteStore.from_url(f"sqlite:///{tmp_path / 'x.db'}?busy_timeout=soon")


def test_a_writer_held_up_too_long_gets_a_retryable_error_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(
            StoreBusy, match=r"stayed locked by another writer .*retry with the same batch id"
        ):
            store.write(batch("b1", '{"a": 1}'))
        blocker.execute("COMMIT")
        assert store.write(batch("b1", '{"a": 1}')) is None
        assert store.count() == 1
    finally:
        blocker.close()
        store.close()


def test_the_service_relays_a_locked_database_as_timeout_error(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    text = f"""
services:
  ingest:
    class: services.ingest:IngestService
    port: 0
    options: {{database: "sqlite:///{path}?busy_timeout=0.2"}}
"""
    with running_host(text) as host, rpyc.connect(*host.address("ingest")) as conn:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(TimeoutError, match="stayed locked by another writer") as info:
                conn.root.submit("t", b'{"a": 1}\n', "locked")
            assert str(info.value).startswith(f"[Errno {errno.ETIMEDOUT}] database '{path}' stayed locked")
            blocker.execute("COMMIT")
        finally:
            blocker.close()
        assert conn.root.submit("t", b'{"a": 1}\n', "locked")[1:] == (1, 0, (), False)


def _write_in_child(store: SQLiteStore) -> None:
    # Runs in a forked child: must open its own connection, not use the parent's.
    store.write(batch("from-child", '{"who": "child"}'))
    store.close()


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "fork.db")
    try:
        store.write(batch("parent-1", '{"who": "parent"}'))
        parent_conn = store._conn()
        child = mp.get_context("fork").Process(target=_write_in_child, args=(store,))
        child.start()
        child.join(timeout=30)
        assert child.exitcode == 0
        assert store._conn() is parent_conn  # untouched by the child
        store.write(batch("parent-2", '{"who": "parent"}'))
        assert store.count("t") == 3
        assert [d for _, d in store.query("t", 0, 10)] == [
            '{"who": "parent"}',
            '{"who": "child"}',
            '{"who": "parent"}',
        ]
        assert store._proc.pid == os.getpid()
    finally:
        store.close()


def test_duplicates_and_totals_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "again.db"
    store = SQLiteStore(path)
    assert (
        store.write(BatchWrite("t", "b1", ('{"a": 1}',), "first", rejected=2, dropped=1, nbytes=30)) is None
    )
    store.close()
    again = SQLiteStore(path)
    try:
        assert again.write(batch("b1", '{"a": 2}')) == "first"
        assert again.duplicate("b1") == "first"
        assert again.duplicate("unknown") is None
        stats = again.stats()
        assert (
            stats.records,
            stats.batches,
            stats.rejects,
            stats.dropped,
            stats.duplicates,
            stats.bytes,
        ) == (
            1,
            1,
            2,
            1,
            2,
            30,
        )
        assert again.topics() == ("t",)
    finally:
        again.close()


def test_a_file_with_another_table_layout_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE records (id INTEGER PRIMARY KEY, topic_id INTEGER, batch INTEGER, data TEXT)"
        )
    with pytest.raises(
        StoreError, match="has table layout version 0, this version of the ingest store uses 1"
    ):
        SQLiteStore(path)


@pytest.mark.parametrize("sizes", [(998,), (999,), (1000, 1), (1998, 999, 1000), (0, 1, 997)])
def test_records_get_consecutive_ids_in_batch_order_across_insert_chunks(
    tmp_path: Path, sizes: tuple[int, ...]
) -> None:
    """Rows are inserted 999 to a statement, without their ids: every size around a chunk's
    edge keeps each batch's records in order, under the ids its batch row names."""
    store = SQLiteStore(tmp_path / "chunks.db")
    try:
        expected: list[str] = []
        for b, n in enumerate(sizes):
            rows = tuple(f'{{"b": {b}, "i": {i}}}' for i in range(n))
            assert store.write(batch(f"b{b}", *rows)) is None
            expected += rows
        stored = store.query("t", 0, 10_000)
        assert [d for _, d in stored] == expected
        assert [i for i, _ in stored] == list(range(1, len(expected) + 1))
        with sqlite3.connect(tmp_path / "chunks.db") as conn:
            ranges = conn.execute("SELECT first_id, last_id FROM batches ORDER BY seq").fetchall()
        starts = [1 + sum(sizes[:b]) for b in range(len(sizes))]
        assert ranges == [(s, s + n - 1) for s, n in zip(starts, sizes, strict=True)]
        assert store.stats().records == len(expected)
    finally:
        store.close()

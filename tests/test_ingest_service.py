"""IngestService over real rpyc connections to in-process hosts, stored in real SQLite files."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import rpyc

from rpyc_host.errors import ConfigError
from rpyc_host.host import Host
from rpyc_host.testing import run_cli, running_host
from tests.helpers import ROOT
from tests.ingest_support import config, lines, submit_from_threads


def shout(record: dict[str, Any]) -> dict[str, Any] | None:
    """A processor for these tests: upper-cases ``name``, drops ``skip``, refuses ``bad``."""
    if record.get("skip"):
        return None
    if record.get("bad"):
        raise ValueError(f"bad record {record['seq']}")
    if record.get("set"):
        return {"seq": record["seq"], "value": {1, 2}}  # not JSON-compatible
    if record.get("loop"):
        record["self"] = record
        return record
    record["name"] = str(record.get("name", "")).upper()
    return record


SHOUT = f"{__name__}:shout"


@contextmanager
def ingest_host(db: Path, server_type: str = "threaded", **options: Any) -> Iterator[tuple[Host, Any]]:
    with running_host(config(db, server_type, **options)) as host:
        conn = rpyc.connect(*host.address("ingest"))
        try:
            yield host, conn
        finally:
            conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ingest.db"


@pytest.fixture
def root(db: Path) -> Iterator[Any]:
    with ingest_host(db) as (_, conn):
        yield conn.root


def test_receipt_comes_after_commit_in_wal_mode(root: Any, db: Path) -> None:
    receipt = root.submit("load", lines({"seq": 1}, {"seq": 2}, {"seq": 3}), "batch-1")
    assert receipt == ("batch-1", 3, 0, (), False)
    # Another connection sees the rows: the batch was committed before the receipt.
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = check.execute("SELECT data FROM records ORDER BY id").fetchall()
    assert [json.loads(r[0])["seq"] for r in rows] == [1, 2, 3]


def test_str_payload_and_generated_batch_id(root: Any) -> None:
    batch_id, accepted, dropped, rejected, duplicate = root.submit("t", '{"a": 1}\n{"a": 2}')
    assert (accepted, dropped, rejected, duplicate) == (2, 0, (), False)
    assert len(batch_id) == 32
    assert root.count("t") == 2


def test_bad_records_get_reasons_and_good_ones_are_stored(db: Path) -> None:
    with ingest_host(db, schema={"seq": "int", "name": "str"}) as (_, conn):
        payload = b"\n".join(
            [
                b'{"seq": 0, "name": "ok"}',
                b"not json",
                b"[1, 2]",
                b'{"seq": 3, "name": "x", "v": NaN}',
                b'{"seq": "4", "name": "x"}',
                b'{"seq": 5}',
                b'\xff\xfe{"seq": 6}',
                b"",
                b'{"seq": 8, "name": "also ok"} trailing',
                b'{"seq": 9, "name": "ok too"}',
            ]
        )
        _, accepted, _, rejected, _ = conn.root.submit("t", payload, "mixed")
        reasons = dict(rejected)
        assert accepted == 2
        assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8]
        assert reasons[1].startswith("not valid JSON")
        assert reasons[2] == "a record must be a JSON object, got an array"
        assert "NaN is not JSON-compatible" in reasons[3]
        assert reasons[4] == "field 'seq' must be int, got a string '4'"
        assert reasons[5] == "missing required field 'name'"
        assert reasons[6] == "not UTF-8 text"
        assert reasons[7] == "blank line"
        assert "Extra data" in reasons[8]
        stored = [json.loads(d)["seq"] for _, d in conn.root.query("t")]
        assert stored == [0, 9]
        assert dict(conn.root.stats())["rejects"] == 8


def test_processor_changes_drops_and_rejects(db: Path) -> None:
    with ingest_host(db, processor=SHOUT) as (_, conn):
        payload = lines(
            {"seq": 0, "name": "ada"},
            {"seq": 1, "skip": True},
            {"seq": 2, "bad": True},
            {"seq": 3, "set": True},
            {"seq": 4, "name": "bob"},
            {"seq": 5, "loop": True},
        )
        _, accepted, dropped, rejected, _ = conn.root.submit("t", payload, "p1")
        assert (accepted, dropped) == (2, 1)
        assert rejected == (
            (2, f"processor {SHOUT} rejected it: ValueError: bad record 2"),
            (3, "processor output is not JSON-compatible: Object of type set is not JSON serializable"),
            (5, "processor output is not JSON-compatible: nested too deeply or circular"),
        )
        assert [json.loads(d)["name"] for _, d in conn.root.query("t")] == ["ADA", "BOB"]
        assert dict(conn.root.stats())["dropped"] == 1


def test_oversize_batches_are_refused_whole_and_the_server_keeps_serving(db: Path) -> None:
    with ingest_host(db, max_batch_records=3, max_batch_bytes=100) as (_, conn):
        with pytest.raises(ValueError, match=r"batch has 4 records, over max_batch_records=3; split it"):
            conn.root.submit("t", lines(*({"i": i} for i in range(4))), "big-1")
        with pytest.raises(ValueError, match=r"batch is 101 bytes, over max_batch_bytes=100; split it"):
            conn.root.submit("t", lines({"s": "x" * 91}), "big-2")
        assert conn.root.count() == 0
        assert conn.root.submit("t", lines({"i": 1}), "small")[1] == 1
        # A refused batch id was not used up.
        assert conn.root.submit("t", lines({"i": 2}), "big-1")[1:] == (1, 0, (), False)


@pytest.mark.parametrize("payload", [b"", b"\n", ""])
def test_empty_batch_is_refused(root: Any, payload: bytes | str) -> None:
    with pytest.raises(ValueError, match="the batch is empty; send at least one JSON record"):
        root.submit("t", payload, "empty")
    assert root.submit("t", lines({"i": 1}), "empty")[1] == 1


def test_garbage_bytes_payload_rejects_every_line(root: Any) -> None:
    garbage = bytes((i * 97 + 13) % 256 for i in range(4000))
    _, accepted, _, rejected, duplicate = root.submit("t", garbage, "garbage")
    assert accepted == 0 and not duplicate
    assert len(rejected) == garbage.count(b"\n") + (not garbage.endswith(b"\n"))
    assert {r.split(":")[0] for _, r in rejected} <= {"not UTF-8 text", "not valid JSON", "blank line"}
    assert root.count() == 0
    assert root.submit("t", lines({"ok": True}), "after")[1] == 1


def test_records_passed_by_reference_are_refused_without_touching_them(root: Any) -> None:
    touched: list[str] = []

    class Batch:  # an object of the client's: it reaches the service as a NetRef
        def __iter__(self) -> Any:
            touched.append("iter")
            return iter([{"a": 1}])

        def __len__(self) -> int:
            touched.append("len")
            return 1

    with pytest.raises(TypeError, match=r"records must be one payload of JSON lines \(bytes or str\)"):
        root.submit("t", Batch(), "netref")
    assert touched == []
    # A list is refused too, whether it arrives by reference or copied by the host.
    with pytest.raises(TypeError, match=r"got (builtins\.)?list; serialize the batch"):
        root.submit("t", ['{"a": 1}'], "netref")
    assert root.count() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", b"{}\n", None), "topic must be 1-200 characters"),
        (("bad topic", b"{}\n", None), "got 'bad topic'"),
        ((7, b"{}\n", None), "got 7"),
        (("t", b"{}\n", "has space"), "batch_id must be 1-128 printable ASCII"),
        (("t", b"{}\n", "x" * 129), "batch_id must be"),
        (("t", b"{}\n", 5), "got 5"),
    ],
)
def test_bad_arguments_are_clear_value_errors(root: Any, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        root.submit(*args)


def test_same_batch_id_is_stored_once_also_after_a_restart(db: Path) -> None:
    payload = lines({"seq": 1}, [1], {"seq": 3})
    with ingest_host(db) as (_, conn):
        first = conn.root.submit("t", payload, "once")
        assert first == ("once", 2, 0, ((1, "a record must be a JSON object, got an array"),), False)
        assert conn.root.submit("t", payload, "once") == (*first[:4], True)
        # Same id with other content: still the first batch's receipt, nothing stored.
        assert conn.root.submit("t", lines({"other": 1}), "once") == (*first[:4], True)
    with ingest_host(db) as (_, conn):
        assert conn.root.submit("t", payload, "once") == (*first[:4], True)
        assert conn.root.count("t") == 2
        assert dict(conn.root.stats()) == {
            "records": 2,
            "batches": 1,
            "rejects": 1,
            "dropped": 0,
            "duplicates": 3,
            "bytes": len(payload),
        }


def test_reading_back_count_topics_query_stats(root: Any) -> None:
    root.submit("a", lines(*({"i": i} for i in range(5))), "a1")
    root.submit("b", lines({"i": 100}), "b1")
    root.submit("a", lines({"i": 5}), "a2")
    assert root.count() == 7
    assert (root.count("a"), root.count("b"), root.count("nothing-here")) == (6, 1, 0)
    assert root.topics() == ("a", "b")
    page1 = root.query("a", 0, 4)
    page2 = root.query("a", page1[-1][0], 4)
    assert [json.loads(d)["i"] for _, d in page1 + page2] == [0, 1, 2, 3, 4, 5]
    assert all(type(i) is int and type(d) is str for i, d in page1)
    assert root.query("a", page2[-1][0], 4) == ()
    stats = dict(root.stats())
    assert (stats["records"], stats["batches"], stats["duplicates"]) == (7, 3, 0)
    for after_id, limit, message in [
        (0, 0, "limit must be"),
        (0, 10_001, "limit must be"),
        (-1, 5, "after_id"),
    ]:
        with pytest.raises(ValueError, match=message):
            root.query("a", after_id, limit)


@pytest.mark.parametrize("server_type", ["threaded", "forking"])
def test_concurrent_submitters_lose_no_writes(db: Path, server_type: str) -> None:
    writers, batches, size = 6, 15, 200
    with running_host(config(db, server_type)) as host:
        address = host.address("ingest")
        receipts = submit_from_threads([address], writers, batches, size)
        assert all(r[1] == size for r in receipts)
        with rpyc.connect(*address) as conn:
            assert conn.root.count("load") == writers * batches * size
            assert dict(conn.root.stats())["batches"] == writers * batches


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"database": "postgress://x/db"},
            "unknown scheme 'postgress' (did you mean 'postgresql'?); known schemes: postgresql, sqlite",
        ),
        ({"database": "sqlite://host/x.db"}, "a SQLite URL has no host"),
        ({"database": "sqlite:///:memory:"}, "an in-memory database is not durable"),
        ({"database": "sqlite:///x.db?sync=full"}, "unknown option 'sync'"),
        ({"processor": "nowhere_module:f"}, "cannot import 'nowhere_module'"),
        ({"processor": "json"}, "processor must be 'module:function'"),
        ({"processor": "json:nothing"}, "'json' has no function 'nothing'"),
        ({"schema": {"seq": "integer"}}, "schema.seq: unknown type 'integer'; known types: any, bool"),
        ({"schema": ["seq"]}, "schema must be a mapping"),
        ({"max_batch_records": 0}, "max_batch_records must be an integer >= 1, got 0"),
        ({"max_batch_bytes": True}, "max_batch_bytes must be an integer >= 1, got True"),
        ({"group_max_batches": 0}, "group_max_batches must be an integer >= 1, got 0"),
        ({"group_max_records": "many"}, "group_max_records must be an integer >= 1, got 'many'"),
        ({"group_max_bytes": -1}, "group_max_bytes must be an integer >= 1, got -1"),
        ({"colour": "blue"}, "unknown option 'colour'"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    options = {"database": f"sqlite:///{tmp_path / 'x.db'}", **options}
    text = config(tmp_path / "unused.db").replace(
        json.dumps({"database": f"sqlite:///{tmp_path / 'unused.db'}"}), json.dumps(options)
    )
    with pytest.raises(ConfigError, match=r"services\.ingest\.options") as info, running_host(text):
        pass
    assert message in str(info.value)


def test_server_exits_2_on_a_bad_database(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config(tmp_path / "x.db").replace("sqlite:///", "mysql:///"))
    result = run_cli(str(ROOT / "server.py"), "--config", str(path), timeout=30)
    assert result.returncode == 2
    assert "unknown scheme 'mysql'" in result.stderr
    assert "Traceback" not in result.stderr

"""The ingest fast path (msgspec): clean batches stored as compact JSON, exactly what the
per-record path would accept, and processor output encoded as ``json`` would have it."""

from __future__ import annotations

import decimal
import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.fastpath import FastPath, Raised, encode, encode_all, run
from services.ingest.service import parse_schema
from tests.ingest_support import lines
from tests.test_ingest_service import SHOUT, ingest_host

ODD_OUTPUT: dict[str, Any] = {
    "nan": {"seq": 1, "v": float("nan")},
    "inf": {"seq": 2, "v": float("-inf")},
    "decimal": {"seq": 3, "v": decimal.Decimal("1.5")},
    "bytes": {"seq": 4, "v": b"x"},
    "set": {"seq": 5, "v": {1}},
    "float key": {1e16: "a"},
    "bool key": {True: "a"},
    "none": {"seq": 6, "v": None},
    "surrogate": {"seq": 7, "v": "\ud800"},
    "nested": {"seq": 8, "v": [1, {"w": (2, 3)}]},
}


def odd(record: dict[str, Any]) -> Any:
    """A processor returning, for record ``k``, a value msgspec alone would encode differently."""
    return ODD_OUTPUT[record["k"]]


def test_a_clean_batch_is_stored_as_compact_json_of_the_same_values(tmp_path: Path) -> None:
    records = [
        {"seq": 0, "name": "ada", "v": 1.5, "big": 10**30, "text": 'é ☃ "q" \\ \n', "ok": True},
        {"seq": 1, "name": "bob", "v": 1e16, "nested": {"a": [1, None]}, "neg": -0.0},
    ]
    with ingest_host(tmp_path / "i.db", processor=SHOUT, schema={"seq": "int", "v": "float"}) as (_, conn):
        receipt = conn.root.submit("t", lines(*records), "clean")
        assert receipt == ("clean", 2, 0, (), False)
        stored = [text for _, text in conn.root.query("t")]
    assert stored[0] == '{"seq":0,"name":"ADA","v":1.5,"big":1000000000000000000000000000000,' + (
        '"text":"é ☃ \\"q\\" \\\\ \\n","ok":true}'
    )
    assert stored[1] == '{"seq":1,"name":"BOB","v":1e+16,"nested":{"a":[1,null]},"neg":-0.0}'
    assert [json.loads(text) for text in stored] == [{**r, "name": r["name"].upper()} for r in records]


def test_processor_output_is_refused_or_encoded_as_json_would(tmp_path: Path) -> None:
    names = list(ODD_OUTPUT)
    with ingest_host(tmp_path / "i.db", processor=f"{__name__}:odd") as (_, conn):
        _, accepted, _, rejected, _ = conn.root.submit("t", lines(*({"k": k} for k in names)), "odd")
        stored = [text for _, text in conn.root.query("t")]
    assert dict(rejected) == {
        0: "processor output is not JSON-compatible: Out of range float values are not JSON compliant",
        1: "processor output is not JSON-compatible: Out of range float values are not JSON compliant",
        2: "processor output is not JSON-compatible: Object of type Decimal is not JSON serializable",
        3: "processor output is not JSON-compatible: Object of type bytes is not JSON serializable",
        4: "processor output is not JSON-compatible: Object of type set is not JSON serializable",
    }
    assert accepted == 5
    assert stored == [
        '{"1e+16":"a"}',
        '{"true":"a"}',
        '{"seq":6,"v":null}',
        '{"seq":7,"v":"\\ud800"}',
        '{"seq":8,"v":[1,{"w":[2,3]}]}',
    ]


SCHEMA = parse_schema({"seq": "int", "x": "float", "tags": "list", "any": "any"})
GOOD = '{"seq": 1, "x": 2, "tags": [], "any": null}'


@pytest.mark.parametrize(
    "line",
    [
        '{"seq": 1, "x": NaN, "tags": [], "any": 1}',
        '{"seq": 1, "x": 1e400, "tags": [], "any": 1}',  # json: inf, which it cannot store again
        '{"seq": 1, "x": 2, "tags": [], "any": -Infinity}',
        '{"seq": 1, "x": 2, "tags": [], "any": "\\ud800"}',
        '{"seq": 1, "x": 2, "tags": [], "any": 1}\x0c',  # trailing whitespace json allows
        '\ufeff{"seq": 1, "x": 2, "tags": [], "any": 1}',
        '{"seq": 1.0, "x": 2, "tags": [], "any": 1}',
        '{"seq": true, "x": 2, "tags": [], "any": 1}',
        '{"seq": 1, "x": false, "tags": [], "any": 1}',
        '{"seq": 1, "x": 2, "tags": {}, "any": 1}',
        '{"seq": 1, "x": 2, "tags": []}',
        '{"seq": 1, "x": 2, "tags": [], "any": 1} {"seq": 2}',
        '{"seq": 1, "x": 2, "tags": [], "any": "a\tb"}',
        '{"seq": 1, "x": 2, "tags": [1,,2], "any": 1}',
        "[1]",
        "",
    ],
)
def test_the_fast_path_leaves_every_doubtful_line_to_the_per_record_path(line: str) -> None:
    """A batch with any line json might read otherwise (or that it refuses) is not taken."""
    fast = FastPath(SCHEMA)
    assert fast.decode([GOOD, line]) is None
    assert fast.check([GOOD, line]) is False
    assert fast.decode([GOOD]) == [json.loads(GOOD)]
    assert fast.check([GOOD]) is True


def test_the_fast_path_reads_what_json_reads() -> None:
    batch = [
        GOOD,
        ' {"seq": -5, "x": 1.25e-3, "tags": ["a", {"b": [true]}], "any": {"deep": [null]}}\r',
        '{"seq": 123456789012345678901234567890, "x": 1E2, "tags": [], "any": "\\u00e9\\n\\"", "extra": 1}',
        '{"x": 0, "tags": [], "any": 0, "seq": 0, "x": 3}',
    ]
    assert FastPath(SCHEMA).decode(batch) == [json.loads(line) for line in batch]
    assert FastPath(()).decode(batch) == [json.loads(line) for line in batch]
    assert FastPath(SCHEMA).check(batch) and FastPath(()).check(batch)
    assert FastPath(()).check([b'{"a": 1}']) is False  # a line the service kept as bytes
    # A repeated key: json keeps the last value, and so does the fast path (checking that one).
    assert FastPath(SCHEMA).decode(['{"seq": "1", "seq": 1, "x": 2, "tags": [], "any": 1}']) == [
        {"seq": 1, "x": 2, "tags": [], "any": 1}
    ]
    assert FastPath(SCHEMA).decode(['{"seq": 1, "seq": "1", "x": 2, "tags": [], "any": 1}']) is None


def test_encode_matches_json_values_and_messages() -> None:
    for record in ({"a": 1, "b": "é", "c": 1.0, "d": False}, {"a": [1]}, {2: 3}, {"a": 10**40}):
        text = encode(record)
        assert " " not in text
        assert json.loads(text) == json.loads(json.dumps(record))
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        encode({"a": float("nan")})
    with pytest.raises(TypeError, match="Object of type Decimal is not JSON serializable"):
        encode({"a": decimal.Decimal(1)})


def test_run_calls_the_processor_once_per_record_and_keeps_each_result_in_place() -> None:
    calls: list[int] = []

    def processor(record: dict[str, Any]) -> Any:
        calls.append(record["i"])
        if record["i"] in (0, 3, 4, 9):
            raise ValueError(f"no {record['i']}")
        if record["i"] == 6:
            raise StopIteration  # would end a plain map() early
        return None if record["i"] == 7 else {"i": record["i"] * 10}

    results = run(processor, [{"i": i} for i in range(10)])
    assert calls == list(range(10))
    assert [type(r).__name__ for r in results] == [
        "Raised", "dict", "dict", "Raised", "Raised", "dict", "Raised", "NoneType", "dict", "Raised"
    ]  # fmt: skip
    assert [str(r.error) for r in results if isinstance(r, Raised)] == ["no 0", "no 3", "no 4", "", "no 9"]
    assert type(results[6].error) is StopIteration
    assert [r for r in results if type(r) is dict] == [{"i": 10}, {"i": 20}, {"i": 50}, {"i": 80}]


def test_encode_all_takes_only_batches_msgspec_encodes_as_json_would() -> None:
    flat = [{"a": 1, "b": "é\n", "c": 1.5, "d": True}, {"e": -2}]
    block = encode_all(flat)
    assert block is not None and len(block) == 2
    assert list(block) == ['{"a":1,"b":"é\\n","c":1.5,"d":true}', '{"e":-2}']
    assert block.block == '{"a":1,"b":"é\\n","c":1.5,"d":true}\n{"e":-2}\n'.encode()
    assert block.size == len(block.block) - 2 and block[1] == '{"e":-2}'
    for odd_one in ({"a": None}, {"a": float("nan")}, {"a": [1]}, {1: 2}, {"a": "\ud800"}, None, 5):
        assert encode_all([*flat, odd_one]) is None

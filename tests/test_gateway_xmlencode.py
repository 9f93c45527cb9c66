"""The gateway's XML-RPC response encoder against ``xmlrpc.client.dumps``: the same bytes for
every value, the same exception for values XML-RPC cannot carry, and what ``loads`` reads back."""

from __future__ import annotations

import datetime
from typing import Any
from xmlrpc.client import Binary, DateTime, Fault, dumps, loads

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpyc_host.gateway import xmlencode


def stdlib(value: Any) -> bytes:
    return dumps((value,), methodresponse=True, allow_none=True, encoding="utf-8").encode("utf-8")


def outcome(fn: Any, value: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(value)
    except Exception as exc:
        return type(exc).__name__, str(exc)


# Any text, also what XML cannot carry (control characters, lone surrogates): the encoder must
# do with it exactly what the standard library does.
any_text = st.text(st.characters())
scalars = (
    st.integers(-(2**40), 2**40)
    | st.floats()
    | st.booleans()
    | st.none()
    | any_text
    | st.binary(max_size=120)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(any_text, inner, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=500, deadline=None)
@given(values)
def test_same_bytes_or_same_error_as_the_standard_library(value: Any) -> None:
    assert outcome(xmlencode.response, value) == outcome(stdlib, value)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.integers(-(2**31), 2**31 - 1)
        | st.floats(allow_nan=False)
        | st.booleans()
        | st.none()
        | st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"))
        | st.binary(max_size=60),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs", "Cc"))), inner, max_size=4)
        ),
        max_leaves=16,
    )
)
def test_what_loads_reads_back(value: Any) -> None:
    (back,), _ = loads(xmlencode.response(value), use_builtin_types=True)
    assert back == value


@pytest.mark.parametrize(
    "value",
    [
        3,
        2**31 - 1,
        -(2**31),
        "a < b && c > d ]]> <![CDATA[x]]> &amp;",
        "\x00\x01\x1f\x7f control",
        "\r\n\t carriage return",
        "unicode: \u00e9\u4e2d\U0001f600 \ufffe",
        "",
        b"",
        b"\x00\xff" * 100,
        True,
        False,
        None,
        0.1,
        -0.0,
        float("inf"),
        float("nan"),
        1e300,
        [],
        (),
        {},
        [1, [2, [3, {"k": (None, b"x")}]]],
        {"<key&>": "v", "": 0},
    ],
)
def test_examples_are_byte_identical(value: Any) -> None:
    assert xmlencode.response(value) == stdlib(value)


@pytest.mark.parametrize(
    "value",
    [
        2**31,
        -(2**31) - 1,
        [1, 2**63],
        {"k": {"deep": 10**20}},
        {1: "int key"},
        {("t",): "tuple key"},
        1j,
        object(),
        {1, 2},
        "lone surrogate \ud800",
    ],
)
def test_values_xml_rpc_cannot_carry_fail_as_with_the_standard_library(value: Any) -> None:
    mine, theirs = outcome(xmlencode.response, value), outcome(stdlib, value)
    assert mine[0] != "ok"
    assert mine == theirs
    if theirs[0] in ("TypeError", "OverflowError"):
        assert outcome(xmlencode.check, value)[0] == theirs[0]


def test_other_types_are_left_to_the_standard_library() -> None:
    when = datetime.datetime(2026, 12, 1, 23, 30, 5)
    for value in (when, DateTime(when), Binary(b"\x00data"), bytearray(b"ab"), [when, {"b": Binary(b"")}]):
        assert xmlencode.response(value) == stdlib(value)
    xmlencode.check(when)  # a datetime is an XML-RPC value: no exception


def test_deep_and_self_containing_values() -> None:
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    assert xmlencode.response(deep) == stdlib(deep)
    loop: list[Any] = []
    loop.append(loop)
    assert outcome(xmlencode.response, loop) == ("TypeError", "cannot marshal recursive sequences")
    twice = [1]
    assert xmlencode.response([twice, twice]) == stdlib([twice, twice])


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**40), 2**40), any_text)
def test_faults_are_byte_identical(code: int, message: str) -> None:
    def theirs(_: Any) -> bytes:
        return dumps(Fault(code, message), methodresponse=True, encoding="utf-8").encode("utf-8")

    assert outcome(lambda _: xmlencode.fault(code, message), None) == outcome(theirs, None)

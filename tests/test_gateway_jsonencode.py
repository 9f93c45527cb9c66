"""The gateway's JSON-RPC result encoder against the general JSON encoder it stands in for: the
same text for every result and id, the same exception for values JSON cannot carry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpyc_host.gateway.jsonencode import ENCODER, result_text


def general(result: Any, req_id: Any) -> str:
    return ENCODER.encode({"jsonrpc": "2.0", "result": result, "id": req_id})


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as exc:
        return type(exc).__name__, str(exc)


scalars = (
    st.integers(-(2**70), 2**70)
    | st.floats()
    | st.booleans()
    | st.none()
    | st.text(st.characters())
    | st.binary(max_size=60)
)
results = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
ids = st.integers(-(2**70), 2**70) | st.text(st.characters()) | st.none() | st.floats()


@settings(max_examples=500, deadline=None)
@given(results, ids)
def test_same_text_or_same_error_as_the_general_encoder(result: Any, req_id: Any) -> None:
    assert outcome(result_text, result, req_id) == outcome(general, result, req_id)


@pytest.mark.parametrize(
    "result",
    [
        3,
        -1,
        2**100,
        0.1,
        -0.0,
        1e300,
        True,
        False,
        None,
        "",
        'quote " and \\ \x00\x1f \u00e9 \U0001f600',
        "\ud800",
        b"",
        b"\x00\xff",
        [1, b"x"],
        {"k": None},
    ],
)
@pytest.mark.parametrize("req_id", [1, 0, "id-\u00e9", None, 1.5])
def test_examples(result: Any, req_id: Any) -> None:
    text = result_text(result, req_id)
    assert text == general(result, req_id)
    back = json.loads(text)
    assert back["id"] == req_id and back["jsonrpc"] == "2.0"


@pytest.mark.parametrize("result", [float("inf"), float("-inf"), float("nan"), 1j, object(), {1j: 1}])
def test_values_json_cannot_carry_fail_as_with_the_general_encoder(result: Any) -> None:
    mine = outcome(result_text, result, 1)
    assert mine[0] in ("TypeError", "ValueError")
    assert mine == outcome(general, result, 1)

"""The gateway's XML-RPC request decoder against ``xmlrpc.client.loads``: the same values for
every request the standard library writes, and the same verdict (a value or an error) for
mangled ones."""

from __future__ import annotations

from typing import Any
from xmlrpc.client import dumps, loads

from hypothesis import given, settings
from hypothesis import strategies as st

from rpyc_host.gateway.xmldecode import _decode_flat, decode_request

# Text XML can carry (no control characters, no lone surrogates, no U+FFFE/U+FFFF).
xml_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff")
    | st.sampled_from("\n\t")
)
scalars = (
    st.integers(-(2**31), 2**31 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
    | xml_text
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(xml_text, inner, max_size=4),
    max_leaves=12,
)


def verdict(fn: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(body)
    except Exception:
        return "error", None


@settings(max_examples=300, deadline=None)
@given(st.lists(values, max_size=5), st.sampled_from(["demo.add", "files.ls", "a.b_c"]))
def test_same_values_as_the_standard_library(params: list[Any], method: str) -> None:
    body = dumps(tuple(params), method, allow_none=True).encode()
    assert decode_request(body) == loads(body, use_builtin_types=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(scalars, max_size=4), st.integers(0, 400), st.binary(min_size=1, max_size=3))
def test_same_verdict_on_mangled_requests(params: list[Any], at: int, junk: bytes) -> None:
    body = dumps(tuple(params), "demo.echo", allow_none=True).encode()
    at = at % len(body)
    mangled = body[:at] + junk + body[at + 1 :]
    mine, theirs = (
        verdict(decode_request, mangled),
        verdict(lambda b: loads(b, use_builtin_types=True), mangled),
    )
    assert mine[0] == theirs[0], (mangled, mine, theirs)
    if mine[0] == "ok":
        assert repr(mine[1]) == repr(theirs[1])


def test_scalar_calls_take_the_regular_expression_path() -> None:
    body = dumps((1, "x", 2.5, True, None), "demo.add", allow_none=True).encode()
    assert _decode_flat(body) == ((1, "x", 2.5, True, None), "demo.add")
    assert _decode_flat(body.replace(b"x", b"&amp;")) is None  # entities go to the parsers


def test_numbers_the_fast_path_does_not_convert_are_decided_by_the_standard_library() -> None:
    # int() and float() of text take digits beyond ASCII, and whitespace around them, as
    # xmlrpc.client does; the fast path converts only ASCII bytes and leaves the rest.
    for value in (
        b"<int>\xd9\xa1\xd9\xa2</int>",
        b"<i4> 7\n</i4>",
        b"<double>\xef\xbc\x91.5</double>",
        b"<double>1_0.5</double>",
        b"<int>+3</int>",
        b"<double>-inf</double>",
    ):
        body = (
            b"<methodCall><methodName>demo.add</methodName><params><param><value>%s</value></param></params></methodCall>"
            % value
        )
        assert decode_request(body) == loads(body, use_builtin_types=True)

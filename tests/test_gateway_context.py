"""The gateway turns a request's headers into the call context: X-Request-Timeout and gRPC's
grpc-timeout become the deadline (504 when it passes), traceparent the spans' parent, and
X-Request-Id the id every service logs."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from rpyc_host.host import Host
from rpyc_host.testing import ServerProcess, wait_until
from rpyc_host.wire import tracing
from tests.helpers import http, jsonrpc, post, relay_chain


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Host, Path]]:
    """A gateway in front of service A (relay), which calls service B (slow) on another host."""
    events = tmp_path / "events"
    with relay_chain(
        events, "gateway: {enabled: true, host: 127.0.0.1, port: 0, services: [relay, ask]}"
    ) as (a, _):
        yield a, events


def _call(a: Host, method: str, params: list[object], headers: str) -> tuple[int, dict[str, str], bytes]:
    assert a.gateway is not None
    address = a.gateway.address
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    return http(address, post("/jsonrpc", body, f"{address[0]}:{address[1]}", extra=headers), timeout=30)


@pytest.mark.parametrize("header", ["X-Request-Timeout: 0.2", "grpc-timeout: 200m"])
def test_a_request_timeout_header_is_the_deadline_and_504_when_it_passes(
    chain: tuple[Host, Path], header: str
) -> None:
    a, events = chain
    started = time.monotonic()
    status, headers, body = _call(a, "relay.relay", [2.0], f"{header}\r\n")
    took = time.monotonic() - started
    assert status == 504, body
    assert took < 1.0, f"answered after {took:.2f} s for a 0.2 s deadline"
    error = json.loads(body)["error"]
    assert error["code"] == -32003 and error["data"]["type"] == "DeadlineExceeded"
    assert events.read_text().count("call-start") == 1  # B got the call: there was time left
    assert headers["x-request-id"]


def test_the_request_id_and_remaining_time_reach_the_service_behind(chain: tuple[Host, Path]) -> None:
    a, _ = chain
    status, headers, body = _call(a, "ask.context_seen", [], "X-Request-Timeout: 5\r\nX-Request-Id: gw-7\r\n")
    assert status == 200, body
    request_id, left, (downstream_id, downstream_left) = json.loads(body)["result"]
    assert request_id == downstream_id == "gw-7" == headers["x-request-id"]
    assert 0 < downstream_left <= left <= 5


@pytest.mark.parametrize("value", ["soon", "-1", "0"])
def test_a_malformed_timeout_is_a_clear_400(chain: tuple[Host, Path], value: str) -> None:
    a, _ = chain
    status, _, body = _call(a, "ask.context_seen", [], f"X-Request-Timeout: {value}\r\n")
    assert status == 400 and b"X-Request-Timeout" in body and b"number of seconds" in body
    status, _, body = _call(a, "ask.context_seen", [], "grpc-timeout: 12x\r\n")
    assert status == 400 and b"grpc-timeout" in body and b"unit" in body


def test_one_trace_from_a_gateway_request_through_two_hosts_and_a_callback(
    start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    console = {"OTEL_TRACES_EXPORTER": "console"}
    b = start_server(
        write_config(
            textwrap.dedent("""
            services:
              b: {class: tests.sample_services:CallbackService, port: 0}
            """)
        ),
        env=console,
    )
    a = start_server(
        write_config(
            textwrap.dedent(f"""
            services:
              a:
                class: tests.sample_services:ChainService
                port: 0
                options: {{target_port: {b.address("b")[1]}}}
            gateway: {{enabled: true, host: 127.0.0.1, port: 0, services: [a]}}
            """)
        ),
        env=console,
    )
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    gateway = tuple(a.ready["gateway"])
    status, reply = jsonrpc(
        gateway,  # type: ignore[arg-type]
        {"jsonrpc": "2.0", "id": 1, "method": "a.chain", "params": ["hi"]},
        headers=f"traceparent: 00-{trace_id}-{parent}-01\r\n",
    )
    assert status == 200 and reply["result"] == "HI"

    def spans() -> list[dict[str, object]]:
        found = tracing.spans_from_lines(a.lines) + tracing.spans_from_lines(b.lines)
        return [s for s in found if s["context"]["trace_id"] == f"0x{trace_id}"]  # type: ignore[index]

    wait_until(lambda: len(spans()) >= 5, 20, "five spans of the request's trace")
    found = spans()
    by_id = {s["context"]["span_id"]: s for s in found}  # type: ignore[index]
    roots = [s for s in found if s["parent_id"] == f"0x{parent}"]
    assert [s["name"] for s in roots] == ["a/chain"]
    # Every other span's parent is a span of the same trace: one tree, rooted at the caller.
    for span in found:
        if span is not roots[0]:
            assert span["parent_id"] in by_id, span
    kinds = sorted(str(s["kind"]) for s in found)
    assert kinds == ["SpanKind.CLIENT"] * 2 + ["SpanKind.SERVER"] * 3
    assert TracerProvider is not None  # the SDK is installed for these tests

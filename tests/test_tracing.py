"""OpenTelemetry spans across processes: one trace from a client through host A to host B and
back into A by a callback, every span's parent right, on every server type; a plain rpyc client
gets a root span and nothing else changes."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rpyc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import client
from rpyc_host.testing import ServerProcess, wait_until
from rpyc_host.wire import tracing

SERVER_TYPES = ["threaded", "threadpool", "forking"]
CONSOLE = {"OTEL_TRACES_EXPORTER": "console"}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """This test process traces into memory; the hosts trace to their stdout (console exporter)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(provider)
    yield memory
    tracing.disable()


def _hex(value: Any) -> str | None:
    return None if value is None else f"0x{value:016x}" if isinstance(value, int) else str(value)


def _spans(*procs: ServerProcess) -> list[dict[str, Any]]:
    return [s for proc in procs for s in tracing.spans_from_lines(list(proc.lines))]


def _start(
    start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path], text: str
) -> ServerProcess:
    return start_server(write_config(textwrap.dedent(text)), env=CONSOLE)


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_one_trace_through_two_hosts_and_a_callback(
    server_type: str,
    exporter: InMemorySpanExporter,
    start_server: Callable[..., ServerProcess],
    write_config: Callable[[str], Path],
) -> None:
    b = _start(
        start_server,
        write_config,
        f"""
        server: {{type: {server_type}}}
        services:
          b: {{class: tests.sample_services:CallbackService, port: 0}}
        """,
    )
    a = _start(
        start_server,
        write_config,
        f"""
        server: {{type: {server_type}}}
        services:
          a:
            class: tests.sample_services:ChainService
            port: 0
            options: {{target_port: {b.address("b")[1]}}}
        """,
    )
    with client.connect("a", host="127.0.0.1", port=a.address("a")[1]) as conn:
        assert conn.root.chain("hello") == "HELLO"
    (mine,) = [s for s in exporter.get_finished_spans() if s.name == "a/chain"]
    trace_id = f"0x{mine.context.trace_id:032x}"
    wait_until(
        lambda: len([s for s in _spans(a, b) if s["context"]["trace_id"] == trace_id]) >= 5, 20, "spans"
    )
    spans = {s["name"]: s for s in _spans(a, b) if s["context"]["trace_id"] == trace_id}
    a_server = spans["a/chain"]
    b_server = spans["b/call_back"]
    (a_client,) = [s for n, s in spans.items() if n.endswith("/call_back") and s["kind"] == "SpanKind.CLIENT"]
    (b_client,) = [s for s in spans.values() if s["kind"] == "SpanKind.CLIENT" and s is not a_client]
    (a_callback,) = [
        s for s in spans.values() if s["kind"] == "SpanKind.SERVER" and s not in (a_server, b_server)
    ]
    assert a_server["parent_id"] == _hex(mine.context.span_id)
    assert a_client["parent_id"] == a_server["context"]["span_id"]
    assert b_server["parent_id"] == a_client["context"]["span_id"]
    assert b_client["parent_id"] == b_server["context"]["span_id"]
    assert a_callback["parent_id"] == b_client["context"]["span_id"]
    assert a_callback["name"].endswith("/shout")
    assert a_server["attributes"] == {"rpc.system": "rpyc", "rpc.service": "a", "rpc.method": "chain"}
    assert mine.kind.name == "CLIENT" and mine.attributes["rpc.method"] == "chain"


def test_a_plain_rpyc_client_is_served_as_before_with_a_root_span(
    start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    demo = _start(
        start_server,
        write_config,
        """
        services:
          demo: {class: services.demo:DemoService, port: 0}
        """,
    )
    with rpyc.connect(*demo.address("demo")) as conn:
        assert conn.root.add(2, 3) == 5
        with pytest.raises(TypeError):
            conn.root.add("x", 1)
    wait_until(lambda: len([s for s in _spans(demo) if s["name"] == "demo/add"]) == 2, 20, "two spans")
    statuses = sorted(s["status"]["status_code"] for s in _spans(demo) if s["name"] == "demo/add")
    assert statuses == ["ERROR", "UNSET"]  # the call that raised, and the one that did not
    assert all(s["parent_id"] is None for s in _spans(demo))


def test_a_pool_call_is_one_span_with_the_instance_and_retries_as_events(
    exporter: InMemorySpanExporter,
) -> None:
    import socket

    from rpyc_host.testing import running_host

    with socket.socket() as dead:  # a port nothing listens on: bound, never listening
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        with running_host("services:\n  demo: {class: services.demo:DemoService, port: 0}\n") as host:
            live = host.address("demo")[1]
            retried = None
            for _ in range(20):  # each pool starts its rotation at random: one soon tries the dead one first
                exporter.clear()
                with client.connect_service(f"static:127.0.0.1:{dead_port},127.0.0.1:{live}") as pool:
                    assert pool.root.add(1, 2) == 3
                (span,) = [s for s in exporter.get_finished_spans() if s.name.endswith("/add") and s.events]
                if any(e.name == "retry" for e in span.events):
                    retried = span
                    break
            assert retried is not None, "no pool call tried the dead instance first in 20 pools"
    events = [(e.name, dict(e.attributes or {})) for e in retried.events]
    assert events[0] == ("instance", {"address": f"127.0.0.1:{dead_port}"})
    assert events[1][0] == "retry" and events[1][1]["reason"] == "not connected"
    assert events[2] == ("instance", {"address": f"127.0.0.1:{live}"})
    (sent,) = [s for s in exporter.get_finished_spans() if s.name == f"127.0.0.1:{live}/add"]
    assert sent.parent is not None and sent.parent.span_id == retried.context.span_id

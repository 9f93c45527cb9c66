"""Lean spans (rpyc_host.wire.leanspan): what they export equals what the SDK's own spans
export, a service's own span inside a served call is a child of the SERVER span, and a
provider lean spans cannot follow (a custom processor, one added later) gets the SDK's spans."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

import client
from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire import tracing
from tests import tracing_services

HOSTS = """
services:
  a:
    class: tests.sample_services:ChainService
    port: 0
    options: {{target_port: {b_port}}}
  user: {{class: tests.tracing_services:UserSpanService, port: 0}}
"""
B_HOST = "services:\n  b: {class: tests.sample_services:CallbackService, port: 0}\n"


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """This process (test client and in-process hosts alike) traces into memory."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing_services.PROVIDER = provider
    yield provider, memory
    tracing.disable()
    tracing_services.PROVIDER = None


@contextmanager
def _user_connection() -> Iterator[Any]:
    """A connection to UserSpanService on an in-process host."""
    with (
        running_host(HOSTS.format(b_port=1)) as host,
        client.connect("user", host="127.0.0.1", port=host.address("user")[1]) as conn,
    ):
        yield conn


def _calls(a_port: int, user_port: int) -> None:
    """A chain through two hosts and back by a callback, a service's own span, an error."""
    with client.connect("a", host="127.0.0.1", port=a_port) as conn:
        assert conn.root.chain("hi") == "HI"
    with client.connect("user", host="127.0.0.1", port=user_port) as conn:
        conn.root.work()
        with pytest.raises(ValueError, match="no such thing"):
            conn.root.fail()


def _shape(spans: list[ReadableSpan]) -> list[tuple[Any, ...]]:
    """Each span's exported fields, ids replaced by the name of the span they point to."""
    by_id = {s.context.span_id: s.name for s in spans}
    rows = []
    for s in spans:
        parent = None if s.parent is None else (by_id.get(s.parent.span_id, "?"), s.parent.is_remote)
        rows.append(
            (
                s.name,
                s.kind,
                dict(s.attributes or {}),
                parent,
                s.status.status_code,
                s.status.description,
                [(e.name, dict(e.attributes or {})) for e in s.events],
                int(s.context.trace_flags),
                s.context.is_remote,
                s.resource.attributes,
                s.instrumentation_scope,
                s.start_time is not None and s.end_time is not None and s.start_time <= s.end_time,
                len({x.context.trace_id for x in spans if by_id.get(x.context.span_id) == s.name}),
            )
        )
    return sorted(rows, key=repr)


def spans_both_ways(provider: TracerProvider, memory: InMemorySpanExporter) -> dict[bool, list[Any]]:
    """The same calls through two hosts traced with SDK spans, then lean ones: what reached
    ``memory`` each time (flushing the provider's processors while waiting, for batch ones)."""
    exported = {}
    with running_host(B_HOST) as b, running_host(HOSTS.format(b_port=b.address("b")[1])) as a:
        for lean in (False, True):
            tracing.disable()
            assert tracing.configure(provider, lean=lean)
            assert tracing.lean() is lean
            memory.clear()
            _calls(a.address("a")[1], a.address("user")[1])

            def ended() -> bool:
                provider.force_flush()
                return len(memory.get_finished_spans()) >= 11

            wait_until(ended, 10, "every span ended and exported")
            exported[lean] = list(memory.get_finished_spans())
    return exported


def test_lean_spans_export_what_the_sdk_spans_export(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    exported = spans_both_ways(*traced)
    assert _shape(exported[True]) == _shape(exported[False])
    names = sorted(s.name for s in exported[True])
    assert names.count("a/chain") == 2  # CLIENT and SERVER
    (failed,) = [s for s in exported[True] if s.name == "user/fail" and s.kind.name == "SERVER"]
    assert failed.status.status_code.name == "ERROR"
    assert failed.status.description == "ValueError: no such thing"
    assert failed.attributes["rpc.error"] == "ValueError"


@pytest.mark.parametrize("lean", [True, False])
def test_a_service_span_inside_a_served_call_is_a_child_of_the_server_span(
    traced: tuple[TracerProvider, InMemorySpanExporter], lean: bool
) -> None:
    provider, memory = traced
    assert tracing.configure(provider, lean=lean)
    with _user_connection() as conn:
        seen = conn.root.work()
    wait_until(lambda: len(memory.get_finished_spans()) == 3, 10, "the CLIENT, SERVER and service's spans")
    spans = {(s.name, s.kind.name): s for s in memory.get_finished_spans()}
    server = spans[("user/work", "SERVER")]
    mine = spans[("user/work", "INTERNAL")]
    assert seen == f"{server.context.span_id:016x}"  # get_current_span() inside the call
    assert mine.parent is not None and mine.parent.span_id == server.context.span_id
    assert mine.context.trace_id == server.context.trace_id
    assert server.parent is not None
    assert server.parent.span_id == spans[("user/work", "CLIENT")].context.span_id
    from opentelemetry import trace

    assert not trace.get_current_span().get_span_context().is_valid  # nothing left attached here


class CountingProcessor(SpanProcessor):
    """A processor of the application's own, which wants every span's start."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append(span.name)


def test_a_provider_with_a_custom_processor_gets_the_sdks_spans() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    counting = CountingProcessor()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(counting)
    assert tracing.configure(provider)
    tracing_services.PROVIDER = provider
    try:
        assert not tracing.lean()
        with _user_connection() as conn:
            conn.root.work()
        assert sorted(counting.started) == ["user/work", "user/work", "user/work"]
        wait_until(lambda: len(memory.get_finished_spans()) == 3, 10, "three spans exported")
    finally:
        tracing.disable()
        tracing_services.PROVIDER = None


def test_a_processor_added_later_gets_every_span_from_then_on() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(memory))
    assert tracing.configure(provider)
    tracing_services.PROVIDER = provider
    try:
        assert tracing.lean()
        counting = CountingProcessor()
        with _user_connection() as conn:
            conn.root.work()
            provider.add_span_processor(counting)
            conn.root.work()
        assert sorted(counting.started) == ["user/work", "user/work", "user/work"]
        provider.force_flush()
        assert len(memory.get_finished_spans()) == 6
    finally:
        tracing.disable()
        tracing_services.PROVIDER = None
        provider.shutdown()


def test_lean_sampling_is_the_providers_ratio_sampler() -> None:
    memory = InMemorySpanExporter()
    sampler = ParentBased(TraceIdRatioBased(0.5))
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(provider)
    tracing_services.PROVIDER = provider
    try:
        assert tracing.lean()
        with _user_connection() as conn:
            for _ in range(200):  # bounded: 200 small calls
                conn.root.work()

        def kinds(kind: str) -> list[ReadableSpan]:
            return [s for s in memory.get_finished_spans() if s.kind.name == kind]

        # A SERVER span reaches the exporter just after its reply is sent.
        wait_until(lambda: len(kinds("SERVER")) == len(kinds("CLIENT")), 10, "every SERVER span exported")
        spans = memory.get_finished_spans()
        clients = [s for s in spans if s.kind.name == "CLIENT"]
        assert 40 < len(clients) < 160  # about half of the 200 traces
        for span in clients:  # kept by the sampler's own rule on its trace id
            assert sampler.should_sample(None, span.context.trace_id, span.name).decision.is_sampled()
            assert span.parent is None and span.context.trace_flags.sampled
        kept = {s.context.trace_id for s in clients}
        servers = [s for s in spans if s.kind.name == "SERVER"]
        assert {s.context.trace_id for s in servers} == kept  # the server follows the caller
        assert len(servers) == len(clients)
    finally:
        tracing.disable()
        tracing_services.PROVIDER = None

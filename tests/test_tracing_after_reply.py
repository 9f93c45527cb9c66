"""A SERVER span is handed to the span processors after the call's reply is sent, with the end
time taken before it; a batch processor's spans (built in its export thread) export what the
SDK's own spans export; traceparent text and dropped new traces are what they were."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

import client
from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire import tracing
from tests import tracing_services
from tests.test_tracing_lean import _shape, spans_both_ways

PROBE = "services:\n  probe: {class: tests.sample_services:ContextProbeService, port: 0}\n"
USER = "services:\n  user: {class: tests.tracing_services:UserSpanService, port: 0}\n"


class _AfterReply(SpanExporter):
    """Records each SERVER span and whether the test's client had its reply when the span
    reached the exporter (it waits up to 5 s for that, so a span exported before the reply
    was sent records False)."""

    def __init__(self, replied: threading.Event) -> None:
        self.replied = replied
        self.server: list[tuple[ReadableSpan, bool]] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            if span.kind.name == "SERVER":
                self.server.append((span, self.replied.wait(5.0)))
        return SpanExportResult.SUCCESS


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    made = TracerProvider()
    tracing_services.PROVIDER = made
    yield made
    tracing.disable()
    tracing_services.PROVIDER = None
    made.shutdown()


@pytest.mark.parametrize("method", ["work", "fail"])
def test_the_server_span_is_exported_after_the_reply_and_ends_before_it(
    provider: TracerProvider, method: str
) -> None:
    replied = threading.Event()
    exporter = _AfterReply(replied)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure(provider) and tracing.lean()
    with (
        running_host(USER) as host,
        client.connect("user", host="127.0.0.1", port=host.address("user")[1]) as conn,
    ):
        call = getattr(conn.root, method)
        sent = time.time_ns()
        try:
            call()
        except ValueError as exc:
            assert method == "fail" and str(exc) == "no such thing"
        answered = time.time_ns()
        replied.set()
        wait_until(lambda: len(exporter.server) == 1, 10, "the SERVER span exported")
    ((span, after_reply),) = exporter.server
    assert after_reply, "the SERVER span reached the exporter before the client had its reply"
    assert span.name == f"user/{method}"
    assert span.start_time is not None and span.end_time is not None
    assert sent <= span.start_time <= span.end_time <= answered
    if method == "fail":
        assert span.status.status_code.name == "ERROR"
        assert span.status.description == "ValueError: no such thing"
        assert span.attributes is not None and span.attributes["rpc.error"] == "ValueError"
    else:
        assert span.status.status_code.name == "UNSET"


def test_batch_exported_lean_spans_are_what_the_sdks_spans_export(provider: TracerProvider) -> None:
    memory = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(memory))
    exported = spans_both_ways(provider, memory)
    assert _shape(exported[True]) == _shape(exported[False])
    assert all(isinstance(span, ReadableSpan) for span in exported[True])
    assert [span.to_json() for span in exported[True]]  # every field readable, as exporters read them


def test_format_traceparent_is_the_w3c_text_of_the_ids() -> None:
    from rpyc_host.wire.leanspan import format_traceparent

    cases = [(1, 1, 0), ((1 << 128) - 1, (1 << 64) - 1, 255), (0xABC << 100, 0xB7AD6B7169203331, 1)]
    for trace_id, span_id, flags in cases:
        assert (
            format_traceparent(trace_id, span_id, flags) == f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
        )
    assert (
        format_traceparent(1 << 130, 1, 1) == f"00-{1 << 130:032x}-{1:016x}-01"
    )  # too wide: as the SDK writes it


def test_a_dropped_new_trace_goes_on_as_its_traceparent_alone() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(provider) and tracing.lean()
    try:
        with (
            running_host(PROBE) as host,
            client.connect(host="127.0.0.1", port=host.address("probe")[1]) as conn,
        ):
            trace_seen = conn.root.trace_seen
            seen = [trace_seen() for _ in range(20)]  # bounded: 20 small calls
    finally:
        tracing.disable()
    assert memory.get_finished_spans() == ()
    for parent in seen:  # a new trace id and parent span id per call, sampled flag off
        assert (
            parent is not None and len(parent) == 55 and parent.startswith("00-") and parent.endswith("-02")
        )
        assert int(parent[3:35], 16) and int(parent[36:52], 16)
    assert len({parent[3:35] for parent in seen}) == 20

"""Work a traced call defers: a SERVER span's ids and sampling decided when first read or when
it ends, the time left as microseconds text, the context text made a CallContext only when
read, span names kept per connection, and batch queueing that leaves the SDK's own handling
to its ``emit`` for whatever is not the plain case."""

from __future__ import annotations

import logging
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

import client
from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire import context, contextwire, leanspan, tracing
from rpyc_host.wire.contextwire import SEP
from tests import tracing_services
from tests.test_context_wire import _TextHost, recording_peer

TRACE = "0af7651916cd43dd8448eb211c80319c"
SAMPLED = f"00-{TRACE}-b7ad6b7169203331-01"
CALLABLE = "services:\n  maker: {class: tests.tracing_services:CallableService, port: 0}\n"
USER = "services:\n  user: {class: tests.tracing_services:UserSpanService, port: 0}\n"


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    """Lean tracing in this process, every span exported at once to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure(provider) and tracing.lean()
    yield exporter
    tracing.disable()
    provider.shutdown()


def test_a_served_span_decides_nothing_until_it_ends_then_is_the_child_of_its_caller(
    memory: InMemorySpanExporter,
) -> None:
    span = tracing.start_server_span("svc", "work", SAMPLED, "vendor=x")
    assert type(span) is leanspan.LeanSpan and span._pending == (SAMPLED, "vendor=x")  # no ids yet
    tracing.end_span(span, None)
    (exported,) = memory.get_finished_spans()
    assert exported.name == "svc/work" and exported.kind.name == "SERVER"
    assert exported.parent is not None and exported.parent.is_remote
    assert (exported.parent.trace_id, exported.parent.span_id) == (int(TRACE, 16), 0xB7AD6B7169203331)
    assert exported.context.trace_id == int(TRACE, 16) and exported.context.span_id
    assert int(exported.context.trace_flags) == 1
    assert exported.context.trace_state.to_header() == "vendor=x"
    assert exported.attributes == {"rpc.system": "rpyc", "rpc.service": "svc", "rpc.method": "work"}


@pytest.mark.parametrize("parent", [None, "00-not-a-traceparent", f"00-{'0' * 32}-b7ad6b7169203331-01"])
def test_a_served_span_without_a_valid_parent_starts_its_own_trace(
    memory: InMemorySpanExporter, parent: str | None
) -> None:
    span = tracing.start_server_span("svc", "work", parent, None)
    tracing.end_span(span, ValueError("bad"))
    (exported,) = memory.get_finished_spans()
    assert exported.parent is None and exported.context.trace_id and exported.context.span_id
    assert exported.status.status_code.name == "ERROR" and exported.attributes["rpc.error"] == "ValueError"


def test_a_served_span_read_from_many_threads_at_once_has_one_context(memory: InMemorySpanExporter) -> None:
    span = tracing.start_server_span("svc", "work", SAMPLED, None)
    start = threading.Barrier(8)
    seen: list[object] = []

    def read() -> None:
        start.wait(5)
        seen.append(span.get_span_context())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(seen) == 8 and len({ctx.span_id for ctx in seen}) == 1  # type: ignore[attr-defined]
    assert tracing.headers_of(span)[0] == f"00-{TRACE}-{span.span_id:016x}-01"
    tracing.end_span(span, None)
    (exported,) = memory.get_finished_spans()
    assert exported.context == seen[0]


@pytest.fixture
def user_spans(memory: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """:func:`memory`, with UserSpanService's own spans going there too."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing_services.PROVIDER = provider
    yield memory
    tracing_services.PROVIDER = None
    provider.shutdown()


def test_a_hosts_serving_thread_names_the_served_span_in_deadline_blocks_and_copied_contexts(
    user_spans: InMemorySpanExporter,
) -> None:
    with (
        running_host(USER) as host,
        client.connect("user", host="127.0.0.1", port=host.address("user")[1]) as conn,
    ):
        in_block = conn.root.parent_in_deadline_block()
        copied = conn.root.seen_in_a_copied_context()
        assert conn.root.current_span_valid()  # during a traced call: its SERVER span
        # A call whose trace is not sampled gets no span: between spans, the serving thread
        # (which keeps its OpenTelemetry context) names none.
        with context.use(context.CallContext(None, f"00-{TRACE}-b7ad6b7169203331-00")):
            assert not conn.root.current_span_valid()
    wait_until(lambda: len(user_spans.get_finished_spans()) >= 7, 10, "every call's spans")
    served = {s.name: s for s in user_spans.get_finished_spans() if s.kind.name == "SERVER"}
    assert in_block == f"{served['user/parent_in_deadline_block'].context.span_id:016x}"
    assert copied == f"{served['user/seen_in_a_copied_context'].context.span_id:016x}"
    from opentelemetry import trace

    assert not trace.get_current_span().get_span_context().is_valid  # this thread: nothing kept


def test_a_call_on_an_object_that_cannot_be_a_key_is_named_by_its_type(memory: InMemorySpanExporter) -> None:
    with (
        running_host(CALLABLE) as host,
        client.connect("maker", host="127.0.0.1", port=host.address("maker")[1]) as conn,
    ):
        made = conn.root.make()
        assert made() == 7 and made() == 7
    wait_until(lambda: len(memory.get_finished_spans()) >= 6, 10, "every call's spans")
    served = sorted(s.name for s in memory.get_finished_spans() if s.kind.name == "SERVER")
    assert served == ["maker/Unhashable", "maker/Unhashable", "maker/make"]


def test_the_time_left_travels_as_microseconds_and_the_connection_timeout_as_it_is() -> None:
    with (
        recording_peer(_TextHost) as (port, seen),
        client.connect(host="127.0.0.1", port=port, timeout=7) as conn,
    ):
        call = conn.root.call
        call()
        with context.deadline(0.25):
            call()
    first, in_block = seen
    assert first.split(SEP)[0] == "7.000000"  # the connection's timeout, from now
    left = in_block.split(SEP)[0]
    assert len(left.split(".")[1]) == 6 and 0 < float(left) <= 0.25
    assert contextwire.seconds_text(1 / 3) == "0.333333"


def test_time_left_texts_read_alike_however_often_they_come_and_bad_ones_never_pass() -> None:
    texts = [contextwire.seconds_text(i / 7) for i in range(3 * contextwire._SECONDS_KEPT)]
    for _ in range(2):
        for text in texts:
            ctx, _ = contextwire.decode(f"{text}{SEP}{SEP}{SEP}r")
            assert ctx is not None and ctx.deadline is not None
            assert abs(ctx.deadline - time.monotonic() - float(text)) < 1.0
        assert len(contextwire._SECONDS_SEEN) <= contextwire._SECONDS_KEPT
    for bad in ("nan", " 1.0", "x", "1.0 "):
        for _ in range(2):
            assert contextwire.decode(f"{bad}{SEP}{SEP}{SEP}r") == (None, contextwire.NOT_TOLD)
    assert contextwire.decode(f"1e12{SEP}{SEP}{SEP}r")[0].remaining() <= 31_536_000.0  # type: ignore[union-attr]


def test_the_text_context_is_made_a_call_context_when_read() -> None:
    text = f"5.0{SEP}{SAMPLED}{SEP}vendor=x{SEP}req-1{SEP}9"
    sent, default = contextwire.decode_lazily(text)
    assert type(sent) is contextwire.Sent and default == 9.0
    assert sent.traceparent == SAMPLED and sent.tracestate == "vendor=x" and not sent.expired()
    built = sent.build()
    assert built is sent.build()
    assert built == contextwire.decode(text)[0].__class__(sent.deadline, SAMPLED, "vendor=x", "req-1")  # type: ignore[union-attr]
    empty, _ = contextwire.decode_lazily(f"{SEP}{SEP}{SEP}")
    assert type(empty) is contextwire.Sent and empty.traceparent is None and empty.tracestate is None
    assert empty.build() == context.CallContext()
    gone, _ = contextwire.decode_lazily(f"-0.5{SEP}{SEP}{SEP}r")
    assert gone is not None and gone.expired()


class _Blocked(SpanExporter):
    """An exporter that holds its first export until released, so the queue fills up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS


def _batched(exporter: SpanExporter, **options: int) -> tuple[TracerProvider, BatchSpanProcessor]:
    provider = TracerProvider()
    processor = BatchSpanProcessor(exporter, **options)
    provider.add_span_processor(processor)
    assert tracing.configure(provider) and tracing.lean()
    return provider, processor


def _one_span() -> None:
    span, _, _ = tracing.start_call("svc", "m", None, None)
    assert span is not None
    tracing.end_span(span, None)


def test_batch_queueing_leaves_a_full_queue_and_a_shutdown_to_the_processor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = _Blocked()
    provider, processor = _batched(exporter, max_queue_size=4, max_export_batch_size=2)
    batch = processor._batch_processor
    try:
        for _ in range(2):
            _one_span()  # a batch is waiting: the export thread takes it and blocks
        wait_until(lambda: not batch._queue, 10, "the export thread to take the first batch")
        with caplog.at_level(logging.WARNING):
            for _ in range(6):
                _one_span()
        assert len(batch._queue) == 4
        assert "Queue full" in caplog.text  # the processor's own handling of a full queue
        exporter.release.set()
        processor.force_flush()
        assert len(exporter.exported) == 2 + 4
    finally:
        exporter.release.set()
        tracing.disable()
        provider.shutdown()
    sink = leanspan._queue_of(batch)
    sink(exporter.exported[0])  # after shutdown: refused by emit, never queued
    assert not batch._queue and len(exporter.exported) == 2 + 4


def test_an_emit_this_does_not_know_is_used_as_it_is() -> None:
    class Other:
        def __init__(self) -> None:
            self.got: list[object] = []
            self._queue: list[object] = []

        def emit(self, span: object) -> None:
            self.got.append(("emitted", span))

    other = Other()
    sink = leanspan._queue_of(other)
    sink("s")  # type: ignore[arg-type]
    assert other.got == [("emitted", "s")]

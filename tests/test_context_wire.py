"""The call context on the wire: the compact text form, a connection timeout told once so that
plain calls carry nothing, old peers (tuple-only hosts, plain rpyc clients) served as before,
and no span work for a call whose trace is not sampled."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import rpyc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from rpyc.core import consts
from rpyc.utils.server import ThreadedServer

import client
from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire import context, contextwire, tracing
from rpyc_host.wire.contextwire import SEP

ABSENT = "absent"
TRACE = "0af7651916cd43dd8448eb211c80319c"
UNSAMPLED = f"00-{TRACE}-b7ad6b7169203331-00"
SAMPLED = f"00-{TRACE}-b7ad6b7169203331-01"
PROBE = "services:\n  probe: {class: tests.sample_services:ContextProbeService, port: 0}\n"


class _Recorder(rpyc.Service):
    """A stock rpyc service that keeps the context keyword each call brought (or ABSENT)."""

    seen: list[Any]

    @rpyc.exposed
    def call(self, **kwargs: Any) -> None:
        self.seen.append(kwargs.get(context.KWARG, ABSENT))


@rpyc.service
class _TextHost(_Recorder):
    """What a host answering version 2 takes: the text form, always as the keyword pair."""

    exposed_rpyc_host_context = context.VERSION
    exposed_rpyc_host_context_text = context.TEXT_IN_PAIR


@rpyc.service
class _TupleHost(_Recorder):
    """What an older host answers: the first marker only."""

    exposed_rpyc_host_context = context.VERSION


@contextmanager
def recording_peer(service: type[_Recorder]) -> Iterator[tuple[int, list[Any]]]:
    """A stock rpyc ThreadedServer for ``service`` on 127.0.0.1; yields (port, what it saw)."""
    seen: list[Any] = []
    bound = type(service.__name__, (service,), {"seen": seen})
    server = ThreadedServer(bound, hostname="127.0.0.1", port=0, protocol_config={"allow_pickle": False})
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        yield server.port, seen
        wait_until(lambda: not server.clients, 10, "the recording server to see the close")
    finally:
        server.close()
        thread.join(5)
    assert not thread.is_alive()


def test_the_timeout_is_told_once_then_plain_calls_carry_nothing_and_a_deadline_still_travels() -> None:
    with (
        recording_peer(_TextHost) as (port, seen),
        client.connect(host="127.0.0.1", port=port, timeout=7) as conn,
    ):
        call = conn.root.call
        call()
        call()
        with context.deadline(0.5, request_id="order-7"):
            call()
        call()
    first, second, in_block, after = seen
    fields = first.split(SEP)
    assert len(fields) == 5 and 0 < float(fields[0]) <= 7 and float(fields[4]) == 7
    assert fields[1] == fields[2] == "" and fields[3]  # no trace; a request id
    assert second == ABSENT and after == ABSENT
    left, parent, state, request_id = in_block.split(SEP)
    assert 0 < float(left) <= 0.5 and request_id == "order-7" and parent == state == ""


def test_a_changed_timeout_travels_and_is_told_again() -> None:
    with (
        recording_peer(_TextHost) as (port, seen),
        client.connect(host="127.0.0.1", port=port, timeout=7) as conn,
    ):
        call = conn.root.call
        call()
        conn._config["sync_request_timeout"] = 3
        call()
        call()
    told_7, told_3, plain = seen
    assert float(told_7.split(SEP)[4]) == 7
    left, *_, default = told_3.split(SEP)
    assert 0 < float(left) <= 3 and float(default) == 3
    assert plain == ABSENT


def test_an_older_host_gets_the_tuple_on_every_call() -> None:
    with (
        recording_peer(_TupleHost) as (port, seen),
        client.connect(host="127.0.0.1", port=port, timeout=7) as conn,
    ):
        call = conn.root.call
        for _ in range(3):
            call()
    assert len(seen) == 3
    for value in seen:
        assert type(value) is tuple and len(value) == 4
        left, parent, state, request_id = value
        assert 0 < left <= 7 and parent is None and state is None and request_id
    assert len({value[3] for value in seen}) == 3


def test_a_separator_in_a_request_id_goes_as_the_tuple() -> None:
    with (
        recording_peer(_TextHost) as (port, seen),
        client.connect(host="127.0.0.1", port=port) as conn,
        context.deadline(5, request_id=f"a{SEP}b"),
    ):
        conn.root.call()
    (value,) = seen
    assert type(value) is tuple and value[3] == f"a{SEP}b"


def test_a_host_derives_the_context_of_a_plain_call_on_a_told_connection() -> None:
    with running_host(PROBE) as host:
        with client.connect(host="127.0.0.1", port=host.address("probe")[1], timeout=7) as conn:
            seen = conn.root.context_seen
            calls = [seen() for _ in range(3)]
            with context.deadline(0.5, request_id="order-8"):
                in_block = seen()
        ids = [request_id for request_id, _ in calls]
        assert all(ids) and len(set(ids)) == 3
        assert all(0 < left <= 7 for _, left in calls)
        assert in_block[0] == "order-8" and 0 < in_block[1] <= 0.5
        # A raw rpyc client telling the default itself: the same derivation.
        with rpyc.connect(*host.address("probe")) as raw:
            told = f"{SEP}{SEP}{SEP}req-9{SEP}3"
            assert tuple(raw.root.context_seen(**{context.KWARG: told})) == ("req-9", None)
            request_id, left = raw.root.context_seen()
            assert request_id and request_id != "req-9" and 0 < left <= 3


def test_a_call_without_keywords_carries_its_context_as_the_bare_text() -> None:
    with running_host(PROBE) as host:
        with client.connect(host="127.0.0.1", port=host.address("probe")[1], timeout=7) as conn:
            assert conn.peer_takes_bare_text
            sent: list[Any] = []
            send = conn._send

            def observe(msg: int, seq: int, args: Any) -> None:
                sent.append(args)
                send(msg, seq, args)

            conn._send = observe  # type: ignore[method-assign]
            with context.deadline(0.5, request_id="bare-1"):
                request_id, _ = conn.root.context_seen()
            assert request_id == "bare-1"
            conn._send = send  # type: ignore[method-assign]
        calls = [a for a in sent if a[0] == consts.HANDLE_CALL]
        label, (_, _, kwargs) = calls[-1][1]
        assert label == consts.LABEL_TUPLE and kwargs[0] == consts.LABEL_VALUE
        assert type(kwargs[1]) is str and kwargs[1].split(SEP)[3] == "bare-1"
        # The same form from a raw rpyc client, and a malformed one served without a context.
        with rpyc.connect(*host.address("probe")) as raw:
            probe = raw.root.context_seen
            request_id, left = raw.sync_request(consts.HANDLE_CALL, probe, (), f"3{SEP}{SEP}{SEP}bare-2")
            assert request_id == "bare-2" and 0 < left <= 3
            assert tuple(raw.sync_request(consts.HANDLE_CALL, probe, (), "garbage")) == (None, None)


def test_old_clients_and_plain_rpyc_clients_are_served_as_before() -> None:
    with running_host(PROBE) as host, rpyc.connect(*host.address("probe")) as raw:
        seen = raw.root.context_seen
        assert tuple(seen()) == (None, None)  # a plain rpyc client: no context, ever
        assert tuple(seen()) == (None, None)
        request_id, left = seen(**{context.KWARG: (4.0, None, None, "old-1")})  # an older client
        assert request_id == "old-1" and 0 < left <= 4
        assert tuple(seen()) == (None, None)  # a tuple tells no default
        with pytest.raises(Exception, match="deadline had passed when it arrived"):
            seen(**{context.KWARG: f"-0.5{SEP}{SEP}{SEP}late-1"})


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        f"soon{SEP}{SEP}{SEP}x",
        f"nan{SEP}{SEP}{SEP}x",
        f" 1{SEP}{SEP}{SEP}x",
        f"1{SEP}{SEP}{SEP}x{SEP}later",
        f"1{SEP}{SEP}{SEP}{'x' * (context.MAX_TEXT + 1)}",
        f"1{SEP}{SEP}{SEP}x{SEP}1{SEP}extra",
    ],
)
def test_a_malformed_text_context_is_ignored_and_the_call_served(value: str) -> None:
    assert contextwire.decode(value) == (None, contextwire.NOT_TOLD)
    with running_host(PROBE) as host, rpyc.connect(*host.address("probe")) as raw:
        assert tuple(raw.root.context_seen(**{context.KWARG: value})) == (None, None)
        assert tuple(raw.root.context_seen()) == (None, None)  # and nothing was told


def _traced(sampler: Sampler | None = None) -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = TracerProvider() if sampler is None else TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(provider)
    return memory


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """This process (the in-process host and its clients) traces into memory, default sampler."""
    yield _traced()
    tracing.disable()


def test_an_unsampled_trace_costs_no_span_and_is_handed_on(exporter: InMemorySpanExporter) -> None:
    with running_host(PROBE) as host:
        with rpyc.connect(*host.address("probe")) as raw:
            assert raw.root.trace_seen(**{context.KWARG: f"5{SEP}{UNSAMPLED}{SEP}{SEP}r-1"}) == UNSAMPLED
            mine = raw.root.trace_seen(**{context.KWARG: f"5{SEP}{SAMPLED}{SEP}{SEP}r-2"})
        with client.connect(host="127.0.0.1", port=host.address("probe")[1]) as conn:
            trace_seen = conn.root.trace_seen
            with context.use(context.CallContext(traceparent=UNSAMPLED)):
                assert trace_seen() == UNSAMPLED  # no CLIENT span either
    wait_until(lambda: len(exporter.get_finished_spans()) == 1, 10, "the SERVER span exported")
    (server,) = exporter.get_finished_spans()
    assert server.name == "probe/trace_seen" and server.kind.name == "SERVER"
    assert server.parent is not None and server.parent.span_id == 0xB7AD6B7169203331
    assert mine == f"00-{TRACE}-{server.context.span_id:016x}-01"


def test_a_sampler_that_records_unsampled_parents_still_gets_its_spans() -> None:
    memory = _traced(ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON))
    try:
        with running_host(PROBE) as host, rpyc.connect(*host.address("probe")) as raw:
            seen = raw.root.trace_seen(**{context.KWARG: f"5{SEP}{UNSAMPLED}{SEP}{SEP}r-1"})
    finally:
        tracing.disable()
    wait_until(lambda: len(memory.get_finished_spans()) == 1, 10, "the SERVER span exported")
    (server,) = memory.get_finished_spans()
    assert server.parent is not None and server.parent.span_id == 0xB7AD6B7169203331
    assert seen == f"00-{TRACE}-{server.context.span_id:016x}-01"


def test_server_spans_for_roots_only_leaves_a_call_to_its_callers_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(tracing.SERVER_SPANS_VARIABLE, "roots")
    memory = _traced()
    try:
        with running_host(PROBE) as host, rpyc.connect(*host.address("probe")) as raw:
            seen = raw.root.trace_seen(**{context.KWARG: f"5{SEP}{SAMPLED}{SEP}{SEP}r-1"})
            assert memory.get_finished_spans() == ()
            root = raw.root.trace_seen()  # no caller's span to stand in: a root SERVER span
    finally:
        tracing.disable()
    assert seen == SAMPLED  # what this call calls becomes a child of the caller's span
    wait_until(lambda: len(memory.get_finished_spans()) == 1, 10, "the SERVER span exported")
    (server,) = memory.get_finished_spans()
    assert server.parent is None and root == tracing.headers_of(server)[0]


class _Alternating(IdGenerator):
    """Trace ids a 0.5 ratio sampler keeps and drops in turn (it reads the low 64 bits)."""

    def __init__(self) -> None:
        self.count = 0

    def generate_trace_id(self) -> int:
        self.count += 1
        return (self.count << 64) | (1 if self.count % 2 else (1 << 63) | 1)

    def generate_span_id(self) -> int:
        return random.getrandbits(63) + 1


def test_a_new_trace_the_sampler_drops_costs_no_span_and_a_kept_one_keeps_its_decision() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=_Alternating())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(provider)
    try:
        with (
            running_host(PROBE) as host,
            client.connect(host="127.0.0.1", port=host.address("probe")[1]) as conn,
        ):
            trace_seen = conn.root.trace_seen
            parents = [trace_seen() for _ in range(10)]
    finally:
        tracing.disable()
    # Kept, dropped, kept...: each call's decision is made once, on the trace id it then carries.
    assert [parent[-2:] for parent in parents] == ["01", "00"] * 5
    assert [int(parent[3:35], 16) >> 64 for parent in parents] == list(range(1, 11))
    wait_until(lambda: len(memory.get_finished_spans()) == 10, 10, "five CLIENT and five SERVER spans")
    spans = memory.get_finished_spans()
    recorded = sorted({span.context.trace_id >> 64 for span in spans})
    assert recorded == [1, 3, 5, 7, 9]  # and a dropped trace made no span at all
    assert sorted(span.kind.name for span in spans) == ["CLIENT"] * 5 + ["SERVER"] * 5

"""Spans recorded as a few fields and handed to the SDK's processors as finished spans.

The OpenTelemetry SDK's ``start_span`` and ``end`` cost tens of microseconds a span (sampler
result objects, a lock, bounded attribute copies, a processor round on start and on end).
A call's span needs little of that: a fixed name, kind and attributes, two timestamps, a
status, and events only for a pool's retries. :class:`LeanTracer` keeps just those fields
while the span is open and builds the SDK's own ``ReadableSpan`` (with the provider's resource
and instrumentation scope) when it ends, handing it to each span processor's ``on_end``,
which is how the SDK's exporters receive spans. When every processor is a batch one, that
``ReadableSpan`` is built on first read, in the processor's export thread, not on the call's
path. A new trace the sampler drops makes no span object: only its traceparent goes on.

A SERVER span (:meth:`LeanTracer.start_served`) holds the caller's traceparent as text and
decides its ids and sampling when its context is first read (a service's own span, a call it
makes) or when it ends, after the reply. A host's serving thread keeps one OpenTelemetry
context whose current span is a view of the SERVER span of the call being served there, held
in a context variable of its own (:func:`attach` with ``for_good``): a call sets and resets that
variable instead of building and attaching an OpenTelemetry context.

It is used only where that is exactly what the SDK would do (:func:`for_tracer`): the SDK's
tracer, enabled, without its internal metrics, whose processors are all the SDK's
``SimpleSpanProcessor`` or ``BatchSpanProcessor`` (their ``on_start`` does nothing), and whose
sampler is built of ``ParentBased``, ``TraceIdRatioBased`` and the static samplers (the ones
``OTEL_TRACES_SAMPLER`` configures); its decision is the sampler's own rule, read from the
sampler's own settings. Anything else (a custom processor or sampler, a processor added
later, an OpenTelemetry context already holding a span) gets the SDK's spans as before.
"""

from __future__ import annotations

import collections
import contextvars
import os
import random
import threading
from collections.abc import Callable, Mapping
from time import time_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation import _SPAN_KEY

_LEAN_PROCESSORS = (SimpleSpanProcessor, BatchSpanProcessor)
_FLAGS = tuple(TraceFlags(value) for value in range(256))
_UNSET = Status(StatusCode.UNSET)
_NO_STATE = TraceState()
_SPAN_ID_MASK = (1 << 64) - 1
_CACHE_LIMIT = 4096  # (kind, service, method) names and attributes kept for reuse
_RESOLVING = threading.Lock()  # a served span's ids are decided once (LeanSpan._resolve)


def _checked_context(
    trace_id: int, span_id: int, remote: bool, flags: int, state: TraceState | None
) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, _FLAGS[flags], state or _NO_STATE)


def _fast_context(
    trace_id: int, span_id: int, remote: bool, flags: int, state: TraceState | None
) -> SpanContext:
    """``SpanContext(...)`` for ids known valid: the tuple it would build, without its checks."""
    fields = (trace_id, span_id, remote, _FLAGS[flags], state or _NO_STATE, True)
    return tuple.__new__(SpanContext, fields)


# The fast form, unless this API version lays a SpanContext out differently.
_new_context = (
    _fast_context
    if _fast_context(1, 1, True, 1, None) == _checked_context(1, 1, True, 1, None)
    else _checked_context
)


Decide = Callable[[int], bool | None]  # trace id -> sampled, None to record without sampling


def _rule(sampler: Sampler) -> Decide | None:
    """The decision of a static or ratio sampler as a function of the trace id, else None."""
    if type(sampler) is StaticSampler:
        decision = sampler._decision
        kept = _decided(decision)
        return lambda _trace_id: kept
    if type(sampler) is TraceIdRatioBased:
        bound, mask = sampler.bound, TraceIdRatioBased.TRACE_ID_LIMIT
        return lambda trace_id: trace_id & mask < bound
    return None


def _decided(decision: Decision) -> bool | None:
    """True: record and sample; None: record only; False: drop."""
    if decision.is_sampled():
        return True
    return None if decision.is_recording() else False


def _rules(sampler: Any) -> tuple[Decide, Decide, Decide] | None:
    """``(root, remote parent sampled, remote parent not sampled)`` rules, or None when the
    sampler is not one whose rule is known (the SDK then decides every span)."""
    if type(sampler) is ParentBased:
        parts = (sampler._root, sampler._remote_parent_sampled, sampler._remote_parent_not_sampled)
        rules = [_rule(part) for part in parts]
        if any(rule is None for rule in rules):
            return None
        return rules[0], rules[1], rules[2]  # type: ignore[return-value]
    rule = _rule(sampler)
    return None if rule is None else (rule, rule, rule)


def _limits_ok(limits: Any) -> bool:
    return isinstance(limits, SpanLimits)


def eligible(tracer: Any) -> bool:
    """Whether ``tracer`` is the SDK's, in the shape whose spans :class:`LeanTracer` makes."""
    processor = getattr(tracer, "span_processor", None)
    return (
        type(tracer) is sdk_trace.Tracer
        and tracer._is_enabled()
        and type(tracer._tracer_metrics).__name__ == "NoOpTracerMetrics"
        and type(processor) is sdk_trace.SynchronousMultiSpanProcessor
        and all(type(each) in _LEAN_PROCESSORS for each in processor._span_processors)
        and _rules(tracer.sampler) is not None
        and _limits_ok(tracer._span_limits)
    )


def for_tracer(tracer: Any) -> LeanTracer | None:
    """A :class:`LeanTracer` for ``tracer``, or None when the SDK's own spans are needed."""
    return LeanTracer(tracer) if eligible(tracer) else None


_FLAGS_HEX = tuple(f"{value:02x}" for value in range(256))


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The W3C ``00-<trace id>-<span id>-<flags>`` naming a span: the text of
    ``f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"``, made from the ids' bytes (formatting a
    128-bit int as hex costs twice as much)."""
    if trace_id >> 128 or span_id >> 64 or not 0 <= flags <= 255:  # not ids the W3C form holds
        return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
    return f"00-{trace_id.to_bytes(16, 'big').hex()}-{span_id.to_bytes(8, 'big').hex()}-{_FLAGS_HEX[flags]}"


def parse_traceparent(traceparent: str | None) -> tuple[int, int, int] | None:
    """``(trace id, span id, flags)`` of a W3C ``00-<trace>-<span>-<flags>``; None when it is
    missing or malformed (the same rule the SDK path's parent context follows)."""
    if not traceparent or len(traceparent) != 55 or traceparent.count("-") != 3:
        return None
    version, trace_hex, span_hex, flags_hex = traceparent.split("-")
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if version != "00" or not trace_id or not span_id or not 0 <= flags <= 255:
        return None
    return trace_id, span_id, flags


class LeanSpan:
    """One open span: what the SDK's span would hold, as plain fields (see the module
    docstring). ``recording`` False: a span the sampler dropped, which only names a context."""

    __slots__ = (
        "_attrs",
        "_context",
        "_events",
        "_headers",
        "_named",
        "_owner",
        "_parent",
        "_pending",
        "_start",
        "_status",
        "ended",
        "flags",
        "recording",
        "span_id",
        "state",
        "trace_id",
    )

    def __init__(
        self,
        owner: LeanTracer,
        named: tuple[str, SpanKind, Any],
        trace_id: int,
        span_id: int,
        flags: int,
        state: TraceState | None,
        parent: tuple[int, int, int] | None,
    ) -> None:
        self._owner, self._named, self._attrs = owner, named, named[2]
        self.trace_id, self.span_id, self.flags, self.state = trace_id, span_id, flags, state
        self._parent = parent
        self.recording = True
        self._context: SpanContext | None = None
        self._events: Any = ()
        self._status = _UNSET
        self.ended = False
        self._pending: tuple[str | None, str | None] | None = None
        self._headers: str | None = None
        self._start = time_ns()

    def _resolve(self) -> None:
        """Decide the ids and sampling of a span started by :meth:`LeanTracer.start_served`, as
        :meth:`LeanTracer.start` would have when it started; once, whichever thread reads
        the span first (service code may hand its context to another thread)."""
        with _RESOLVING:
            pending = self._pending
            if pending is None:
                return
            traceparent, tracestate = pending
            # What self._owner.decide(traceparent, tracestate) returns, without its frame
            parent = parse_traceparent(traceparent) if traceparent else None
            decided = self._owner._decide(parent, tracestate)
            self.trace_id, self.span_id, self.flags, self.state, kept = decided
            self._parent = parent
            self.recording = kept is not False
            self._pending = None

    def headers(self) -> tuple[str, str | None]:
        """``(traceparent, tracestate)`` naming this span as the parent of what comes next."""
        if self._pending is not None:
            self._resolve()
        state = self.state
        text = self._headers
        if text is None:
            text = self._headers = format_traceparent(self.trace_id, self.span_id, self.flags)
        return text, (state.to_header() or None) if state else None

    def get_span_context(self) -> SpanContext:
        if self._pending is not None:
            self._resolve()
        built = self._context
        if built is None:
            built = self._context = _new_context(self.trace_id, self.span_id, False, self.flags, self.state)
        return built

    def is_recording(self) -> bool:
        if self._pending is not None:
            self._resolve()
        return self.recording and not self.ended

    def set_status(self, status: Status) -> None:
        if self._status.status_code is StatusCode.OK or status.status_code is StatusCode.UNSET:
            return
        self._status = status

    def set_attribute(self, key: str, value: Any) -> None:
        if self.ended:
            return
        limits = self._owner.limits
        attrs = BoundedAttributes(
            limits.max_span_attributes,
            self._attrs,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )
        attrs[key] = value
        attrs._immutable = True
        self._attrs = attrs

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self._pending is not None:
            self._resolve()
        if self.ended or not self.recording:
            return
        limits = self._owner.limits
        if not self._events:
            self._events = BoundedList(limits.max_events)
        event_attributes = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        self._events.append(Event(name=name, attributes=event_attributes, timestamp=timestamp))

    def end(self, end_time: int | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self._pending is not None:
            self._resolve()
        if not self.recording:
            return
        owner = self._owner
        end = time_ns() if end_time is None else end_time
        if self.flags & 1 and owner._batched:  # LeanTracer.finish's usual case, without its frame
            readable = _new_deferred(_Deferred)
            readable._source = (self, end)
            for sink in owner._sinks:
                sink(readable)
            return
        owner.finish(self, end)

    def finish(self, error: BaseException | None, end_time: int | None = None) -> None:
        """End the span (at ``end_time``, ns since the epoch, else now), ERROR with the
        exception's type and message when ``error`` is given."""
        if error is not None:
            self.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
            self.set_attribute("rpc.error", type(error).__name__)
        self.end(end_time)

    def readable(self, end: int) -> ReadableSpan:
        """The SDK's finished span for this one."""
        if self._pending is not None:
            self._resolve()
        tracer = self._owner.tracer
        parent = self._parent
        named = self._named
        return _readable(
            named[0],
            self.get_span_context(),
            None if parent is None else _new_context(parent[0], parent[1], True, parent[2], self.state),
            tracer.resource,
            self._attrs,
            self._events,
            named[1],
            tracer.instrumentation_info,
            self._status,
            self._start,
            end,
            tracer._instrumentation_scope,
        )


def _checked_readable(
    name: str,
    context: SpanContext,
    parent: SpanContext | None,
    resource: Any,
    attributes: Any,
    events: Any,
    kind: SpanKind,
    info: Any,
    status: Status,
    start: int,
    end: int,
    scope: Any,
) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes,
        events=events,
        links=(),
        kind=kind,
        instrumentation_info=info,
        status=status,
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


def _fast_readable(
    name: str,
    context: SpanContext,
    parent: SpanContext | None,
    resource: Any,
    attributes: Any,
    events: Any,
    kind: SpanKind,
    info: Any,
    status: Status,
    start: int,
    end: int,
    scope: Any,
) -> ReadableSpan:
    """What ``ReadableSpan(...)`` sets, set at once (its constructor costs a keyword call)."""
    made = object.__new__(ReadableSpan)
    made.__dict__.update(
        _name=name,
        _context=context,
        _kind=kind,
        _instrumentation_info=info,
        _instrumentation_scope=scope,
        _parent=parent,
        _start_time=start,
        _end_time=end,
        _attributes=attributes,
        _events=events,
        _links=(),
        _resource=resource,
        _status=status,
    )
    return made


def _probe() -> tuple[Any, ...]:
    """Arguments for building one ReadableSpan, to compare how its fields are set."""
    from opentelemetry.sdk.resources import Resource

    context = _new_context(1, 2, False, 1, None)
    return ("n", context, None, Resource.get_empty(), {}, (), SpanKind.CLIENT, None, _UNSET, 1, 2, None)


def _same_fields() -> bool:
    """Whether this SDK's ReadableSpan holds exactly the fields :func:`_fast_readable` sets."""
    probe = _probe()
    return vars(_fast_readable(*probe)) == vars(_checked_readable(*probe))


_readable = _fast_readable if _same_fields() else _checked_readable
_READABLE_FIELDS = frozenset(vars(_checked_readable(*_probe())))  # what _Deferred builds on a read


class LeanTracer:
    """Makes :class:`LeanSpan` s for an eligible SDK tracer (see :func:`for_tracer`)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.limits = tracer._span_limits
        self._multi = tracer.span_processor
        self._seen = self._multi._span_processors
        self._sinks = _sinks(self._seen)
        self._batched = _all_batched(self._seen)
        self._config = tracer._tracer_config
        rules = _rules(tracer.sampler)
        assert rules is not None
        self._root, self._sampled, self._unsampled = rules
        self._names: dict[tuple[bool, str, str], tuple[str, SpanKind, Any]] = {}
        ids = tracer.id_generator
        inner = getattr(ids, "inner", ids)  # presample's wrapper keeps the tracer's own generator
        fast = type(inner) is RandomIdGenerator
        self._span_id: Callable[[], int] = _random_span_id if fast else inner.generate_span_id
        self._trace_id: Callable[[], int] = _random_trace_id if fast else inner.generate_trace_id
        self._random_roots = bool(inner.is_trace_id_random())
        self._one_draw = fast

    def usable(self) -> bool:
        """False once the provider changed in a way lean spans cannot follow (a processor added,
        the tracer reconfigured): the caller goes back to the SDK."""
        multi = self._multi
        if multi._span_processors is self._seen and self.tracer._tracer_config is self._config:
            return True
        if eligible(self.tracer):
            self._seen, self._config = multi._span_processors, self.tracer._tracer_config
            self._sinks = _sinks(self._seen)
            self._batched = _all_batched(self._seen)
            return True
        return False

    def start(
        self, server: bool, service: str, method: str, traceparent: str | None, tracestate: str | None
    ) -> LeanSpan | None:
        """A span for one call, child of ``traceparent`` (a new trace without a valid one); None
        when the SDK must make it (see the module docstring). A span the sampler drops has
        ``recording`` False."""
        made = self.start_or_drop(server, service, method, traceparent, tracestate, False)
        return None if isinstance(made, str) else made

    def start_or_drop(
        self,
        server: bool,
        service: str,
        method: str,
        traceparent: str | None,
        tracestate: str | None,
        bare: bool = True,
    ) -> LeanSpan | str | None:
        """What :meth:`start` makes, except that with ``bare`` a new trace the sampler drops is
        only its traceparent (sampled flag off): no span object for what is never recorded."""
        if (
            self._multi._span_processors is not self._seen or self.tracer._tracer_config is not self._config
        ) and not self.usable():
            return None
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is None:
            base = _VAR.get() if _VAR is not None else otel_context.get_current()
            # The application's own context may hold the parent (a thread's kept serving
            # context counts only while a call is served in it).
            if base and (base is not _SERVING or _SERVED.get() is not None):
                return None
            if self._one_draw:  # the SDK's random ids: both from one draw of 192 bits
                bits = random.getrandbits(192)
                trace_id, span_id = bits >> 64, bits & _SPAN_ID_MASK
                if trace_id and span_id:  # never zero, as the SDK's generator makes them
                    kept = self._root(trace_id)
                    flags = 2 if self._random_roots else 0
                    if kept:
                        flags |= 1
                    ids = bits.to_bytes(24, "big").hex()  # one conversion for both ids' text
                    text = f"00-{ids[:32]}-{ids[32:]}-{_FLAGS_HEX[flags]}"
                    if kept is False and bare:
                        return text
                    named = self._names.get((server, service, method)) or self._named(server, service, method)
                    # What LeanSpan(self, named, trace_id, span_id, flags, None, None) makes,
                    # without its frame: this is every CLIENT span starting a trace.
                    made = _new_span(LeanSpan)
                    made._owner, made._named, made._attrs = self, named, named[2]
                    made.trace_id, made.span_id, made.flags, made.state = trace_id, span_id, flags, None
                    made._parent = made._context = made._pending = None
                    made._headers = text
                    made.recording = kept is not False
                    made._events = ()
                    made._status = _UNSET
                    made.ended = False
                    made._start = time_ns()
                    return made
        trace_id, span_id, flags, state, kept = self._decide(parent, tracestate)
        if kept is False and bare and parent is None:
            return format_traceparent(trace_id, span_id, flags)
        made = LeanSpan(self, self._name(server, service, method), trace_id, span_id, flags, state, parent)
        if kept is False:
            made.recording = False
        return made

    def start_served(
        self, service: str, method: str, traceparent: str | None, tracestate: str | None
    ) -> LeanSpan | None:
        """The SERVER span of a call being served, child of ``traceparent``, its ids and
        sampling decided when first read or when it ends (after the call's reply is sent): until
        then it holds the caller's ``traceparent`` and ``tracestate`` as text, so the call waits
        for none of it. None when the SDK must make it."""
        if (
            self._multi._span_processors is not self._seen or self.tracer._tracer_config is not self._config
        ) and not self.usable():
            return None
        base = _VAR.get() if _VAR is not None else otel_context.get_current()
        if base and (base is not _SERVING or _SERVED.get() is not None):
            # The application's own context may hold the parent: decide now.
            made = self.start_or_drop(True, service, method, traceparent, tracestate, False)
            return None if isinstance(made, str) else made
        named = self._names.get((True, service, method)) or self._named(True, service, method)
        # Made field by field, without a constructor's frame: this is every SERVER span.
        span = _new_span(LeanSpan)
        span._owner, span._named, span._attrs = self, named, named[2]
        span._pending = (traceparent, tracestate)
        span._context = span._headers = None
        span._events = ()
        span._status = _UNSET
        span.ended = False
        span._start = time_ns()
        return span

    def decide(
        self, traceparent: str | None, tracestate: str | None
    ) -> tuple[int, int, int, TraceState | None, tuple[int, int, int] | None, bool | None]:
        """``(trace id, span id, flags, trace state, parent ids, sampler's decision)`` of a span
        child of ``traceparent``, or starting a new trace without a valid one (the caller has
        made sure the application's own context holds no parent)."""
        parent = parse_traceparent(traceparent) if traceparent else None
        trace_id, span_id, flags, state, kept = self._decide(parent, tracestate)
        return trace_id, span_id, flags, state, parent, kept

    def _decide(
        self, parent: tuple[int, int, int] | None, tracestate: str | None
    ) -> tuple[int, int, int, TraceState | None, bool | None]:
        state: TraceState | None = None
        span_id = 0
        if parent is None:
            if self._one_draw:  # the SDK's random ids: both from one draw of 192 bits
                bits = random.getrandbits(192)
                trace_id, span_id = bits >> 64, bits & _SPAN_ID_MASK
                if not trace_id:  # never zero, as the SDK's generator makes them
                    trace_id = self._trace_id()
            else:
                trace_id = self._trace_id()
            kept = self._root(trace_id)
            flags = 2 if self._random_roots else 0
        else:
            trace_id = parent[0]
            kept = (self._sampled if parent[2] & 1 else self._unsampled)(trace_id)
            flags = parent[2] & 2
            if tracestate:
                state = TraceState.from_header([tracestate])
        return trace_id, span_id or self._span_id(), flags | 1 if kept else flags, state, kept

    def _name(self, server: bool, service: str, method: str) -> tuple[str, SpanKind, Any]:
        named = self._names.get((server, service, method))
        return self._named(server, service, method) if named is None else named

    def _named(self, server: bool, service: str, method: str) -> tuple[str, SpanKind, Any]:
        limits = self.limits
        attrs = BoundedAttributes(
            limits.max_span_attributes,
            {"rpc.system": "rpyc", "rpc.service": service, "rpc.method": method},
            immutable=True,
            max_value_len=limits.max_span_attribute_length,
        )
        named = (f"{service}/{method}", SpanKind.SERVER if server else SpanKind.CLIENT, attrs)
        if len(self._names) < _CACHE_LIMIT:
            self._names[(server, service, method)] = named
        return named

    def finish(self, span: LeanSpan, end: int) -> None:
        if span.flags & 1:
            # Every processor a batch one: the span is read in its export thread, so it is
            # built there, off the call's path.
            if self._batched:
                readable: ReadableSpan = _new_deferred(_Deferred)  # what _Deferred(span, end) makes
                readable._source = (span, end)  # type: ignore[attr-defined]
            else:
                readable = span.readable(end)
            for sink in self._sinks:
                sink(readable)
            return
        readable = span.readable(end)
        # Recorded, not sampled (a custom static decision): the processors' own rule.
        for processor in self._seen:
            processor.on_end(readable)


def _all_batched(processors: tuple[Any, ...]) -> bool:
    """Whether every processor is the SDK's batch one, whose exporter reads spans in its own
    thread (a simple processor exports at once: building the span later saves nothing)."""
    return bool(processors) and all(type(each) is BatchSpanProcessor for each in processors)


class _Deferred(ReadableSpan):
    """A finished lean span as the SDK's ``ReadableSpan``, its fields built on first read (in
    the batch processor's export thread). A lean span takes no changes once ended, so reading
    it later gives what building it at the end would have; threads that read it together
    build the same fields."""

    def __init__(self, span: LeanSpan, end: int) -> None:  # no super().__init__: fields come later
        self._source = (span, end)

    _source: tuple[LeanSpan, int]

    def __getattr__(self, name: str) -> Any:
        # Called only for a field not yet set (every field, before the first read).
        source = self.__dict__.get("_source")
        if source is None or name not in _READABLE_FIELDS:
            raise AttributeError(name)
        span, end = source
        self.__dict__.update(vars(span.readable(end)))
        return self.__dict__[name]


_new_deferred = object.__new__
_new_span = object.__new__


def _sinks(processors: tuple[Any, ...]) -> tuple[Callable[[ReadableSpan], None], ...]:
    """Where each processor takes a finished, sampled span: a batch processor's queue directly
    when it has the SDK's (its ``on_end`` only checks the sampled flag, then queues), else
    ``on_end``."""
    sinks = []
    for processor in processors:
        batch = getattr(processor, "_batch_processor", None)
        if type(processor) is BatchSpanProcessor and getattr(batch, "emit", None) is not None:
            sinks.append(_queue_of(batch))
        else:
            sinks.append(processor.on_end)
    return tuple(sinks)


# What the SDK's BatchProcessor.emit refers to, in the versions whose emit _queue_of repeats:
# refused after shutdown, re-initialised after a fork, a warning when the queue is full, else
# queued, waking the export thread once a batch is waiting.
_EMIT_NAMES = frozenset(
    {
        "_at_fork_reinit",
        "_bsp_reset_once",
        "_exporting",
        "_logger",
        "_max_export_batch_size",
        "_max_queue_size",
        "_metrics",
        "_pid",
        "_queue",
        "_shutdown",
        "_worker_awaken",
        "appendleft",
        "do_once",
        "drop_items",
        "getpid",
        "info",
        "is_set",
        "len",
        "os",
        "set",
        "warning",
    }
)
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _queue_of(batch: Any) -> Callable[[ReadableSpan], None]:
    """``batch.emit``, without the ``getpid`` system call it makes per span: the pid is this
    module's, renewed after a fork. Whatever is not the plain case (shut down, forked, the
    queue full) goes to ``emit`` itself; an ``emit`` this does not know is used as it is."""
    emit = batch.emit
    queue = getattr(batch, "_queue", None)
    code = getattr(getattr(type(batch), "emit", None), "__code__", None)
    if code is None or not set(code.co_names) <= _EMIT_NAMES or type(queue) is not collections.deque:
        return emit
    full, batch_size = batch._max_queue_size, batch._max_export_batch_size

    def sink(span: ReadableSpan) -> None:
        if batch._shutdown or batch._pid != _pid or len(queue) >= full:
            emit(span)
            return
        queue.appendleft(span)
        if len(queue) >= batch_size:
            awaken = batch._worker_awaken  # read each time: a fork replaces it
            if not awaken.is_set():
                awaken.set()

    return sink


def _random_span_id() -> int:
    """What the SDK's RandomIdGenerator makes: 64 random bits, never zero."""
    value = random.getrandbits(64)
    while not value:
        value = random.getrandbits(64)
    return value


def _random_trace_id() -> int:
    """What the SDK's RandomIdGenerator makes: 128 random bits, never zero."""
    value = random.getrandbits(128)
    while not value:
        value = random.getrandbits(128)
    return value


# The OpenTelemetry context a served call runs in: its SERVER span as the current span, so
# service code sees it from get_current_span() and its own spans become its children. Set on
# the runtime's own context variable when it is the default one (what attach() does, minus
# two calls and a copy of the current context through set_value).
_RUNTIME = getattr(otel_context, "_RUNTIME_CONTEXT", None)
_VAR = _RUNTIME._current_context if type(_RUNTIME) is ContextVarsRuntimeContext else None


class _ServedView(trace.NonRecordingSpan):
    """OpenTelemetry's current span while a call is served: a non-recording view of its
    SERVER span (service code cannot end or change it), whose context is read from the span
    when asked for, so a call whose code never asks decides no ids before its reply."""

    def __init__(self, span: LeanSpan) -> None:  # no super().__init__: the context is the span's
        self._span = span

    def get_span_context(self) -> SpanContext:
        return self._span.get_span_context()

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


class _ThreadView(trace.NonRecordingSpan):
    """OpenTelemetry's current span, for good, in a thread that serves traced calls: a
    non-recording view of the SERVER span of the call being served (:data:`_SERVED`, a context
    variable of its own, so a context copied to another thread keeps its call's span), and of
    none (an invalid context, as with no span at all) between calls."""

    def __init__(self) -> None:  # no super().__init__: the context is the served span's
        pass

    def get_span_context(self) -> SpanContext:
        span = _SERVED.get()
        return trace.INVALID_SPAN_CONTEXT if span is None else span.get_span_context()

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


_SERVED: contextvars.ContextVar[LeanSpan | None] = contextvars.ContextVar(
    "rpyc_host_served_span", default=None
)
# The OpenTelemetry context a thread that serves traced calls keeps (attach(span, for_good=True)):
# a call then costs one set and one reset of _SERVED, not an OpenTelemetry context of its own.
_SERVING = otel_context.Context({_SPAN_KEY: _ThreadView()})
_new_view = object.__new__
_Context = otel_context.Context
# For a host's call path (rpyc_host.wire.remote): a thread whose RUNTIME_VAR holds SERVING
# keeps the serving context (attach with for_good), and a call's lean span is made current by
# setting SERVED alone.
SERVED, SERVING, RUNTIME_VAR = _SERVED, _SERVING, _VAR


def attach(span: Any, for_good: bool = False) -> Any:
    """Make ``span`` (a :class:`LeanSpan` or an SDK span) OpenTelemetry's current span until
    :func:`detach` is given the token returned. With ``for_good``, a thread with no
    OpenTelemetry context of its own keeps :data:`_SERVING` from then on, whose current span
    is the lean span of the call being served there, none between calls."""
    if type(span) is LeanSpan:
        if _VAR is not None:
            base = _VAR.get()
            if base is _SERVING:
                return _SERVED.set(span)
            if for_good and not base:
                _VAR.set(_SERVING)  # never reset: between calls it names no span
                return _SERVED.set(span)
        current: Any = _new_view(_ServedView)  # what _ServedView(span) makes, without its frame
        current._span = span
    else:
        current = span
    if _VAR is None:  # a runtime context other than the default contextvars one
        return otel_context.attach(trace.set_span_in_context(current))
    base = _VAR.get()
    if not base:  # a served call's thread with no OpenTelemetry context of its own
        return _VAR.set(_Context({_SPAN_KEY: current}))
    values = dict(base)
    values[_SPAN_KEY] = current
    return _VAR.set(_Context(values))


def detach(token: Any) -> None:
    if getattr(token, "var", None) is _SERVED:
        _SERVED.reset(token)
    elif _VAR is None:
        otel_context.detach(token)
    else:
        _VAR.reset(token)

"""OpenTelemetry spans for calls, both ends: a SERVER span per exposed call, a CLIENT span per
call sent, joined through the W3C ``traceparent``/``tracestate`` the call context carries.

Optional: ``pip install 'rpyc-host[otel]'``. Spans are made only when the OpenTelemetry SDK is
installed *and* an exporter is configured through the standard environment variables:

- ``OTEL_TRACES_EXPORTER``: ``console`` (one JSON object per span and line on stdout), ``otlp``
  (needs ``opentelemetry-exporter-otlp``; endpoint from ``OTEL_EXPORTER_OTLP_*``) or ``none``;
- ``OTEL_SERVICE_NAME`` (default ``rpyc-host``);
- or an application that set its own tracer provider: its provider is used as it is.

Anything else costs one check per call: :func:`active` is a module attribute read.

``RPYC_HOST_SERVER_SPANS=roots`` (default ``all``) makes a host skip the SERVER span of a call
whose caller sent a sampled trace context: the caller's CLIENT span already times the call,
and what the call calls becomes its child. A call without one still gets its own (root) span.
A call whose caller's trace is not sampled gets no span work at all when the sampler would
drop its child anyway (the SDK's default, parent-based).
With the SDK's own provider, processors and samplers, a span is recorded as a few fields and
handed to the processors as a finished span when it ends (:mod:`rpyc_host.wire.leanspan`);
anything else gets the SDK's spans. While a call is served, its SERVER span is OpenTelemetry's
current span: service code's own spans are its children. A SERVER span takes its end time when
the method returns and reaches the processors once the reply is sent
(:mod:`rpyc_host.wire.afterreply`): the caller does not wait for its export. A lean SERVER
span also decides its ids and sampling only then, unless the call reads its context (or
OpenTelemetry's current span) first.
Attributes follow OpenTelemetry's RPC conventions: ``rpc.system`` = ``rpyc``, ``rpc.service``,
``rpc.method``, and the span status is ERROR when the call raised.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import presample

log = logging.getLogger("rpyc_host.tracing")

_tracer: Any = None
_configured = False
# True when the provider's sampler drops every child of an unsampled remote parent (the SDK's
# default, ParentBased): such a call then costs no span work at all (see unsampled()).
_drops_unsampled = False
_server_spans_for_roots_only = False  # RPYC_HOST_SERVER_SPANS=roots
_roots: Any = None  # a presample.RootSampler, when new traces may be dropped
_lean: Any = None  # a leanspan.LeanTracer, when the provider is the SDK's in the shape it needs
_LeanSpan: Any = None  # leanspan.LeanSpan, once imported
_leanspan: Any = None  # the module, once imported (it needs the SDK)
SERVER_SPANS_VARIABLE = "RPYC_HOST_SERVER_SPANS"
_EVEN_HEX = frozenset("02468ace")


def active() -> bool:
    """Whether spans are being made (after :func:`configure`)."""
    return _tracer is not None


def configure(provider: Any = None, lean: bool = True) -> bool:
    """Set up tracing once, from ``provider`` or the ``OTEL_*`` environment; True if active.

    Safe to call again: later calls only switch to an explicitly given ``provider`` (tests
    pass one with an in-memory exporter). ``lean=False`` makes every span through the SDK
    (to compare the two).
    """
    global _tracer, _configured, _drops_unsampled, _server_spans_for_roots_only, _roots, _lean
    if _configured and provider is None:
        return active()
    _configured = True
    try:
        from opentelemetry import trace
    except ImportError:
        return False
    if provider is None:
        provider = _provider_from_environment(trace)
        if provider is None:
            return False
    _tracer = provider.get_tracer("rpyc_host")
    _drops_unsampled = _drops_children_of_unsampled(getattr(_tracer, "sampler", None))
    _roots = presample.for_tracer(_tracer)
    _lean = _lean_tracer(_tracer) if lean else None
    choice = os.environ.get(SERVER_SPANS_VARIABLE, "all").strip().lower()
    if choice not in ("all", "roots"):
        log.warning(
            "%s=%r is not one of all, roots: SERVER spans for all calls", SERVER_SPANS_VARIABLE, choice
        )
    _server_spans_for_roots_only = choice == "roots"
    return True


def disable() -> None:
    """Stop making spans (the provider is left to its owner)."""
    global _tracer, _drops_unsampled, _server_spans_for_roots_only, _roots, _lean
    _tracer = _roots = _lean = None
    _drops_unsampled = _server_spans_for_roots_only = False


def _lean_tracer(tracer: Any) -> Any:
    global _LeanSpan, _leanspan
    try:
        from . import leanspan
    except ImportError:  # the API without the SDK: nothing to hand finished spans to
        return None
    _LeanSpan, _leanspan = leanspan.LeanSpan, leanspan
    return leanspan.for_tracer(tracer)


def lean() -> bool:
    """Whether spans are recorded lean (see the module docstring)."""
    return _lean is not None


def _drops_children_of_unsampled(sampler: Any) -> bool:
    try:
        from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
    except ImportError:
        return False
    delegate = (
        getattr(sampler, "_remote_parent_not_sampled", None) if isinstance(sampler, ParentBased) else None
    )
    return isinstance(delegate, StaticSampler) and getattr(delegate, "_decision", None) is Decision.DROP


def server_span_needed(traceparent: str | None) -> bool:
    """Whether a call that arrived with ``traceparent`` gets a SERVER span (see the module
    docstring); without one it runs under, and hands on, the caller's traceparent."""
    if traceparent is None:
        return True
    if _server_spans_for_roots_only:
        return not _valid(traceparent)
    # unsampled(), in one call: this runs for every call served
    return not (_drops_unsampled and traceparent[-1:] in _EVEN_HEX and _valid(traceparent))


_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _valid(traceparent: str | None) -> bool:
    return (
        traceparent is not None
        and len(traceparent) == 55
        and traceparent[2] == "-"
        and traceparent[35] == "-"
        and traceparent[52] == "-"
        and traceparent[:2] == "00"
        and traceparent[3:35] != _ZERO_TRACE
        and traceparent[36:52] != _ZERO_SPAN
    )


def unsampled(traceparent: str | None) -> bool:
    """True when ``traceparent`` names a valid parent whose trace is not sampled and the sampler
    would drop its child: the call needs no span, and hands the same traceparent on."""
    return (
        _drops_unsampled
        and traceparent is not None
        and traceparent[-1:] in _EVEN_HEX  # the sampled flag is the flags byte's lowest bit
        and _valid(traceparent)
    )


def _provider_from_environment(trace: Any) -> Any:
    existing = trace.get_tracer_provider()
    if type(existing).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return existing  # the application configured OpenTelemetry itself
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter_name in ("", "none"):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER=%s but opentelemetry-sdk is not installed: no spans", exporter_name)
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "rpyc-host")})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        # One line per span, written at once: forked connection processes exit without flushing.
        exporter = ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp: no spans")
            return None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        log.warning("OTEL_TRACES_EXPORTER=%r is not one of console, otlp, none: no spans", exporter_name)
        return None
    trace.set_tracer_provider(provider)
    return provider


def _parent(traceparent: str | None, tracestate: str | None) -> Any:
    """An OpenTelemetry context whose current span is the remote parent ``traceparent`` names
    (W3C ``00-<trace id>-<span id>-<flags>``); None when it is missing or malformed."""
    if not traceparent or len(traceparent) != 55 or _tracer is None:
        return None
    version, trace_hex, span_hex, flags_hex = (
        traceparent.split("-") if traceparent.count("-") == 3 else ("",) * 4
    )
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if version != "00" or not trace_id or not span_id:
        return None
    from opentelemetry import trace

    state = trace.TraceState.from_header([tracestate]) if tracestate else None
    remote = trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags), trace_state=state
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


def headers_of(span: Any) -> tuple[str | None, str | None]:
    """``(traceparent, tracestate)`` naming ``span`` as the parent of what comes next."""
    if type(span) is _LeanSpan:
        headers: tuple[str | None, str | None] = span.headers()
        return headers
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    state = ctx.trace_state.to_header() if ctx.trace_state else None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}", state or None


@contextmanager
def span(
    kind: str,
    service: str,
    method: str,
    traceparent: str | None,
    tracestate: str | None,
    attributes: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """A SERVER or CLIENT span for one call, child of the given trace context; the span is
    yielded (None when tracing is off), ended when the block ends, ERROR if it raised."""
    if _tracer is None:
        yield None
        return
    current = None if attributes else _start_lean(kind, service, method, traceparent, tracestate)
    if current is None:
        from opentelemetry.trace import SpanKind

        attrs = {"rpc.system": "rpyc", "rpc.service": service, "rpc.method": method, **(attributes or {})}
        # Not start_as_current_span: the trace context travels in the call context (a served
        # call is made current by attach()).
        current = _tracer.start_span(
            f"{service}/{method}",
            context=_parent(traceparent, tracestate),
            kind=SpanKind.SERVER if kind == "server" else SpanKind.CLIENT,
            attributes=attrs,
        )
    try:
        yield current
    except BaseException as exc:
        end_span(current, exc)
        raise
    end_span(current, None)


def start_call(
    service: str, method: str, traceparent: str | None, tracestate: str | None
) -> tuple[Any, str | None, str | None]:
    """``(CLIENT span or None, traceparent, tracestate)`` for a call about to be sent, child of
    the given trace context: no span at all for a trace that is not sampled (the parent's, or a
    new one the sampler drops), whose traceparent goes on as it is."""
    if traceparent is not None and unsampled(traceparent):
        return None, traceparent, tracestate
    lean_tracer = _lean
    if lean_tracer is not None:
        made = lean_tracer.start_or_drop(False, service, method, traceparent, tracestate)
        if type(made) is str:  # a new trace the sampler dropped: only its traceparent goes on
            return None, made, None
        if made is not None:
            text = made._headers
            # A new trace's span has its traceparent made and no trace state: read at once.
            headers = (text, None) if text is not None and made.state is None else made.headers()
            if not made.recording:  # the sampler dropped it: only its traceparent goes on
                return (None, *headers)
            return (made, *headers)
    roots = _roots
    if traceparent is None and roots is not None:
        dropped = roots.dropped(f"{service}/{method}")
        if dropped is not None:
            return None, dropped, None
    current = _start("client", service, method, traceparent, tracestate)
    if current is None:  # turned off meanwhile
        return None, traceparent, tracestate
    return (current, *headers_of(current))


def start_client_span(service: str, method: str, traceparent: str | None, tracestate: str | None) -> Any:
    """A CLIENT span for a call whose reply arrives later (end it with :func:`end_span`)."""
    return _start("client", service, method, traceparent, tracestate)


def start_server_span(service: str, method: str, traceparent: str | None, tracestate: str | None) -> Any:
    """A SERVER span for a call being served (end it with :func:`end_span`): what :func:`span`
    makes, without a generator's frame per call. A lean span's ids and sampling are decided
    when its context is first read or when it ends (``LeanTracer.start_served``): a call that
    reads neither gets its reply first."""
    lean_tracer = _lean
    if lean_tracer is not None:
        made = lean_tracer.start_served(service, method, traceparent, tracestate)
        if made is not None:
            return made
    return _start("server", service, method, traceparent, tracestate)


def _start_lean(kind: str, service: str, method: str, traceparent: str | None, tracestate: str | None) -> Any:
    lean_tracer = _lean
    if lean_tracer is None:
        return None
    return lean_tracer.start(kind == "server", service, method, traceparent, tracestate)


def _start(kind: str, service: str, method: str, traceparent: str | None, tracestate: str | None) -> Any:
    if _tracer is None:
        return None
    lean_tracer = _lean
    if lean_tracer is not None:
        # Never a bare traceparent (bare=False): a span, or None for the SDK to make one.
        made = lean_tracer.start_or_drop(kind == "server", service, method, traceparent, tracestate, False)
        if made is not None:
            return made
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(
        f"{service}/{method}",
        context=_parent(traceparent, tracestate),
        kind=SpanKind.SERVER if kind == "server" else SpanKind.CLIENT,
        attributes={"rpc.system": "rpyc", "rpc.service": service, "rpc.method": method},
    )


def end_span(current: Any, error: BaseException | None, end_time: int | None = None) -> None:
    """End a span from this module (at ``end_time``, ns since the epoch, else now), ERROR
    when ``error`` is given."""
    if current is None:
        return
    if type(current) is _LeanSpan:
        current.finish(error, end_time)
        return
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
        current.set_attribute("rpc.error", type(error).__name__)
    current.end(end_time)


def attach(current: Any, for_good: bool = False) -> Any:
    """Make ``current`` (a span from this module) OpenTelemetry's current span, for the code a
    served call runs; returns the token for :func:`detach`. None for no span. ``for_good``: a
    thread that serves only calls may keep a context of its own from then on, whose current
    span is the call's (``leanspan.attach``)."""
    if current is None:
        return None
    if _leanspan is not None:
        return _leanspan.attach(current, for_good)
    from opentelemetry import context, trace

    return context.attach(trace.set_span_in_context(current))


def detach(token: Any) -> None:
    if token is None:
        return
    if _leanspan is not None:
        _leanspan.detach(token)
        return
    from opentelemetry import context

    context.detach(token)


def spans_from_lines(lines: list[str]) -> list[dict[str, Any]]:
    """The spans in console-exporter output (one JSON object per line), for tests and tools."""
    found = []
    for line in lines:
        text = line.strip()
        if text.startswith("{") and '"trace_id"' in text:
            try:
                found.append(json.loads(text))
            except ValueError:
                continue
    return found

"""A new trace's sampling decided before OpenTelemetry's SDK builds anything.

The SDK spends several microseconds on a span it then drops (ids, flags, a span context, a
non-recording span), which a sampled-down deployment pays on most calls. For a call that starts
a trace, :class:`RootSampler` asks the provider's own sampler first, with a trace id from the
tracer's own id generator: a dropped trace becomes its traceparent (sampled flag off) and
nothing else; a kept one is started by the SDK with that same trace id, so the decision stands.
"""

from __future__ import annotations

import threading
from typing import Any


class _PresetIds:
    """The tracer's id generator, handing out a trace id chosen beforehand (once, per thread)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.preset = threading.local()

    def generate_trace_id(self) -> int:
        value: int | None = getattr(self.preset, "trace_id", None)
        if value is None:
            return int(self.inner.generate_trace_id())
        self.preset.trace_id = None
        return value

    def generate_span_id(self) -> int:
        return int(self.inner.generate_span_id())

    def is_trace_id_random(self) -> bool:
        return bool(getattr(self.inner, "is_trace_id_random", lambda: False)())


class RootSampler:
    """Decides new traces for ``tracer`` (an SDK tracer; see :func:`for_tracer`)."""

    def __init__(self, tracer: Any, root: Any) -> None:
        from opentelemetry import context
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
        from opentelemetry.trace import SpanKind

        self._current = context.get_current
        self._client = SpanKind.CLIENT
        self._sampler = tracer.sampler
        ids = tracer.id_generator
        self._ids = ids if isinstance(ids, _PresetIds) else _PresetIds(ids)
        tracer.id_generator = self._ids
        self._trace_id, self._span_id = self._ids.inner.generate_trace_id, self._ids.inner.generate_span_id
        # What the SDK sets on a dropped root: the random-trace-id flag, when its ids are random.
        self._flags = "02" if self._ids.is_trace_id_random() else "00"
        # The ratio sampler's whole decision (the one OTEL_TRACES_SAMPLER=parentbased_traceidratio
        # makes), without building its result.
        self._bound: int | None = root.bound if type(root) is TraceIdRatioBased else None
        self._mask = TraceIdRatioBased.TRACE_ID_LIMIT

    def dropped(self, name: str) -> str | None:
        """The traceparent of a new trace the sampler drops, or None: the SDK is to start the
        span (with the trace id decided here, when there was a decision)."""
        if self._current():  # an application's own context may hold the parent: the SDK decides
            return None
        trace_id = self._trace_id()
        if self._bound is not None:
            kept = trace_id & self._mask < self._bound
        else:
            result = self._sampler.should_sample(None, trace_id, name, self._client)
            kept = result.decision.is_recording() or bool(result.trace_state)
        if kept:
            self._ids.preset.trace_id = trace_id
            return None
        return f"00-{trace_id:032x}-{self._span_id():016x}-{self._flags}"


def for_tracer(tracer: Any) -> RootSampler | None:
    """A :class:`RootSampler` for an SDK tracer whose new traces may be dropped; None for one that
    keeps them all (asking first would be work for nothing) or that is not the SDK's."""
    try:
        from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
    except ImportError:
        return None
    sampler = getattr(tracer, "sampler", None)
    if sampler is None or getattr(tracer, "id_generator", None) is None:
        return None
    root = getattr(sampler, "_root", None) if isinstance(sampler, ParentBased) else sampler
    if root is None or (isinstance(root, StaticSampler) and root._decision is Decision.RECORD_AND_SAMPLE):
        return None
    return RootSampler(tracer, root)

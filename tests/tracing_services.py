"""Services for the lean-span tests: run in the test's own process (running_host)."""

from __future__ import annotations

from typing import Any

import rpyc
from opentelemetry import trace

# The tracer provider the test configured; a service's own spans go through it.
PROVIDER: Any = None


@rpyc.service
class UserSpanService(rpyc.Service):
    """Reads OpenTelemetry's current span and starts a span of its own inside the call."""

    @rpyc.exposed
    def work(self) -> str:
        seen = trace.get_current_span().get_span_context()
        with PROVIDER.get_tracer("tests.user").start_as_current_span("user/work"):
            pass
        return f"{seen.span_id:016x}"

    @rpyc.exposed
    def fail(self) -> None:
        raise ValueError("no such thing")


class Unhashable:
    """A callable a service hands out that cannot be a dict key."""

    __hash__ = None  # type: ignore[assignment]

    def __call__(self) -> int:
        return 7


@rpyc.service
class CallableService(rpyc.Service):
    """Hands out an unhashable callable, for the span a call on it gets."""

    @rpyc.exposed
    def make(self) -> Unhashable:
        return Unhashable()

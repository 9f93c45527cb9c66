"""Services for the lean-span tests: run in the test's own process (running_host)."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import rpyc
from opentelemetry import trace

from rpyc_host.wire import context

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

    @rpyc.exposed
    def parent_in_deadline_block(self) -> str:
        """The parent span id of a span the service starts inside a ``context.deadline`` block."""
        with (
            context.deadline(5.0),
            PROVIDER.get_tracer("tests.user").start_as_current_span("user/block") as mine,
        ):
            return f"{mine.parent.span_id:016x}"

    @rpyc.exposed
    def seen_in_a_copied_context(self) -> str:
        """OpenTelemetry's current span id as a thread running a copy of this call's context
        sees it, after the call's own thread has moved on."""
        copied = contextvars.copy_context()
        seen: list[int] = []

        def read() -> None:
            seen.append(copied.run(lambda: trace.get_current_span().get_span_context().span_id))

        thread = threading.Thread(target=read)
        thread.start()
        thread.join(5)
        return f"{seen[0]:016x}"

    @rpyc.exposed
    def current_span_valid(self) -> bool:
        return bool(trace.get_current_span().get_span_context().is_valid)


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

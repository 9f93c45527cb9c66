"""SERVER spans handed to the span processors after the call's reply is sent.

Ending a span builds the SDK's finished span and queues it for export: a few microseconds a
call that the caller would otherwise wait for. A served call's span takes its end time when the
method returns (:func:`end_after_reply`, before the reply is boxed and sent) and is finished
with that end time once the connection has sent the reply (:func:`finish_ended`, which the
connection's request dispatch calls however the request ended). The list is per thread: a
request served on a thread is answered on it, and a nested request (the client calling back
in) is answered, and its span finished, before the outer call returns.
"""

from __future__ import annotations

import threading
from time import time_ns
from typing import Any

from . import tracing

_local = threading.local()


def end_after_reply(span: Any, error: BaseException | None) -> None:
    """Take ``span``'s end time now; :func:`finish_ended` ends it with that time (ERROR when
    ``error`` is given) once the reply is out. None is ignored."""
    if span is None:
        return
    end = time_ns()
    try:
        waiting: list[tuple[Any, BaseException | None, int]] = _local.waiting
    except AttributeError:
        waiting = _local.waiting = []
    waiting.append((span, error, end))


def finish_ended() -> None:
    """End every span of this thread's served calls that took its end time (their replies
    have been sent)."""
    waiting: list[tuple[Any, BaseException | None, int]] | None = getattr(_local, "waiting", None)
    if not waiting:
        return
    ended = waiting[:]
    waiting.clear()
    lean = tracing._LeanSpan
    for span, error, end in ended:
        if error is None and type(span) is lean:
            span.end(end)  # what end_span does for a lean span that did not fail
        else:
            tracing.end_span(span, error, end)

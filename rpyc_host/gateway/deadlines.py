"""A request's call context from its HTTP headers: deadline, trace context and request id.

- ``X-Request-Timeout: 2.5`` (seconds) or gRPC's ``grpc-timeout: 2500m`` (an integer and a unit:
  ``H`` hours, ``M`` minutes, ``S`` seconds, ``m`` milliseconds, ``u`` microseconds, ``n``
  nanoseconds) set the deadline of every call the request makes; a service the call reaches
  sees it in ``rpyc_host.wire.context.current()`` and passes what is left on to the services
  it calls. A request whose deadline passes is answered ``504 Gateway Timeout``.
- ``traceparent`` / ``tracestate`` (W3C) make the calls' spans children of the caller's.
- ``X-Request-Id`` labels the calls in every service's log (one is made up when the request
  names a deadline or a trace but no id; a request with none of these headers has no context).
"""

from __future__ import annotations

import math
import re

from ..wire.context import MAX_TEXT, CallContext, new_request_id
from .http import HTTPError

# The headers that make a call context; a request with none of them runs without one.
CONTEXT_HEADERS = ("x-request-timeout", "grpc-timeout", "traceparent", "x-request-id")
GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC = re.compile(r"(\d{1,8})([HMSmun])")
MAX_TIMEOUT = 24 * 3600.0


def timeout_of(headers: dict[str, str]) -> float | None:
    """Seconds the request allows, from ``X-Request-Timeout`` or ``grpc-timeout``; None if neither.

    Raises:
        HTTPError: 400 for a value that is not a timeout, naming the header and the forms it takes.
    """
    text = headers.get("x-request-timeout")
    if text is not None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= MAX_TIMEOUT:
            raise HTTPError(
                400, f"X-Request-Timeout: {text[:40]!r} is not a number of seconds (0 < t <= {MAX_TIMEOUT:g})"
            )
        return seconds
    text = headers.get("grpc-timeout")
    if text is not None:
        match = _GRPC.fullmatch(text.strip())
        if match is None or int(match.group(1)) == 0:
            raise HTTPError(
                400, f"grpc-timeout: {text[:40]!r} is not an integer of 1-8 digits and a unit (H M S m u n)"
            )
        return min(MAX_TIMEOUT, int(match.group(1)) * GRPC_UNITS[match.group(2)])
    return None


def context_of(headers: dict[str, str]) -> CallContext:
    """The call context for the calls one request makes."""
    request_id = headers.get("x-request-id")
    if request_id is None or not request_id or len(request_id) > MAX_TEXT:
        request_id = new_request_id()
    parent = headers.get("traceparent")
    state = headers.get("tracestate") if parent else None
    ctx = CallContext(
        traceparent=parent if parent and len(parent) <= MAX_TEXT else None,
        tracestate=state if state and len(state) <= MAX_TEXT else None,
        request_id=request_id,
    )
    return ctx.narrowed(timeout_of(headers))

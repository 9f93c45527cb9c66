"""The call context: a deadline, W3C trace context and a request id that travel with each call.

rpyc frames carry no header, so the context rides as one extra keyword argument of an rpyc
call request, named :data:`KWARG` (a name no service method takes). The host's connections take
it off before the method runs; a call without it (a plain ``rpyc.connect`` client) is served
exactly as before, and such a client is never sent one (see :data:`MARKER`). The client
library's connections (:class:`~rpyc_host.wire.remote.WireConnection`) give it to every
call: the deadline is the connection's timeout, narrowed by any :func:`deadline` block and by
the context of the call being served (so a service calling another service hands on the time
its own caller has left). A host derives it for a call that carries nothing more than the
connection's timeout, which it is told once (:mod:`rpyc_host.wire.contextwire`).

Usage::

    with context.deadline(0.2):          # calls in this block: 200 ms each, at most
        conn.root.slow()                 # DeadlineExceeded after 200 ms
    ctx = context.current()              # inside a service method: the caller's context

On the wire the context is ``(seconds left or None, traceparent, tracestate, request id)``, or
the same fields as one string: time left rather than a clock reading, so the two machines'
clocks need not agree.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

KWARG = "__rpyc_host_context__"
# A host's services answer this exposed attribute; a client sends contexts only to peers that
# do (a stock rpyc server would hand the extra keyword to the method), and a host only to
# clients that sent one first.
MARKER = "rpyc_host_context"
VERSION = 1
# A host also answers this one: it takes the compact text form and derives a call's context
# when the client sends none after telling the connection's timeout (rpyc_host.wire.contextwire).
# Version 2 takes the text as the keyword pair; version 3 also takes it in place of the keyword
# arguments of a call that has none (one string for brine, not two nested tuples).
TEXT_MARKER = "rpyc_host_context_text"
TEXT_VERSION = 3
TEXT_IN_PAIR = 2  # the oldest version that takes the text form
MAX_TEXT = 512  # traceparent is 55 characters; tracestate at most 512 by the W3C spec


@dataclass(frozen=True, slots=True)
class CallContext:
    """One call's context; ``deadline`` is a ``time.monotonic()`` reading on this machine."""

    deadline: float | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    request_id: str | None = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed), None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def narrowed(self, timeout: float | None) -> CallContext:
        """This context with a deadline no later than ``timeout`` seconds from now."""
        if timeout is None:
            return self
        candidate = time.monotonic() + timeout
        if self.deadline is not None and self.deadline <= candidate:
            return self
        return replace(self, deadline=candidate)

    def to_wire(self) -> tuple[float | None, str | None, str | None, str | None]:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        return (left, self.traceparent, self.tracestate, self.request_id)

    @classmethod
    def from_wire(cls, value: Any) -> CallContext | None:
        """The context a peer sent, or None if it is not one (anything malformed is ignored)."""
        if type(value) is not tuple or len(value) != 4:
            return None
        left, parent, state, request_id = value
        for text in (parent, state, request_id):
            if text is not None and (type(text) is not str or len(text) > MAX_TEXT):
                return None
        if left is None:
            return cls(None, parent, state, request_id)
        if (type(left) is not float and type(left) is not int) or left != left:  # NaN
            return None
        return cls(time.monotonic() + max(-1.0, min(left, 31_536_000.0)), parent, state, request_id)


class Lazy:
    """A call's context built on first read (:func:`current`), since most calls never read
    theirs."""

    __slots__ = ()

    def build(self) -> CallContext:
        raise NotImplementedError


class Derived(Lazy):
    """The context of a call that arrived without one on a connection whose client told its
    timeout (:mod:`rpyc_host.wire.contextwire`): built on first read, since most calls never
    read theirs."""

    __slots__ = ("_arrived", "_built", "_timeout")

    def __init__(self, timeout: float | None, arrived: float) -> None:
        self._timeout, self._arrived = timeout, arrived
        self._built: CallContext | None = None

    def build(self) -> CallContext:
        built = self._built
        if built is None:
            deadline = None if self._timeout is None else self._arrived + self._timeout
            built = self._built = CallContext(deadline, None, None, new_request_id())
        return built


_CURRENT: contextvars.ContextVar[CallContext | Lazy | None] = contextvars.ContextVar(
    "rpyc_host_call", default=None
)


def current() -> CallContext | None:
    """The context of the call being served or made in this thread, if any."""
    ctx = _CURRENT.get()
    return ctx.build() if isinstance(ctx, Lazy) else ctx


@contextmanager
def use(ctx: CallContext | None) -> Iterator[CallContext | None]:
    """Make ``ctx`` the current context for the block."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@contextmanager
def deadline(timeout: float, request_id: str | None = None) -> Iterator[CallContext]:
    """Calls made in this block must finish within ``timeout`` seconds (or sooner, if the
    enclosing context says so); ``request_id`` labels them in every service's log."""
    base = current() or CallContext()
    ctx = base.narrowed(timeout)
    if request_id is not None:
        ctx = replace(ctx, request_id=request_id)
    with use(ctx):
        yield ctx


# A random prefix per process and a counter: unique across hosts in practice, and cheap enough
# to give every call one (os.urandom per call costs a system call).
_ID_PREFIX = os.urandom(5).hex()
_IDS = itertools.count(1)


def new_request_id() -> str:
    """A request id: unique enough to find one request's lines in the logs of several hosts."""
    return f"{_ID_PREFIX}{next(_IDS):06x}"


def outgoing(timeout: float | None) -> CallContext:
    """The context for a call about to be sent: the current one (or a new request id), with a
    deadline no later than ``timeout`` from now."""
    base = current()
    if base is None:  # the common case, kept cheap: one object, no copies
        deadline = None if timeout is None else time.monotonic() + timeout
        return CallContext(deadline, None, None, new_request_id())
    if base.request_id is None:
        base = replace(base, request_id=new_request_id())
    return base.narrowed(timeout)

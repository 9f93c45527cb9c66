"""The call context's compact wire form, and the connection default a peer is told once.

A host that exposes :data:`~rpyc_host.wire.context.TEXT_MARKER` takes the context as one
``str`` (brine encodes it in one step, where a 4-tuple costs an item each way)::

    "<seconds left>\\x1f<traceparent>\\x1f<tracestate>\\x1f<request id>[\\x1f<default timeout>]"

with an empty field for None; the seconds are written to the microsecond, and a call whose
deadline is its connection's timeout from now sends that timeout's text, made once. It
travels as the ``(KWARG, text)`` keyword pair, or, to a host answering version 3 and for a
call with no keyword arguments, as the text alone in the place of the keyword pairs: brine
then writes one string where the pair costs two nested tuples, and each side boxes, dumps and
loads about 4 us less per call here.

The optional fifth field tells the host the client's connection timeout, once: from then on a
call with nothing else to carry (no enclosing context, the connection's own timeout, no trace)
is sent with no context at all, and the host derives it: the deadline is that timeout from
arrival, the request id one of its own. Fields holding the separator are not written as text:
such a context goes as the 4-tuple every host reads.
"""

from __future__ import annotations

import time
from typing import Any, Final

from .context import MAX_TEXT, CallContext, Derived, Lazy

SEP: Final = "\x1f"
MAX_WIRE: Final = 4 * MAX_TEXT + 128


class _NotTold:
    """The type of :data:`NOT_TOLD`."""

    def __repr__(self) -> str:
        return "NOT_TOLD"


NOT_TOLD: Final = _NotTold()  # no connection default announced (None is a default: no deadline)


def seconds_text(seconds: float) -> str:
    """``seconds`` as the text field: to the microsecond (``repr`` of a float costs three
    times as much, for digits no deadline needs)."""
    return f"{seconds:.6f}"


def encode(
    deadline: float | None,
    parent: str | None,
    state: str | None,
    request_id: str | None,
    default: float | _NotTold | None = NOT_TOLD,
    left_text: str | None = None,
) -> Any:
    """The wire form of a context (``deadline`` a ``time.monotonic()`` reading), telling the
    connection's ``default`` timeout too (unless NOT_TOLD); the 4-tuple when a field holds the
    separator. ``left_text``, when given, is the time left already as text (a connection's
    timeout, for a call whose deadline is that timeout from now)."""
    if (state is not None and SEP in state) or (request_id is not None and SEP in request_id):
        left = None if deadline is None else deadline - time.monotonic()
        return (left, parent, state, request_id)
    if left_text is None:
        left_text = "" if deadline is None else seconds_text(deadline - time.monotonic())
    text = f"{left_text}{SEP}{parent or ''}{SEP}{state or ''}{SEP}{request_id or ''}"
    if default is NOT_TOLD:
        return text
    return f"{text}{SEP}{'' if default is None else default!r}"


# The seconds of the time-left texts seen lately: most calls carry their connection's timeout
# unchanged (the same few texts), and parsing a float costs more than looking it up.
_SECONDS_SEEN: dict[str, float] = {}
_SECONDS_KEPT = 64


def _seconds(text: str) -> float:
    """A finite number of seconds, clamped to [-1 s, 1 year]; ValueError if it is not one."""
    seen = _SECONDS_SEEN.get(text)
    if seen is not None:
        return seen
    value = _parsed_seconds(text)
    if len(_SECONDS_SEEN) >= _SECONDS_KEPT:
        _SECONDS_SEEN.clear()
    _SECONDS_SEEN[text] = value
    return value


def _parsed_seconds(text: str) -> float:
    value = float(text)
    if value != value or text.strip() != text:  # NaN; float() would also accept padding
        raise ValueError(text)
    return -1.0 if value < -1.0 else 31_536_000.0 if value > 31_536_000.0 else value


class Sent(Lazy):
    """The context a call request carried as text, made a :class:`CallContext` when first
    read (most calls never read theirs); its deadline and trace fields read without that."""

    __slots__ = ("_built", "_fields", "deadline")

    def __init__(self, deadline: float | None, fields: list[str]) -> None:
        self.deadline, self._fields = deadline, fields
        self._built: CallContext | None = None

    @property
    def traceparent(self) -> str | None:
        return self._fields[1] or None

    @property
    def tracestate(self) -> str | None:
        return self._fields[2] or None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def build(self) -> CallContext:
        built = self._built
        if built is None:
            _, parent, state, request_id = self._fields[:4]
            built = self._built = CallContext(
                self.deadline, parent or None, state or None, request_id or None
            )
        return built


def decode(value: Any) -> tuple[CallContext | None, float | _NotTold | None]:
    """``(context, connection default)`` from what a peer sent as the context: the text form or
    the 4-tuple; ``(None, NOT_TOLD)`` for anything malformed (it is ignored, like a bad tuple)."""
    ctx, default = decode_lazily(value)
    return (ctx.build() if isinstance(ctx, Sent) else ctx), default


def decode_lazily(value: Any) -> tuple[CallContext | Sent | None, float | _NotTold | None]:
    """What :func:`decode` reads, the text form as a :class:`Sent` (checked as strictly)."""
    if type(value) is not str:
        return CallContext.from_wire(value), NOT_TOLD
    size = len(value)
    if size > MAX_WIRE:
        return None, NOT_TOLD
    fields = value.split(SEP)
    count = len(fields)
    if (count != 4 and count != 5) or (size > MAX_TEXT and max(map(len, fields)) > MAX_TEXT):
        return None, NOT_TOLD
    left = fields[0]
    try:
        # _seconds(left), with its usual case (a text seen lately) read here without its frame
        seconds = _SECONDS_SEEN.get(left) if left else None
        if seconds is None and left:
            seconds = _seconds(left)
        deadline = None if seconds is None else time.monotonic() + seconds
        default: float | _NotTold | None = NOT_TOLD
        if count == 5:
            default = _seconds(fields[4]) if fields[4] else None
    except ValueError:
        return None, NOT_TOLD
    sent = _new_sent(Sent)  # what Sent(deadline, fields) makes, without its frame
    sent.deadline, sent._fields, sent._built = deadline, fields, None
    return sent, default


_new_sent = object.__new__


def derived(default: float | None) -> Derived:
    """The context of a call sent without one on a connection whose default is ``default``:
    what the client would have sent (its timeout from now; a request id, made here), built
    when it is first read."""
    return Derived(default, time.monotonic())

"""Errors raised on the other side, as this side reads them: their own type, a clean message.

rpyc rebuilds a remote exception as a subclass of its type whose ``str()`` appends a
``========= Remote Traceback (1) =========`` banner and the traceback text (``<traceback
denied>`` from a host). :class:`WireConnection` rebuilds it once more, at the wire, as the plain
type: ``str(exc)`` is the message alone, ``except ValueError`` still works, and the traceback
text stays on ``exc._remote_tb`` for whoever wants it. :func:`is_remote` tells a service's error
from a local one; :func:`describe` gives the one line a person reads.

:class:`WireConnection` also closes promptly when its owner gives up: rpyc's ``close()`` sends a
close request and waits for the answer, which a server busy with the call that was interrupted
(Ctrl-C, a deadline) gives only when that call ends. With a request still unanswered the socket
is shut first, so ``close()`` returns at once. A stream a host returns (an iterator result,
:mod:`rpyc_host.wire.streams`) arrives as a :class:`~rpyc_host.wire.stream_reader.StreamReader`.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from rpyc.core import consts, netref
from rpyc.core.protocol import Connection

from . import afterreply, context, contextwire, tracing
from .errors import DeadlineExceeded
from .stream_reader import StreamReader
from .streams import STREAM_TYPE

REMOTE_TB = "_remote_tb"
_DEADLINE = (DeadlineExceeded.__module__, DeadlineExceeded.__name__)


def clean(exc: Any, raw: Any) -> Any:
    """``exc`` (what rpyc's vinegar made of ``raw``) as its plain type, attributes kept; a
    deadline the peer refused as :class:`DeadlineExceeded`."""
    if not isinstance(exc, BaseException) or not hasattr(exc, REMOTE_TB):
        return exc
    if isinstance(raw, tuple) and raw and raw[0] == _DEADLINE:
        rebuilt_deadline = DeadlineExceeded(*exc.args)
        setattr(rebuilt_deadline, REMOTE_TB, getattr(exc, REMOTE_TB))
        return rebuilt_deadline
    plain: Any = type(exc).__mro__[1]  # vinegar's subclass sits right above the real type
    try:
        rebuilt = plain.__new__(plain)
        rebuilt.args = exc.args
        for name, value in raw[2]:
            try:
                setattr(rebuilt, name, value)
            except AttributeError:  # read-only attributes: vinegar skips them too
                pass
        setattr(rebuilt, REMOTE_TB, getattr(exc, REMOTE_TB))
    except Exception:  # an exotic type that cannot be rebuilt: keep rpyc's version
        return exc
    return rebuilt


def is_remote(exc: BaseException) -> bool:
    """True for an error the other side raised (and relayed), False for a local one."""
    return hasattr(exc, REMOTE_TB)


def message(exc: BaseException) -> str:
    """The message alone: an OSError's ``strerror`` (rpyc relays it without filenames), else
    ``str()`` without any remote-traceback banner."""
    strerror = getattr(exc, "strerror", None)
    if isinstance(exc, OSError) and isinstance(strerror, str) and strerror:
        return strerror
    if len(exc.args) == 1:
        return str(exc.args[0])
    text = str(exc).split("\n\n========= Remote Traceback")[0].strip()
    return text


def describe(exc: BaseException) -> str:
    """``Type: message`` (the type's own name, also for a service's custom exception)."""
    name = type(exc).__name__.rsplit(".", 1)[-1]
    text = message(exc)
    return f"{name}: {text}" if text else name


def _method_name(obj: Any) -> str:
    name = str(getattr(obj, "__name__", None) or type(obj).__name__)
    return name[len("exposed_") :] if name.startswith("exposed_") else name


class ContextCalls:
    """Connection behaviour both ends share: every call request this side sends carries the
    call context (:mod:`rpyc_host.wire.context`), bounded by the connection's call timeout, to a
    peer that takes it off (a host told the timeout gets none for a call that carries nothing
    more: :mod:`rpyc_host.wire.contextwire`); a call whose deadline has passed is not sent at
    all; with tracing on, each call sent is a CLIENT span (none for an unsampled trace)."""

    _config: dict[str, Any]
    peer_speaks_context = False  # set when the peer is known to take contexts off
    peer_takes_text = False  # set when the peer takes the compact form (rpyc_host.wire.contextwire)
    peer_takes_bare_text = False  # ... and takes it in place of empty keyword arguments
    _told: float | contextwire._NotTold | None = contextwire.NOT_TOLD  # the timeout the peer knows
    _method_names: dict[Any, str] | None = None  # netref id -> attribute name, for span names
    _peer_label: str | None = None  # the service name CLIENT spans carry (peer_service)
    _left_for: float | None = None  # the call timeout whose text _left_text holds
    _left_text = ""

    def async_request(self, handler: int, *args: Any, **kwargs: Any) -> Any:
        result, span = self._request(handler, args, kwargs)
        if span is not None:
            self._open_spans[id(result)] = span
            result.add_callback(lambda res: self._end_span(res, res._obj if res.error else None))
        return result

    def _request(self, handler: int, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """``(rpyc's async result, CLIENT span or None)`` for a request; the caller ends the span."""
        traced = tracing._tracer is not None  # what tracing.active() reads, without the call
        if handler != consts.HANDLE_CALL or len(args) != 3:
            if handler == consts.HANDLE_GETATTR and traced:
                return self._remember_name(super().async_request(handler, *args, **kwargs), args), None  # type: ignore[misc]
            return super().async_request(handler, *args, **kwargs), None  # type: ignore[misc]
        if not self.peer_speaks_context and not traced:
            return super().async_request(handler, *args, **kwargs), None  # type: ignore[misc]
        limit = kwargs.get("timeout") or self._config.get("sync_request_timeout")
        if not traced and limit == self._told and context._CURRENT.get() is None:
            # Nothing the host cannot derive (its timeout is told, no trace, no enclosing
            # context): send no context at all.
            return super().async_request(handler, *args, **kwargs), None  # type: ignore[misc]
        # The context's fields as locals: no CallContext is built for the call being sent.
        base = context._CURRENT.get()  # context.current(), without its frame
        if base is not None and isinstance(base, context.Lazy):
            base = base.build()
        request_id: str | None
        left_text = None
        if base is None:
            deadline = None if limit is None else time.monotonic() + limit
            parent = state = None
            request_id = context.new_request_id()
            if limit is not None:  # the time left is the limit itself: its text made once
                if limit != self._left_for:
                    self._left_for, self._left_text = limit, contextwire.seconds_text(limit)
                left_text = self._left_text
        else:
            ctx = context.outgoing(limit)
            deadline, parent, state, request_id = (
                ctx.deadline,
                ctx.traceparent,
                ctx.tracestate,
                ctx.request_id,
            )
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the call's deadline passed before it was sent")
            kwargs["timeout"] = left
        obj, call_args, call_kwargs = args
        span = None
        if traced:
            service = self._peer_label
            if service is None:
                service = self._peer_label = str(self._config.get("peer_service") or "rpyc")
            span, parent, state = tracing.start_call(service, self._name_of(obj), parent, state)
        telling = False
        if self.peer_takes_text and self.peer_speaks_context:
            default = self._config.get("sync_request_timeout")
            telling = default != self._told
            wire = contextwire.encode(
                deadline, parent, state, request_id, default if telling else contextwire.NOT_TOLD, left_text
            )
            telling = telling and type(wire) is str
            if not call_kwargs and self.peer_takes_bare_text and type(wire) is str:
                args = (obj, call_args, wire)  # one string where the keyword pairs would go
            else:
                args = (obj, call_args, (*tuple(call_kwargs), (context.KWARG, wire)))
        elif self.peer_speaks_context:
            ctx = context.CallContext(deadline, parent, state, request_id)
            args = (obj, call_args, (*tuple(call_kwargs), (context.KWARG, ctx.to_wire())))
        try:
            result = super().async_request(handler, *args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            tracing.end_span(span, exc)
            raise
        if telling:
            result.add_callback(lambda res, told=default: self._was_told(res, told))
        return result, span

    def _was_told(self, result: Any, default: float | None) -> None:
        # A reply means the peer read the request, and with it the default; an error might be
        # a refusal before it was read, so the next call tells it again.
        if not result.error:
            self._told = default

    def sync_request(self, handler: int, *args: Any) -> Any:
        # rpyc's own sync_request, with a deadline's timeout read as DeadlineExceeded; the
        # call's span ends here, without a callback on the reply.
        result, span = self._request(handler, args, {"timeout": self._config["sync_request_timeout"]})
        try:
            value = result.value
        except TimeoutError as exc:
            tracing.end_span(span, exc)
            if handler == consts.HANDLE_CALL and not is_remote(exc) and not isinstance(exc, DeadlineExceeded):
                raise DeadlineExceeded("no reply before the call's deadline") from None
            raise
        except BaseException as exc:
            tracing.end_span(span, exc)
            raise
        if span is not None:
            span.end()  # what end_span(span, None) does, for a lean span and the SDK's alike
        return value

    @property
    def _open_spans(self) -> dict[int, Any]:
        spans: dict[int, Any] | None = self.__dict__.get("_spans")
        if spans is None:
            spans = self.__dict__["_spans"] = {}
        return spans

    def _end_span(self, result: Any, error: BaseException | None) -> None:
        span = self._open_spans.pop(id(result), None)
        if span is not None:
            tracing.end_span(span, error)

    def _remember_name(self, result: Any, args: Any) -> Any:
        names = self._method_names
        if names is None:
            names = self._method_names = {}
        name = str(args[1]) if len(args) > 1 else "?"

        def record(res: Any) -> None:
            if not res.error and len(names) < 4096:
                try:
                    names[object.__getattribute__(res._obj, "____id_pack__")] = name
                except (AttributeError, TypeError):
                    pass  # a plain value, not a remote object

        result.add_callback(record)
        return result

    def _name_of(self, obj: Any) -> str:
        names = self._method_names
        if names:
            try:
                return names.get(object.__getattribute__(obj, "____id_pack__"), "call")
            except (AttributeError, TypeError):
                pass
        return "call"


class ContextServing:
    """Connection behaviour both ends share: a call request that carries a call context is run
    in it (:func:`rpyc_host.wire.context.current` inside the method), and refused unstarted with
    :class:`DeadlineExceeded` when its deadline passed before it arrived. A request without one
    is served exactly as rpyc serves it. With tracing on, each call served is a SERVER span,
    child of the caller's span."""

    # Whether a thread serving this connection's calls may keep an OpenTelemetry context of
    # its own for good (tracing.attach): a host's serving threads run nothing but calls; a
    # client's thread serving callbacks is the application's.
    keeps_span_view = False

    @classmethod
    def _request_handlers(cls) -> dict[int, Any]:
        handlers: dict[int, Any] = super()._request_handlers()  # type: ignore[misc]
        inner = handlers[consts.HANDLE_CALL]

        def handle_call(self: Any, obj: Any, args: Any, kwargs: Any = ()) -> Any:
            ctx: context.CallContext | context.Derived | contextwire.Sent | None
            if type(kwargs) is str:  # the text form in place of no keyword arguments
                ctx = self._context_sent(kwargs)
                kwargs = ()
            elif kwargs and type(kwargs) is tuple and kwargs[-1][0] == context.KWARG:
                ctx = self._context_sent(kwargs[-1][1])
                kwargs = kwargs[:-1]
            else:
                told = self.__dict__.get("_told_by_peer", contextwire.NOT_TOLD)
                ctx = None if told is contextwire.NOT_TOLD else contextwire.derived(told)
            if tracing._tracer is not None:
                if isinstance(ctx, context.Derived):
                    ctx = ctx.build()
                return _traced(self, inner, ctx, obj, args, kwargs)
            if ctx is None:
                return inner(self, obj, args, kwargs)
            token = context._CURRENT.set(ctx)  # what context.use does, without its generator
            try:
                return inner(self, obj, args, kwargs)
            finally:
                context._CURRENT.reset(token)

        handlers[consts.HANDLE_CALL] = handle_call
        return handlers

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        try:
            super()._dispatch_request(seq, raw_args)  # type: ignore[misc]
        finally:
            # The reply is sent (or could not be): the call's SERVER span, its end time taken
            # when the method returned, goes to the processors now, off the caller's wait.
            afterreply.finish_ended()

    def _context_sent(self, value: Any) -> context.CallContext | contextwire.Sent | None:
        """The context a call request carried (None if malformed), remembering a default it
        told; DeadlineExceeded if its deadline passed before it arrived."""
        ctx, told = contextwire.decode_lazily(value)
        if told is not contextwire.NOT_TOLD:
            self._told_by_peer = told
        if ctx is not None:
            self.peer_speaks_context = True  # its callbacks may carry contexts too
            deadline = ctx.deadline  # ctx.expired(), without its frame
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the call's deadline had passed when it arrived; it was not started")
        return ctx


def _traced(
    conn: Any,
    inner: Any,
    ctx: context.CallContext | contextwire.Sent | None,
    obj: Any,
    args: Any,
    kwargs: Any,
) -> Any:
    # Every call served with tracing on runs this: fields and steps are read and taken here
    # rather than through the helpers that would each cost a frame.
    if type(ctx) is contextwire.Sent:
        fields = ctx._fields
        parent, state = fields[1] or None, fields[2] or None
    elif ctx is not None:
        parent, state = ctx.traceparent, ctx.tracestate
    else:
        parent = state = None
    if ctx is not None and not tracing.server_span_needed(parent):
        # The caller's trace is not recorded (nor would this span be), or its CLIENT span is
        # the one wanted: no span work at all; the caller's traceparent goes on as it is.
        token = context._CURRENT.set(ctx)
        try:
            return inner(conn, obj, args, kwargs)
        finally:
            context._CURRENT.reset(token)
    service, method = _span_names(conn, obj)
    lean = tracing._lean
    span = lean.start_served(service, method, parent, state) if lean is not None else None
    if span is None:
        span = tracing.start_server_span(service, method, parent, state)
    served = _new_served(_ServedContext)  # what _ServedContext(ctx, span, parent, state) makes
    served._caller, served._span, served._built = ctx, span, None
    served._parent, served._state = parent, state
    token = context._CURRENT.set(served)
    # Service code's spans are its children: the span is OpenTelemetry's current one. A thread
    # that keeps the serving context (tracing.attach with for_good) only sets the served span.
    views = tracing._leanspan
    kept = (  # whether this thread keeps the serving context (leanspan.attach, for_good)
        views is not None
        and type(span) is views.LeanSpan
        and views.RUNTIME_VAR is not None
        and views.RUNTIME_VAR.get() is views.SERVING
    )
    current = views.SERVED.set(span) if kept else tracing.attach(span, conn.keeps_span_view)
    try:
        result = inner(conn, obj, args, kwargs)
    except BaseException as exc:
        afterreply.end_after_reply(span, exc)
        raise
    finally:
        if kept:
            views.SERVED.reset(current)
        else:
            tracing.detach(current)
        context._CURRENT.reset(token)
    afterreply.end_after_reply(span, None)  # ended once the reply is sent (_dispatch_request)
    return result


_NAMES_KEPT = 256  # (service, method) names of the objects a connection's calls were made on


def _span_names(conn: Any, obj: Any) -> tuple[str, str]:
    """``(service, method)`` for the span of a call on ``obj``, kept per connection: a client
    calls the same few methods over and over."""
    names: dict[Any, tuple[str, str]] | None = conn.__dict__.get("_span_names")
    if names is None:
        names = conn.__dict__["_span_names"] = {}
    try:
        found = names.get(obj)
    except Exception:  # not a key (unhashable, or an __eq__ that raises): named each time
        found, names = None, None
    if found is None:
        config = conn._config
        found = (str(config.get("host_service") or config.get("peer_service") or "rpyc"), _method_name(obj))
        if names is not None:
            if len(names) >= _NAMES_KEPT:
                names.clear()
            names[obj] = found
    return found


class _ServedContext(context.Lazy):
    """The context of a call served under a SERVER span: the caller's, with the span as the
    parent of what the call calls; built when first read (most calls never read theirs)."""

    __slots__ = ("_built", "_caller", "_parent", "_span", "_state")

    def __init__(
        self,
        caller: context.CallContext | contextwire.Sent | None,
        span: Any,
        parent: str | None,
        state: str | None,
    ) -> None:
        self._caller, self._span, self._parent, self._state = caller, span, parent, state
        self._built: context.CallContext | None = None

    def build(self) -> context.CallContext:
        built = self._built
        if built is None:
            span, sent = self._span, self._caller
            caller = sent.build() if isinstance(sent, contextwire.Sent) else sent
            mine = tracing.headers_of(span) if span is not None else (self._parent, self._state)
            built = self._built = (
                context.CallContext(caller.deadline, *mine, caller.request_id)
                if caller
                else context.CallContext(None, *mine)
            )
        return built


_new_served = object.__new__

_STREAM_REF = netref.class_factory((STREAM_TYPE, 0, 0), [])


class WireConnection(ContextServing, ContextCalls, Connection):
    """An rpyc ``Connection`` whose remote errors read cleanly, whose calls carry their context,
    and whose close never waits on a busy peer; see the module docstring."""

    def _unbox_exc(self, raw: Any) -> Any:
        return clean(super()._unbox_exc(raw), raw)

    def _unbox(self, package: Any) -> Any:
        # A host's stream becomes a local iterator that fetches chunks (wire/stream_reader.py).
        obj = super()._unbox(package)
        if package[0] == consts.LABEL_REMOTE_REF and package[1][0] == STREAM_TYPE:
            return StreamReader(self, obj)
        return obj

    def _netref_factory(self, id_pack: Any) -> Any:
        if id_pack[0] == STREAM_TYPE:  # only ever called through its reader: no class to inspect
            return _STREAM_REF(self, id_pack)
        return super()._netref_factory(id_pack)

    def close(self) -> None:
        if not self._closed and self._request_callbacks:
            # A request is unanswered (interrupted, timed out): the polite close request would
            # wait behind it. Shut the socket: the peer sees EOF and runs its disconnect hooks.
            sock = getattr(getattr(self._channel, "stream", None), "sock", None)
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().close()

"""The rpyc connection settings and connection class the host serves with.

rpyc's defaults send server tracebacks and versions to clients; the host keeps them in its own
log instead. Attribute access is limited to exposed names and rpyc's safe dunders; pickling,
setattr and delattr stay off.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from rpyc.core import brine
from rpyc.core.async_ import AsyncResultTimeout
from rpyc.core.netref import BaseNetref
from rpyc.core.protocol import Connection
from rpyc.lib import Timeout

from . import batching, oneway_calls
from .batching import BATCH, MODEL_ATTR
from .budget import CONFIG_KEY
from .errors import did_you_mean
from .instances import PER_CALL_KEY, call_target
from .oneway_calls import ONEWAY
from .streams import PLAIN_RESULTS, as_stream
from .wire.errors import DeadlineExceeded
from .wire.remote import ContextCalls, ContextServing

SAFE_PROTOCOL: dict[str, Any] = {
    "allow_safe_attrs": True,
    "allow_exposed_attrs": True,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_pickle": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "include_local_traceback": False,
    "include_local_version": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "instantiate_oldstyle_exceptions": False,
    # rpyc logs every remote exception with a traceback at DEBUG; HostConnection logs them.
    "log_exceptions": False,
    "sync_request_timeout": 30,
}


class InflightTracker:
    """Counts requests being dispatched, so a graceful stop can wait for them to finish.

    enter/exit run on every request: each is one ``next()`` on an ``itertools.count``, atomic in
    CPython without a lock; in flight = entered - exited. Waiting (only at shutdown) polls.
    """

    def __init__(self) -> None:
        self._entered = itertools.count()
        self._exited = itertools.count()
        self.enter = self._entered.__next__
        self.exit = self._exited.__next__

    @property
    def count(self) -> int:
        # count.__reduce__() is (count, (next value,)): a read without an increment.
        return int(self._entered.__reduce__()[1][0]) - int(self._exited.__reduce__()[1][0])

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


# Containers a client passes by reference are copied to local values before a method sees them,
# within these bounds; callables and other objects stay remote (callbacks, by design).
PLAIN_CONTAINERS: dict[str, type] = {
    "builtins.list": list,
    "builtins.dict": dict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
}
_SCALARS = frozenset({int, float, str, bytes, bool, type(None), complex})
# Items copied for one request's arguments, all containers together.
MAX_ARG_ITEMS = 100_000
MAX_ARG_DEPTH = 32


class _ItemCount:
    """Items copied so far for one request; counted as they arrive, never from ``__len__``."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_ARG_ITEMS

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise ValueError(
                f"arguments hold more than {MAX_ARG_ITEMS} items in lists, dicts and sets "
                f"(the limit is {MAX_ARG_ITEMS}); send one serialized payload instead"
            )

    def pull(self, remote: Any) -> Iterator[Any]:
        """Iterate a remote container, counting each item before it is kept."""
        for item in remote:  # a remote iterator: one round trip per item, each within the budget
            self.take()
            yield item


def to_plain(value: Any, depth: int = 0, count: _ItemCount | None = None) -> Any:
    """Copy remote lists/dicts/sets (and tuples holding them) into local values.

    Items are counted as they are pulled (a client's ``__len__`` may lie), across every
    argument sharing ``count``.

    Raises:
        ValueError: nesting deeper than MAX_ARG_DEPTH or more than MAX_ARG_ITEMS items.
        TypeError: one of this server's own objects passed back as an argument.
    """
    if depth > MAX_ARG_DEPTH:
        raise ValueError(f"argument nested deeper than {MAX_ARG_DEPTH} levels")
    if count is None:
        count = _ItemCount()
    if isinstance(value, BaseNetref):
        kind = PLAIN_CONTAINERS.get(object.__getattribute__(value, "____id_pack__")[0])
        if kind is None:
            return value  # a callback or live object of the client's: it stays remote
        if kind is dict:
            # Only safe dunders (__iter__, __getitem__): the client's config refuses .items().
            keys = [to_plain(k, depth + 1, count) for k in count.pull(value)]
            return {k: to_plain(value[k], depth + 1, count) for k in keys}
        return kind([to_plain(v, depth + 1, count) for v in count.pull(value)])
    if type(value) is tuple:
        if brine.dumpable(value):
            return value
        return tuple(to_plain(v, depth + 1, count) for v in value)
    if not brine.dumpable(value):
        raise TypeError(
            f"an argument of type {type(value).__name__} is one of this server's own objects passed back; "
            "pass plain values (str, bytes, numbers, tuples, lists, dicts) instead"
        )
    return value


def harden_netrefs() -> None:
    """Make pickling a remote object fail: unpickling what the peer sends would run its code."""

    def refuse(self: Any, proto: Any) -> Any:
        raise TypeError("refusing to pickle a remote object (unpickling it would run code the peer chose)")

    BaseNetref.__reduce_ex__ = refuse


class RequestTimeout(TimeoutError):
    """A request's round trips to its own client, together, outlasted ``limits.request_timeout``."""


class RequestHost(Protocol):
    """What a host server offers its connections (``host_server`` in the connection config)."""

    @property
    def limits(self) -> Any: ...  # a LimitsSection, read per request so a reload applies

    def waiting(self, conn: Any) -> AbstractContextManager[object]:
        """Held while a request waits on its client (may raise LimitExceeded)."""
        ...


class _Request:
    """One request being handled on this thread: when it started, and whether its time ran out."""

    __slots__ = ("expired", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.expired = False


# Requests being handled, per thread, by id(connection). A nested request (the client calling
# back in while the server waits on it) runs on the same thread and shares the outer one's clock.
_handling = threading.local()
NO_WAIT: AbstractContextManager[object] = nullcontext()


def _requests() -> dict[int, _Request | float]:
    """This thread's requests: a request's start time, made a _Request once it waits on its client
    (most never do, and building one for each costs more than the rest of the bookkeeping)."""
    try:
        return _handling.by_conn
    except AttributeError:
        _handling.by_conn = {}
        return _handling.by_conn


def _always() -> bool:
    return True


class HostConnection(ContextServing, ContextCalls, Connection):
    """An rpyc ``Connection`` that counts requests in flight, bounds the time a request may
    spend waiting on its client, and logs remote errors locally; calls run in the call context
    their client sent (:mod:`rpyc_host.wire.context`), whose deadline may cut waits shorter.

    The host passes ``host_tracker`` (an :class:`InflightTracker`), ``host_logger`` and
    ``host_server`` (a :class:`RequestHost`) in the connection config. Every round trip the
    server makes to the client while handling a request (pulling an argument's items, calling a
    callback) waits at most ``limits.call_timeout``, and all of them together at most
    ``limits.request_timeout`` from the request's start.
    """

    keeps_span_view = True  # its serving threads run only its calls (ContextServing)

    def serve(self, timeout: Any = 1, wait_for_lock: bool = True, waiting: Any = _always) -> bool:
        """rpyc's ``serve``, given plain seconds as the host's serving loops pass them: no
        ``Timeout`` object built and asked for the time left on every request (the streams
        take seconds). A ``Timeout`` (a reply being waited for), a negative timeout (none) or
        thread binding goes to rpyc's own."""
        if self._bind_threads or isinstance(timeout, Timeout) or (timeout is not None and timeout < 0):
            return bool(super().serve(timeout, wait_for_lock, waiting))
        event, lock = self._recv_event, self._recvlock
        with event:
            if not lock.acquire(False):
                if wait_for_lock and waiting():
                    return bool(event.wait(timeout))
                return False
        if not waiting():  # as rpyc: the result arrived while the lock was being taken
            lock.release()
            with event:
                event.notify_all()
            return False
        try:
            data = self._channel.poll(timeout) and self._channel.recv()
        except Exception as exc:
            lock.release()
            if isinstance(exc, EOFError):
                self.close()
            raise
        else:
            if data:
                self._dispatch(data)  # releases the lock once the frame is read
                return True
            lock.release()
            return False
        finally:
            with event:
                event.notify_all()

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        config = self._config
        tracker: InflightTracker | None = config.get("host_tracker")
        if tracker is None:
            super()._dispatch_request(seq, raw_args)
            return
        try:
            handling = _handling.by_conn
        except AttributeError:
            handling = _requests()
        key = id(self)
        outer = key not in handling
        if outer:
            handling[key] = time.monotonic()
        tracker.enter()
        try:
            super()._dispatch_request(seq, raw_args)
        finally:
            tracker.exit()
            if outer:
                del handling[key]

    def sync_request(self, handler: Any, *args: Any) -> Any:
        """A round trip to the client, within the request's time budget."""
        config = self._config
        server: RequestHost | None = config.get("host_server")
        if server is None:
            return super().sync_request(handler, *args)
        call_timeout = float(config["sync_request_timeout"])
        timeout = call_timeout
        handling = _requests()
        held = handling.get(id(self))
        request: _Request | None
        if isinstance(held, float):
            request = handling[id(self)] = _Request(held)
        else:
            request = held
        budget = 0.0
        if request is not None:
            budget = float(server.limits.request_timeout)
            left = request.started + budget - time.monotonic()
            if left <= 0:
                raise self._out_of_time(request, budget)
            timeout = min(call_timeout, left)
        with server.waiting(self):
            sent = time.monotonic()
            # ContextCalls may shorten the wait to the call context's deadline.
            pending = self.async_request(handler, *args, timeout=timeout)
            try:
                return pending.value
            except AsyncResultTimeout:
                if pending._is_ready:
                    raise  # the client's own TimeoutError, passed on as it is
        error: TimeoutError
        if time.monotonic() - sent < timeout - 0.001:
            error = DeadlineExceeded("no reply before the call's deadline")
        elif request is not None and timeout < call_timeout:
            error = self._out_of_time(request, budget)
        else:
            error = TimeoutError(f"the client did not answer within limits.call_timeout ({call_timeout:g} s)")
        self._end_span(pending, error)
        raise error

    def _out_of_time(self, request: _Request, budget: float) -> RequestTimeout:
        if not request.expired:  # counted once, however often the service retries
            request.expired = True
            account = self._config.get(CONFIG_KEY)
            if account is not None:
                account.ledger.count_refusal("request_timeout")
        return RequestTimeout(
            f"the request ran out of time waiting on the client (limits.request_timeout: {budget:g} s "
            "for all of one request's round trips to its client: argument items, callbacks)"
        )

    def _handle_call(self, obj: Any, args: Any, kwargs: Any = ()) -> Any:
        # A batch, or a one-way method (rpyc_host.batching, rpyc_host.oneway_calls). Read from
        # the function's __dict__: a getattr that misses (every plain call) costs 5x as much.
        attrs = getattr(getattr(obj, "__func__", obj), "__dict__", None)
        model = attrs.get(MODEL_ATTR) if attrs else None
        if model == BATCH:
            return batching.run(self, obj.__self__, args, kwargs)
        # Most calls carry only scalars: check types once instead of walking every argument.
        plain_args = args
        count: _ItemCount | None = None  # one count for all of the request's arguments
        for a in args:
            if type(a) not in _SCALARS:
                count = _ItemCount()
                plain_args = tuple(to_plain(v, 0, count) for v in args)
                break
        if kwargs and count is None:
            count = _ItemCount()
        plain_kwargs = {k: to_plain(v, 0, count) for k, v in dict(kwargs).items()} if kwargs else {}
        config = self._config
        if PER_CALL_KEY in config:  # services.<name>.instance: call (one-way calls too)
            obj = call_target(self._local_root, obj)
        if model == ONEWAY:
            return oneway_calls.submit(self, obj, plain_args, plain_kwargs)
        book = config.get("host_calls")
        logger: logging.Logger | None = config.get("host_logger")
        debug = logger is not None and logger.isEnabledFor(logging.DEBUG)
        if book is None and not debug:
            # The usual call: no keywords, a plain result (as_stream's own first check, inline).
            result = obj(*plain_args, **plain_kwargs) if plain_kwargs else obj(*plain_args)
            if type(result) in PLAIN_RESULTS:
                return result
            return as_stream(self, result)  # an iterator goes as a stream
        method = getattr(obj, "__name__", type(obj).__name__)
        failed = True
        started = time.perf_counter()
        try:
            result = as_stream(self, obj(*plain_args, **plain_kwargs))
            failed = False
            return result
        finally:
            elapsed = time.perf_counter() - started
            if book is not None:
                book.record(config.get("host_service", "?"), method, elapsed, failed)
            if debug and logger is not None:
                logger.debug("call %s %.3f ms%s", method, elapsed * 1000, " (raised)" if failed else "")

    def _check_attr(self, obj: Any, name: str, perm: str) -> str:
        """rpyc's check, with a did-you-mean from the exposed names when access is refused."""
        try:
            return str(super()._check_attr(obj, name, perm))
        except AttributeError:
            prefix = self._config["exposed_prefix"]
            exposed = [n[len(prefix) :] for n in dir(obj) if n.startswith(prefix)]
            raise AttributeError(f"cannot access {name!r}{did_you_mean(name, exposed)}") from None

    def _handle_dir(self, obj: Any) -> tuple[str, ...]:
        """Only what a client may access: exposed names (without the prefix) and safe dunders."""
        prefix = self._config["exposed_prefix"]
        safe = self._config["safe_attrs"]
        names = {n[len(prefix) :] for n in dir(obj) if n.startswith(prefix)}
        names.update(n for n in dir(obj) if n in safe)
        return tuple(sorted(names))

    def _box_exc(self, typ: type[BaseException], val: BaseException, tb: Any) -> Any:
        logger: logging.Logger | None = self._config.get("host_logger")
        if logger is not None and typ is not StopIteration:
            # User errors (bad arguments, missing files) are routine; keep their tracebacks at DEBUG
            # and show unexpected ones at WARNING, so the server log has what the client does not.
            routine = isinstance(val, ValueError | TypeError | LookupError | OSError | AttributeError)
            level = logging.DEBUG if routine else logging.WARNING
            logger.log(
                level,
                "[%s] call failed: %s: %s",
                self._config.get("connid"),
                typ.__name__,
                val,
                exc_info=(typ, val, tb),
            )
        if isinstance(val, RequestTimeout):
            # A plain TimeoutError, so any client (which cannot import ours) gets that type.
            typ, val = TimeoutError, TimeoutError(*val.args)
        dumped = super()._box_exc(typ, val, tb)
        if isinstance(val, OSError) and isinstance(dumped, tuple) and len(dumped) == 4:
            # rpyc copies errno/strerror/filename even when None, and the client's rebuilt
            # OSError then prints "[Errno None] None: None -> None" instead of its message.
            name, args, attrs, tbtext = dumped
            dumped = (name, args, tuple((k, v) for k, v in attrs if v is not None), tbtext)
        return dumped

"""The rpyc connection settings and connection class the host serves with.

rpyc's defaults send server tracebacks and versions to clients; the host keeps them in its own
log instead. Attribute access is limited to exposed names and rpyc's safe dunders; pickling,
setattr and delattr stay off.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from rpyc.core import brine
from rpyc.core.netref import BaseNetref
from rpyc.core.protocol import Connection

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
MAX_ARG_ITEMS = 100_000
MAX_ARG_DEPTH = 32


def to_plain(value: Any, depth: int = 0) -> Any:
    """Copy remote lists/dicts/sets (and tuples holding them) into local values.

    Raises:
        ValueError: nesting deeper than MAX_ARG_DEPTH or a container over MAX_ARG_ITEMS.
        TypeError: one of this server's own objects passed back as an argument.
    """
    if depth > MAX_ARG_DEPTH:
        raise ValueError(f"argument nested deeper than {MAX_ARG_DEPTH} levels")
    if isinstance(value, BaseNetref):
        kind = PLAIN_CONTAINERS.get(object.__getattribute__(value, "____id_pack__")[0])
        if kind is None:
            return value  # a callback or live object of the client's: it stays remote
        size = len(value)
        if size > MAX_ARG_ITEMS:
            raise ValueError(
                f"argument has {size} items; the limit is {MAX_ARG_ITEMS} (send one serialized payload)"
            )
        if kind is dict:
            # Only safe dunders (__iter__, __getitem__): the client's config refuses .items().
            return {to_plain(k, depth + 1): to_plain(value[k], depth + 1) for k in tuple(value)}
        return kind(to_plain(v, depth + 1) for v in tuple(value))
    if type(value) is tuple:
        if brine.dumpable(value):
            return value
        return tuple(to_plain(v, depth + 1) for v in value)
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


class HostConnection(ContextServing, ContextCalls, Connection):
    """An rpyc ``Connection`` that counts requests in flight and logs remote errors locally; calls
    run in the call context their client sent (:mod:`rpyc_host.wire.context`).

    The host passes ``host_tracker`` (an :class:`InflightTracker`) and ``host_logger`` in the
    connection config.
    """

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        tracker: InflightTracker | None = self._config.get("host_tracker")
        if tracker is None:
            super()._dispatch_request(seq, raw_args)
            return
        tracker.enter()
        try:
            super()._dispatch_request(seq, raw_args)
        finally:
            tracker.exit()

    def _handle_call(self, obj: Any, args: Any, kwargs: Any = ()) -> Any:
        # Most calls carry only scalars: check types once instead of walking every argument.
        plain_args = args
        for a in args:
            if type(a) not in _SCALARS:
                plain_args = tuple(to_plain(v) for v in args)
                break
        plain_kwargs = {k: to_plain(v) for k, v in dict(kwargs).items()} if kwargs else {}
        config = self._config
        book = config.get("host_calls")
        logger: logging.Logger | None = config.get("host_logger")
        debug = logger is not None and logger.isEnabledFor(logging.DEBUG)
        if book is None and not debug:
            return obj(*plain_args, **plain_kwargs)
        method = getattr(obj, "__name__", type(obj).__name__)
        failed = True
        started = time.perf_counter()
        try:
            result = obj(*plain_args, **plain_kwargs)
            failed = False
            return result
        finally:
            elapsed = time.perf_counter() - started
            if book is not None:
                book.record(config.get("host_service", "?"), method, elapsed, failed)
            if debug and logger is not None:
                logger.debug("call %s %.3f ms%s", method, elapsed * 1000, " (raised)" if failed else "")

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
        dumped = super()._box_exc(typ, val, tb)
        if isinstance(val, OSError) and isinstance(dumped, tuple) and len(dumped) == 4:
            # rpyc copies errno/strerror/filename even when None, and the client's rebuilt
            # OSError then prints "[Errno None] None: None -> None" instead of its message.
            name, args, attrs, tbtext = dumped
            dumped = (name, args, tuple((k, v) for k, v in attrs if v is not None), tbtext)
        return dumped

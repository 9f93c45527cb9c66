"""The server side of batched calls (:mod:`rpyc_host.wire.batch`).

Every served class gets the hidden exposed entry point :func:`entry`; the host's connection
recognises it and runs the batch here instead, each call through the path a single call takes:
the attribute check (only exposed names), argument copying with its own item caps, the call
book, and the call context of the batch's request. One failing call fails only itself. A
deadline that passes stops the remaining calls, each reported as ``DeadlineExceeded``; the
whole batch is one request, so ``limits.request_timeout`` bounds its round trips to the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .wire import context
from .wire.batch import ENTRY, Outcome
from .wire.errors import DeadlineExceeded

if TYPE_CHECKING:
    from .protocol import HostConnection

# What HostConnection._handle_call looks up to tell a batch or one-way method from a plain one.
MODEL_ATTR = "_rpyc_host_call_model"
BATCH = "batch"


def entry(self: Any, calls: Any) -> Any:
    """Run several calls in one request: ``calls`` is a tuple of ``(method, args, kwargs
    pairs)``; answers ``(ok, value or boxed error)`` for each, in order."""
    # Reached only on a connection that is not the host's (HostConnection runs batches itself).
    raise RuntimeError("batches are run by the host's connection")


setattr(entry, MODEL_ATTR, BATCH)


def run(conn: HostConnection, root: Any, args: Any, kwargs: Any) -> tuple[Outcome, ...]:
    """The outcomes of the batch request ``root.rpyc_host_batch(*args, **kwargs)``.

    Raises:
        TypeError: the request is not one tuple of calls.
        ValueError: more calls than ``limits.max_batch_calls`` (nothing was run).
    """
    if kwargs or len(args) != 1 or type(args[0]) is not tuple:
        raise TypeError(f"{ENTRY}(calls) takes one tuple of (method, args tuple, kwargs pairs) triples")
    calls = args[0]
    server = conn._config.get("host_server")
    limit = int(server.limits.max_batch_calls) if server is not None else 0
    if limit and len(calls) > limit:
        account = conn._config.get("host_account")
        if account is not None:
            account.ledger.count_refusal("max_batch_calls")
        raise ValueError(
            f"a batch of {len(calls)} calls is more than limits.max_batch_calls allows ({limit}); "
            "send it in smaller batches"
        )
    ctx = context.current()
    out: list[Outcome] = []
    for item in calls:
        if ctx is not None and ctx.expired():
            late = DeadlineExceeded("the batch's deadline passed before this call was started")
            boxed = conn._box_exc(DeadlineExceeded, late, None)
            out.extend((False, boxed) for _ in range(len(calls) - len(out)))
            break
        try:
            name, call_args, call_kwargs = _unpack(item)
            method = conn._handle_getattr(root, name)
            out.append((True, conn._handle_call(method, call_args, call_kwargs)))
        except Exception as exc:  # the call's own error: boxed for its outcome, the rest go on
            out.append((False, conn._box_exc(type(exc), exc, exc.__traceback__)))
    return tuple(out)


def _unpack(item: Any) -> tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]]:
    if type(item) is not tuple or len(item) != 3:
        raise TypeError("a batched call is a (method, args tuple, kwargs pairs) triple")
    name, call_args, call_kwargs = item
    if type(name) is not str or type(call_args) is not tuple or type(call_kwargs) is not tuple:
        raise TypeError("a batched call is a (method name, args tuple, kwargs pairs tuple) triple")
    if name == ENTRY:
        raise ValueError("a batch cannot contain another batch")
    for pair in call_kwargs:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str:
            raise TypeError("a batched call's kwargs are (name, value) pairs")
    return name, call_args, call_kwargs

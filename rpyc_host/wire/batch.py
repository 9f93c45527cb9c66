"""Batched calls on the wire: many calls in one request, their outcomes in one reply.

A host's services expose :data:`ENTRY`, which takes one tuple of calls, each ``(method name,
args tuple, kwargs pairs)``, and answers one tuple of outcomes in the same order: ``(True,
value)`` or ``(False, error)``, the error boxed as rpyc boxes any remote exception (type,
arguments, attributes; the traceback withheld). A peer without the entry point is a plain rpyc
server: the client library pipelines the calls to it instead.
"""

from __future__ import annotations

from typing import Any

ENTRY = "rpyc_host_batch"

Call = tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]]
Outcome = tuple[bool, Any]

"""The time left by an ``asyncio.timeout()`` (or Python 3.11's ``asyncio.wait_for``) around the
running task, so an asyncio call can send it as the call's deadline.

asyncio keeps no public link from a task to the timeouts around it; both arm a timer on the
loop, so the loop's scheduled timers are searched for the one belonging to this task. Anything
this Python's asyncio does differently gives None (no deadline from asyncio: the timeout still
cancels the task, and the call with it).
"""

from __future__ import annotations

import asyncio
from typing import Any

_ON_TIMEOUT = getattr(getattr(asyncio, "Timeout", None), "_on_timeout", None)
_RELEASE_WAITER = getattr(asyncio.tasks, "_release_waiter", None)


def enclosing_timeout(loop: asyncio.AbstractEventLoop) -> float | None:
    """Seconds until the nearest asyncio timeout around the current task fires, or None."""
    try:
        task = asyncio.current_task(loop)
        scheduled = getattr(loop, "_scheduled", None)
        if task is None or not scheduled:
            return None
        waiters = _wait_for_waiters(task)
        nearest: float | None = None
        for handle in scheduled:
            if handle.cancelled():
                continue
            callback: Any = handle._callback
            mine = False
            if getattr(callback, "__func__", None) is _ON_TIMEOUT and _ON_TIMEOUT is not None:
                mine = getattr(callback.__self__, "_task", None) is task
            elif waiters and callback is _RELEASE_WAITER:
                mine = any(arg in waiters for arg in handle._args)
            if mine and (nearest is None or handle.when() < nearest):
                nearest = handle.when()
    except Exception:  # an asyncio that works differently: no deadline from it
        return None
    return None if nearest is None else nearest - loop.time()


def _wait_for_waiters(task: asyncio.Task[Any]) -> list[Any]:
    """The waiters of ``asyncio.wait_for`` calls (3.11) running ``task``: wait_for adds
    ``partial(_release_waiter, waiter)`` as the task's done callback."""
    if _RELEASE_WAITER is None:
        return []
    found = []
    for entry in getattr(task, "_callbacks", None) or ():
        callback = entry[0] if isinstance(entry, tuple) else entry
        args = getattr(callback, "args", None)
        if getattr(callback, "func", None) is _RELEASE_WAITER and args:
            found.append(args[0])
    return found

"""``root.method(*args)`` as ``call("method", *args)``: the ``root`` of a pool, a batch and the
asyncio connection and pool, which call methods by name instead of through an rpyc netref."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class MethodsByName:
    """Attribute access gives ``call`` bound to the attribute's name (private names refused)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        call = self._call

        def method(*args: Any, **kwargs: Any) -> Any:
            return call(name, *args, **kwargs)

        method.__name__ = name
        return method

"""The demo service: exposed methods, connection hooks, callbacks, a live object and a stream.

Shows the pieces a real service uses: plain-value methods, per-connection state set in
``on_connect``, a server-to-client callback, a live object the client drives by reference, and
a generator its clients read in chunks (a streamed result).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import rpyc

from rpyc_host import oneway

log = logging.getLogger("services.demo")


@rpyc.service
class Counter:
    """A live object kept on the server; the client holds a reference (NetRef) to it."""

    def __init__(self, start: int = 0) -> None:
        self._value = start
        self._lock = threading.Lock()

    @rpyc.exposed
    def increment(self, by: int = 1) -> int:
        """Add ``by`` and return the new value."""
        with self._lock:
            self._value += int(by)
            return self._value

    @rpyc.exposed
    def value(self) -> int:
        """The current value."""
        return self._value


@rpyc.service
class DemoService(rpyc.Service):
    """Echo, arithmetic, per-connection session facts, callbacks and live objects."""

    def __init__(self, greeting: str = "pong", max_countdown: int = 10_000) -> None:
        if max_countdown < 0:
            raise ValueError(f"max_countdown must be >= 0, got {max_countdown!r}")
        self.greeting = greeting
        self.max_countdown = max_countdown
        self._calls = 0
        # Shared by every connection (set in __init__); the newest events only.
        self._events: deque[tuple[str, str]] = deque(maxlen=100)

    def on_connect(self, conn: Any) -> None:
        self._connid = str(conn._config.get("connid"))
        endpoints = conn._config.get("endpoints") or (None, ("?", 0))
        self._peer = f"{endpoints[1][0]}:{endpoints[1][1]}"
        self._connected_at = time.time()
        self._calls = 0
        # The host logs each connection's start and end at INFO (its id and peer prefix every
        # line); the service adds only what it knows, at DEBUG.
        log.debug("session started")

    def on_disconnect(self, conn: Any) -> None:
        log.debug("session ended after %d demo calls", self._calls)

    def _count(self) -> None:
        self._calls += 1

    @rpyc.exposed
    def echo(self, text: str) -> str:
        """Return ``text`` unchanged."""
        self._count()
        if not isinstance(text, str):
            raise TypeError(f"echo(text): text must be a str, got {type(text).__name__}")
        return text

    @rpyc.exposed
    def add(self, a: Any, b: Any) -> Any:
        """Return ``a + b`` for two numbers."""
        self._count()
        for name, value in (("a", a), ("b", b)):
            if isinstance(value, bool) or not isinstance(value, int | float | complex):
                raise TypeError(f"add(a, b): {name} must be a number, got {type(value).__name__}")
        return a + b

    @rpyc.exposed
    @oneway
    def log_event(self, kind: str, detail: str = "") -> None:
        """Record an event without waiting (one-way: the caller gets None at once)."""
        self._count()
        if not isinstance(kind, str) or not isinstance(detail, str):
            raise TypeError("log_event(kind, detail): kind and detail must be str")
        self._events.append((kind, detail))
        log.info("event %s: %s", kind, detail)

    @rpyc.exposed
    def events(self) -> tuple[tuple[str, str], ...]:
        """The newest events recorded by ``log_event`` (at most 100), oldest first."""
        self._count()
        return tuple(self._events)

    @rpyc.exposed
    def ping(self) -> str:
        """Return ``"pong"`` (or the configured greeting)."""
        self._count()
        return self.greeting

    @rpyc.exposed
    def session(self) -> tuple[tuple[str, Any], ...]:
        """Facts about this connection: id, peer, connected-at time, calls made on it."""
        self._count()
        return (
            ("connection_id", self._connid),
            ("peer", self._peer),
            ("connected_at", self._connected_at),
            ("calls", self._calls),
        )

    @rpyc.exposed
    def countdown(self, n: int, callback: Callable[[int], Any]) -> int:
        """Call the client's ``callback(i)`` for i = n, n-1, ..., 1; return how many calls."""
        self._count()
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.max_countdown:
            raise ValueError(
                f"countdown(n, callback): n must be an int from 0 to {self.max_countdown}, got {n!r}"
            )
        if not callable(callback):
            raise TypeError("countdown(n, callback): callback must be callable")
        for i in range(n, 0, -1):
            callback(i)
        return n

    @rpyc.exposed
    def new_counter(self, start: int = 0) -> Counter:
        """A live counter on the server; call ``increment(by)`` and ``value()`` on it."""
        self._count()
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"new_counter(start): start must be an int, got {type(start).__name__}")
        return Counter(start)

    @rpyc.exposed
    def count(self, n: int, start: int = 0) -> Iterator[int]:
        """The ints ``start``, ``start + 1``, ... below ``start + n``, streamed (a generator:
        ``client.connect`` reads it in chunks, plain rpyc item by item)."""
        self._count()
        for name, value in (("n", n), ("start", start)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"count(n, start): {name} must be an int, got {type(value).__name__}")
        if n < 0:
            raise ValueError(f"count(n, start): n must be >= 0, got {n}")
        return iter(range(start, start + n))

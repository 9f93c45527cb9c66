"""Service classes the tests host (named in test configs as ``tests.sample_services:...``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import rpyc

from rpyc_host import oneway
from rpyc_host.testing import wait_until

NOT_A_CLASS = 42


@rpyc.service
class HookCounterService(rpyc.Service):
    """Counts connection hooks across all connections (state shared through __init__)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"connect": 0, "disconnect": 0}

    def on_connect(self, conn: Any) -> None:
        with self._lock:
            self._counts["connect"] += 1

    def on_disconnect(self, conn: Any) -> None:
        with self._lock:
            self._counts["disconnect"] += 1

    @rpyc.exposed
    def counts(self) -> tuple[int, int]:
        """(connects, disconnects) seen so far."""
        return self._counts["connect"], self._counts["disconnect"]

    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


@rpyc.service
class SlowService(rpyc.Service):
    """A call that takes a while, and hooks that leave a trace in a file."""

    def __init__(self, events: str = "") -> None:
        self.events = Path(events) if events else None

    def _record(self, text: str) -> None:
        if self.events is not None:
            with self.events.open("a") as fh:
                fh.write(text + "\n")

    def on_connect(self, conn: Any) -> None:
        self._record("connect")

    def on_disconnect(self, conn: Any) -> None:
        self._record("disconnect")

    @rpyc.exposed
    def sleep(self, seconds: float) -> float:
        """Sleep, then return how long."""
        self._record("call-start")
        time.sleep(seconds)  # the slow method the deadline tests call
        self._record("call-end")
        return seconds

    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


class Calculator:
    """An ordinary class, not an rpyc service: the host exposes its public methods."""

    def __init__(self, scale: int = 1) -> None:
        self.scale = scale

    def add(self, a: int, b: int) -> int:
        """Add and scale."""
        return (a + b) * self.scale

    def mul(self, a: int, b: int) -> int:
        return a * b * self.scale

    def _secret(self) -> str:
        return "hidden"


@rpyc.service
class PickyService(rpyc.Service):
    """Rejects a negative level (in check_options, so ``--check`` finds it without building)."""

    def __init__(self, level: int = 1) -> None:
        self.check_options(level)
        self.level = level

    @staticmethod
    def check_options(level: int = 1) -> None:
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")


@rpyc.service
class InspectService(rpyc.Service):
    """Reports what arguments arrived as, and fails on purpose."""

    @rpyc.exposed
    def kinds(self, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Type names of the arguments as the method received them."""
        return tuple(type(a).__name__ for a in (*args, *kwargs.values()))

    @rpyc.exposed
    def total(self, values: Any) -> int:
        """Sum of a list of ints (the list arrives as a local copy)."""
        assert type(values) is list
        return sum(values)

    @rpyc.exposed
    def show(self, value: Any) -> str:
        """repr() of the argument as it arrived (a local copy prints as a plain list)."""
        return repr(value)

    @rpyc.exposed
    def boom(self) -> float:
        return 1 / 0

    @rpyc.exposed
    def echo(self, value: Any) -> Any:
        return value


@rpyc.service
class RelayService(rpyc.Service):
    """Calls another host's SlowService through the client library, inside its own call."""

    def __init__(self, target_port: int = 0) -> None:
        self.target_port = target_port

    @rpyc.exposed
    def relay(self, seconds: float) -> float:
        """Ask the target to sleep ``seconds``; returns what it answered."""
        import client

        with client.connect(host="127.0.0.1", port=self.target_port, timeout=30) as conn:
            return float(conn.root.sleep(seconds))

    @rpyc.exposed
    def context_seen(self) -> tuple[Any, ...]:
        """The request id and seconds left that this call arrived with, and what the target saw."""
        import client
        from rpyc_host.wire import context

        ctx = context.current()
        left = ctx.remaining() if ctx else None  # before the downstream call spends any of it
        with client.connect(host="127.0.0.1", port=self.target_port, timeout=30) as conn:
            downstream = tuple(conn.root.context_seen())
        return (ctx.request_id if ctx else None, left, downstream)


@rpyc.service
class ContextProbeService(rpyc.Service):
    """Reports the call context a call arrived with."""

    @rpyc.exposed
    def context_seen(self) -> tuple[Any, ...]:
        from rpyc_host.wire import context

        ctx = context.current()
        return (ctx.request_id, ctx.remaining()) if ctx else (None, None)

    @rpyc.exposed
    def trace_seen(self) -> str | None:
        """The traceparent this call runs under (what a call it made would hand on)."""
        from rpyc_host.wire import context

        ctx = context.current()
        return ctx.traceparent if ctx else None


@rpyc.service
class ChainService(rpyc.Service):
    """Calls a CallbackService on another host, handing it a function of this process to call."""

    def __init__(self, target_port: int = 0) -> None:
        self.target_port = target_port

    @rpyc.exposed
    def chain(self, text: str) -> str:
        import client

        def shout(value: str) -> str:
            return value.upper()

        with client.connect(host="127.0.0.1", port=self.target_port, timeout=30) as conn:
            return str(conn.root.call_back(shout, text))


@rpyc.service
class CallbackService(rpyc.Service):
    """Calls back into its caller once."""

    @rpyc.exposed
    def call_back(self, fn: Any, value: str) -> Any:
        return fn(value)


@rpyc.service
class NoteService(rpyc.Service):
    """Writes what it is given to the host's log."""

    @rpyc.exposed
    def note(self, text: str) -> None:
        import logging

        logging.getLogger("tests.note").warning("note: %s", text)


# Released by the one-way tests; the service runs in the test's own process (running_host).
ONEWAY_GATE = threading.Event()


@rpyc.service
class OnewayService(rpyc.Service):
    """One-way methods that wait for the test, fail, or leave a trace in a file."""

    def __init__(self, trace: str = "") -> None:
        self.trace = Path(trace) if trace else None
        self.done: list[Any] = []  # shared by every connection: what the one-way calls did

    @rpyc.exposed
    @oneway
    def wait_for_gate(self, tag: Any) -> None:
        """Blocks until the test sets ONEWAY_GATE (at most 60 s)."""
        ONEWAY_GATE.wait(60)
        self.done.append(tag)

    @rpyc.exposed
    @oneway
    def record(self, tag: Any) -> None:
        self.done.append(tag)
        if self.trace is not None:
            with self.trace.open("a") as fh:
                fh.write(f"{tag}\n")

    @rpyc.exposed
    @oneway
    def record_after(self, tag: Any, flag: str) -> None:
        """Record ``tag`` once the file ``flag`` exists (at most 30 s): a gate across processes."""
        try:
            wait_until(Path(flag).exists, 30, f"the gate file {flag}")
        except AssertionError:
            pass  # recorded anyway: a test that never opens the gate sees it late, not never
        self.record(tag)

    @rpyc.exposed
    @oneway
    def fail(self, text: str) -> None:
        raise ValueError(f"fail: {text}")

    @rpyc.exposed
    def seen(self) -> tuple[Any, ...]:
        return tuple(self.done)

    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


# The first stall_first() call in this process blocks until the test sets it (at most 30 s).
STALL_RELEASE = threading.Event()
_STALLED = threading.Lock()


@rpyc.service
class StallFirstService(rpyc.Service):
    """The first stall_first() call (across every host in the process) blocks; later ones return."""

    @rpyc.exposed
    def stall_first(self) -> str:
        if _STALLED.acquire(blocking=False):
            STALL_RELEASE.wait(30)
        return "done"

    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


@rpyc.service
class StreamService(rpyc.Service):
    """Generators to stream; appends ``<name>-closed`` to ``events`` when one's finally runs."""

    def __init__(self, events: str) -> None:
        self.events = events

    def on_connect(self, conn: Any) -> None:
        from rpyc_host import budget

        self._account = budget.account_of(conn)

    def _note(self, text: str) -> None:
        with open(self.events, "a") as out:
            out.write(text + "\n")

    @rpyc.exposed
    def count(self, n: int) -> Any:
        try:
            yield from range(n)
        finally:
            self._note("count-closed")

    @rpyc.exposed
    def endless(self) -> Any:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            self._note("endless-closed")

    @rpyc.exposed
    def failing(self, n: int) -> Any:
        yield from range(n)
        raise ValueError(f"item {n} is broken")

    @rpyc.exposed
    def not_plain(self) -> Any:
        yield 1
        yield [2, 3]

    @rpyc.exposed
    def blobs(self, n: int, size: int) -> Any:
        for i in range(n):
            yield bytes([i % 256]) * size

    @rpyc.exposed
    def held(self) -> tuple[int, int]:
        """(this connection's open streams, the service's), as this process counts them."""
        if self._account is None:
            return (-1, -1)
        return self._account.held("open_streams"), self._account.ledger.held("open_streams")

    @rpyc.exposed
    def rss_kib(self) -> int:
        """This process's resident memory now, in KiB."""
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1


@rpyc.service
class InstanceModeService(rpyc.Service):
    """Remembers a value set by a call and records its hooks in a file (seen across processes)."""

    def __init__(self, events: str = "") -> None:
        self.events = Path(events) if events else None
        self.connid = None

    def _record(self, text: str) -> None:
        if self.events is not None:
            with self.events.open("a") as fh:
                fh.write(text + "\n")

    def on_connect(self, conn: Any) -> None:
        self.connid = conn._config.get("connid")
        self._record(f"connect {self.connid}")

    def on_disconnect(self, conn: Any) -> None:
        self._record(f"disconnect {conn._config.get('connid')}")

    @rpyc.exposed
    def remember(self, value: str) -> None:
        """Set an attribute on the instance serving this call."""
        self.value = value

    @rpyc.exposed
    def recall(self) -> str | None:
        """The attribute an earlier call set, if this instance sees it."""
        return getattr(self, "value", None)

    @rpyc.exposed
    def connection_id(self) -> str | None:
        """The connection id on_connect stored on this instance."""
        return self.connid


@rpyc.service
class WorkerNameService(rpyc.Service):
    """Says which server thread served the call; ``sleep`` blocks its thread (no callback, so a
    thread pool's worker keeps its place). ``sleeping`` counts the calls asleep, in-process."""

    sleeping = 0
    _lock = threading.Lock()

    @rpyc.exposed
    def who(self) -> str:
        return threading.current_thread().name

    @rpyc.exposed
    def sleep(self, seconds: float) -> str:
        cls = WorkerNameService  # not type(self): the host may serve a subclass
        with cls._lock:
            cls.sleeping += 1
        try:
            time.sleep(seconds)  # the blocking method whose worker must not stall the others
        finally:
            with cls._lock:
                cls.sleeping -= 1
        return threading.current_thread().name

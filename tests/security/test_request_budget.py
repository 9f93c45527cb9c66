"""One time budget per request for its round trips to the client, items counted while copied,
and thread-pool workers that a waiting request cannot pin."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import rpyc

import client
from rpyc_host.protocol import MAX_ARG_ITEMS
from rpyc_host.testing import ServerProcess, running_host, wait_until
from rpyc_host.wire import DeadlineExceeded, context

SERVER_TYPES = ["threaded", "threadpool", "forking"]
CLIENT = {"sync_request_timeout": 30}


def config(server_type: str, limits: str = "", metrics: bool = True) -> str:
    return f"""
server: {{type: {server_type}, pool_size: 4}}
limits: {{{limits}}}
metrics: {{enabled: {str(metrics).lower()}, port: 0}}
services:
  demo: {{class: services.demo:DemoService, port: 0}}
"""


class PosingList(list):  # type: ignore[type-arg]
    """A client-side object that travels as a 'builtins.list' netref: its ``__len__`` says 1,
    its iterator goes on until ``stop`` is set, ``limit`` items were given, or ``seconds`` pass."""

    def __init__(self, limit: int, seconds: float, stop: threading.Event, pause: float = 0.0) -> None:
        super().__init__()
        self.limit, self.seconds, self.stop, self.pause = limit, seconds, stop, pause
        self.given = 0

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[int]:
        ends = time.monotonic() + self.seconds
        while self.given < self.limit and time.monotonic() < ends and not self.stop.is_set():
            if self.pause:
                self.stop.wait(self.pause)
            self.given += 1
            yield self.given


PosingList.__module__ = "builtins"
PosingList.__name__ = PosingList.__qualname__ = "list"


def refusals(host: Any) -> dict[str, int]:
    return dict(host.hosted[0].server.ledger.refusal_counts())


def metrics_page(host: Any) -> str:
    address, port = host.metrics.address
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_endless_argument_is_cut_at_request_timeout_and_the_connection_goes_on(server_type: str) -> None:
    with running_host(config(server_type, "request_timeout: 2")) as host:
        conn = rpyc.connect(*host.address("demo"), config=CLIENT)
        counter = conn.root.new_counter(5)
        counter.increment(by=2)
        endless = PosingList(limit=10 * MAX_ARG_ITEMS, seconds=40, stop=threading.Event())
        started = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            conn.root.echo(endless)
        elapsed = time.monotonic() - started
        assert "limits.request_timeout: 2 s" in str(caught.value)
        assert 1.9 <= elapsed < 15, elapsed
        assert endless.given < MAX_ARG_ITEMS
        # The connection and what it holds on the server are intact.
        assert counter.value() == 7
        assert conn.root.ping() == "pong"
        assert dict(conn.root.session())["calls"] == 3  # new_counter, ping, session: echo never ran
        conn.close()
        if server_type != "forking":  # a forked child's counters stay in the child
            assert refusals(host).get("request_timeout") == 1
            assert (
                'rpyc_host_limit_refusals_total{limit="request_timeout",service="demo"} 1.0'
                in metrics_page(host)
            )


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_callbacks_share_one_budget(server_type: str) -> None:
    """Each callback is well within call_timeout; together they pass request_timeout."""
    with running_host(config(server_type, "request_timeout: 2, call_timeout: 5")) as host:
        conn = rpyc.connect(*host.address("demo"), config=CLIENT)
        called: list[int] = []
        pause = threading.Event()

        def slow(i: int) -> None:
            called.append(i)
            pause.wait(0.6)

        started = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            conn.root.countdown(10, slow)
        assert "limits.request_timeout: 2 s" in str(caught.value)
        assert time.monotonic() - started < 15
        assert 3 <= len(called) <= 5, called
        assert conn.root.add(2, 3) == 5
        assert conn.root.countdown(2, called.append) == 2  # a fresh request has a fresh budget
        conn.close()
        if server_type != "forking":
            assert refusals(host).get("request_timeout") == 1


def test_items_are_counted_while_copied_not_taken_from_len(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(config("threaded", "request_timeout: 110", metrics=False)))
    with rpyc.connect(*proc.address("demo"), config={"sync_request_timeout": 110}) as conn:
        lying = PosingList(limit=MAX_ARG_ITEMS + 10, seconds=100, stop=threading.Event())
        with pytest.raises(ValueError) as caught:
            conn.root.echo(lying)
        assert f"more than {MAX_ARG_ITEMS} items" in str(caught.value)
        assert lying.given == MAX_ARG_ITEMS + 1  # pulled no further than one past the limit
        assert conn.root.ping() == "pong"


def hold_requests(count: int, address: tuple[str, int], stop: threading.Event, stack: ExitStack) -> list[Any]:
    """Open ``count`` connections, each holding one request that makes the server wait on it:
    even ones through a callback that sleeps, odd ones through an endless argument. Returns
    per-connection flags set once the server is waiting on that connection."""
    holding: list[threading.Event] = []
    threads: list[threading.Thread] = []
    for i in range(count):
        conn = rpyc.connect(*address, config=CLIENT)
        stack.callback(conn.close)
        flag = threading.Event()
        holding.append(flag)

        def sleep_in_callback(n: int, flag: threading.Event = flag) -> None:
            flag.set()
            stop.wait(30)

        if i % 2 == 0:
            target: Callable[[], Any] = lambda c=conn, cb=sleep_in_callback: c.root.countdown(1, cb)  # noqa: E731
        else:
            endless = PosingList(limit=10_000, seconds=30, stop=stop, pause=0.05)
            target = lambda c=conn, e=endless: c.root.echo(e)  # noqa: E731
            threading.Thread(
                target=lambda e=endless, f=flag: (
                    wait_until(lambda: e.given > 0, 20, "a pulled item") or f.set()
                ),
                daemon=True,
            ).start()

        def run(target: Callable[[], Any] = target) -> None:
            try:
                target()
            except Exception:
                pass  # the endless argument ends as a list, which echo() refuses: expected

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    def release() -> None:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a holding client did not finish"

    stack.callback(release)
    return holding


@pytest.mark.parametrize("hostile", [4, 10])
@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_clients_the_server_waits_on_cannot_delay_an_honest_ping(server_type: str, hostile: int) -> None:
    with running_host(config(server_type, metrics=False)) as host, ExitStack() as stack:
        address = host.address("demo")
        honest = rpyc.connect(*address, config={"sync_request_timeout": 10})
        stack.callback(honest.close)
        stop = threading.Event()
        holding = hold_requests(hostile, address, stop, stack)
        wait_until(
            lambda: all(f.is_set() for f in holding), 30, f"{hostile} requests waiting on their clients"
        )
        ends = time.monotonic() + 3
        for _ in range(30):
            if time.monotonic() > ends:
                break
            started = time.monotonic()
            assert honest.root.ping() == "pong"
            with rpyc.connect(*address, config={"sync_request_timeout": 10}) as fresh:
                assert fresh.root.ping() == "pong"
            assert time.monotonic() - started < 2, "an honest ping waited behind the held requests"
            stop.wait(0.1)
        if server_type == "threadpool":
            server = host.hosted[0].server
            assert server.ledger.held("waiting_requests") == hostile
            stack.close()  # the holding clients finish
            wait_until(lambda: server.ledger.held("waiting_requests") == 0, 20, "waits given back")

            def workers() -> int:
                return sum(t.name.startswith("demo-worker-") for t in threading.enumerate())

            wait_until(lambda: workers() == 4, 20, "the pool back at pool_size workers")


def test_waits_past_max_waiting_requests_fail_at_once() -> None:
    limits = "max_waiting_requests: 2, max_waiting_requests_per_connection: 1"
    with running_host(config("threadpool", limits, metrics=False)) as host, ExitStack() as stack:
        address = host.address("demo")
        stop = threading.Event()
        holding = hold_requests(2, address, stop, stack)
        wait_until(lambda: all(f.is_set() for f in holding), 30, "2 requests waiting on their clients")
        with rpyc.connect(*address, config=CLIENT) as third:
            started = time.monotonic()
            with pytest.raises(Exception) as caught:
                third.root.countdown(1, lambda i: None)
            assert time.monotonic() - started < 5
            assert "limits.max_waiting_requests: 2" in str(caught.value)
            assert third.root.ping() == "pong"
        assert refusals(host) == {"max_waiting_requests": 1}
        stack.close()
        # One connection nesting waits: its callback calls back in, and the nested request's
        # own callback would be a second wait on the same connection.
        with rpyc.connect(*address, config=CLIENT) as nesting:
            seen: list[str] = []

            def inner(i: int) -> None:
                seen.append("inner")

            def outer(i: int) -> None:
                try:
                    nesting.root.countdown(1, inner)
                except Exception as exc:
                    seen.append(str(exc))

            assert nesting.root.countdown(1, outer) == 1
            assert "inner" not in seen
            assert any("limits.max_waiting_requests_per_connection: 1" in s for s in seen), seen


def test_a_callers_shorter_deadline_is_reported_as_its_own() -> None:
    """A wait cut short by the call context's deadline is not a request_timeout refusal."""
    with running_host(config("threaded", "request_timeout: 60", metrics=False)) as host:
        with client.connect(host="127.0.0.1", port=host.address("demo")[1], timeout=30) as conn:
            called: list[int] = []
            pause = threading.Event()

            def slow(i: int) -> None:
                called.append(i)
                pause.wait(0.5)

            started = time.monotonic()
            with pytest.raises(DeadlineExceeded), context.deadline(1.2):
                conn.root.countdown(10, slow)
            assert time.monotonic() - started < 10
            assert len(called) < 10
        assert "request_timeout" not in refusals(host)

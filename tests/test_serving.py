"""Serving: every server type under concurrent clients, hooks, callbacks, live objects,
introspection, plain classes, tuned sockets, the thread-pool cap, and the debug console."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import rpyc
from rpyc.utils import classic as rpyc_classic

import client
from rpyc_host.testing import ServerProcess, running_host, wait_until
from tests.helpers import SERVER_TYPES, demo_config


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_eight_concurrent_clients(
    server_type: str, write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(demo_config(server_type)))
    host, port = proc.address("demo")
    assert f"[{server_type}]" in proc.wait_for("serving demo")

    def worker(i: int) -> tuple[list[int], str]:
        with rpyc.connect(host, port) as conn:
            add = conn.root.add
            sums = [add(i, n) for n in range(200)]
            return sums, dict(conn.root.session())["connection_id"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    for i, (sums, _) in enumerate(results):
        assert sums == [i + n for n in range(200)]
    assert len({connid for _, connid in results}) == 8  # one session per connection


def test_hooks_are_counted_per_connection() -> None:
    config = "services:\n  hooks: {class: tests.sample_services:HookCounterService, port: 0}\n"
    with running_host(config) as host:
        address = host.address("hooks")
        conns = [rpyc.connect(*address) for _ in range(5)]
        # on_connect runs in each connection's own thread: wait for all five.
        counts = conns[0].root.counts
        wait_until(lambda: counts() == (5, 0), what="5 connect hooks")
        for conn in conns:
            conn.close()
        with rpyc.connect(*address) as conn:
            counts = conn.root.counts
            wait_until(lambda: counts() == (6, 5), what="5 disconnect hooks")


def test_callback_and_live_object() -> None:
    with running_host(demo_config("threaded")) as host, rpyc.connect(*host.address("demo")) as conn:
        seen: list[int] = []
        assert conn.root.countdown(5, seen.append) == 5
        assert seen == [5, 4, 3, 2, 1]
        counter = conn.root.new_counter(10)
        assert counter.increment() == 11
        assert counter.increment(by=5) == 16
        assert counter.value() == 16
        other = conn.root.new_counter()
        assert other.value() == 0  # each call makes a new live object
        with pytest.raises(AttributeError):
            counter._value  # noqa: B018 - private state is not reachable


def test_session_facts_are_per_connection() -> None:
    with running_host(demo_config("threaded")) as host:
        a, b = rpyc.connect(*host.address("demo")), rpyc.connect(*host.address("demo"))
        try:
            a.root.ping()
            a.root.ping()
            sa, sb = dict(a.root.session()), dict(b.root.session())
            assert sa["calls"] == 3 and sb["calls"] == 1
            assert sa["connection_id"] != sb["connection_id"]
            assert sa["peer"].startswith("127.0.0.1:")
            assert abs(sa["connected_at"] - time.time()) < 60
        finally:
            a.close()
            b.close()


def test_describe_lists_exposed_methods_as_plain_values() -> None:
    with (
        running_host(demo_config("threaded")) as host,
        client.connect(host=host.address("demo")[0], port=host.address("demo")[1]) as conn,
    ):
        raw = conn.root.describe()
        assert type(raw) is tuple  # a plain value, not a NetRef
        info = client.describe(conn)
    assert info["service"] == "DEMO"
    methods = info["methods"]
    assert {"echo", "add", "ping", "session", "countdown", "new_counter", "describe"} <= set(methods)
    assert methods["add"]["signature"].startswith("(a: Any, b: Any)")
    assert methods["ping"]["doc"] == 'Return ``"pong"`` (or the configured greeting).'
    assert "on_connect" not in methods and "get_service_name" not in methods


def test_plain_class_is_served_with_its_public_methods() -> None:
    config = (
        "services:\n  calc:\n    class: tests.sample_services:Calculator\n    port: 0\n"
        "    options: {scale: 3}\n"
    )
    with running_host(config) as host, rpyc.connect(*host.address("calc")) as conn:
        assert conn.root.add(1, 2) == 9
        assert conn.root.mul(2, 2) == 12
        with pytest.raises(AttributeError):
            conn.root._secret()
        name, methods = conn.root.describe()
        assert name == "CALCULATOR"
        assert [m[0] for m in methods] == ["add", "describe", "health", "mul"]
        assert dict((m[0], m[2]) for m in methods)["add"] == "Add and scale."


@pytest.mark.parametrize("compression", [False, True])
def test_sockets_are_tuned_and_compression_is_configurable(compression: bool) -> None:
    config = demo_config("threaded").replace(
        "port: 0}", f"port: 0, compression: {str(compression).lower()}}}"
    )
    with running_host(config) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        assert conn.root.echo("x" * 10_000) == "x" * 10_000
        (server_conn,) = host.hosted[0].server.connections
        sock = server_conn._channel.stream.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert server_conn._channel.compress is compression
        assert conn._channel.compress is False
        assert conn._channel.stream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_threadpool_caps_workers_and_serves_more_connections_than_workers() -> None:
    config = demo_config("threaded").replace("type: threaded, pool_size: 4", "type: threadpool, pool_size: 3")
    with running_host(config) as host:
        conns = [rpyc.connect(*host.address("demo")) for _ in range(10)]
        try:
            for round_ in range(3):
                for i, conn in enumerate(conns):
                    assert conn.root.add(i, round_) == i + round_
            workers = [t for t in threading.enumerate() if t.name.startswith("demo-worker-")]
            assert len(workers) == 3
        finally:
            for conn in conns:
                conn.close()


def test_threadpool_callbacks_and_many_sequential_calls_do_not_stall() -> None:
    config = demo_config("threaded").replace("type: threaded, pool_size: 4", "type: threadpool, pool_size: 2")
    with running_host(config) as host, rpyc.connect(*host.address("demo")) as conn:
        seen: list[int] = []
        assert conn.root.countdown(20, seen.append) == 20
        add = conn.root.add
        started = time.monotonic()
        for i in range(300):
            assert add(i, 1) == i + 1
        # rpyc's own ThreadPoolServer needs ~100 ms per call (30 s here); allow a very slow machine.
        assert time.monotonic() - started < 15


def test_client_connect_by_name_and_refusal_message(write_config: Callable[[str], Path]) -> None:
    with running_host(demo_config("threaded")) as host:
        port = host.address("demo")[1]
        path = write_config(f"services:\n  demo: {{class: services.demo:DemoService, port: {port}}}\n")
        with client.connect("demo", config=path, timeout=5) as conn:
            assert conn.root.add(2, 3) == 5
    with pytest.raises(client.ConnectError, match=rf"cannot connect to 'demo' at 127.0.0.1:{port} after 2"):
        client.connect("demo", config=path, retries=1, backoff=0.01)


def test_classic_debug_console_inspects_live_services() -> None:
    config = demo_config("threaded", "debug:\n  classic: {enabled: true, host: 127.0.0.1, port: 0}\n")
    with running_host(config) as host:
        assert host.classic is not None
        conn = rpyc_classic.connect(*host.classic.address)
        try:
            remote_sys = conn.modules.sys
            assert "services.demo" in remote_sys.modules
            assert conn.eval("1 + 1") == 2
        finally:
            conn.close()


def test_classic_console_is_off_by_default() -> None:
    with running_host(demo_config("threaded")) as host:
        assert host.classic is None

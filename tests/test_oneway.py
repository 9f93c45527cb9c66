"""One-way methods: answered at once, run in order later, bounded, and plain values only."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rpyc

import client
from rpyc_host.testing import ServerProcess, running_host, wait_until
from tests import sample_services

ONEWAY = """
services:
  oneway: {{class: tests.sample_services:OnewayService, port: 0}}
{extra}
"""


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """The event OnewayService.wait_for_gate blocks on: closed for the test, open after it."""
    sample_services.ONEWAY_GATE.clear()
    try:
        yield sample_services.ONEWAY_GATE
    finally:
        sample_services.ONEWAY_GATE.set()


def connect(host: Any) -> Any:
    return rpyc.connect("127.0.0.1", host.address("oneway")[1])


def test_a_one_way_call_returns_before_the_method_finishes_and_calls_run_in_order(
    gate: threading.Event,
) -> None:
    with running_host(ONEWAY.format(extra="")) as host:
        conn = connect(host)
        try:
            started = time.monotonic()
            assert conn.root.wait_for_gate("first") is None
            assert conn.root.record("second") is None
            assert conn.root.record("third") is None
            assert time.monotonic() - started < 10  # the gate is still shut: nothing waited on it
            assert conn.root.seen() == ()
            gate.set()
            wait_until(lambda: len(conn.root.seen()) == 3, 10, "the queued one-way calls")
            assert conn.root.seen() == ("first", "second", "third")
        finally:
            conn.close()


def test_a_failing_one_way_call_is_logged_in_one_line_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    extra = "metrics: {enabled: true, port: 0}"
    caplog.set_level(logging.INFO)
    with running_host(ONEWAY.format(extra=extra)) as host:
        with client.connect(host="127.0.0.1", port=host.address("oneway")[1]) as conn:
            assert conn.root.fail("boom") is None  # the client never sees the error
            assert conn.root.add(1, 2) == 3
        wait_until(
            lambda: any("one-way call fail failed" in r.getMessage() for r in caplog.records),
            10,
            "the one-way error in the log",
        )
        lines = [r for r in caplog.records if "one-way call fail failed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert lines[0].getMessage().endswith("ValueError: fail: boom")
        assert lines[0].exc_info is None  # the traceback is a separate DEBUG record
        metrics_host, metrics_port = host.metrics.address
        with urllib.request.urlopen(f"http://{metrics_host}:{metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'rpyc_host_oneway_errors_total{method="fail",service="oneway"} 1.0' in text
        assert 'rpyc_host_call_errors_total{method="fail",service="oneway"} 1.0' in text


def test_the_queue_cap_refuses_naming_the_limit_and_spares_other_connections(gate: threading.Event) -> None:
    extra = "limits: {max_oneway_pending_per_connection: 2, max_oneway_pending: 3}"
    with running_host(ONEWAY.format(extra=extra)) as host:
        first, second, third = connect(host), connect(host), connect(host)
        try:
            first.root.wait_for_gate("a1")
            first.root.record("a2")
            with pytest.raises(OSError, match=r"limits.max_oneway_pending_per_connection: 2") as caught:
                first.root.record("a3")
            assert "record() not queued" in str(caught.value)
            # Another connection has its own share, and its plain calls answer at once.
            second.root.wait_for_gate("b1")
            assert second.root.add(2, 3) == 5
            with pytest.raises(OSError, match=r"limits.max_oneway_pending: 3"):
                third.root.record("c1")  # the service-wide cap: three are queued
            assert third.root.add(1, 1) == 2
            ledger = host.hosted[0].server.ledger
            assert ledger.refusal_counts() == {
                "max_oneway_pending_per_connection": 1,
                "max_oneway_pending": 1,
            }
            gate.set()
            wait_until(lambda: len(first.root.seen()) == 3, 10, "the accepted calls to run")
            assert sorted(first.root.seen()) == ["a1", "a2", "b1"]  # the refused ones never ran
            wait_until(lambda: ledger.held("oneway_pending") == 0, 10, "the queue places to be given back")
            third.root.record("c2")  # room again
            wait_until(lambda: "c2" in first.root.seen(), 10, "a call after the queue drained")
        finally:
            for conn in (first, second, third):
                conn.close()


def test_remote_objects_are_refused_as_one_way_arguments() -> None:
    with running_host(ONEWAY.format(extra="")) as host:
        conn = connect(host)
        try:
            with pytest.raises(TypeError, match=r"record\(\) is one-way: argument 1 is a remote object"):
                conn.root.record(lambda: 1)
            with pytest.raises(TypeError, match="remote object"):
                conn.root.record([1, {"callback": print}])  # copied, but holds a callable
            conn.root.record([1, {"plain": (2, 3)}])  # plain containers are copied and accepted
            # seen() hands the copied list back by reference: compare what it prints.
            expected = repr(([1, {"plain": (2, 3)}],))
            wait_until(lambda: repr(conn.root.seen()) == expected, 10, "the plain call")
        finally:
            conn.close()


def test_calls_queued_when_the_client_leaves_still_run(gate: threading.Event) -> None:
    with running_host(ONEWAY.format(extra="")) as host:
        conn = connect(host)
        conn.root.wait_for_gate("before-close")
        conn.root.record("queued")
        conn.close()
        server = host.hosted[0].server
        wait_until(lambda: not server.connections, 10, "the connection to close")
        gate.set()
        other = connect(host)
        try:
            wait_until(lambda: len(other.root.seen()) == 2, 10, "the queued calls to run")
            assert other.root.seen() == ("before-close", "queued")
        finally:
            other.close()


def test_a_graceful_stop_waits_for_queued_one_way_calls(gate: threading.Event) -> None:
    with running_host(ONEWAY.format(extra="")) as host:
        conn = connect(host)
        conn.root.wait_for_gate("last")
        service = host.hosted[0].service
        stopper = threading.Thread(target=host.stop, kwargs={"grace": 30})
        stopper.start()
        try:
            wait_until(lambda: host.draining, 10, "the host to start stopping")
            assert stopper.is_alive() and service.done == []  # waiting on the queued call
            gate.set()
            stopper.join(30)
            assert not stopper.is_alive()
            assert service.done == ["last"]
        finally:
            gate.set()
            stopper.join(30)
            conn.close()


@pytest.mark.parametrize("server_type", ["threadpool", "forking"])
def test_one_way_calls_work_on_the_other_server_types(
    server_type: str,
    tmp_path: Path,
    write_config: Callable[[str], Path],
    start_server: Callable[..., ServerProcess],
) -> None:
    trace = tmp_path / "trace.txt"
    config = write_config(
        f"""
server: {{type: {server_type}, pool_size: 2}}
services:
  oneway: {{class: tests.sample_services:OnewayService, port: 0, options: {{trace: "{trace}"}}}}
"""
    )
    server = start_server(config)
    port = server.address("oneway")[1]
    flag = tmp_path / "go"
    conn = rpyc.connect("127.0.0.1", port, config={"sync_request_timeout": 10})
    try:
        # Answered at once although the first one waits for the flag (up to 30 s).
        assert conn.root.record_after("first", str(flag)) is None
        for i in range(5):
            assert conn.root.record(f"call-{i}") is None
        assert conn.root.add(2, 2) == 4
        assert not trace.exists()  # all queued behind the first
    finally:
        conn.close()  # right away: calls still queued must run anyway
    flag.touch()
    wait_until(lambda: trace.exists() and len(trace.read_text().split()) == 6, 30, "the one-way calls")
    assert trace.read_text().split() == ["first"] + [f"call-{i}" for i in range(5)]

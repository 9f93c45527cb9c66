"""Stopping in the order a load balancer needs: not ready first, listeners later, calls last."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import rpyc

from rpyc_host.testing import ServerProcess, running_host, wait_until
from tests.helpers import get, refused

DRAIN_DELAY = 4.0


def readyz(base: str) -> tuple[int, dict[str, object]]:
    status, body = get(base + "/readyz")
    return status, json.loads(body)


def line_index(proc: ServerProcess, text: str) -> int:
    return next(i for i, line in enumerate(proc.lines) if text in line)


def test_sigterm_reports_draining_keeps_serving_for_drain_delay_then_refuses_then_finishes_calls(
    tmp_path: Path, write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    events = tmp_path / "events.log"
    path = write_config(
        f"""
        server: {{grace_period: 20, drain_delay: {DRAIN_DELAY}}}
        services:
          slow: {{class: tests.sample_services:SlowService, port: 0, options: {{events: "{events}"}}}}
        metrics: {{enabled: true, port: 0}}
        """
    )
    proc = start_server(path)
    assert proc.ready is not None
    metrics_host, metrics_port = proc.ready["metrics"]
    base = f"http://{metrics_host}:{metrics_port}"
    address = proc.address("slow")
    assert readyz(base) == (200, {"status": "ready", "services": {"slow": "accepting"}})

    # A call that outlasts the drain delay: it must still finish after the listeners close.
    in_flight = rpyc.connect(*address, config={"sync_request_timeout": 60})
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["value"] = in_flight.root.sleep(DRAIN_DELAY + 3)
        except Exception as exc:
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: events.exists() and "call-start" in events.read_text(), 20, "the call to start")

    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    proc.wait_for("draining: /readyz answers 503")
    assert readyz(base) == (503, {"status": "draining", "services": {"slow": "draining"}})
    # Still accepting and serving: a client the load balancer sent before it noticed is served.
    with rpyc.connect(*address) as late:
        assert late.root.add(1, 2) == 3
    assert not any("stopped accepting" in line for line in proc.lines), "listeners closed too early"

    proc.wait_for("stopped accepting connections", DRAIN_DELAY + 20)
    assert time.monotonic() - signalled >= DRAIN_DELAY
    assert refused(address)
    assert "call-end" not in events.read_text()  # the call is still in flight

    caller.join(timeout=30)
    assert result == {"value": DRAIN_DELAY + 3}
    assert proc.wait_exit(timeout=30) == 0
    in_flight.close()
    steps = [
        "received SIGTERM",
        "draining: /readyz answers 503; listeners close in 4.0 s",
        "stopped accepting connections",
        "calls in flight finished",
        "host stopped",
    ]
    positions = [line_index(proc, step) for step in steps]
    assert positions == sorted(positions), proc.log
    assert events.read_text().splitlines() == [
        "connect",
        "call-start",
        "connect",
        "disconnect",
        "call-end",
        "disconnect",
    ]


def test_drain_delay_defaults_to_zero_and_stop_reports_draining_at_once() -> None:
    with running_host(
        """
        services:
          demo: {class: services.demo:DemoService, port: 0}
        """
    ) as host:
        assert host.config.drain_delay == 0
        assert not host.draining
        address = host.address("demo")
        started = time.monotonic()
        assert host.stop(grace=0)
        assert host.draining
        assert time.monotonic() - started < 10
        assert refused(address)

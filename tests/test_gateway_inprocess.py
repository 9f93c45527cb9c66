"""Gateway calls run inside the host process, with what an rpyc client gets (its own service
instance and hooks, an admission slot, a budget account, metrics, graceful drain), except for
``forking`` services, which keep a process per connection over rpyc."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import rpyc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from rpyc_host.budget import account_of
from rpyc_host.testing import PROJECT_ROOT, running_host, wait_until
from rpyc_host.wire import tracing
from tests.helpers import jsonrpc, post, read_response


@rpyc.service
class PidService(rpyc.Service):
    """Says which process and connection serve a call."""

    def on_connect(self, conn: Any) -> None:
        self._connid = conn._config["connid"]
        self._peer = conn._config["endpoints"][1][0]
        self._account = account_of(conn)

    @rpyc.exposed
    def whoami(self) -> tuple[int, str, str, bool]:
        return os.getpid(), self._connid, self._peer, self._account is not None

    @rpyc.exposed
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)  # the service's own slow method, what the tests call
        return seconds


CONFIG = """
services:
  pid: {class: tests.test_gateway_inprocess:PidService, port: 0, limits: {max_connections_per_ip: 1}}
  forked: {class: tests.test_gateway_inprocess:PidService, port: 0, type: forking}
gateway: {enabled: true, port: 0, services: [pid, forked]}
metrics: {enabled: true, port: 0}
"""
WHOAMI = {"jsonrpc": "2.0", "method": "pid.whoami", "id": 1}


def call(sock: socket.socket, address: tuple[str, int], payload: Any) -> Any:
    sock.sendall(post("/jsonrpc", json.dumps(payload).encode(), f"{address[0]}:{address[1]}"))
    status, _, body = read_response(sock)
    assert status == 200, body
    return json.loads(body)


def test_calls_run_in_process_with_an_rpyc_clients_view() -> None:
    with running_host(CONFIG) as host:
        address = host.gateway.address
        server = next(h.server for h in host.hosted if h.config.name == "pid")
        with socket.create_connection(address, timeout=10, source_address=("127.0.0.6", 0)) as sock:
            pid, connid, peer, has_account = call(sock, address, WHOAMI)["result"]
            # This process, the HTTP client's own address, a connection id and budget account of
            # the service, and no rpyc connection behind it.
            assert (pid, peer, has_account) == (os.getpid(), "127.0.0.6", True)
            assert connid.startswith("pid-") and not server.connections
            assert call(sock, address, WHOAMI)["result"][1] == connid  # one instance per connection
            assert server.admitted == 1
            # The service's limits.max_connections_per_ip (1) applies to the HTTP client's address.
            refused = jsonrpc(address, WHOAMI, source="127.0.0.6")[1]["error"]
            assert refused["code"] == -32001 and "limit 1" in refused["message"]
            assert jsonrpc(address, WHOAMI, source="127.0.0.7")[1]["result"][2] == "127.0.0.7"
        wait_until(lambda: server.admitted == 0, 10, "the slot to be given back")
        assert host.calls is not None
        assert dict(host.calls.items())[("pid", "whoami")].calls == 3


def test_forking_service_keeps_a_process_per_connection() -> None:
    with running_host(CONFIG) as host:
        address = host.gateway.address
        forked = {"jsonrpc": "2.0", "method": "forked.whoami", "id": 1}
        pids = []
        for _ in range(2):
            with socket.create_connection(address, timeout=10) as sock:
                first = call(sock, address, forked)["result"]
                assert call(sock, address, forked)["result"] == first  # same child, same instance
                pids.append(first[0])
        assert os.getpid() not in pids and pids[0] != pids[1]


def test_graceful_stop_waits_for_a_gateway_call_in_flight() -> None:
    with running_host(CONFIG) as host:
        address = host.gateway.address
        server = next(h.server for h in host.hosted if h.config.name == "pid")
        replies: list[Any] = []
        slow = {"jsonrpc": "2.0", "method": "pid.sleep", "params": [1.0], "id": 1}
        caller = threading.Thread(target=lambda: replies.append(jsonrpc(address, slow)))
        caller.start()
        try:
            wait_until(lambda: server.tracker.count == 1, 10, "the call to start")
            assert host.stop(grace=10)  # nothing cut short
        finally:
            caller.join(timeout=20)
        assert replies and replies[0][1]["result"] == 1.0


def test_the_host_package_does_not_import_the_client_library() -> None:
    code = "import sys, rpyc_host.gateway, rpyc_host.host; print('client' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr


def test_calls_are_server_spans_under_the_requests_traceparent() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(provider)
    try:
        with running_host(CONFIG) as host:
            address = host.gateway.address
            trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
            header = f"traceparent: 00-{trace_id}-{parent_id}-01\r\n"
            assert jsonrpc(address, WHOAMI, headers=header)[1]["result"][0] == os.getpid()
            no_header = jsonrpc(
                address, WHOAMI, source="127.0.0.8"
            )  # another address: the slot is per address
            assert no_header[1]["result"][0] == os.getpid()
    finally:
        tracing.disable()
    spans = [s for s in memory.get_finished_spans() if s.name == "pid/whoami"]
    assert len(spans) == 2 and all(s.kind is SpanKind.SERVER for s in spans)
    child, root = spans
    assert f"{child.context.trace_id:032x}" == trace_id and f"{child.parent.span_id:016x}" == parent_id
    assert root.parent is None and root.attributes["rpc.method"] == "whoami"

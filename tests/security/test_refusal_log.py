"""A flood of refusals from one address writes a few log lines, not one per refusal, while every
refusal is still answered with its reason and counted; the gateway refuses without a thread each."""

from __future__ import annotations

import logging
import re
import socket
import threading
from contextlib import ExitStack

import pytest

from rpyc_host.refusal_log import RefusalLog
from rpyc_host.testing import running_host, wait_until

FLOOD = 1000

DEMO_CAPPED = """
services:
  demo: {class: services.demo:DemoService, port: 0}
limits: {max_connections_per_ip: 1}
"""

GATEWAY_CAPPED = """
services:
  demo: {class: services.demo:DemoService, port: 0}
gateway: {enabled: true, port: 0, services: [demo], max_connections_per_ip: 1}
"""


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes its side."""
    data = b""
    for _ in range(100):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_thousand_refused_connections_write_one_line_and_are_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rpyc_host.security")
    with running_host(DEMO_CAPPED) as host, ExitStack() as stack:
        address = host.address("demo")
        held = stack.enter_context(
            socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0))
        )
        wait_until(lambda: host.hosted[0].server.admitted == 1, 10, "the first connection admitted")
        for _ in range(FLOOD):
            with socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0)) as sock:
                answer = read_all(sock)
            assert b"too many connections from 127.0.0.2" in answer and b"limit 1" in answer
        wait_until(lambda: host.refusals.snapshot().get("limit") == FLOOD, 10, "every refusal counted")
        lines = [r.getMessage() for r in caplog.records if "connection from 127.0.0.2" in r.getMessage()]
        # One line per 10 s: a second one only if this loaded machine took that long.
        assert 1 <= len(lines) <= 2 and "max_connections_per_ip (1) reached" in lines[0]
        gatekeeper = host.hosted[0].server.gatekeeper
        told = sum(int(m.group(1)) for line in lines if (m := re.search(r"\((\d+) more from", line)))
        # Every refusal is in a line, in a line's count, or still waiting for the next line.
        assert len(lines) + told + gatekeeper.refusal_log.unlogged("127.0.0.2", "limit") == FLOOD
        # Another address is logged on its own.
        with socket.create_connection(address, timeout=10, source_address=("127.0.0.3", 0)) as other:
            with socket.create_connection(address, timeout=10, source_address=("127.0.0.3", 0)) as sock:
                assert b"too many connections from 127.0.0.3" in read_all(sock)
            assert other.fileno() >= 0
        assert any("connection from 127.0.0.3" in r.getMessage() for r in caplog.records)
        held.close()


def test_the_gateway_refuses_a_flood_without_a_thread_or_a_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rpyc_host.gateway")
    with running_host(GATEWAY_CAPPED) as host, ExitStack() as stack:
        address = host.gateway.address
        stack.enter_context(socket.create_connection(address, timeout=10, source_address=("127.0.0.4", 0)))
        wait_until(
            lambda: host.gateway.open_connections("127.0.0.4") == 1, 10, "the first connection admitted"
        )
        threads_before = threading.active_count()
        peak = threads_before
        # Refused clients that stay connected after reading the answer: a thread per refusal
        # would wait on each of them.
        for _ in range(200):
            sock = stack.enter_context(
                socket.create_connection(address, timeout=10, source_address=("127.0.0.4", 0))
            )
            answer = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 503") and b"gateway.max_connections_per_ip: 1" in answer
            peak = max(peak, threading.active_count())
        assert peak <= threads_before + 2, f"{peak - threads_before} threads started for 200 refusals"
        wait_until(
            lambda: host.gateway.refusal_counts().get("max_connections_per_ip") == 200, 10, "refusals counted"
        )
        lines = [
            r.getMessage() for r in caplog.records if "refused a connection from 127.0.0.4" in r.getMessage()
        ]
        assert len(lines) == 1 and "gateway.max_connections_per_ip: 1" in lines[0]


TOKEN = "refusal-log-token-0123456789"
GATEWAY_TOKENS = f"""
services:
  demo: {{class: services.demo:DemoService, port: 0}}
security: {{tokens: [{TOKEN}]}}
gateway: {{enabled: true, port: 0, services: [demo]}}
"""


def test_a_blocked_address_gets_429_at_accept_before_it_sends_anything() -> None:
    with running_host(GATEWAY_TOKENS) as host:
        address = host.gateway.address
        wrong = b"Authorization: Bearer wrong-token-0123456789abcdef\r\n"
        request = b"POST /jsonrpc HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n" + wrong + b"\r\n{}"
        for _ in range(5):  # FAILURES_ALLOWED wrong tokens block the address
            with socket.create_connection(address, timeout=10, source_address=("127.0.0.6", 0)) as sock:
                sock.sendall(request)
                assert read_all(sock).startswith(b"HTTP/1.1 401")
        threads_before = threading.active_count()
        peak = threads_before
        with ExitStack() as stack:
            for _ in range(50):  # well within the 2 s the first block lasts
                sock = stack.enter_context(
                    socket.create_connection(address, timeout=10, source_address=("127.0.0.6", 0))
                )
                answer = read_all(sock)  # nothing sent: the answer comes from the accept thread
                assert answer.startswith(b"HTTP/1.1 429") and b"Retry-After: " in answer
                assert b"too many failed logins from 127.0.0.6" in answer
                peak = max(peak, threading.active_count())
        assert peak <= threads_before + 2, f"{peak - threads_before} threads started for 50 refusals"
        assert host.gateway.refusal_counts() == {"auth": 5, "throttled": 50}


def test_the_line_after_a_quiet_interval_says_how_many_were_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    logger = logging.getLogger("rpyc_host.test_refusal_log")
    refusals = RefusalLog(logger, every=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger=logger.name)
    written = [refusals.refused("127.0.0.5", "limit", "refused %s", "x") for _ in range(FLOOD)]
    assert written.count(True) == 1
    assert refusals.unlogged("127.0.0.5", "limit") == FLOOD - 1
    assert refusals.refused("127.0.0.5", "auth", "refused %s", "y")  # another kind: its own line
    now[0] += 10.5
    assert refusals.refused("127.0.0.5", "limit", "refused %s", "z")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused x",
        "refused y",
        f"refused z ({FLOOD - 1} more from this address not logged in the last 10 s)",
    ]
    assert refusals.unlogged("127.0.0.5", "limit") == 0


def test_addresses_remembered_are_bounded() -> None:
    now = [0.0]
    refusals = RefusalLog(
        logging.getLogger("rpyc_host.test_refusal_log"), every=10.0, max_tracked=100, clock=lambda: now[0]
    )
    for i in range(100):
        refusals.refused(f"127.0.1.{i}", "limit", "refused")
    now[0] += 11
    for i in range(100):
        refusals.refused(f"127.0.2.{i}", "limit", "refused")
    assert len(refusals._seen) <= 101

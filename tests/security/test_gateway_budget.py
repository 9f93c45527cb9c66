"""No single gateway client can take the gateway down: slow requests, nesting bombs and token
guessing each meet a limit that names itself, and an honest client keeps being served."""

from __future__ import annotations

import json
import logging
import select
import socket
import time
import urllib.request
from contextlib import ExitStack

import pytest

from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire.handshake import client_handshake
from tests.helpers import http, jsonrpc, post

TOKEN = "gateway-budget-token-0123456789"
ADD = {"jsonrpc": "2.0", "method": "demo.add", "params": [8, 8], "id": 1}
AUTH = f"Authorization: Bearer {TOKEN}\r\n"

SLOW_CONFIG = """
services:
  demo: {class: services.demo:DemoService, port: 0}
limits: {max_connections: 20}
gateway: {enabled: true, port: 0, services: [demo], timeout: 5, request_timeout: 2, max_connections_per_ip: 8}
"""


def test_slow_requests_get_408_and_one_address_cannot_take_every_slot() -> None:
    """20 connections from one address sending a byte every 0.25 s: 8 are admitted and cut with
    408 after the 2 s request deadline (a byte per read no longer extends it), the other 12 get
    503 naming the per-address cap, and a client from another address is served meanwhile."""
    with running_host(SLOW_CONFIG) as host, ExitStack() as stack:
        address = host.gateway.address
        socks: list[socket.socket] = []
        for i in range(20):
            sock = socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0))
            stack.callback(sock.close)
            # Half stall in the headers, half in the body.
            head = b"POST /jsonrpc HTTP/1.1\r\nHost: h\r\n"
            sock.sendall(head if i % 2 else head + b"Content-Length: 1000\r\n\r\n{")
            socks.append(sock)
        started = time.monotonic()
        answers: dict[socket.socket, tuple[bytes, float]] = {}
        honest: tuple[int, object] | None = None
        while len(answers) < len(socks) and time.monotonic() - started < 12:
            pending = [s for s in socks if s not in answers]
            readable, _, _ = select.select(pending, [], [], 0.25)  # also the dribble's pace
            for sock in readable:
                answers[sock] = (sock.recv(65536), time.monotonic() - started)
            for sock in pending:
                if sock not in answers:
                    try:
                        sock.sendall(b"x")
                    except OSError:
                        answers[sock] = (b"", time.monotonic() - started)
            if honest is None and time.monotonic() - started > 1.0:
                honest = jsonrpc(address, ADD, source="127.0.0.3")
        assert len(answers) == 20, "some slow connections were never answered"
        refused = [data for data, _ in answers.values() if data.startswith(b"HTTP/1.1 503 ")]
        timed_out = [(data, t) for data, t in answers.values() if data.startswith(b"HTTP/1.1 408 ")]
        assert len(refused) == 12 and len(timed_out) == 8, answers
        assert all(b"gateway.max_connections_per_ip: 8" in data for data in refused)
        assert all(b"request_timeout" in data and t < 7 for data, t in timed_out), timed_out
        assert honest is not None and honest[0] == 200 and honest[1]["result"] == 16  # type: ignore[index]
        counts = host.gateway.refusal_counts()
        assert counts["max_connections_per_ip"] == 12 and counts["request_timeout"] == 8
        for sock in socks:
            sock.close()
        wait_until(lambda: host.gateway.open_connections("127.0.0.2") == 0, 10, "the slow connections to end")
        assert jsonrpc(address, ADD, source="127.0.0.2")[1]["result"] == 16  # the address recovers


NEST_CONFIG = """
services:
  demo: {class: services.demo:DemoService, port: 0}
gateway: {enabled: true, port: 0, services: [demo], max_body_bytes: 8388608}
"""


def test_nesting_bombs_get_an_answer_and_the_server_is_unharmed() -> None:
    with running_host(NEST_CONFIG) as host:
        address = host.gateway.address
        where = f"{address[0]}:{address[1]}"
        bomb = b"[" * 100_000 + b"]" * 100_000
        status, _, body = http(address, post("/jsonrpc", bomb, where), timeout=30)
        reply = json.loads(body)
        assert status == 200 and reply["error"]["code"] == -32700 and reply["id"] is None

        deep: object = "x"
        for _ in range(50):
            deep = [deep]
        status, reply = jsonrpc(address, {"jsonrpc": "2.0", "method": "demo.echo", "params": [deep], "id": 2})
        assert reply["error"]["code"] == -32602 and "32 levels" in reply["error"]["message"]

        for levels in (1_000, 100_000):  # under and over the size decoded through ElementTree
            inner = "<value><array><data>" * levels + "</data></array></value>" * levels
            xml = (
                "<?xml version='1.0'?><methodCall><methodName>demo.echo</methodName>"
                f"<params><param>{inner}</param></params></methodCall>"
            ).encode()
            status, _, body = http(address, post("/RPC2", xml, where, ctype="text/xml"), timeout=60)
            assert status == 200 and b"<name>faultCode</name>" in body
            assert b"<int>-32602</int>" in body and b"32 levels" in body, body[:400]
        assert jsonrpc(address, ADD)[1]["result"] == 16


def test_xml_entity_bomb_is_refused() -> None:
    laughs = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    xml = (
        f'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY l0 "lol">{laughs}]>'
        "<methodCall><methodName>demo.echo</methodName><params><param><value><string>&l9;"
        "</string></value></param></params></methodCall>"
    ).encode()
    with running_host(NEST_CONFIG) as host:
        address = host.gateway.address
        status, _, body = http(address, post("/RPC2", xml, "h", ctype="text/xml"))
        assert status == 200 and b"<int>-32700</int>" in body and b"DOCTYPE" in body
        assert jsonrpc(address, ADD)[1]["result"] == 16


TOKEN_CONFIG = f"""
services:
  demo: {{class: services.demo:DemoService, port: 0}}
security: {{tokens: [{TOKEN}]}}
gateway: {{enabled: true, port: 0, services: [demo]}}
metrics: {{enabled: true, port: 0}}
"""


def test_token_guessing_is_throttled_for_both_doors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rpyc_host.gateway")
    with running_host(TOKEN_CONFIG) as host:
        address = host.gateway.address
        statuses, retry_after = [], []
        deadline = time.monotonic() + 30
        for i in range(300):
            if time.monotonic() > deadline:
                break
            wrong = f"Authorization: Bearer wrong-token-{i:020d}\r\n"
            status, headers, _ = http(address, post("/jsonrpc", b"{}", "h", extra=wrong), source="127.0.0.4")
            statuses.append(status)
            if status == 429:
                retry_after.append(int(headers["retry-after"]))
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses[:10]
        assert len(statuses) == 300 and min(retry_after) >= 1
        # The right token from the blocked address waits too; another address is served.
        status, _, body = http(
            address, post("/jsonrpc", json.dumps(ADD).encode(), "h", extra=AUTH), source="127.0.0.4"
        )
        assert status == 429 and b"too many failed logins" in body
        assert jsonrpc(address, ADD, headers=AUTH)[1]["result"] == 16
        # The rpyc port refuses the same address.
        demo_port = host.address("demo")[1]
        with (
            socket.create_connection(
                ("127.0.0.1", demo_port), timeout=10, source_address=("127.0.0.4", 0)
            ) as sock,
            pytest.raises(ConnectionError, match="too many failed logins"),
        ):
            client_handshake(sock, TOKEN)
        # Refused tokens are logged with the peer, not once per guess.
        logged = [
            r.getMessage() for r in caplog.records if "refused a request from 127.0.0.4" in r.getMessage()
        ]
        assert len(logged) == 1 and "(401)" in logged[0]
        metrics = host.metrics.address
        page = urllib.request.urlopen(f"http://{metrics[0]}:{metrics[1]}/metrics", timeout=10).read().decode()
        assert 'rpyc_host_gateway_refusals_total{reason="auth"} 5.0' in page
        assert 'rpyc_host_gateway_refusals_total{reason="throttled"} 296.0' in page


def test_failed_rpyc_logins_block_the_gateway_too() -> None:
    with running_host(TOKEN_CONFIG) as host:
        demo_port = host.address("demo")[1]
        for _ in range(5):
            with (
                socket.create_connection(
                    ("127.0.0.1", demo_port), timeout=10, source_address=("127.0.0.5", 0)
                ) as sock,
                pytest.raises(ConnectionError),
            ):
                client_handshake(sock, "not-the-token-not-the-token")
        address = host.gateway.address
        raw = post("/jsonrpc", json.dumps(ADD).encode(), "h", extra=AUTH)
        status, headers, _ = http(address, raw, source="127.0.0.5")
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert http(address, raw, source="127.0.0.6")[0] == 200

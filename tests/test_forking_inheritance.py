"""A forked connection process keeps none of the host's other sockets: not the gateway's
listener or its HTTP connections, not /metrics or the classic console, not the reaper's pidfds.
A descriptor it kept would hold the connection open after the host closed it, count against the
child's descriptor limit, and keep the gateway's port bound after the host let it go."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import rpyc

from rpyc_host.testing import ServerProcess
from tests.helpers import post, read_response

CONFIG = """
services:
  pid: {class: tests.test_gateway_inprocess:PidService, port: 0}
  forked: {class: tests.test_gateway_inprocess:PidService, port: 0, type: forking}
gateway: {enabled: true, port: 0, services: [pid, forked]}
metrics: {enabled: true, port: 0}
debug: {classic: {enabled: true, port: 0}}
"""
WHOAMI = json.dumps({"jsonrpc": "2.0", "method": "pid.whoami", "id": 1}).encode()


def tcp_ports(pid: int) -> list[int]:
    """The local ports of the TCP sockets process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def descriptors(pid: int, kind: str) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(kind) for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_connection_process_holds_only_its_own_connection(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(CONFIG))
    assert proc.ready is not None
    gateway = ("127.0.0.1", int(proc.ready["gateway"][1]))
    forked_port = proc.address("forked")[1]
    with socket.create_connection(gateway, timeout=10) as http:
        http.sendall(post("/jsonrpc", WHOAMI, f"{gateway[0]}:{gateway[1]}"))
        assert read_response(http)[0] == 200
        # Two connection processes, so the second is forked while the first is being served.
        first = rpyc.connect("127.0.0.1", forked_port, config={"sync_request_timeout": 10})
        second = rpyc.connect("127.0.0.1", forked_port, config={"sync_request_timeout": 10})
        try:
            child = second.root.whoami()[0]
            assert child != proc.pid and first.root.whoami()[0] not in (child, proc.pid)
            # Its own connection on the service's port, and no other TCP socket or pidfd.
            assert tcp_ports(child) == [forked_port]
            assert descriptors(child, "anon_inode:[pidfd]") == 0

            # The gateway ends the HTTP connection (Connection: close): the client reads the end
            # at once, although a connection process was forked while it was open.
            http.sendall(
                post("/jsonrpc", WHOAMI, f"{gateway[0]}:{gateway[1]}", extra="Connection: close\r\n")
            )
            status, headers, body = read_response(http)
            assert status == 200
            rest = body[int(headers["content-length"]) :]
            http.settimeout(5)
            for _ in range(100):
                chunk = http.recv(65536)
                if not chunk:
                    break
                rest += chunk
            assert rest == b""
        finally:
            first.close()
            second.close()

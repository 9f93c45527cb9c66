"""``services.<name>.instance``: which instance serves a connection or a call, on every server
type, and how often the connection hooks run."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

import client
from rpyc_host.config import load_config, parse_config
from rpyc_host.errors import ConfigError
from rpyc_host.host import Host
from rpyc_host.reload import reload
from rpyc_host.testing import running_host, wait_until
from tests.helpers import SERVER_TYPES, post, read_response

CONFIG = """
server: {{type: {server_type}, pool_size: 4}}
services:
  modes:
    class: tests.sample_services:InstanceModeService
    port: 0
    {instance}
    options: {{events: "{events}"}}
"""

# What a second call on the same connection, and a call on another connection, see of the
# attribute the first call set.
SEEN = {
    "connection": ("a", None),
    "shared": ("a", "a"),
    "call": (None, None),
}


@pytest.mark.parametrize("mode", [None, "connection", "shared", "call"])
@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_each_mode_on_each_server(server_type: str, mode: str | None, tmp_path: Path) -> None:
    events = tmp_path / "events"
    text = CONFIG.format(server_type=server_type, instance=f"instance: {mode}" if mode else "", events=events)
    expected_same, expected_other = SEEN[mode or "connection"]
    if server_type == "forking" and mode == "shared":
        expected_other = None  # shared within one child process, and each connection has its own
    with running_host(text) as host:
        port = host.address("modes")[1]
        with client.connect(host="127.0.0.1", port=port) as first:
            first.root.remember("a")
            assert first.root.recall() == expected_same
            # on_connect ran on the instance the calls see (in call mode: copied from it).
            connid = first.root.connection_id()
            assert connid and connid.startswith("modes-")
            with client.connect(host="127.0.0.1", port=port) as second:
                assert second.root.recall() == expected_other
                second_id = second.root.connection_id()
                if mode == "shared" and server_type != "forking":
                    assert second_id == first.root.connection_id()  # the last on_connect won
                else:
                    assert second_id != connid

        # Each hook ran once per connection, with its connection.
        def hooks() -> list[str]:
            return sorted(events.read_text().split("\n")[:-1]) if events.exists() else []

        wait_until(lambda: len(hooks()) == 4, 10, "both connections' hooks")
        lines = hooks()
        assert [line.split()[0] for line in lines].count("connect") == 2
        assert {line.split()[1] for line in lines if line.startswith("disconnect")} == {
            line.split()[1] for line in lines if line.startswith("connect")
        }


def test_an_unknown_mode_is_one_line_naming_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("services:\n  demo: {class: services.demo:DemoService, port: 0, instance: percall}\n")
    text = str(caught.value)
    assert "\n" not in text
    assert "services.demo.instance" in text and "'percall'" in text
    assert "call, connection, shared" in text


def test_the_default_is_connection() -> None:
    config = parse_config("services:\n  demo: {class: services.demo:DemoService, port: 0}\n")
    assert config.service("demo").instance == "connection"


GATEWAY_CONFIG = """
services:
  modes:
    class: tests.sample_services:InstanceModeService
    port: 0
    instance: {instance}
gateway: {{enabled: true, port: 0, services: [modes]}}
"""


def _jsonrpc(sock: socket.socket, address: tuple[str, int], method: str, *params: Any) -> Any:
    payload = {"jsonrpc": "2.0", "method": f"modes.{method}", "params": list(params), "id": 1}
    sock.sendall(post("/jsonrpc", json.dumps(payload).encode(), f"{address[0]}:{address[1]}"))
    status, _, body = read_response(sock)
    assert status == 200, body
    return json.loads(body)["result"]


@pytest.mark.parametrize("mode", ["connection", "shared", "call"])
def test_gateway_clients_get_the_same_modes(mode: str) -> None:
    expected_same, expected_other = SEEN[mode]
    with running_host(GATEWAY_CONFIG.format(instance=mode)) as host:
        address = host.gateway.address
        with socket.create_connection(address, timeout=10) as sock:  # one keep-alive connection
            _jsonrpc(sock, address, "remember", "a")
            assert _jsonrpc(sock, address, "recall") == expected_same
            assert _jsonrpc(sock, address, "connection_id").startswith("modes-")
            with client.connect(host="127.0.0.1", port=host.address("modes")[1]) as conn:
                assert conn.root.recall() == expected_other


def test_a_reload_keeps_the_running_mode_and_says_it_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    text = "services:\n  modes: {{class: tests.sample_services:InstanceModeService, port: 0, instance: {}}}\n"
    path.write_text(text.format("shared"))
    host = Host(load_config(path))
    host.start()
    try:
        port = host.address("modes")[1]
        path.write_text(text.format("call"))
        with caplog.at_level(logging.WARNING, logger="rpyc_host"):
            assert reload(host)
        assert "services.modes.instance changed; that needs a restart" in caplog.text
        with client.connect(host="127.0.0.1", port=port) as conn:
            conn.root.remember("kept")
            assert conn.root.recall() == "kept"  # still shared, not per call
    finally:
        host.stop(grace=0)


@pytest.mark.parametrize("mode", ["connection", "call"])
def test_each_call_in_a_batch_gets_the_modes_instance(mode: str, tmp_path: Path) -> None:
    text = CONFIG.format(server_type="threaded", instance=f"instance: {mode}", events=tmp_path / "e")
    with (
        running_host(text) as host,
        client.connect(host="127.0.0.1", port=host.address("modes")[1]) as conn,
        client.batch(conn) as b,  # sent, in one request, when the block ends
    ):
        b.root.remember("a")
        recalled = b.root.recall()
    assert recalled.value == SEEN[mode][0]

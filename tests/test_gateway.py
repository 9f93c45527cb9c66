"""The gateway over real HTTP: stdlib xmlrpc.client, curl, Node's fetch, introspection, JSON-RPC
batches and every error code; after each error the same gateway keeps serving."""

from __future__ import annotations

import json
import socket
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rpyc_host.host import Host
from rpyc_host.testing import running_host
from tests.helpers import curl, http, jsonrpc, node_fetch, post, read_response

CONFIG = """
services:
  demo: {{class: services.demo:DemoService, port: 0}}
  files: {{class: services.files:FileService, port: 0, options: {{root: "{root}"}}}}
  ingest: {{class: services.ingest:IngestService, port: 0, options: {{database: "sqlite:///{db}"}}}}
gateway: {{enabled: true, port: 0, services: [demo, files, ingest], timeout: 5}}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("gateway")
    with running_host(CONFIG.format(root=tmp / "files", db=tmp / "ingest.db")) as host:
        yield host
    assert host._stopped.is_set()


@pytest.fixture
def address(host: Host) -> tuple[str, int]:
    address: tuple[str, int] = host.gateway.address
    return address


@pytest.fixture
def proxy(address: tuple[str, int]) -> Iterator[Any]:
    with xmlrpc.client.ServerProxy(f"http://{address[0]}:{address[1]}/RPC2", allow_none=True) as proxy:
        yield proxy


def still_serving(address: tuple[str, int]) -> None:
    status, reply = jsonrpc(address, {"jsonrpc": "2.0", "method": "demo.add", "params": [2, 3], "id": "ok"})
    assert (status, reply["result"]) == (200, 5)


def call_error(address: tuple[str, int], method: str, params: Any) -> dict[str, Any]:
    status, reply = jsonrpc(address, {"jsonrpc": "2.0", "method": method, "params": params, "id": 7})
    assert status == 200 and reply["id"] == 7, reply
    error: dict[str, Any] = reply["error"]
    return error


# -- clients ------------------------------------------------------------------------------------------


def test_stdlib_xmlrpc_client(proxy: Any, address: tuple[str, int]) -> None:
    assert proxy.demo.add(8, 8) == 16
    assert proxy.demo.add(1.5, 2) == 3.5
    assert proxy.demo.echo("你好, world") == "你好, world"
    assert proxy.demo.ping() == "pong"
    session = dict(proxy.demo.session())
    # One rpyc connection for the whole keep-alive HTTP connection (session() counts itself).
    assert session["calls"] == 5


def test_curl_jsonrpc_and_xmlrpc(address: tuple[str, int]) -> None:
    url = f"http://{address[0]}:{address[1]}"
    done = curl(
        "-H", "Content-Type: application/json",
        "-d", '{"jsonrpc": "2.0", "method": "demo.add", "params": [8, 8], "id": 1}',
        f"{url}/jsonrpc",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"jsonrpc": "2.0", "result": 16, "id": 1}
    body = xmlrpc.client.dumps(("curl",), "demo.echo")
    done = curl("-H", "Content-Type: text/xml", "--data-binary", body, f"{url}/RPC2")
    assert done.returncode == 0, done.stderr
    assert xmlrpc.client.loads(done.stdout)[0] == ("curl",)


def test_node_fetch(address: tuple[str, int]) -> None:
    url = f"http://{address[0]}:{address[1]}"
    request = json.dumps({"jsonrpc": "2.0", "method": "demo.echo", "params": ["node"], "id": "n"})
    reply = node_fetch(f"{url}/jsonrpc", request, "application/json")
    assert reply["status"] == 200
    assert json.loads(reply["body"]) == {"jsonrpc": "2.0", "result": "node", "id": "n"}
    reply = node_fetch(f"{url}/RPC2", xmlrpc.client.dumps((20, 22), "demo.add"), "text/xml")
    assert reply["status"] == 200 and xmlrpc.client.loads(reply["body"])[0] == (42,)


def test_keep_alive_and_http10(address: tuple[str, int]) -> None:
    host = f"{address[0]}:{address[1]}"
    body = json.dumps({"jsonrpc": "2.0", "method": "demo.session", "id": 1}).encode()
    with socket.create_connection(address, timeout=10) as sock:
        calls = []
        for _ in range(3):
            sock.sendall(post("/jsonrpc", body, host))
            status, headers, data = read_response(sock)
            assert status == 200 and "connection" not in headers
            calls.append(dict(json.loads(data)["result"])["calls"])
        assert calls == [1, 2, 3]  # same connection, same rpyc session
    status, headers, _ = http(address, post("/jsonrpc", body, host).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    assert status == 200 and headers["connection"] == "close"


def test_http_errors(address: tuple[str, int]) -> None:
    host = f"{address[0]}:{address[1]}"
    assert http(address, f"GET /jsonrpc HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())[0] == 405
    assert http(address, post("/nowhere", b"{}", host))[0] == 404
    assert http(address, b"NONSENSE\r\n\r\n")[0] == 400
    chunked = f"POST /jsonrpc HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert http(address, chunked.encode())[0] == 411
    still_serving(address)


# -- introspection ------------------------------------------------------------------------------------


def test_introspection(proxy: Any) -> None:
    names = proxy.system.listMethods()
    for name in (
        "demo.add",
        "demo.echo",
        "files.ls",
        "files.read_bytes",
        "ingest.submit",
        "system.multicall",
    ):
        assert name in names
    assert not [n for n in names if n.split(".")[-1].startswith("_") or "on_connect" in n]
    help_text = proxy.system.methodHelp("demo.echo")
    assert help_text.startswith("demo.echo(text: str) -> str") and "unchanged" in help_text
    assert proxy.system.methodSignature("demo.echo") == [["string", "string"]]
    multi = xmlrpc.client.MultiCall(proxy)
    multi.demo.add(1, 2)
    multi.demo.nothing()
    multi.demo.echo("x")
    results = multi()
    assert results[0] == 3 and results[2] == "x"
    with pytest.raises(xmlrpc.client.Fault) as info:
        results[1]
    assert info.value.faultCode == -32601 and "demo.nothing" in info.value.faultString


def test_xmlrpc_faults(proxy: Any, address: tuple[str, int]) -> None:
    cases = [
        (lambda: proxy.demo.nothing(), -32601, "did you mean"),
        (lambda: proxy.demo.add(1), -32602, "missing a required argument"),
        (lambda: proxy.demo.add("a", 1), -32000, "TypeError: add(a, b): a must be a number"),
        (lambda: proxy.demo.new_counter(1), -32002, "live object (Counter)"),
        (lambda: proxy.demo.add(2**30, 2**30), -32603, "XML-RPC cannot carry"),
    ]
    for call, code, text in cases:
        with pytest.raises(xmlrpc.client.Fault) as info:
            call()
        assert info.value.faultCode == code and text in info.value.faultString
        assert "Traceback" not in info.value.faultString
        assert proxy.demo.add(1, 1) == 2  # the same connection keeps working
    status, _, body = http(address, post("/RPC2", b"<methodCall><oops", f"{address[0]}:{address[1]}"))
    assert status == 200
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(body)
    assert info.value.faultCode == -32700


# -- JSON-RPC -----------------------------------------------------------------------------------------


def test_jsonrpc_batch_mixing_calls_notifications_and_errors(address: tuple[str, int], host: Host) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "demo.add", "params": [1, 2], "id": 1},
        {"jsonrpc": "2.0", "method": "files.mkdir", "params": ["made-by-notification"]},  # notification
        {"jsonrpc": "2.0", "method": "demo.nothing", "id": 2},
        {"jsonrpc": "2.0", "method": "demo.echo", "params": {"text": "kw"}, "id": 3},
        {"jsonrpc": "2.0", "method": "demo.add", "params": ["x", 1], "id": 4},
        {"jsonrpc": "2.0", "method": "demo.nothing"},  # a failing notification: no reply either
        42,
    ]
    status, replies = jsonrpc(address, batch)
    assert status == 200
    by_id = {r["id"]: r for r in replies if r["id"] is not None}
    assert len(replies) == 5
    assert by_id[1]["result"] == 3
    assert by_id[2]["error"]["code"] == -32601
    assert by_id[3]["result"] == "kw"
    assert by_id[4]["error"]["code"] == -32000
    assert by_id[4]["error"]["data"] == {
        "type": "TypeError",
        "message": "add(a, b): a must be a number, got str",
    }
    assert [r["error"]["code"] for r in replies if r["id"] is None] == [-32600]
    _, exists = jsonrpc(
        address, {"jsonrpc": "2.0", "method": "files.exists", "params": ["made-by-notification"], "id": 1}
    )
    assert exists["result"] is True
    status, reply = jsonrpc(address, [{"jsonrpc": "2.0", "method": "demo.ping"}])
    assert status == 204 and not reply  # only notifications: nothing to return
    still_serving(address)


def test_jsonrpc_every_error_code(address: tuple[str, int]) -> None:
    host = f"{address[0]}:{address[1]}"
    status, _, body = http(address, post("/jsonrpc", b'{"jsonrpc": "2.0", "method"', host))
    assert status == 200 and json.loads(body)["error"]["code"] == -32700
    assert json.loads(body)["id"] is None
    for bad in ({"jsonrpc": "1.0", "method": "demo.ping", "id": 1}, {"jsonrpc": "2.0", "method": 5, "id": 1}):
        assert jsonrpc(address, bad)[1]["error"]["code"] == -32600
    assert jsonrpc(address, [])[1]["error"]["code"] == -32600
    assert (
        jsonrpc(address, {"jsonrpc": "2.0", "method": "demo.ping", "params": 3, "id": 1})[1]["error"]["code"]
        == -32600
    )
    assert call_error(address, "nope.add", [1, 2])["code"] == -32601
    assert call_error(address, "demo.add", [1, 2, 3])["code"] == -32602
    assert call_error(address, "demo.add", {"a": 1, "c": 2})["code"] == -32602
    assert call_error(address, "files.write_bytes", ["f", {"__bytes__": "not base64!"}])["code"] == -32602
    internal = call_error(address, "demo.add", [1e308, 1e308])  # inf: no JSON for it
    assert internal["code"] == -32603 and "JSON cannot carry" in internal["message"]
    server = call_error(address, "files.ls", ["no-such-dir"])
    assert server["code"] == -32000 and server["data"]["type"] == "FileNotFoundError"
    assert "Traceback" not in json.dumps(server) and "/tmp" not in json.dumps(server)
    live = call_error(address, "demo.new_counter", [1])
    assert live["code"] == -32002 and "Counter" in live["message"]
    still_serving(address)


def test_bytes_travel_as_base64_in_json(address: tuple[str, int]) -> None:
    data = bytes(range(256))
    import base64

    encoded = base64.b64encode(data).decode()
    status, reply = jsonrpc(
        address,
        {
            "jsonrpc": "2.0",
            "method": "files.write_bytes",
            "params": ["blob.bin", {"__bytes__": encoded}],
            "id": 1,
        },
    )
    assert status == 200 and reply["result"][0] == 256
    _, reply = jsonrpc(
        address, {"jsonrpc": "2.0", "method": "files.read_bytes", "params": ["blob.bin"], "id": 2}
    )
    assert reply["result"] == {"__bytes__": encoded}


def test_ingest_through_the_gateway(proxy: Any) -> None:
    receipt = proxy.ingest.submit("gw.test", '{"a": 1}\n{"a": 2}\n', "gw-batch-1")
    assert receipt[:3] == ["gw-batch-1", 2, 0]
    assert proxy.ingest.count("gw.test") == 2


def test_startup_error_when_port_taken(tmp_path: Path) -> None:
    from rpyc_host.errors import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = f"""
services:
  demo: {{class: services.demo:DemoService, port: 0}}
gateway: {{enabled: true, port: {port}, services: [demo]}}
"""
        with (
            pytest.raises(StartupError, match=rf"gateway: cannot listen on 127.0.0.1:{port}"),
            running_host(config),
        ):
            pass

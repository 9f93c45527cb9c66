"""Gateway security and limits: Bearer tokens, TLS (with and without client certificates), the
body size limit, the timeout, the listen backlog; the gateway keeps serving after each."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest

import client
from rpyc_host.host import Host
from rpyc_host.testing import Certificates, running_host
from tests.helpers import curl, http, jsonrpc, post, read_response, read_responses

TOKEN = "gateway-test-token-0123456789"
ADD = {"jsonrpc": "2.0", "method": "demo.add", "params": [8, 8], "id": 1}


def gateway_config(extra: str = "", gateway: str = "") -> str:
    return f"""
services:
  demo: {{class: services.demo:DemoService, port: 0}}
gateway: {{enabled: true, port: 0, services: [demo], max_body_bytes: 4096, timeout: 1.0{gateway}}}
{extra}
"""


@pytest.fixture(scope="module")
def token_host() -> Iterator[Host]:
    with running_host(gateway_config(f"security: {{tokens: [{TOKEN}]}}")) as host:
        yield host


def test_bearer_token_required(token_host: Host) -> None:
    address = token_host.gateway.address
    for header in (
        "",
        "Authorization: Bearer wrong-token-wrong-token\r\n",
        f"Authorization: Basic {TOKEN}\r\n",
    ):
        status, headers, body = http(address, post("/jsonrpc", json.dumps(ADD).encode(), "h", extra=header))
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), body
        assert TOKEN.encode() not in body
    status, reply = jsonrpc(address, ADD, headers=f"Authorization: Bearer {TOKEN}\r\n")
    assert (status, reply["result"]) == (200, 16)  # still serving after the refusals


def test_bearer_token_with_stdlib_client_and_curl(token_host: Host) -> None:
    url = f"http://{token_host.gateway.address[0]}:{token_host.gateway.address[1]}"
    with (
        xmlrpc.client.ServerProxy(f"{url}/RPC2") as anonymous,
        pytest.raises(xmlrpc.client.ProtocolError) as info,
    ):
        anonymous.demo.add(1, 2)
    assert info.value.errcode == 401
    with xmlrpc.client.ServerProxy(f"{url}/RPC2", headers=[("Authorization", f"Bearer {TOKEN}")]) as proxy:
        assert proxy.demo.add(8, 8) == 16
    done = curl("-o", "/dev/null", "-w", "%{http_code}", "-d", json.dumps(ADD), f"{url}/jsonrpc")
    assert done.stdout == "401"
    done = curl("-H", f"Authorization: Bearer {TOKEN}", "-d", json.dumps(ADD), f"{url}/jsonrpc")
    assert json.loads(done.stdout)["result"] == 16


def test_backend_connections_carry_the_token(token_host: Host) -> None:
    """The services require the token too: a plain rpyc client without it is refused, while the
    gateway's own connections (which send it) work."""
    with pytest.raises(client.ConnectError):
        client.connect(host="127.0.0.1", port=token_host.address("demo")[1], retries=0, timeout=5)
    assert (
        jsonrpc(token_host.gateway.address, ADD, headers=f"Authorization: Bearer {TOKEN}\r\n")[1]["result"]
        == 16
    )


def test_oversize_body_gets_413_and_the_gateway_keeps_serving(token_host: Host) -> None:
    address = token_host.gateway.address
    big = json.dumps({"jsonrpc": "2.0", "method": "demo.echo", "params": ["x" * 10_000], "id": 1}).encode()
    status, headers, body = http(
        address, post("/jsonrpc", big, "h", extra=f"Authorization: Bearer {TOKEN}\r\n")
    )
    assert status == 413 and headers["connection"] == "close" and b"4096" in body
    url = f"http://{address[0]}:{address[1]}/RPC2"
    with xmlrpc.client.ServerProxy(url, headers=[("Authorization", f"Bearer {TOKEN}")]) as proxy:
        with pytest.raises(xmlrpc.client.ProtocolError) as info:
            proxy.demo.echo("y" * 10_000)
        assert info.value.errcode == 413
    # curl sends "Expect: 100-continue" for bodies over 1 kB: refused before the body is sent.
    done = curl(
        "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {TOKEN}", "-d", big, url
    )
    assert done.stdout == "413"
    medium = json.dumps({"jsonrpc": "2.0", "method": "demo.echo", "params": ["z" * 3000], "id": 1})
    done = curl(
        "-H", f"Authorization: Bearer {TOKEN}", "-d", medium, f"http://{address[0]}:{address[1]}/jsonrpc"
    )
    assert json.loads(done.stdout)["result"] == "z" * 3000  # 100-continue answered: no 1 s stall
    assert jsonrpc(address, ADD, headers=f"Authorization: Bearer {TOKEN}\r\n")[1]["result"] == 16


def test_timeouts(token_host: Host) -> None:
    address = token_host.gateway.address
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"POST /jsonrpc HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and then nothing
        started = time.monotonic()
        data = sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 5
    with socket.create_connection(address, timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""  # an idle keep-alive connection is closed after gateway.timeout
        assert time.monotonic() - started < 5
    assert jsonrpc(address, ADD, headers=f"Authorization: Bearer {TOKEN}\r\n")[1]["result"] == 16


def test_listen_backlog_at_least_128(token_host: Host) -> None:
    assert shutil.which("ss"), "needs ss from iproute2: scripts/test.sh installs it"
    port = token_host.gateway.address[1]
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout
    assert int(out.split()[2]) >= 128  # Send-Q of a listening socket is its backlog


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem_dir(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's CA, server and client certificates as ca.pem, server.pem/.key, client.pem/.key."""
    directory = tmp_path_factory.mktemp("pem")
    for source, name in (
        (certs.ca, "ca.pem"),
        (certs.server_cert, "server.pem"),
        (certs.server_key, "server.key"),
        (certs.client_cert, "client.pem"),
        (certs.client_key, "client.key"),
    ):
        shutil.copy(source, directory / name)
    return directory


def tls_call(address: tuple[str, int], context: ssl.SSLContext) -> int:
    with xmlrpc.client.ServerProxy(f"https://{address[0]}:{address[1]}/RPC2", context=context) as proxy:
        result: int = proxy.demo.add(8, 8)
        return result


def test_tls(pem_dir: Path) -> None:
    tls = f"security: {{tls: {{cert: {pem_dir / 'server.pem'}, key: {pem_dir / 'server.key'}}}}}"
    with running_host(gateway_config(tls)) as host:
        address = host.gateway.address
        context = ssl.create_default_context(cafile=str(pem_dir / "ca.pem"))
        assert tls_call(address, context) == 16
        with pytest.raises(OSError):  # plain HTTP to a TLS port
            http(address, post("/jsonrpc", json.dumps(ADD).encode(), "h"), timeout=3)
        assert tls_call(address, context) == 16


def test_tls_with_client_certificates(pem_dir: Path) -> None:
    files = f"cert: {pem_dir / 'server.pem'}, key: {pem_dir / 'server.key'}, ca: {pem_dir / 'ca.pem'}"
    tls = f"security: {{tls: {{{files}}}}}"
    with running_host(gateway_config(tls)) as host:
        address = host.gateway.address
        anonymous = ssl.create_default_context(cafile=str(pem_dir / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_call(address, anonymous)
        with_cert = ssl.create_default_context(cafile=str(pem_dir / "ca.pem"))
        with_cert.load_cert_chain(str(pem_dir / "client.pem"), str(pem_dir / "client.key"))
        assert tls_call(address, with_cert) == 16


# -- hostile HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_host() -> Iterator[Host]:
    with running_host(gateway_config()) as host:
        yield host


def test_smuggling_shapes_are_refused_and_nothing_after_them_runs(open_host: Host) -> None:
    address = open_host.gateway.address
    body = json.dumps(ADD).encode()
    hidden = post("/jsonrpc", body, "h")
    shapes = {
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n": (400, 411),
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n": (400, 411),
        b"Content-Length: 5\r\nContent-Length: 6\r\n": (400,),
        b"Content-Length: +5\r\n": (400,),
        b"Content-Length : 5\r\n": (400,),
        b"Transfer-Encoding: identity, chunked\r\n": (400, 411),
    }
    for headers, allowed in shapes.items():
        raw = b"POST /jsonrpc HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n0\r\n\r\n" + hidden
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(raw)
            status, reply_headers, _ = read_response(sock)
            assert status in allowed and reply_headers["connection"] == "close", (headers, status)
            rest = b""
            while chunk := sock.recv(65536):
                rest += chunk
            assert rest == b"", (headers, rest)  # the request hidden behind it was not answered
    assert jsonrpc(address, ADD)[1]["result"] == 16


def test_huge_headers_get_431(open_host: Host) -> None:
    address = open_host.gateway.address
    raw = b"POST /jsonrpc HTTP/1.1\r\nHost: h\r\n" + b"X-Filler: " + b"a" * 70_000 + b"\r\n\r\n"
    status, _, body = http(address, raw)
    assert status == 431 and b"65536" in body
    many = b"".join(b"X-%d: b\r\n" % i for i in range(10_000))
    assert http(address, b"POST /jsonrpc HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n")[0] == 431
    assert jsonrpc(address, ADD)[1]["result"] == 16


def test_pipelined_requests_are_answered_in_order(open_host: Host) -> None:
    address = open_host.gateway.address
    requests = [{"jsonrpc": "2.0", "method": "demo.echo", "params": [f"r{i}"], "id": i} for i in range(20)]
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"".join(post("/jsonrpc", json.dumps(r).encode(), "h") for r in requests))
        got = [json.loads(body)["result"] for _, body in read_responses(sock, len(requests))]
    assert got == [f"r{i}" for i in range(20)]

"""Stdlib XML-RPC clients as people write them, against ``python server.py`` with the gateway
on: ``ServerProxy`` calling demo.add(8, 8), demo.echo, and the files service's pwd/ls/mkdir/cp plus
an image uploaded and downloaded as ``Binary``."""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Callable
from pathlib import Path

from rpyc_host.testing import ServerProcess
from tests.helpers import make_png

CONFIG = """
services:
  demo: {{class: services.demo:DemoService, port: 0}}
  files: {{class: services.files:FileService, port: 0, options: {{root: "{root}"}}}}
gateway: {{enabled: true, port: 0, services: [demo, files]}}
"""


def test_stdlib_clients_through_server_py(
    tmp_path: Path, write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(write_config(CONFIG.format(root=tmp_path / "files")))
    assert server.ready is not None and server.ready["gateway"] is not None, server.log
    gateway_host, gateway_port = server.ready["gateway"]
    url = f"http://{gateway_host}:{gateway_port}/RPC2"

    s = xmlrpc.client.ServerProxy(url)
    assert s.demo.add(8, 8) == 16
    assert s.demo.echo("cloud") == "cloud"
    assert s.files.pwd() == "."
    assert s.files.ls() == []
    assert s.files.mkdir("tmp1") == "tmp1"
    png = make_png()
    size, digest = s.files.write_bytes("girl.png", xmlrpc.client.Binary(png))
    assert size == len(png) and len(digest) == 64
    assert s.files.cp("girl.png", "tmp1/boy.png") == "tmp1/boy.png"
    assert s.files.ls() == ["girl.png", "tmp1"]
    got = s.files.read_bytes("tmp1/boy.png")
    assert isinstance(got, xmlrpc.client.Binary) and got.data == png
    assert got.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "files" / "tmp1" / "boy.png").read_bytes() == png
    assert s.files.cd("tmp1") == "tmp1"
    assert s.files.pwd() == "tmp1"  # per-connection state survives across keep-alive calls
    s("close")()
    assert xmlrpc.client.ServerProxy(url).files.pwd() == "."  # a new connection starts at the root
    assert "Traceback" not in server.log

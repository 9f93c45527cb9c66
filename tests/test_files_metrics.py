"""The file service's figures on the host's /metrics: bytes in and out, uploads and downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import rpyc

import client
from client import files
from rpyc_host.testing import running_host
from tests.helpers import get, metric, metrics_url

SIZE = (5 << 20) + 1234  # more than one bulk piece, and not a multiple of anything


def test_upload_and_download_show_on_metrics(tmp_path: Path) -> None:
    text = f"""
services:
  files: {{class: services.files:FileService, port: 0, options: {{root: "{tmp_path / "root"}"}}}}
metrics: {{enabled: true, port: 0}}
logging: {{level: WARNING}}
"""
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(os.urandom(SIZE))
    with running_host(text) as host:
        url = metrics_url(host) + "/metrics"
        page = get(url)[1]
        for name in ("bytes_in", "bytes_out", "uploads", "downloads"):
            assert metric(page, f"rpyc_host_service_files_{name}", service="files") == 0
        address = host.address("files")
        with client.connect(host=address[0], port=address[1]) as conn:
            files.upload(conn, src, "a.bin")
            page = get(url)[1]
            assert metric(page, "rpyc_host_service_files_bytes_in", service="files") == SIZE
            assert metric(page, "rpyc_host_service_files_uploads", service="files") == 1
            assert metric(page, "rpyc_host_service_files_bytes_out", service="files") == 0
        # A second connection: the counts are the service's, not one connection's.
        with client.connect(host=address[0], port=address[1]) as conn:
            files.download(conn, "a.bin", back)
            with pytest.raises(AttributeError):
                conn.root.metrics()  # for the host only, never exposed to clients
        assert back.read_bytes() == src.read_bytes()
        page = get(url)[1]
        assert metric(page, "rpyc_host_service_files_bytes_in", service="files") == SIZE
        assert metric(page, "rpyc_host_service_files_bytes_out", service="files") == SIZE
        assert metric(page, "rpyc_host_service_files_uploads", service="files") == 1
        assert metric(page, "rpyc_host_service_files_downloads", service="files") == 1


def test_small_and_rpc_transfers_are_counted(tmp_path: Path) -> None:
    text = f"""
services:
  files: {{class: services.files:FileService, port: 0, options: {{root: "{tmp_path / "root"}"}}}}
metrics: {{enabled: true, port: 0}}
logging: {{level: WARNING}}
"""
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(os.urandom(SIZE))
    with running_host(text) as host, rpyc.connect(*host.address("files")) as conn:
        conn.root.write_bytes("small", b"x" * 1000)
        assert conn.root.read_bytes("small") == b"x" * 1000
        files.upload(conn, src, "big", bulk=False)
        files.download(conn, "big", back, bulk=False)
        page = get(metrics_url(host) + "/metrics")[1]
        assert metric(page, "rpyc_host_service_files_bytes_in", service="files") == 1000 + SIZE
        assert metric(page, "rpyc_host_service_files_bytes_out", service="files") == 1000 + SIZE
        assert metric(page, "rpyc_host_service_files_uploads", service="files") == 2
        assert metric(page, "rpyc_host_service_files_downloads", service="files") == 2

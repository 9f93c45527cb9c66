"""The file service with its root on a tmpfs (/dev/shm): uploads and downloads over the side
connection arrive whole there, whether the kernel's tmpfs takes O_DIRECT (Linux 6.6 and later)
or refuses it (older kernels: the service writes buffered instead)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

import client
from client import files
from rpyc_host.testing import running_host
from rpyc_host.wire import bulk

MEMORY_FS = Path("/dev/shm")
SIZE = 3 * bulk.CHUNK + 12345  # several pieces and a tail that is not a multiple of O_DIRECT's alignment


@pytest.fixture
def shm_root() -> Iterator[Path]:
    # Linux always mounts a tmpfs here; a machine without one fails this test rather than skip it.
    assert MEMORY_FS.is_dir(), f"{MEMORY_FS} (a tmpfs) is missing"
    with tempfile.TemporaryDirectory(prefix="rpyc-host-test-", dir=MEMORY_FS) as tmp:
        yield Path(tmp)


def config(root: Path) -> str:
    return f"""
services:
  files: {{class: services.files:FileService, port: 0, options: {{root: "{root}"}}}}
logging: {{level: WARNING}}
"""


def test_upload_and_download_with_the_root_on_tmpfs(shm_root: Path, tmp_path: Path) -> None:
    root = shm_root / "root"
    data = os.urandom(SIZE)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    digest = blake3.blake3(data).hexdigest()
    with running_host(config(root)) as host:
        addr, port = host.address("files")
        with client.connect(host=addr, port=port, timeout=10) as conn:
            assert files.upload(conn, src, "up.bin") == (SIZE, digest)
            assert (root / "up.bin").read_bytes() == data
            assert not list(root.rglob(".upload-*")), "an upload temporary was left behind"
            back = shm_root / "back.bin"  # the client's copy on the tmpfs too
            assert files.download(conn, "up.bin", back) == (SIZE, digest)
            assert back.read_bytes() == data
            assert not Path(str(back) + ".part").exists()

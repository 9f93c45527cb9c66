"""Streaming uploads and downloads: atomic, verified, resumable, within limits, under races."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import blake3
import pytest

import client
from client import files
from rpyc_host.testing import running_host, wait_until
from services.files import XATTR_SHA256
from tests.helpers import ROOT

MiB = 1 << 20


def files_config(root: Path, server_type: str = "threaded", **options: Any) -> str:
    opts = ", ".join(f"{k}: {v}" for k, v in {"root": str(root), **options}.items())
    return f"""
server: {{type: {server_type}}}
services:
  files:
    class: services.files:FileService
    port: 0
    options: {{{opts}}}
logging: {{level: WARNING}}
"""


class Files:
    """A running file service on ``root`` and a way to open clients to it."""

    def __init__(self, stack: ExitStack, root: Path, server_type: str = "threaded", **options: Any) -> None:
        self.root = root
        self._stack = stack
        host = stack.enter_context(running_host(files_config(root, server_type, **options)))
        self.address = host.address("files")

    def connect(self) -> Any:
        host, port = self.address
        cm: AbstractContextManager[Any] = client.connect(host=host, port=port, timeout=10)
        return self._stack.enter_context(cm)

    def temporaries(self) -> list[str]:
        return [p.name for p in self.root.rglob(".upload-*")]


@pytest.fixture
def start_files(tmp_path: Path) -> Iterator[Callable[..., Files]]:
    with ExitStack() as stack:
        yield lambda **options: Files(stack, tmp_path / "root", **options)


@pytest.fixture
def service(start_files: Callable[..., Files]) -> Files:
    return start_files()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sha(path: Path) -> str:
    """The digest ``files.upload``/``download`` report by default: BLAKE3."""
    return str(blake3.blake3(path.read_bytes()).hexdigest())


@pytest.mark.parametrize("bulk", [True, False], ids=["side-connection", "rpyc-calls"])
def test_upload_download_roundtrip(service: Files, tmp_path: Path, bulk: bool) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 9 * MiB + 123)
    seen: list[tuple[int, int]] = []
    size, digest = files.upload(conn, src, "up.bin", progress=lambda d, t: seen.append((d, t)), bulk=bulk)
    assert (size, digest) == (src.stat().st_size, sha(src))
    assert (service.root / "up.bin").read_bytes() == src.read_bytes()
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert service.temporaries() == []
    back = tmp_path / "back.bin"
    assert files.download(conn, "up.bin", back, bulk=bulk) == (size, digest)
    assert back.read_bytes() == src.read_bytes()
    assert not (tmp_path / "back.bin.part").exists()
    # The service keeps working on the same connection afterwards.
    assert conn.root.ls() == ("up.bin",)


def test_empty_file(service: Files, tmp_path: Path) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "empty", 0)
    assert files.upload(conn, src, "empty")[0] == 0
    assert files.download(conn, "empty", tmp_path / "e2") == (0, blake3.blake3().hexdigest())


def test_nothing_appears_before_commit_and_abort_cleans(service: Files) -> None:
    fs = service.connect().root
    up = fs.open_write("f.bin")
    up.write(b"x" * 1000)
    assert not fs.exists("f.bin") and fs.ls() == ()
    assert len(service.temporaries()) == 1
    up.abort()
    assert service.temporaries() == [] and not fs.exists("f.bin")
    up = fs.open_write("f.bin")
    up.write(b"data")
    assert up.commit() == (4, hashlib.sha256(b"data").hexdigest())
    with pytest.raises(FileExistsError, match=r"f\.bin"):
        fs.open_write("f.bin")
    with pytest.raises(ValueError, match="closed"):
        up.write(b"more")


def partial_released(root: Path) -> bool:
    """Whether there is one partial upload under ``root`` and no upload holds its lock."""
    (path,) = root.rglob(".upload-*")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases our lock
    return True


def test_upload_resumes_after_a_dropped_connection(service: Files, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.bin", 6 * MiB)
    data = src.read_bytes()
    first = service.connect()
    up = first.root.open_write("big.bin")
    up.write(data[: 2 * MiB])
    up.write(data[2 * MiB : 3 * MiB])
    first.close()  # the client goes away mid-upload: the partial stays for resuming
    conn = service.connect()
    # The partial's size shows at once; its lock goes only when the server has dropped the connection.
    wait_until(lambda: partial_released(service.root), what="the server to drop the connection")
    assert conn.root.resumable("big.bin") == 3 * MiB
    assert not conn.root.exists("big.bin")
    seen: list[int] = []
    size, digest = files.upload(conn, src, "big.bin", progress=lambda d, t: seen.append(d))
    assert seen[0] == 3 * MiB  # only the missing half was sent
    assert (size, digest) == (len(data), sha(src))
    assert (service.root / "big.bin").read_bytes() == data
    assert service.temporaries() == []


def test_resume_with_a_different_prefix_starts_over(service: Files, tmp_path: Path) -> None:
    first = service.connect()
    up = first.root.open_write("f.bin")
    up.write(b"not the same bytes" * 1000)
    first.close()
    conn = service.connect()
    wait_until(lambda: conn.root.resumable("f.bin") > 0, what="the partial upload")
    src = random_file(tmp_path / "src.bin", 2 * MiB)
    seen: list[int] = []
    files.upload(conn, src, "f.bin", progress=lambda d, t: seen.append(d))
    assert seen[0] == 0
    assert (service.root / "f.bin").read_bytes() == src.read_bytes()
    assert service.temporaries() == []


def test_download_resumes_a_part_file(service: Files, tmp_path: Path) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 5 * MiB)
    files.upload(conn, src, "f.bin")
    local = tmp_path / "got.bin"
    Path(f"{local}.part").write_bytes(src.read_bytes()[: 2 * MiB])
    seen: list[int] = []
    files.download(conn, "f.bin", local, progress=lambda d, t: seen.append(d))
    assert seen[0] == 2 * MiB
    assert local.read_bytes() == src.read_bytes()


def test_download_checksum_mismatch_leaves_nothing(service: Files, tmp_path: Path) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", MiB)
    files.upload(conn, src, "f.bin")
    local = tmp_path / "got.bin"
    # A .part whose bytes are not a prefix of the file: the hash over the whole must catch it.
    Path(f"{local}.part").write_bytes(b"\xff" * 1000)
    with pytest.raises(files.ChecksumError, match=r"f\.bin"):
        files.download(conn, "f.bin", local)
    assert not local.exists() and not Path(f"{local}.part").exists()
    # The server's side: a stored digest that no longer matches (bit rot, tampering) is caught too.
    remote = service.root / "f.bin"
    st = remote.stat()
    os.setxattr(remote, XATTR_SHA256, f"{st.st_size}:{st.st_mtime_ns}:{'0' * 64}".encode())
    with pytest.raises(files.ChecksumError):
        files.download(conn, "f.bin", local, hash="sha256")
    assert not local.exists()
    assert conn.root.pwd() == "."


def test_file_size_limit(start_files: Callable[..., Files], tmp_path: Path) -> None:
    service = start_files(max_file_size=2 * MiB, small_io_limit=MiB)
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 3 * MiB)
    with pytest.raises(ValueError, match="largest file allowed") as exc:
        files.upload(conn, src, "big.bin")
    assert "big.bin" in str(exc.value)
    assert not conn.root.exists("big.bin") and service.temporaries() == []
    # Streaming with write(): refused at the chunk that would pass the limit, nothing kept.
    up = conn.root.open_write("big.bin")
    up.write(b"x" * MiB)
    up.write(b"x" * MiB)
    with pytest.raises(ValueError, match="largest file allowed"):
        up.write(b"x")
    assert service.temporaries() == [] and not conn.root.exists("big.bin")
    with pytest.raises(ValueError, match="small-file limit"):
        conn.root.write_bytes("small", b"x" * (MiB + 1))


def test_quota(start_files: Callable[..., Files], tmp_path: Path) -> None:
    service = start_files(max_total_bytes=3 * MiB)
    conn = service.connect()
    files.upload(conn, random_file(tmp_path / "a", 2 * MiB), "a")
    with pytest.raises(ValueError, match="quota") as exc:
        files.upload(conn, random_file(tmp_path / "b", 2 * MiB), "b")
    assert "'b'" in str(exc.value)
    assert sorted(os.listdir(service.root)) == ["a"]
    with pytest.raises(ValueError, match="quota"):
        conn.root.cp("a", "a2")
    assert sorted(os.listdir(service.root)) == ["a"]
    files.upload(conn, random_file(tmp_path / "c", MiB), "c")  # what fits still goes in


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_clients_writing_one_path(service: Files, overwrite: bool) -> None:
    one, two = service.connect().root, service.connect().root
    a, b = b"A" * (3 * MiB), b"B" * (3 * MiB)
    up_a, up_b = one.open_write("same", overwrite), two.open_write("same", overwrite)
    results: dict[str, Any] = {}

    def run(name: str, up: Any, data: bytes) -> None:
        try:
            for i in range(0, len(data), MiB):
                up.write(data[i : i + MiB])
            results[name] = up.commit()
        except Exception as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("a", up_a, a)),
        threading.Thread(target=run, args=("b", up_b, b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    content = (service.root / "same").read_bytes()
    assert content in (a, b)  # whole, never torn
    if overwrite:
        assert all(isinstance(r, tuple) for r in results.values())
    else:
        errors = [r for r in results.values() if isinstance(r, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], FileExistsError)
    assert service.temporaries() == []


def test_client_killed_mid_upload(start_files: Callable[..., Files], tmp_path: Path) -> None:
    service = start_files()
    script = f"""
import sys, client
conn = client.connect(host={service.address[0]!r}, port={service.address[1]})
up = conn.root.open_write("killed.bin")
up.write(b"k" * {MiB})
print("written", flush=True)
sys.stdin.read()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    fs = service.connect().root
    wait_until(lambda: fs.resumable("killed.bin") == MiB, what="the partial of the killed client")
    assert not fs.exists("killed.bin") and fs.ls() == ()
    # The next start removes what nobody resumed.
    start_files()
    assert service.temporaries() == []
    assert not (service.root / "killed.bin").exists()


def test_directory_swapped_for_symlink_during_upload(service: Files, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    fs = service.connect().root
    fs.mkdir("sub")
    up = fs.open_write("sub/f.bin")
    up.write(b"payload")
    os.rename(service.root / "sub", service.root / "sub-old")
    os.symlink(outside, service.root / "sub")
    with pytest.raises(PermissionError, match=r"sub/f\.bin"):
        up.commit()
    assert os.listdir(outside) == []
    assert os.listdir(service.root / "sub-old") == []  # nothing published, temporary removed


def test_file_swapped_for_symlink_during_download(service: Files, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * 100)
    conn = service.connect()
    conn.root.write_bytes("f.bin", b"F" * 100)
    down = conn.root.open_read("f.bin")
    assert down.read(10) == b"F" * 10
    os.unlink(service.root / "f.bin")
    os.symlink(secret, service.root / "f.bin")
    assert down.read(1000) == b"F" * 90  # still the file that was opened, never the link's target
    down.close()
    with pytest.raises(PermissionError, match="link"):
        conn.root.open_read("f.bin")


def test_open_read_bad_offset_and_reading_past_end(service: Files) -> None:
    fs = service.connect().root
    fs.write_bytes("f", b"12345")
    with pytest.raises(ValueError, match="past the end"):
        fs.open_read("f", 6)
    down = fs.open_read("f", 3)
    assert (down.size(), down.read(100), down.read(100)) == (5, b"45", b"")
    with pytest.raises(ValueError, match="no interrupted upload"):
        fs.open_write("g", False, 10)


def test_forking_server_transfers(start_files: Callable[..., Files], tmp_path: Path) -> None:
    service = start_files(server_type="forking")
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 4 * MiB)
    assert files.upload(conn, src, "f.bin")[1] == sha(src)
    assert files.download(conn, "f.bin", tmp_path / "back.bin")[1] == sha(src)
    assert service.temporaries() == []

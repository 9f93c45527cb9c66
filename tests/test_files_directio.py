"""Large inline writes skip the page cache: the aligned middle goes O_DIRECT, head and tail
buffered, every byte in place; a busy buffer pool falls back to buffered writes. ``fincore``
(util-linux) reads how much of a file is in the page cache."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import client
from client import files
from rpyc_host.testing import running_host
from rpyc_host.wire import directio

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on the disk the checkout is on (``/tmp`` may be a tmpfs elsewhere)."""
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".test-directio-") as tmp:
        path = Path(tmp)
        probe = os.open(path / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            assert directio.direct_io_allowed(probe), (
                f"{path} does not take O_DIRECT: run the tests from a disk"
            )
        finally:
            os.close(probe)
        yield path


def connect_to(address: tuple[str, int]) -> Any:
    return client.connect(host=address[0], port=address[1], timeout=30)


def cached_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return int(out.stdout.split()[0])


def write_file(path: Path, pieces: list[tuple[int, bytes]], direct: bool) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for pos, data in pieces:
            direct = directio.pwrite_all(fd, data, pos, direct)
        return direct
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "pieces",
    [
        [(0, 3 * MiB + 17)],  # aligned start, several pool pieces, a tail
        [(0, 100), (100, MiB), (100 + MiB, 3)],  # unaligned head, then a short tail
        [(5000, 200_000)],  # a hole before, both ends unaligned
        [(0, 70_000), (70_000, 4096), (74_096, 2 * MiB)],  # some below the direct threshold
    ],
)
def test_direct_writes_put_every_byte_in_place(disk_dir: Path, pieces: list[tuple[int, int]]) -> None:
    data = [(pos, os.urandom(n)) for pos, n in pieces]
    expected = bytearray()
    for pos, chunk in data:
        expected[len(expected) : pos] = bytes(max(0, pos - len(expected)))
        expected[pos : pos + len(chunk)] = chunk
    path = disk_dir / "f.bin"
    assert write_file(path, data, True) is True
    assert path.read_bytes() == bytes(expected)


def test_the_aligned_middle_leaves_no_page_cache_behind(disk_dir: Path) -> None:
    direct, buffered = disk_dir / "direct.bin", disk_dir / "buffered.bin"
    payload = os.urandom(4 * MiB + 100)
    write_file(direct, [(0, payload)], True)
    write_file(buffered, [(0, payload)], False)
    # Only the buffered 100-byte tail's page may be cached; the buffered file is all cached.
    assert cached_bytes(direct) <= 2 * directio.ALIGN
    assert cached_bytes(buffered) >= 4 * MiB
    assert direct.read_bytes() == payload == buffered.read_bytes()


def test_writes_to_a_tmpfs_land_whole() -> None:
    """tmpfs takes O_DIRECT on newer kernels and refuses it on older ones: either way, every byte."""
    shm = Path("/dev/shm")
    assert shm.is_dir(), "/dev/shm (a tmpfs) is missing on this machine"
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        path = Path(tmp) / "f.bin"
        payload = os.urandom(2 * MiB + 5)
        write_file(path, [(0, payload), (len(payload), payload)], True)
        assert path.read_bytes() == payload * 2


def test_more_writers_than_pool_buffers_all_land(disk_dir: Path) -> None:
    """Writers past the shared pool's buffers go buffered at once instead of waiting."""
    payloads = {i: os.urandom(MiB + i) for i in range(3 * directio.POOL)}
    barrier = threading.Barrier(len(payloads), timeout=30)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            write_file(disk_dir / f"{i}.bin", [(0, payloads[i])], True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for i, payload in payloads.items():
        assert (disk_dir / f"{i}.bin").read_bytes() == payload


def test_inline_uploads_of_odd_sizes_through_the_service(disk_dir: Path) -> None:
    config = (
        f"services:\n  files: {{class: services.files:FileService, port: 0, options: {{root: {disk_dir}}}}}\n"
    )
    pieces = [os.urandom(n) for n in (100, MiB, 3, 2 * MiB + 4095)]
    with running_host(config) as host, connect_to(host.address("files")) as conn:
        up = conn.root.open_write("odd.bin", True, 0, "blake3")
        for piece in pieces:
            up.write(piece)
        size, digest = up.commit()
        whole = b"".join(pieces)
        assert size == len(whole)
        assert (disk_dir / "odd.bin").read_bytes() == whole
        back = disk_dir / "back.bin"
        got, digest_back = files.download(conn, "odd.bin", back, resume=False, hash="blake3")
        assert (got, digest_back) == (len(whole), digest)
        assert back.read_bytes() == whole

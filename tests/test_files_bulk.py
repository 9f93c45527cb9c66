"""rpyc_host.wire.bulk's send path on real files and sockets: uncached ranges go by O_DIRECT reads into
reused buffers, cached ones by sendfile; every offset and length arrives byte for byte."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import threading
from pathlib import Path

import pytest

from rpyc_host.testing import wait_until
from rpyc_host.wire import bulk

SIZE = 3 * bulk.CHUNK + 12345  # several pieces and a tail that is not a multiple of ALIGN


def write_uncached(path: Path, data: bytes) -> None:
    """Write ``data`` and make sure none of it stays in the page cache."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)  # dirty pages cannot be dropped; clean ones can
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def send_and_collect(fd: int, offset: int, count: int) -> tuple[int, bytes]:
    ours, theirs = socket.socketpair()
    got = bytearray()

    def receive() -> None:
        while chunk := theirs.recv(1 << 20):
            got.extend(chunk)

    reader = threading.Thread(target=receive)
    reader.start()
    try:
        with ours:
            sent = bulk.send_file(ours, fd, offset, count)
    finally:
        reader.join(30)
        theirs.close()
    assert not reader.is_alive()
    return sent, bytes(got)


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.mark.parametrize(
    ("offset", "count"),
    [
        (0, SIZE),
        (1, SIZE - 1),
        (bulk.ALIGN + 7, bulk.CHUNK),
        (SIZE - 10, 10),
        (5, 100),
        (bulk.CHUNK, SIZE),  # asks for more than there is: sends to the end of the file
    ],
)
def test_uncached_ranges_arrive_whole(tmp_path: Path, data: bytes, offset: int, count: int) -> None:
    path = tmp_path / "f.bin"
    write_uncached(path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        if bulk._open_direct(fd) is None:
            pytest.fail(f"{tmp_path} has no O_DIRECT: this test wants a disk filesystem")
        n = min(count, SIZE - offset)

        def dropped() -> bool:
            # DONTNEED skips pages the kernel holds at that moment (readahead, writeback on a
            # loaded machine): ask again until the range really is out of the page cache.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return not bulk._cached(fd, offset, n)

        wait_until(dropped, 10, "the file's pages to leave the page cache")
        sent, got = send_and_collect(fd, offset, count)
    finally:
        os.close(fd)
    assert sent == len(got) == min(count, SIZE - offset)
    assert got == data[offset : offset + count]


def test_cached_file_goes_by_sendfile_and_arrives_whole(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(data)  # just written: in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        assert bulk._cached(fd, 3, SIZE - 3)
        sent, got = send_and_collect(fd, 3, SIZE - 3)
    finally:
        os.close(fd)
    assert sent == SIZE - 3 and got == data[3:]


def test_direct_descriptor_is_separate(tmp_path: Path, data: bytes) -> None:
    """The O_DIRECT descriptor leaves the original's flags alone (a checksum may read it meanwhile)."""
    path = tmp_path / "f.bin"
    write_uncached(path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        direct = bulk._open_direct(fd)
        assert direct is not None
        try:
            assert os.get_blocking(fd)
            assert not os.O_DIRECT & _flags(fd)
            assert os.O_DIRECT & _flags(direct)
            unaligned = bytearray(10)
            assert os.preadv(fd, [unaligned], 1) == 10  # buffered reads still work on the original
            assert bytes(unaligned) == data[1:11]
            buf = mmap.mmap(-1, bulk.ALIGN)
            with memoryview(buf) as view:
                assert os.preadv(direct, [view], 0) == bulk.ALIGN
            assert buf[:] == data[: bulk.ALIGN]
            buf.close()
        finally:
            os.close(direct)
    finally:
        os.close(fd)


def _flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)

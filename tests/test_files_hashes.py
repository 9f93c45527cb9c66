"""The integrity hash of a transfer, chosen per upload and download: blake3 (the default), xxh3_128
or sha256, each verified end to end, on resumed transfers too; old clients still get SHA-256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import blake3
import pytest
import xxhash

from client import files
from rpyc_host.testing import wait_until
from services.files import XATTR_SHA256
from services.files.storage import hash_fd
from tests.helpers import ROOT
from tests.test_files_transfer import Files, partial_released, random_file

MiB = 1 << 20
REFERENCE: dict[str, Callable[[bytes], str]] = {
    "blake3": lambda b: str(blake3.blake3(b).hexdigest()),
    "sha256": lambda b: hashlib.sha256(b).hexdigest(),
    "xxh3_128": lambda b: xxhash.xxh3_128(b).hexdigest(),
}
NAMES = sorted(REFERENCE)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Files]:
    with ExitStack() as stack:
        yield Files(stack, tmp_path / "root")


def test_the_client_offers_exactly_these_hashes() -> None:
    assert tuple(NAMES) == files.HASHES
    assert files.DEFAULT_HASH == "blake3"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bulk", [True, False], ids=["side-connection", "rpyc-calls"])
def test_each_hash_end_to_end(service: Files, tmp_path: Path, name: str, bulk: bool) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 9 * MiB + 321)
    data = src.read_bytes()
    size, digest = files.upload(conn, src, "f.bin", hash=name, bulk=bulk)
    assert (size, digest) == (len(data), REFERENCE[name](data))
    assert (service.root / "f.bin").read_bytes() == data
    back = tmp_path / "back.bin"
    assert files.download(conn, "f.bin", back, hash=name, bulk=bulk) == (size, digest)
    assert back.read_bytes() == data
    # The server answers by the name asked for, and by any other name on request.
    reader = conn.root.open_read("f.bin", 0, name)
    try:
        assert reader.hash_name() == name
        assert reader.digest() == digest
        assert {n: reader.digest(n) for n in NAMES} == {n: REFERENCE[n](data) for n in NAMES}
    finally:
        reader.close()


@pytest.mark.parametrize("name", NAMES)
def test_each_hash_resumes_a_partial_upload(service: Files, tmp_path: Path, name: str) -> None:
    src = random_file(tmp_path / "src.bin", 6 * MiB + 7)
    data = src.read_bytes()
    first = service.connect()
    up = first.root.open_write("big.bin", False, 0, name)
    up.write(data[: 3 * MiB])
    first.close()  # the partial stays for resuming
    wait_until(lambda: partial_released(service.root), what="the server to drop the connection")
    conn = service.connect()
    seen: list[int] = []
    size, digest = files.upload(conn, src, "big.bin", hash=name, progress=lambda d, t: seen.append(d))
    assert seen[0] == 3 * MiB  # the prefix matched by this hash: only the rest was sent
    assert (size, digest) == (len(data), REFERENCE[name](data))
    assert (service.root / "big.bin").read_bytes() == data
    assert service.temporaries() == []


@pytest.mark.parametrize("name", NAMES)
def test_each_hash_catches_a_corrupted_byte_in_a_partial_upload(
    service: Files, tmp_path: Path, name: str
) -> None:
    src = random_file(tmp_path / "src.bin", 4 * MiB)
    data = src.read_bytes()
    first = service.connect()
    up = first.root.open_write("big.bin", False, 0, name)
    up.write(data[: 2 * MiB])
    first.close()
    wait_until(lambda: partial_released(service.root), what="the server to drop the connection")
    (partial,) = service.root.rglob(".upload-*")
    with open(partial, "r+b") as f:  # one flipped byte in the middle of the kept prefix
        f.seek(MiB)
        byte = f.read(1)
        f.seek(MiB)
        f.write(bytes([byte[0] ^ 0x01]))
    conn = service.connect()
    seen: list[int] = []
    size, digest = files.upload(conn, src, "big.bin", hash=name, progress=lambda d, t: seen.append(d))
    assert seen[0] == 0  # the prefix's digest differed: started over rather than keep the bad byte
    assert (size, digest) == (len(data), REFERENCE[name](data))
    assert (service.root / "big.bin").read_bytes() == data


@pytest.mark.parametrize("name", NAMES)
def test_each_hash_resumes_a_partial_download(service: Files, tmp_path: Path, name: str) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 5 * MiB + 11)
    data = src.read_bytes()
    files.upload(conn, src, "f.bin", hash=name)
    local = tmp_path / "got.bin"
    Path(f"{local}.part").write_bytes(data[: 2 * MiB + 5])
    seen: list[int] = []
    result = files.download(conn, "f.bin", local, hash=name, progress=lambda d, t: seen.append(d))
    assert seen[0] == 2 * MiB + 5
    assert result == (len(data), REFERENCE[name](data))
    assert local.read_bytes() == data


@pytest.mark.parametrize("name", NAMES)
def test_each_hash_catches_a_corrupted_byte_in_a_download(service: Files, tmp_path: Path, name: str) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", 3 * MiB)
    files.upload(conn, src, "f.bin", hash=name)
    local = tmp_path / "got.bin"
    # A resumed .part with one wrong byte: the digest over the whole file must catch it.
    prefix = bytearray(src.read_bytes()[:MiB])
    prefix[1000] ^= 0x80
    Path(f"{local}.part").write_bytes(prefix)
    with pytest.raises(files.ChecksumError, match=rf"f\.bin.*server has {name}"):
        files.download(conn, "f.bin", local, hash=name)
    assert not local.exists() and not Path(f"{local}.part").exists()
    # A byte flipped on the server's disk behind its back (bit rot: size and mtime unchanged),
    # so the digest it recorded at commit no longer matches what it sends.
    remote = service.root / "f.bin"
    st = remote.stat()
    with open(remote, "r+b") as f:
        f.seek(2 * MiB)
        byte = f.read(1)
        f.seek(2 * MiB)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(remote, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(files.ChecksumError, match=name):
        files.download(conn, "f.bin", local, hash=name)
    assert not local.exists() and not Path(f"{local}.part").exists()


def test_unknown_hash_names_are_refused_clearly(service: Files, tmp_path: Path) -> None:
    conn = service.connect()
    src = random_file(tmp_path / "src.bin", MiB)
    known = "known hashes: blake3, sha256, xxh3_128"
    with pytest.raises(ValueError, match=rf"unknown hash 'sha265' \(did you mean 'sha256'\?\); {known}"):
        files.upload(conn, src, "f.bin", hash="sha265")
    with pytest.raises(ValueError, match=rf"'f\.bin': unknown hash 'md5'; {known}"):
        conn.root.open_write("f.bin", False, 0, "md5")
    with pytest.raises(ValueError, match=rf"unknown hash 'BLAKE-3' \(did you mean 'blake3'\?\); {known}"):
        conn.root.open_read("nothing-here.bin", 0, "BLAKE-3")
    with pytest.raises(ValueError, match=rf"unknown hash 'xxh3'.*{known}"):
        files.download(conn, "f.bin", tmp_path / "got.bin", hash="xxh3")
    # Nothing was written, held or left behind, and the connection still works.
    assert service.temporaries() == [] and conn.root.ls() == ()
    assert not (tmp_path / "got.bin.part").exists()
    files.upload(conn, src, "f.bin")
    reader = conn.root.open_read("f.bin")
    try:
        with pytest.raises(ValueError, match=rf"unknown hash 'crc32'; {known}"):
            reader.digest("crc32")
    finally:
        reader.close()


def test_the_cli_refuses_an_unknown_hash(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.bin", 10)
    proc = subprocess.run(
        [sys.executable, "-m", "client", "files", "upload", str(src), "--hash", "md5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--hash: invalid choice: 'md5' (choose from 'blake3', 'sha256', 'xxh3_128')" in proc.stderr


def test_old_clients_still_get_sha256(service: Files) -> None:
    data = os.urandom(3 * MiB + 1)
    fs = service.connect().root
    # A client that names no hash: every digest is SHA-256, and commit caches it in the xattr.
    up = fs.open_write("old.bin")
    up.write(data)
    assert up.hash_name() == "sha256"
    assert up.sha256() == up.digest() == hashlib.sha256(data).hexdigest()
    assert up.commit() == (len(data), hashlib.sha256(data).hexdigest())
    cached = os.getxattr(service.root / "old.bin", XATTR_SHA256).decode()
    assert cached.endswith(":" + hashlib.sha256(data).hexdigest())
    reader = fs.open_read("old.bin")
    try:
        assert reader.sha256() == reader.digest() == hashlib.sha256(data).hexdigest()
    finally:
        reader.close()
    assert fs.write_bytes("small.bin", b"abc") == (3, hashlib.sha256(b"abc").hexdigest())
    # A transfer that chose another hash still answers sha256() with SHA-256.
    up = fs.open_write("new.bin", False, 0, "blake3")
    up.write(data)
    assert up.sha256() == hashlib.sha256(data).hexdigest()
    assert up.digest() == REFERENCE["blake3"](data)
    assert up.digest("xxh3_128") == REFERENCE["xxh3_128"](data)
    assert up.commit() == (len(data), REFERENCE["blake3"](data))
    reader = fs.open_read("new.bin", 0, "xxh3_128")
    try:
        assert reader.sha256() == hashlib.sha256(data).hexdigest()
        assert reader.digest() == REFERENCE["xxh3_128"](data)
    finally:
        reader.close()


def test_prefix_sha256_is_sha256_when_resuming_with_another_hash(service: Files) -> None:
    data = os.urandom(2 * MiB)
    first = service.connect()
    up = first.root.open_write("p.bin", False, 0, "xxh3_128")
    up.write(data)
    first.close()
    wait_until(lambda: partial_released(service.root), what="the server to drop the connection")
    up = service.connect().root.open_write("p.bin", False, len(data), "blake3")
    try:
        assert up.prefix_digest() == REFERENCE["blake3"](data)
        assert up.prefix_sha256() == hashlib.sha256(data).hexdigest()
    finally:
        up.abort()


def test_hashing_a_short_prefix_allocates_only_what_it_reads(tmp_path: Path) -> None:
    """A new upload (no prefix to hash) and a short resumed one allocate no 4 MiB buffer: zeroing
    one holds the GIL for about a millisecond on every upload, honest or hostile."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        tracemalloc.start()
        try:
            empty = hash_fd(fd, 0, 0).hexdigest()
            ten = hash_fd(fd, 0, 10).hexdigest()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        whole = hash_fd(fd, 0, 1000).hexdigest()
    finally:
        os.close(fd)
    assert peak < 64 * 1024, f"hashing 0 and 10 bytes allocated {peak} bytes at the peak"
    assert empty == hashlib.sha256(b"").hexdigest()
    assert ten == hashlib.sha256(b"0123456789").hexdigest()
    assert whole == hashlib.sha256(b"0123456789" * 100).hexdigest()

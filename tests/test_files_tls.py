"""TLS on the bulk side connection (an ssl.SSLSocket with the control connection's context).

Real hosts on 127.0.0.1, real sockets; a small forwarding proxy (a thread per direction) stands
between a client and a ticket where a test needs to see or damage the ciphertext.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

import client
from client import files
from rpyc_host.testing import Certificates, running_host, wait_until
from rpyc_host.wire import bulk
from rpyc_host.wire.bulktls import TLSRecordError
from rpyc_host.wire.tls import client_context, server_context

MiB = 1 << 20


def config(root: Path, certs: Certificates, transfer_timeout: float = 30.0) -> str:
    return f"""
services:
  files:
    class: services.files:FileService
    port: 0
    options: {{root: "{root}", transfer_timeout: {transfer_timeout}}}
security: {{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"}}}}
logging: {{level: WARNING}}
"""


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def connect(stack: ExitStack, root: Path, certs: Certificates, **options: Any) -> Any:
    host, port = stack.enter_context(running_host(config(root, certs, **options))).address("files")
    return stack.enter_context(client.connect(host=host, port=port, tls=True, ca=str(certs.ca), timeout=10))


def source(tmp_path: Path, size: int, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def wait_done(transfer: Any) -> int:
    """The server side's byte count once it finished (before the client closes its side)."""
    result: list[int] = []

    def done() -> bool:
        finished, count = transfer.wait(0.5)
        if finished:
            result.append(count)
        return finished

    wait_until(done, 30, "the bulk transfer to finish")
    return result[0]


class Proxy:
    """Forwards one TCP connection to ``target``; ``flip``: (direction, offset) of one byte to XOR.

    Direction ``"up"`` is client to server, ``"down"`` server to client.
    """

    def __init__(self, target: tuple[str, int], flip: tuple[str, int] | None = None) -> None:
        self.target = target
        self.flip = flip
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        try:
            down, _ = self.listener.accept()
        except OSError:
            return
        up = socket.create_connection(self.target, timeout=10)
        self._socks += [down, up]
        for src, dst, direction in ((down, up, "up"), (up, down, "down")):
            at = self.flip[1] if self.flip is not None and self.flip[0] == direction else -1
            t = threading.Thread(target=self._pump, args=(src, dst, at), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, flip_at: int) -> None:
        done = 0
        try:
            while data := src.recv(256 << 10):
                if done <= flip_at < done + len(data):
                    changed = bytearray(data)
                    changed[flip_at - done] ^= 0x01
                    data = bytes(changed)
                done += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(10)


@contextmanager
def proxy(target: tuple[str, int], flip: tuple[str, int] | None = None) -> Iterator[Proxy]:
    p = Proxy(target, flip)
    try:
        yield p
    finally:
        p.close()


def via(p: Proxy, ticket: tuple[Any, ...]) -> tuple[str, int, bytes]:
    return (str(p.address[0]), int(p.address[1]), bytes(ticket[2]))


def test_upload_and_download_over_tls_arrive_whole(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    src = source(tmp_path, 5 * MiB + 12345)  # not a whole number of records
    with files._open_bulk(conn, conn.root.open_write("probe.bin").bulk(0), 10) as side:
        assert isinstance(side, ssl.SSLSocket)  # the side connection speaks TLS
        assert side.version() in ("TLSv1.2", "TLSv1.3")
    size, digest = files.upload(conn, src, "up.bin", overwrite=True, hash="sha256")
    assert size == src.stat().st_size
    back = tmp_path / "back.bin"
    assert files.download(conn, "up.bin", back, resume=False, hash="sha256") == (size, digest)
    assert back.read_bytes() == src.read_bytes()
    assert (tmp_path / "root" / "up.bin").read_bytes() == src.read_bytes()


def test_a_server_with_a_wrong_certificate_is_refused(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    rogue = server_context(str(certs.rogue_cert), str(certs.rogue_key))
    listener = socket.create_server(("127.0.0.1", 0))
    stack.callback(listener.close)
    seen: list[BaseException] = []

    def impostor() -> None:
        raw, _ = listener.accept()
        with raw:
            raw.settimeout(10)
            try:
                rogue.wrap_socket(raw, server_side=True).recv(1)
            except OSError as exc:
                seen.append(exc)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    host, port = listener.getsockname()[:2]
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        files._open_bulk(conn, (host, port, b"t" * bulk.TOKEN_BYTES), 10)
    thread.join(10)
    assert seen  # the impostor's handshake failed too: it never got the token


def test_a_client_stalled_mid_handshake_is_cut_off_and_blocks_nobody(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    src = source(tmp_path, 2 * MiB + 1)
    writer = conn.root.open_write("up.bin")
    ticket = tuple(writer.bulk(src.stat().st_size))
    # The first bytes of a real ClientHello, then silence.
    hello = ssl.MemoryBIO()
    obj = client_context(str(certs.ca)).wrap_bio(ssl.MemoryBIO(), hello, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    staller = socket.create_connection(ticket[:2], timeout=10)
    stack.callback(staller.close)
    staller.sendall(hello.read()[:20])
    # Meanwhile the ticket holder and another client's transfer go through.
    other = connect(stack, tmp_path / "root", certs)
    other_src = source(tmp_path, MiB, "other.bin")
    assert files.upload(other, other_src, "other.bin")[0] == MiB
    with files._open_bulk(conn, ticket, 10) as side, open(src, "rb") as f:
        bulk.send_file(side, f.fileno(), 0, src.stat().st_size)
        assert wait_done(writer) == src.stat().st_size
    writer.commit()
    assert (tmp_path / "root" / "up.bin").read_bytes() == src.read_bytes()
    # The staller was closed by the handshake deadline (2 s), not left open.
    staller.settimeout(15)
    try:
        assert staller.recv(4096) == b""
    except ConnectionResetError:
        pass


def test_a_client_stalled_mid_transfer_is_cut_off_and_blocks_nobody(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs, transfer_timeout=1.0)
    writer = conn.root.open_write("stalled.bin")
    ticket = tuple(writer.bulk(4 * MiB))
    side = files._open_bulk(conn, ticket, 10)
    stack.callback(side.close)
    side.sendall(os.urandom(MiB + 7))  # then nothing more
    other = connect(stack, tmp_path / "root", certs)
    src = source(tmp_path, 3 * MiB)
    assert files.upload(other, src, "other.bin")[1] == files.upload(other, src, "again.bin")[1]
    with pytest.raises(
        ConnectionError,
        match=r"data transfer failed: data connection sent nothing for 1 s \(after \d+ of 4194304 bytes\)",
    ):
        wait_done(writer)
    assert not (tmp_path / "root" / "stalled.bin").exists()
    assert (tmp_path / "root" / "other.bin").read_bytes() == src.read_bytes()


def test_a_corrupted_upload_byte_is_refused_and_leaves_no_file(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    src = source(tmp_path, 8 * MiB)
    data = src.read_bytes()
    writer = conn.root.open_write("up.bin")
    ticket = tuple(writer.bulk(len(data)))
    with proxy(ticket[:2], flip=("up", 3 * MiB)) as p, files._open_bulk(conn, via(p, ticket), 10) as side:
        try:
            side.sendall(data)
        except OSError:
            pass  # the server may close before the last bytes arrive
        with pytest.raises(ConnectionError, match=r"TLS record refused after \d+ bytes"):
            wait_done(writer)
    assert not (tmp_path / "root" / "up.bin").exists()
    kept = conn.root.resumable("up.bin")  # what the server kept is authenticated bytes only
    assert kept < 3 * MiB
    writer.abort()


def test_a_corrupted_download_byte_is_refused_before_it_reaches_the_file(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    src = source(tmp_path, 8 * MiB)
    files.upload(conn, src, "f.bin")
    reader = conn.root.open_read("f.bin")
    ticket = tuple(reader.bulk(-1))
    out = tmp_path / "out.part"
    with (
        proxy(ticket[:2], flip=("down", 3 * MiB)) as p,
        open(out, "wb") as f,
        files._open_bulk(conn, via(p, ticket), 10) as side,
        pytest.raises(TLSRecordError, match=r"TLS record refused after \d+ bytes"),
    ):
        bulk.recv_to_file(side, f.fileno(), 0, 8 * MiB)
    kept = out.read_bytes()
    assert len(kept) < 3 * MiB  # nothing from the damaged record on
    assert kept == src.read_bytes()[: len(kept)]
    reader.close()


def test_a_side_server_that_stalls_mid_handshake_is_cut_off_by_the_deadline(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
    stack.callback(listener.close)
    host, port = listener.getsockname()[:2]
    with pytest.raises(TimeoutError, match="TLS handshake not finished within 1 s"):
        files._open_bulk(conn, (host, port, b"t" * bulk.TOKEN_BYTES), 1.0)


def test_a_client_that_closes_mid_upload_fails_it_naming_the_bytes(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    writer = conn.root.open_write("cut.bin")
    ticket = tuple(writer.bulk(4 * MiB))
    with files._open_bulk(conn, ticket, 10) as side:
        side.sendall(os.urandom(MiB))  # then closes without a TLS close_notify
    with pytest.raises(ConnectionError, match=r"data connection closed after \d+ of 4194304 bytes"):
        wait_done(writer)
    assert not (tmp_path / "root" / "cut.bin").exists()


def test_a_side_server_that_trickles_its_handshake_is_cut_off_by_one_deadline(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs)
    listener = socket.create_server(("127.0.0.1", 0))
    stack.callback(listener.close)
    stop = threading.Event()

    def trickle() -> None:
        """A handshake record header, then one byte every 0.1 s: each read waits far less than 1 s."""
        raw, _ = listener.accept()
        with raw:
            raw.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record follows
            for _ in range(300):  # at most 30 s
                if stop.wait(0.1):
                    return
                try:
                    raw.sendall(b"\x02")
                except OSError:
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    stack.callback(thread.join, 10)
    stack.callback(stop.set)
    host, port = listener.getsockname()[:2]
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="TLS handshake not finished within 1 s"):
        files._open_bulk(conn, (host, port, b"t" * bulk.TOKEN_BYTES), 1.0)
    assert time.monotonic() - began < 10  # one deadline, not 1 s per read


def test_a_client_that_stops_reading_a_download_is_cut_off_naming_the_timeout(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    conn = connect(stack, tmp_path / "root", certs, transfer_timeout=1.0)
    size = 48 * MiB  # more than both ends' kernel buffers hold
    files.upload(conn, source(tmp_path, size), "big.bin")
    reader = conn.root.open_read("big.bin")
    side = files._open_bulk(conn, tuple(reader.bulk(-1)), 10)  # TLS done, token sent, then never read
    stack.callback(side.close)
    with pytest.raises(
        ConnectionError,
        match=r"data transfer failed: peer took no data for 1 s \(after \d+ of 50331648 bytes\)",
    ):
        wait_done(reader)
    reader.close()

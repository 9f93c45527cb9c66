"""The bulk side connection keeps the control connection's protection: TLS (mutual too) and tokens."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import client
from client import files
from rpyc_host.testing import Certificates, running_host

MiB = 1 << 20
TOKEN = "files-token-0123456789abcdef"


def config(root: Path, security: str) -> str:
    return f"""
services:
  files:
    class: services.files:FileService
    port: 0
    options: {{root: "{root}"}}
security: {security}
logging: {{level: WARNING}}
"""


def tls_security(certs: Certificates, mutual: bool) -> str:
    ca = f', ca: "{certs.ca}"' if mutual else ""
    return f'{{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"{ca}}}}}'


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def serve(stack: ExitStack, root: Path, security: str) -> tuple[str, int]:
    host = stack.enter_context(running_host(config(root, security)))
    return host.address("files")


def round_trip(conn: Any, tmp_path: Path, size: int = 3 * MiB + 17) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    size_up, digest = files.upload(conn, src, "up.bin", overwrite=True)
    assert size_up == size
    back = tmp_path / "back.bin"
    assert files.download(conn, "up.bin", back, resume=False) == (size, digest)
    assert back.read_bytes() == src.read_bytes()


def control_is_tls(conn: Any) -> bool:
    return isinstance(conn._channel.stream.sock, ssl.SSLSocket)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_transfers_over_tls(stack: ExitStack, tmp_path: Path, certs: Certificates, mutual: bool) -> None:
    host, port = serve(stack, tmp_path / "root", tls_security(certs, mutual))
    extra = {"cert": str(certs.client_cert), "key": str(certs.client_key)} if mutual else {}
    with client.connect(host=host, port=port, tls=True, ca=str(certs.ca), timeout=10, **extra) as conn:
        assert control_is_tls(conn)
        round_trip(conn, tmp_path)


def test_transfers_with_a_token(stack: ExitStack, tmp_path: Path) -> None:
    host, port = serve(stack, tmp_path / "root", f'{{tokens: ["{TOKEN}"]}}')
    with client.connect(host=host, port=port, token=TOKEN, timeout=10) as conn:
        round_trip(conn, tmp_path)


def test_tls_side_connection_refuses_plain_tcp_even_with_the_ticket(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    host, port = serve(stack, tmp_path / "root", tls_security(certs, mutual=False))
    with client.connect(host=host, port=port, tls=True, ca=str(certs.ca), timeout=10) as conn:
        writer = conn.root.open_write("x.bin")
        ticket = tuple(writer.bulk(4))
        assert_dropped(plain_with_token(ticket))
        assert writer.wait(0.2) == (False, 0)
        # The ticket still works for a client that speaks TLS like its control connection.
        with files._open_bulk(conn, ticket, 10) as sock:
            sock.sendall(b"abcd")
            assert wait_done(writer) == 4  # before closing: see wait_done
        assert writer.commit()[0] == 4


def test_mutual_tls_side_connection_wants_the_control_connections_certificate(
    stack: ExitStack, tmp_path: Path, certs: Certificates
) -> None:
    host, port = serve(stack, tmp_path / "root", tls_security(certs, mutual=True))
    with client.connect(
        host=host, port=port, ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key)
    ) as conn:
        writer = conn.root.open_write("x.bin")
        ticket = tuple(writer.bulk(4))
        rogue = client.tls_context(str(certs.ca), str(certs.rogue_cert), str(certs.rogue_key))
        raw = socket.create_connection(ticket[:2], timeout=5)
        # Its CA is not the host's: refused in the handshake, or closed right after it.
        with (
            pytest.raises((ssl.SSLError, ConnectionError)),
            rogue.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(ticket[2])
            if tls.recv(1) == b"":
                raise ConnectionError("closed by the server")
        raw.close()
        assert writer.wait(0.2) == (False, 0)
        with files._open_bulk(conn, ticket, 10) as sock:
            sock.sendall(b"abcd")
            assert wait_done(writer) == 4  # before closing: see wait_done


def test_side_connection_without_the_right_ticket_is_refused(stack: ExitStack, tmp_path: Path) -> None:
    host, port = serve(stack, tmp_path / "root", f'{{tokens: ["{TOKEN}"]}}')
    with client.connect(host=host, port=port, token=TOKEN, timeout=10) as conn:
        writer = conn.root.open_write("x.bin")
        thost, tport, token = tuple(writer.bulk(4))
        wrong = bytes(b ^ 0xFF for b in token)
        assert_dropped(plain_with_token((thost, tport, wrong)))
        host_token = (TOKEN * 2).encode()[:32]
        assert_dropped(plain_with_token((thost, tport, host_token)))  # a host token is no ticket
        done, count = writer.wait(0.2)
        assert (done, count) == (False, 0)  # still waiting for its own client
        with files._open_bulk(conn, (thost, tport, token), 10) as sock:
            sock.sendall(b"abcd")
            assert wait_done(writer) == 4
        # One use only: the listener is gone once the right client came.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((thost, tport), timeout=5).close()


def plain_with_token(ticket: tuple[Any, ...]) -> socket.socket:
    sock = socket.create_connection(ticket[:2], timeout=5)
    sock.sendall(ticket[2])
    return sock


def assert_dropped(sock: socket.socket) -> None:
    """The server closes a connection it refuses (at most a TLS alert comes back, never data)."""
    with sock:
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass


def wait_done(transfer: Any) -> int:
    """Wait for a bulk transfer's server side.

    Call it before closing the side connection: a TLS 1.3 client that closes with the server's
    session tickets unread sends a reset, and the kernel then drops bytes the server has not
    read yet.
    """
    for _ in range(20):
        done, count = transfer.wait(1.0)
        if done:
            return int(count)
    raise AssertionError("bulk transfer did not finish")

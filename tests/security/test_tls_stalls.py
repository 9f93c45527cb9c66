"""TLS connections that stall: half a record, half a frame, a reply never read. Host TLS sockets
are non-blocking with the stall limit enforced by the stream (no socket timeout, so no poll()
before every send), so each of these must still be cut off after ``handshake_timeout`` without
holding a thread or worker, while large frames both ways arrive whole."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import rpyc

from rpyc_host.testing import Certificates, running_host, wait_until
from tests.helpers import SERVER_TYPES
from tests.security.test_limits import closed_by_server

# The stall limit sits well above the time the honest calls are given, so an honest call that
# waited for a staller to be cut off would fail the test.
LIMITS = "handshake_timeout: 4, idle_timeout: 30, max_frame_bytes: 33554432"


def tls_host_config(server_type: str, certs: Certificates) -> str:
    return f"""
server: {{type: {server_type}, pool_size: 4}}
limits: {{{LIMITS}}}
services:
  demo: {{class: services.demo:DemoService, port: 0}}
security: {{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"}}}}
"""


def tls_socket(address: tuple[str, int], certs: Certificates) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certs.ca))
    raw = socket.create_connection(address, timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def half_record(address: tuple[str, int], certs: Certificates) -> socket.socket:
    """A TLS connection (memory BIOs over a plain socket) that sends half of one record."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    sock = socket.create_connection(address, timeout=10)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "the server closed during the TLS handshake"
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())
    tls.write(struct.pack("!LB", 100, 0) + bytes(100) + b"\n")  # one whole frame in one record
    record = outgoing.read()
    sock.sendall(record[: len(record) // 2])
    return sock


def server_closed(local: int, remote: int) -> bool:
    """Whether the server (port ``remote``) has closed its end of the connection from port
    ``local``, read from the server side's TCP state with ``ss``: a FIN queued behind a reply
    the client never reads never reaches the client, so the client's own state cannot tell."""
    shown = subprocess.run(
        ["ss", "-Htan", f"( sport = :{remote} and dport = :{local} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.split()
    return not shown or shown[0] != "ESTAB"


@contextmanager
def tls_host(server_type: str, certs: Certificates) -> Iterator[tuple[str, int]]:
    with running_host(tls_host_config(server_type, certs)) as host:
        yield host.address("demo")


def honest_calls_work(address: tuple[str, int], certs: Certificates) -> None:
    started = time.monotonic()
    conn = rpyc.ssl_connect(*address, ca_certs=str(certs.ca))
    try:
        add = conn.root.add
        assert [add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    finally:
        conn.close()
    assert time.monotonic() - started < 3.0, "an honest TLS client waited behind a staller"


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_tls_half_records_and_half_frames_are_cut_off_and_block_nobody(
    server_type: str, certs: Certificates
) -> None:
    with tls_host(server_type, certs) as address, ExitStack() as stack:
        stalled: list[socket.socket] = []
        # More of each than the thread pool has workers (4).
        for _ in range(5):
            sock = stack.enter_context(half_record(address, certs))
            stalled.append(sock)
        for _ in range(5):
            sock = stack.enter_context(tls_socket(address, certs))
            sock.sendall(struct.pack("!LB", 100, 0) + b"0123456789")  # a whole record, 10 of 101 bytes
            stalled.append(sock)
        honest_calls_work(address, certs)
        for sock in stalled:
            assert closed_by_server(sock, 20), "a stalled TLS connection was never closed"
        honest_calls_work(address, certs)


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_tls_reply_never_read_is_cut_off_and_large_frames_arrive_whole(
    server_type: str, certs: Certificates
) -> None:
    with tls_host(server_type, certs) as address:
        # A large frame each way: the server's non-blocking writes of a 12 MiB reply must retry
        # until all of it is sent, in order.
        blob = os.urandom(6 * 1024 * 1024).hex()  # 12 MiB of text
        conn = rpyc.ssl_connect(*address, ca_certs=str(certs.ca))
        try:
            assert conn.root.echo(blob) == blob
        finally:
            conn.close()
        # Clients that ask for that reply and never read it: the server's send is bounded by
        # the stall limit, and nobody else waits meanwhile. Fewer than the pool's 4 workers: a
        # worker sending a reply is busy until the stall limit, which more such clients than
        # workers would make every newcomer wait out (within handshake_timeout, as promised).
        readers, ports = [], []
        for _ in range(3):
            reader = rpyc.ssl_connect(*address, ca_certs=str(certs.ca))
            readers.append(reader)
            sock = reader._channel.stream.sock
            ports.append((sock.getsockname()[1], sock.getpeername()[1]))
            echo = rpyc.async_(reader.root.echo)
            echo(blob)  # sent; the reply is never read (nothing serves this connection)
        try:
            honest_calls_work(address, certs)
            wait_until(
                lambda: all(server_closed(*pair) for pair in ports), 20, "replies never read to be cut off"
            )
            honest_calls_work(address, certs)
        finally:
            for reader in readers:
                reader.close()

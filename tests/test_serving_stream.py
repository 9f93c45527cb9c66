"""A host server waits for a connection's next request with one blocking read (the kernel's
receive timeout bounds it) instead of poll() and then a read: what arrives is in the stream's
buffer when the wait returns, and timeouts, the peer's end and idle limits behave as before."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import rpyc
from rpyc.lib import Timeout

from rpyc_host.servers.stream import ServingSocketStream
from rpyc_host.testing import running_host, wait_until
from tests.test_transport_buffering import kernel_queued


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, ServingSocketStream]]:
    """A client socket and the server end's stream, as a host server builds it (blocking, stall 5 s)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.settimeout(None)
    stream = ServingSocketStream(server, stall=5.0)
    try:
        yield client, stream
    finally:
        client.close()
        stream.close()


def test_the_wait_reads_what_arrives(pair: tuple[socket.socket, ServingSocketStream]) -> None:
    client, stream = pair
    client.sendall(b"0123456789")
    wait_until(lambda: kernel_queued(stream.sock) == 10, 10, "the bytes to reach the server end")
    assert stream.poll(5)
    # Taken from the kernel by the wait itself: reading it needs no further system call.
    assert kernel_queued(stream.sock) == 0
    assert stream.buffered == 10
    assert stream.read(4) == b"0123"
    assert stream.poll(0)  # the rest is still buffered
    assert stream.read(6) == b"456789"


def test_the_wait_gives_up_after_its_timeout(pair: tuple[socket.socket, ServingSocketStream]) -> None:
    client, stream = pair
    assert not stream.poll(0)
    for make in (float, Timeout):  # seconds, or rpyc's Timeout as Connection.serve passes it
        started = time.monotonic()
        assert not stream.poll(make(0.3))
        waited = time.monotonic() - started
        assert 0.2 <= waited < 5.0, f"waited {waited:.3f} s for a 0.3 s timeout"
    client.sendall(b"x")
    assert stream.poll(10)  # a shorter timeout set before does not cut a longer wait short
    assert stream.read(1) == b"x"


def test_the_peers_end_is_reported_then_read_as_eof(pair: tuple[socket.socket, ServingSocketStream]) -> None:
    client, stream = pair
    client.close()
    assert stream.poll(5)
    with pytest.raises(EOFError):
        stream.read(1)


@pytest.mark.parametrize("server_type", ["threaded", "threadpool", "forking"])
def test_calls_and_callbacks_are_served_and_an_idle_connection_is_closed(server_type: str) -> None:
    config = (
        f"server: {{type: {server_type}, pool_size: 2}}\n"
        "limits: {idle_timeout: 1.5}\n"
        "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"
    )
    with running_host(config) as host:
        conn = rpyc.connect(*host.address("demo"))
        try:
            add = conn.root.add
            assert [add(i, 1) for i in range(200)] == list(range(1, 201))
            seen: list[int] = []
            conn.root.countdown(3, seen.append)  # nested round trips wait on the same stream
            assert seen == [3, 2, 1]
            started = time.monotonic()
            wait_until(lambda: closed_by_server(conn), 20, "the idle connection to be closed")
            assert time.monotonic() - started >= 1.0
        finally:
            conn._channel.stream.close()


def closed_by_server(conn: rpyc.Connection) -> bool:
    """Serve what the server sends (it may release the callback it was given); True at its end."""
    try:
        conn.serve(0.05)
    except EOFError:
        return True
    return bool(conn.closed)

"""The tuned channel reads small frames through a receive buffer, and the thread pool serves
frames that wait in it (the kernel no longer reports them readable)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Iterator

import pytest
import rpyc

from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire.transport import FastChannel, FastSocketStream, make_channel

MiB = 1 << 20


def kernel_queued(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` that no one has read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def test_one_recv_takes_a_small_frame_and_what_follows(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    sender, receiver = tcp_pair
    frames = [b"first small frame", b"x" * (3 * MiB), b"last"]
    wire = b"".join(struct.pack("!LB", len(f), 0) + f + b"\n" for f in frames)
    small = len(frames[0]) + 6
    sender.sendall(wire[: small + 100])  # the first frame and the start of the big one
    wait_until(lambda: kernel_queued(receiver) == small + 100, 10, "the first bytes to arrive")
    channel = make_channel(receiver, stall=10)
    assert channel.recv() == frames[0]
    # One recv took the first frame and what followed it: nothing is left in the kernel, yet
    # the channel knows there is more without asking it.
    assert kernel_queued(receiver) == 0
    stream = channel.stream
    assert isinstance(stream, FastSocketStream) and stream.buffered == 100
    assert channel.poll(0)
    rest = threading.Thread(target=sender.sendall, args=(wire[small + 100 :],), daemon=True)
    rest.start()  # 3 MiB outgrow the socket buffers: sent while this thread reads
    try:
        assert channel.recv() == frames[1]  # buffered start, the rest read straight into the frame
        assert channel.recv() == frames[2]
    finally:
        rest.join(10)
    assert stream.buffered == 0  # between frames the stream holds nothing
    assert not channel.poll(0)


def test_frames_split_anywhere_arrive_whole(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    sender, receiver = tcp_pair
    frames = [bytes([i]) * (i * 7919 % 70_000) for i in range(1, 40)]
    wire = b"".join(struct.pack("!LB", len(f), 0) + f + b"\n" for f in frames)
    channel = FastChannel(FastSocketStream(receiver, 10))
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    step = 4093  # a prime: pieces end at ever-changing offsets within frames and headers

    def send() -> None:
        for start in range(0, len(wire), step):
            sender.sendall(wire[start : start + step])

    feeder = threading.Thread(target=send, daemon=True)
    feeder.start()
    try:
        got = [channel.recv() for _ in frames]
    finally:
        feeder.join(10)
    assert got == frames
    assert kernel_queued(receiver) == 0 and channel.stream.buffered == 0


def test_threadpool_serves_frames_waiting_in_the_buffer() -> None:
    """More requests in one segment than a worker serves in a row (16) all get their replies,
    though after the first recv the kernel holds none of them."""
    config = (
        "server: {type: threadpool, pool_size: 2}\n"
        "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"
    )
    with running_host(config) as host:
        conn = rpyc.connect(*host.address("demo"))
        try:
            add = conn.root.add
            assert add(1, 2) == 3
            sock = conn._channel.stream.sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # hold the writes back...
            pending = [rpyc.async_(add)(i, 1) for i in range(40)]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # ...and send them together
            for result in pending:
                result.set_expiry(20)
            assert [r.value for r in pending] == [i + 1 for i in range(40)]
        finally:
            conn.close()

"""The refusal closer keeps working when the sockets it lingers on are closed by their owner."""

from __future__ import annotations

import socket

from rpyc_host.security import Closer
from rpyc_host.testing import wait_until


def test_a_socket_closed_elsewhere_and_its_fd_reused_still_gets_its_refusal() -> None:
    closer = Closer(linger=30)
    first, first_peer = socket.socketpair()
    fd = first.fileno()
    closer.close_after(first, b"refused 1")
    assert first_peer.recv(100) == b"refused 1"
    first.close()  # its owner closes it while it lingers (a server stopping closes its clients)
    # The kernel hands the same fd number to the next socket: the closer must take it.
    second, second_peer = socket.socketpair()
    try:
        assert fd in (second.fileno(), second_peer.fileno())
        reused = second if second.fileno() == fd else second_peer
        peer = second_peer if reused is second else second
        closer.close_after(reused, b"refused 2")
        assert peer.recv(100) == b"refused 2"
        peer.shutdown(socket.SHUT_WR)  # the client hangs up: the closer closes its end
        wait_until(lambda: reused.fileno() == -1, 10, "the closer to close the socket")
        assert closer.pending == 0
        assert closer._thread.is_alive()
    finally:
        closer.close()
        for sock in (first_peer, second, second_peer):
            sock.close()
    assert not closer._thread.is_alive()

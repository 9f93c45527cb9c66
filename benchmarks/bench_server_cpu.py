"""Server CPU per request, in-process A/B: the host's connection beside bare rpyc's.

    python benchmarks/bench_server_cpu.py              # 9 interleaved rounds (~20 s)
    python benchmarks/bench_server_cpu.py --quick      # three short rounds, for CI smoke

One thread drives both ends of a loopback TCP connection: it writes a captured ``add(1, 2)``
request frame (from a plain rpyc client, the bound method cached), lets the server side serve
it, and reads the reply. Only the serving is timed, with ``time.thread_time()`` (CPU time, so
a loaded machine's scheduling does not count): what one request costs a server, with no other
thread, GIL hand-off or client in the figure. The systems are bare rpyc (a ``Channel`` over a
``SocketStream``, as its ThreadedServer serves) and the host's connections as its threaded
and threadpool servers build them (the threadpool one served as its workers do: one buffered
read, then ``poll(0)``). Rounds alternate the order of the systems; the table gives each one's
median, its spread, and its ratio to bare rpyc; the target is a ratio of at most 1.0.
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rpyc  # noqa: E402
from rpyc.core.channel import Channel  # noqa: E402
from rpyc.core.stream import SocketStream  # noqa: E402

from benchmarks.bench_service import AddService  # noqa: E402
from benchmarks.harness import machine, print_checks, save, table  # noqa: E402
from rpyc_host.servers.base import close_quietly  # noqa: E402
from rpyc_host.testing import running_host  # noqa: E402

HOST_CONFIG = """
server: {{type: {type}, pool_size: 4}}
services:
  add: {{class: benchmarks.bench_service:AddService, port: 0}}
"""
SYSTEMS = ("bare", "threaded", "threadpool")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


class Pair:
    """A server-side connection, a plain rpyc client on the other end, and the request frame."""

    def __init__(self, server_conn: Any, client_sock: socket.socket, server_sock: socket.socket) -> None:
        self.server = server_conn
        self.client_sock = client_sock
        client = rpyc.connect_stream(SocketStream(client_sock))
        stop = threading.Event()

        def serve() -> None:  # only while the client looks up add
            while not stop.is_set():
                server_conn.serve(0.05)

        helper = threading.Thread(target=serve)
        helper.start()
        try:
            add = client.root.add
            assert add(1, 2) == 3
        finally:
            stop.set()
            helper.join()
        rpyc.async_(add)(1, 2)  # sent, not served: read it raw as the frame to replay
        self.frame = server_sock.recv(65536)
        self.keep = (client, add)  # the netref must stay alive, or the server drops its object
        self.serve_one: Callable[[], object] = lambda: server_conn.serve(1)

    def request(self) -> float:
        """CPU seconds the server spends on one request."""
        self.client_sock.sendall(self.frame)
        start = time.thread_time()
        self.serve_one()
        spent = time.thread_time() - start
        reply = self.client_sock.recv(65536)
        assert reply, "the server closed the connection"
        return spent


@contextmanager
def bare_pair() -> Iterator[Pair]:
    client_sock, server_sock = _tcp_pair()
    config = {"allow_public_attrs": False}
    conn = AddService()._connect(Channel(SocketStream(server_sock)), config)
    try:
        yield Pair(conn, client_sock, server_sock)
    finally:
        close_quietly(conn, logging.getLogger(__name__))
        client_sock.close()


@contextmanager
def host_pair(kind: str) -> Iterator[Pair]:
    with running_host(HOST_CONFIG.format(type=kind)) as host:
        server = host.hosted[0].server
        client_sock, server_sock = _tcp_pair()
        conn = server._build_connection(server_sock, client_sock.getsockname())
        try:
            pair = Pair(conn, client_sock, server_sock)
            if kind == "threadpool":
                stream = conn._channel.stream

                def served_as_workers_do() -> None:
                    if stream.fill():
                        conn.poll(0)

                pair.serve_one = served_as_workers_do
            yield pair
        finally:
            close_quietly(conn, server.logger)
            client_sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three short rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5000, help="requests per system per round")
    args = parser.parse_args(argv)
    rounds, calls = (3, 500) if args.quick else (args.rounds, args.calls)
    results: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    with ExitStack() as stack:
        pairs = {"bare": stack.enter_context(bare_pair())}
        for kind in SYSTEMS[1:]:
            pairs[kind] = stack.enter_context(host_pair(kind))
        for pair in pairs.values():
            for _ in range(calls // 10):  # warm up
                pair.request()
        for r in range(rounds):
            order = SYSTEMS[r % len(SYSTEMS) :] + SYSTEMS[: r % len(SYSTEMS)]
            for name in order:
                request = pairs[name].request
                results[name].append(sum(request() for _ in range(calls)) / calls * 1e6)
    base = statistics.median(results["bare"])
    rows = [["system", "server CPU us/request (median)", "min..max", "x bare", "extra us"]]
    for name in SYSTEMS:
        values = results[name]
        med = statistics.median(values)
        rows.append(
            [
                name,
                f"{med:.1f}",
                f"{min(values):.1f}..{max(values):.1f}",
                f"{med / base:.2f}",
                f"{med - base:+.1f}",
            ]
        )
    print(f"{rounds} rounds of {calls} requests per system, one thread, CPU time of the serving only")
    print(table(rows))
    checks = []
    for name in SYSTEMS[1:]:
        ratio = statistics.median(results[name]) / base
        checks.append(
            (f"host {name}: server CPU per request {ratio:.2f}x bare (target <= 1.0)", ratio <= 1.0)
        )
    print()
    print_checks(checks)
    data = {
        "machine": machine(),
        "rounds": rounds,
        "calls": calls,
        "us_per_request": results,
        "checks": [{"check": t, "ok": ok} for t, ok in checks],
    }
    print(f"\nJSON: {save('server_cpu', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

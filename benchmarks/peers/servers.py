"""Each system's server, in its own process on 127.0.0.1, and the context managers that run them.

A peer server runs as ``python -m benchmarks.peers.servers NAME``, binds port 0 and prints
``READY <port>``; the host runs as ``python server.py --config ...`` (through
:class:`rpyc_host.testing.ServerProcess`). Either way the process is stopped by PID when the
``with`` block ends, failure or not.

Every server offers the same two operations: ``add(a, b)`` and ``put(piece)`` (a piece of a
bulk transfer, dropped on arrival); the raw socket floor echoes 16-byte messages and sinks bulk
bytes instead.
"""

from __future__ import annotations

import socket
import struct
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rpyc_host.wire.handshake import recv_exact  # re-exported for the peer clients

ROOT = Path(__file__).resolve().parent.parent.parent
TOKEN = "peers-benchmark-token-0123456789"
PAIR = struct.Struct("!qq")
MEMORY_FS = "/dev/shm"  # a tmpfs on Linux: the file service's root for the in-memory rows
ONE = struct.Struct("!q")
RAW_ECHO, RAW_SINK = b"E", b"S"


def _ready(port: int) -> None:
    print("READY", port, flush=True)


# -- servers (each runs in its own process) ---------------------------------------------------------


def serve_raw() -> None:
    """The floor: a thread per connection; mode ``E`` echoes, mode ``S`` sinks N bytes then says k."""

    def handle(sock: socket.socket) -> None:
        with sock:
            try:
                mode = recv_exact(sock, 1)
                if mode == RAW_ECHO:
                    while data := sock.recv(65536):
                        sock.sendall(data)
                elif mode == RAW_SINK:
                    (size,) = ONE.unpack(recv_exact(sock, ONE.size))
                    view = memoryview(bytearray(1 << 20))
                    got = 0
                    while got < size and (n := sock.recv_into(view)):
                        got += n
                    sock.sendall(b"k")
            except (OSError, EOFError):
                pass

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    _ready(listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


def serve_rpyc() -> None:
    """Bare rpyc: a ``ThreadedServer`` with rpyc's defaults, as a hand-rolled service would run."""
    from rpyc.utils.server import ThreadedServer

    from benchmarks.peers.service import PeerService

    server = ThreadedServer(PeerService, hostname="127.0.0.1", port=0)
    server._listen()
    _ready(server.port)
    server.start()


def serve_xmlrpc() -> None:
    """The classic stdlib server: ``SimpleXMLRPCServer`` with ``ThreadingMixIn`` (HTTP/1.0)."""
    from socketserver import ThreadingMixIn
    from xmlrpc.client import Binary
    from xmlrpc.server import SimpleXMLRPCServer

    class Server(ThreadingMixIn, SimpleXMLRPCServer):
        daemon_threads = True
        request_queue_size = 1024  # stdlib's 5 drops SYNs under 8 clients; the stronger baseline

    def add(a: int, b: int) -> int:
        return a + b

    def put(piece: Binary) -> int:
        return len(piece.data)

    server = Server(("127.0.0.1", 0), allow_none=True, logRequests=False)
    server.register_function(add, "add")
    server.register_function(put, "put")
    _ready(server.server_address[1])
    server.serve_forever()


def serve_pyro5() -> None:
    """Pyro5's default thread-pool server; the pool may grow to 2,000 so 1,000 idle clients fit
    (its default of 80 refuses the 81st connection)."""
    import Pyro5
    import Pyro5.api

    Pyro5.config.SERVERTYPE = "thread"
    Pyro5.config.THREADPOOL_SIZE = 2000

    @Pyro5.api.expose
    class Peer:
        def add(self, a: int, b: int) -> int:
            return a + b

        def put(self, piece: Any) -> int:
            return len(piece)

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(Peer, "peer")
    _ready(daemon.sock.getsockname()[1])
    daemon.requestLoop()


def serve_grpc() -> None:
    """gRPC Python's sync server with a generic handler (no generated code); 16 worker threads."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    def add(request: bytes, context: Any) -> bytes:
        a, b = PAIR.unpack(request)
        return ONE.pack(a + b)

    def put(pieces: Iterator[bytes], context: Any) -> bytes:
        return ONE.pack(sum(len(p) for p in pieces))

    handler = grpc.method_handlers_generic_handler(
        "peers.Peer",
        {
            "Add": grpc.unary_unary_rpc_method_handler(add),
            "Put": grpc.stream_unary_rpc_method_handler(put),
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _ready(port)
    server.wait_for_termination()


SERVERS: dict[str, Callable[[], None]] = {
    "raw": serve_raw,
    "rpyc": serve_rpyc,
    "xmlrpc": serve_xmlrpc,
    "pyro5": serve_pyro5,
    "grpc": serve_grpc,
}


# -- running them (the benchmark's side) ---------------------------------------------------------------


def peer_server(kind: str, timeout: float = 30) -> Any:
    """Run one peer's server in a child process; yields (port, pid); stops it by PID on exit."""
    from benchmarks.harness import ready_server

    if kind not in SERVERS:
        raise ValueError(f"unknown peer server {kind!r}; expected one of {sorted(SERVERS)}")
    return ready_server(
        [sys.executable, "-m", "benchmarks.peers.servers", kind], timeout, what=f"{kind} server"
    )


HOST_CONFIG = """
server: {{type: {kind}, pool_size: 16, grace_period: 1}}
limits: {{max_connections: 2000, max_connections_per_ip: 2000}}
services:
  {service}
{security}
logging: {{level: INFO}}
"""
PEER_SERVICE = "peer: {class: benchmarks.peers.service:PeerService, port: 0}"
FILES_SERVICE = "files: {{class: services.files:FileService, port: 0, options: {{root: {root}}}}}"


@contextmanager
def host_server(
    kind: str, *, token: bool = False, files: bool = False, files_in_memory: bool = False
) -> Iterator[tuple[int, int]]:
    """``python -m rpyc_host`` serving PeerService (or FileService with ``files``) with one server
    type; connection limits raised to 2,000 so the idle-connection test fits. Yields (port, pid).

    With ``files_in_memory`` the file service's root is a temporary directory on a tmpfs
    (:data:`MEMORY_FS`), removed afterwards: its writes and fsyncs cost no disk time, so the
    transfer is compared with gRPC's server, which drops the bytes in memory."""
    from rpyc_host.testing import ServerProcess

    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peers-"))
        root = Path(tmp) / "files"
        if files_in_memory:
            root = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peers-", dir=MEMORY_FS))
            )
        service = FILES_SERVICE.format(root=root) if files or files_in_memory else PEER_SERVICE
        security = f"security: {{tokens: [{TOKEN}]}}" if token else ""
        config = Path(tmp) / "host.yaml"
        config.write_text(textwrap.dedent(HOST_CONFIG).format(kind=kind, service=service, security=security))
        proc = ServerProcess(config, cwd=ROOT, ready_timeout=30)  # cwd: benchmarks.* services import
        try:
            proc.start()
            yield proc.address("files" if files or files_in_memory else "peer")[1], proc.pid
        finally:
            proc.stop()


if __name__ == "__main__":
    SERVERS[sys.argv[1]]()

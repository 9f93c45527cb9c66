"""Each system's client, all with the same shape: ``add`` (bound once, as a user would cache it),
``bulk`` (send pieces until done or out of time) and ``close``.

Clients are what a user of each system writes: plain ``rpyc.connect`` for bare rpyc and for the
host without auth, ``client.connect(token=...)`` for the host with tokens, ``ServerProxy``,
a Pyro5 ``Proxy``, a gRPC channel's multi-callable, a socket for the floor.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.peers.servers import MEMORY_FS, ONE, PAIR, RAW_ECHO, RAW_SINK, TOKEN, recv_exact

ADDR = "127.0.0.1"
_MSG = b"0123456789abcdef"  # 16 bytes: the floor's "call"


@dataclass(frozen=True)
class System:
    """One column of the comparison: which client to use against which server."""

    name: str
    server: str  # a peer server kind (servers.SERVERS), or "host:<server type>", or "host:files"
    client: str | None  # a key of CLIENTS for small calls and idle connections; None: bulk only
    bulk: str | None  # a key of CLIENTS for the bulk transfer; None: not measured
    peer: bool = False  # one of the peers (the "best peer" is the best of these)
    token: bool = False


class Client:
    add: Callable[[int, int], Any]

    def put(self, piece: bytes) -> None:
        raise NotImplementedError

    def prepare(self, source: Path) -> None:
        """Before the clock starts: whatever the bulk transfer needs in place (nothing by default)."""

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        """Send pieces one call each until all are sent or ``seconds`` pass; returns bytes sent."""
        put = self.put
        sent = 0
        deadline = time.perf_counter() + seconds
        for piece in pieces:
            put(piece)
            sent += len(piece)
            if time.perf_counter() > deadline:
                break
        return sent

    def close(self) -> None:
        raise NotImplementedError


class RawClient(Client):
    def __init__(self, port: int, token: bool = False) -> None:
        self.port = port
        self.sock = socket.create_connection((ADDR, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(RAW_ECHO)
        sock = self.sock

        def add(a: int, b: int) -> bytes:
            sock.sendall(_MSG)
            data = sock.recv(16)
            return data if len(data) == 16 else data + recv_exact(sock, 16 - len(data))

        self.add = add

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        size = sum(len(p) for p in pieces)
        with socket.create_connection((ADDR, self.port), timeout=60) as sock:
            sock.sendall(RAW_SINK + ONE.pack(size))
            for piece in pieces:
                sock.sendall(piece)
            if recv_exact(sock, 1) != b"k":
                raise RuntimeError("raw sink did not confirm")
        return size

    def close(self) -> None:
        self.sock.close()


class RpycClient(Client):
    """Plain ``rpyc.connect`` (defaults: zlib on, Nagle on), or ``client.connect`` with a token."""

    def __init__(self, port: int, token: bool = False) -> None:
        if token:
            import client

            self.conn = client.connect(host=ADDR, port=port, token=TOKEN, timeout=60)
        else:
            import rpyc

            self.conn = rpyc.connect(ADDR, port, config={"sync_request_timeout": 60})
        self.add = self.conn.root.add
        self.put = self.conn.root.put

    def close(self) -> None:
        self.conn.close()


class HostClient(RpycClient):
    """The host's own client library (TCP_NODELAY, no zlib): what the host recommends for bulk."""

    def __init__(self, port: int, token: bool = False) -> None:
        import client

        self.conn = client.connect(host=ADDR, port=port, token=TOKEN if token else None, timeout=60)
        self.add = self.conn.root.add
        self.put = self.conn.root.put


class FilesClient(Client):
    """The file service's own upload path: ``client.files.upload`` of a file holding the pieces
    (verified end to end by ``hash_name``, fsynced, committed), timed from the call to its return."""

    hash_name = "blake3"

    def __init__(self, port: int, token: bool = False) -> None:
        import client

        self.conn = client.connect(host=ADDR, port=port, timeout=60)

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        from client import files

        size, _ = files.upload(
            self.conn, source, "peers-bench.bin", overwrite=True, timeout=seconds + 60, hash=self.hash_name
        )
        return int(size)

    def close(self) -> None:
        try:
            self.conn.root.rm("peers-bench.bin")
        finally:
            self.conn.close()


class FilesSha256Client(FilesClient):
    hash_name = "sha256"


class FilesDownloadClient(FilesClient):
    """``client.files.download`` of the same bytes, verified by ``hash_name``, timed from the call
    to its return (the local copy fsynced and renamed into place). Before the clock starts the
    file is uploaded and then read once over rpyc, so the server's copy is warm in the page cache
    as a file read lately would be (uploads are written with O_DIRECT and are not cached)."""

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        from client import files

        size, _ = files.download(
            self.conn, "peers-bench.bin", self.local, resume=False, timeout=seconds + 60, hash=self.hash_name
        )
        os.unlink(self.local)
        return int(size)

    def prepare(self, source: Path) -> None:
        from client import files

        files.upload(self.conn, source, "peers-bench.bin", overwrite=True, hash=self.hash_name)
        reader = self.conn.root.open_read("peers-bench.bin")
        try:
            while reader.read(16 << 20):
                pass
        finally:
            reader.close()
        self.local = str(source) + ".back"


class FilesDownloadSha256Client(FilesDownloadClient):
    hash_name = "sha256"


class _InMemory:
    """A temporary directory on a tmpfs for a client's own copy of the bytes, removed on close."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bench-peers-client-", dir=MEMORY_FS)
        self.path = Path(self._dir.name)

    def close(self) -> None:
        self._dir.cleanup()


class FilesMemoryClient(FilesClient):
    """``client.files.upload`` as :class:`FilesClient`, from a copy of the file on a tmpfs into a
    service whose root is on one too: the transport alone, as gRPC's in-memory sink measures it."""

    def __init__(self, port: int, token: bool = False) -> None:
        super().__init__(port, token)
        self.memory = _InMemory()

    def prepare(self, source: Path) -> None:
        self.source = self.memory.path / source.name
        shutil.copyfile(source, self.source)

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        return super().bulk(pieces, seconds, self.source)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.memory.close()


class FilesDownloadMemoryClient(FilesDownloadClient):
    """``client.files.download`` as :class:`FilesDownloadClient`, from a service whose root is on
    a tmpfs into a local file on one too."""

    def __init__(self, port: int, token: bool = False) -> None:
        super().__init__(port, token)
        self.memory = _InMemory()

    def prepare(self, source: Path) -> None:
        super().prepare(source)
        self.local = str(self.memory.path / "back.bin")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.memory.close()


class XmlRpcClient(Client):
    def __init__(self, port: int, token: bool = False) -> None:
        from xmlrpc.client import Binary, ServerProxy

        self.proxy = ServerProxy(f"http://{ADDR}:{port}/", allow_none=True)
        self.add = self.proxy.add
        remote_put = self.proxy.put
        self.put = lambda piece: remote_put(Binary(piece))

    def close(self) -> None:
        self.proxy("close")()


class PyroClient(Client):
    """Pyro5's default serializer (serpent) for calls; marshal for bulk, its fastest for bytes
    (serpent would base64 them)."""

    def __init__(self, port: int, token: bool = False) -> None:
        import Pyro5.api

        self.uri = f"PYRO:peer@{ADDR}:{port}"
        self.proxy = Pyro5.api.Proxy(self.uri)
        self.proxy._pyroBind()
        self.add = self.proxy.add

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        import Pyro5.api

        with Pyro5.api.Proxy(self.uri) as proxy:
            proxy._pyroSerializer = "marshal"
            self.put = proxy.put
            return super().bulk(pieces, seconds, source)

    def close(self) -> None:
        self.proxy._pyroRelease()


class GrpcClient(Client):
    """A channel of its own (local subchannel pool), so each client is its own TCP connection."""

    def __init__(self, port: int, token: bool = False) -> None:
        import grpc

        self.channel = grpc.insecure_channel(
            f"{ADDR}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        grpc.channel_ready_future(self.channel).result(timeout=30)
        unary = self.channel.unary_unary(
            "/peers.Peer/Add",
            request_serializer=lambda ab: PAIR.pack(*ab),
            response_deserializer=lambda data: ONE.unpack(data)[0],
        )
        self.add = lambda a, b: unary((a, b))
        self.stream = self.channel.stream_unary("/peers.Peer/Put")

    def bulk(self, pieces: list[bytes], seconds: float, source: Path) -> int:
        """One client-streaming call carrying every piece (gRPC's way to move bulk data)."""
        sent = 0
        deadline = time.perf_counter() + seconds

        def pieces_in_time() -> Any:
            nonlocal sent
            for piece in pieces:
                yield piece
                sent += len(piece)
                if time.perf_counter() > deadline:
                    break

        got = ONE.unpack(self.stream(pieces_in_time(), timeout=seconds + 60))[0]
        if got != sent:
            raise RuntimeError(f"gRPC server got {got} bytes of {sent}")
        return sent

    def close(self) -> None:
        self.channel.close()


CLIENTS: dict[str, type[Client]] = {
    "raw": RawClient,
    "rpyc": RpycClient,
    "host": HostClient,
    "files": FilesClient,
    "files-sha256": FilesSha256Client,
    "files-down": FilesDownloadClient,
    "files-down-sha256": FilesDownloadSha256Client,
    "files-memory": FilesMemoryClient,
    "files-down-memory": FilesDownloadMemoryClient,
    "xmlrpc": XmlRpcClient,
    "pyro5": PyroClient,
    "grpc": GrpcClient,
}


def open_client(system: System, port: int, kind: str | None = None) -> Client:
    """A client of ``kind`` (default: the system's small-call client) connected to ``port``."""
    name = kind or system.client
    assert name is not None, f"{system.name} has no small-call client"
    return CLIENTS[name](port, system.token)


def open_idle(system: System, port: int) -> Callable[[], None]:
    """One idle connection, established the way the system's clients establish one (the rpyc
    root fetched, the Pyro5 proxy bound, the gRPC channel ready, the floor's echo answered); an
    XML-RPC client is an HTTP connection that has not sent its request yet. Returns its closer."""
    if system.client == "xmlrpc":
        sock = socket.create_connection((ADDR, port), timeout=30)
        return sock.close
    conn = open_client(system, port)
    if system.client == "raw":
        conn.add(1, 2)
    return conn.close

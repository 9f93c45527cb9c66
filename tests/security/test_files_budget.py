"""No single client takes the file service down: the storage quota holds under concurrent uploads
(across the forking server's processes too), open transfers are capped per connection and per
service, and the bulk side channel cannot be squatted by connections without a ticket."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import client
from client import files
from rpyc_host.host import Host
from rpyc_host.testing import PROJECT_ROOT, Certificates, make_certificates, running_host, wait_until
from services.files.paths import TEMP_NAME
from services.files.quota import Quota, QuotaExceeded

from ..test_operate import get, metric, metrics_url

SERVER_TYPES = ["threaded", "threadpool", "forking"]
QUOTA = 1_000_000


def config(root: Path, server_type: str, options: str = "", limits: str = "", extra: str = "") -> str:
    return f"""
server: {{type: {server_type}, pool_size: 8}}
limits: {{{limits}}}
services:
  files:
    class: services.files:FileService
    port: 0
    options: {{root: "{root}"{", " + options if options else ""}}}
logging: {{level: WARNING}}
{extra}
"""


class Served:
    """A running file service and clients to it, all closed when the test ends."""

    def __init__(self, stack: ExitStack, host: Host, root: Path) -> None:
        self.stack = stack
        self.host = host
        self.root = root
        self.address = host.address("files")

    def connect(self, **kwargs: Any) -> Any:
        host, port = self.address
        return self.stack.enter_context(client.connect(host=host, port=port, timeout=10, **kwargs))

    @property
    def ledger(self) -> Any:
        return self.host.hosted[0].server.ledger

    def partials(self) -> list[str]:
        return sorted(p.name for p in self.root.rglob("*") if TEMP_NAME.match(p.name))

    def stored(self) -> int:
        return sum(
            p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")
        )


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    with ExitStack() as stack:

        def start(server_type: str, **parts: str) -> Served:
            root = tmp_path / "root"
            host = stack.enter_context(running_host(config(root, server_type, **parts)))
            return Served(stack, host, root)

        yield start


def wait_done(transfer: Any, timeout: float = 30.0) -> int:
    """Wait for a bulk transfer's server side; its byte count (errors are raised by wait())."""
    result: list[int] = []

    def finished() -> bool:
        done, count = transfer.wait(0.5)
        if done:
            result.append(int(count))
        return bool(done)

    wait_until(finished, timeout, "the bulk transfer to finish")
    return result[0]


def send_bulk(conn: Any, writer: Any, data: bytes) -> None:
    ticket = writer.bulk(len(data))
    with files._open_bulk(conn, ticket, 10) as sock:
        sock.sendall(data)
        assert wait_done(writer) == len(data)


# -- the storage quota -----------------------------------------------------------------------------


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_concurrent_uploads_cannot_overrun_the_quota(serve: Any, server_type: str) -> None:
    served = serve(server_type, options=f"max_total_bytes: {QUOTA}")
    conns = [served.connect() for _ in range(5)]
    # Every upload is open before any sends a byte: each sees an empty tree when it starts.
    writers = [conn.root.open_write(f"u{i}.bin") for i, conn in enumerate(conns)]
    data = os.urandom(900_000)
    outcomes: dict[int, Any] = {}
    start = threading.Barrier(5, timeout=30)

    def upload(i: int) -> None:
        try:
            start.wait()
            send_bulk(conns[i], writers[i], data)
            outcomes[i] = writers[i].commit()
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    committed = [o for o in outcomes.values() if isinstance(o, tuple)]
    refused = [o for o in outcomes.values() if isinstance(o, Exception)]
    assert len(committed) == 1 and len(refused) == 4, outcomes
    for exc in refused:
        assert isinstance(exc, ValueError), repr(exc)
        assert f"max_total_bytes: {QUOTA} bytes" in str(exc) and "in use or reserved" in str(exc)
        assert "nothing was written" in str(exc)
    assert served.stored() == 900_000 <= QUOTA
    assert served.partials() == []  # refused uploads leave nothing behind


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_quota_reservations_are_released_on_disconnect_abort_and_commit(serve: Any, server_type: str) -> None:
    served = serve(server_type, options=f"max_total_bytes: {QUOTA}")
    a, b = served.connect(), served.connect()
    wa, wb = a.root.open_write("a.bin"), b.root.open_write("b.bin")
    wa.bulk(800_000)  # announced: reserved, though not a byte has arrived yet
    with pytest.raises(ValueError, match=f"max_total_bytes: {QUOTA} bytes") as refused:
        wb.write(b"b" * 300_000)
    assert "'b.bin': 293.0 KiB more would exceed" in str(refused.value)
    assert len(served.partials()) == 1  # a.bin's; the refused b.bin left nothing

    a.close()  # cut off mid-upload: its reservation goes with it

    def fits(name: str, size: int) -> bool:
        writer = b.root.open_write(name, True)
        try:
            writer.write(b"x" * size)
        except ValueError:
            return False  # the refused upload was aborted
        writer.abort()
        return True

    wait_until(lambda: fits("probe", 900_000), 20, "the disconnected upload's reservation to be released")

    wb = b.root.open_write("b.bin")
    wb.write(b"b" * 900_000)
    c = served.connect()
    wc = c.root.open_write("c.bin")
    with pytest.raises(ValueError, match="max_total_bytes"):
        wc.write(b"c" * 200_000)
    wb.abort()  # gives its 900,000 bytes back
    wc = c.root.open_write("c.bin")
    wc.write(b"c" * 200_000)
    assert wc.commit()[0] == 200_000  # now counted by its size, not reserved twice
    assert c.root.write_bytes("d.bin", b"d" * 800_000)[0] == 800_000  # exactly the quota
    with pytest.raises(ValueError, match="max_total_bytes"):
        c.root.write_bytes("e.bin", b"e")
    with pytest.raises(ValueError, match="max_total_bytes"):
        c.root.cp("c.bin", "c2.bin")
    assert served.stored() == QUOTA
    if server_type != "forking":  # a forking child's counts stay in the child
        # At least the four above; waiting for the disconnect may have been refused a few more.
        assert served.ledger.refusal_counts()["max_total_bytes"] >= 4
    assert sorted(os.listdir(served.root)) == [*served.partials(), "c.bin", "d.bin"]


def test_a_reservation_dies_with_its_process(tmp_path: Path) -> None:
    """A connection process killed mid-upload (no on_disconnect) frees what it reserved."""
    root = tmp_path / "root"
    root.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from services.files.quota import Quota; "
            f"Quota({str(root)!r}, {QUOTA}).reserve('held', 900_000); print('held', flush=True); "
            "sys.stdin.read()",
        ],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        quota = Quota(str(root), QUOTA)
        with pytest.raises(QuotaExceeded) as refused:
            quota.reserve("mine", 200_000)
        assert refused.value.others == 900_000
    finally:
        holder.kill()
        holder.wait(20)
        if holder.stdin is not None:
            holder.stdin.close()
        if holder.stdout is not None:
            holder.stdout.close()
    quota.reserve("mine", 200_000)  # the dead process's record is dropped at this look
    assert quota.in_use() == 200_000
    quota.release("mine")
    assert os.listdir(root) == []


# -- open transfers --------------------------------------------------------------------------------


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_one_connection_cannot_hold_every_descriptor(serve: Any, server_type: str, tmp_path: Path) -> None:
    served = serve(server_type)  # the default caps: 32 open transfers per connection
    hostile, honest = served.connect(), served.connect()
    hostile.root.write_bytes("f.bin", b"f" * 1000)
    held = [hostile.root.open_read("f.bin") for _ in range(32)]
    with pytest.raises(OSError) as refused:
        hostile.root.open_read("f.bin")
    assert refused.value.errno == errno.EMFILE
    assert "limits.max_open_transfers_per_connection: 32" in str(refused.value)
    with pytest.raises(OSError, match="max_open_transfers_per_connection"):
        hostile.root.open_write("w.bin")
    assert not hostile.root.exists("w.bin") and served.partials() == []

    # Another client is not affected while the hostile one sits at its cap.
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(os.urandom(3 << 20))
    size, digest = files.upload(honest, src, "honest.bin")
    assert files.download(honest, "honest.bin", back) == (size, digest)
    assert back.read_bytes() == src.read_bytes()

    held.pop().close()  # closing one makes room for one
    held.append(hostile.root.open_read("f.bin"))
    assert len(held) == 32


@pytest.mark.parametrize("server_type", ["threaded", "threadpool"])
def test_the_service_cap_is_shared_and_disconnect_gives_everything_back(serve: Any, server_type: str) -> None:
    # (Under forking each connection is its own process with its own descriptors and counts.)
    served = serve(
        server_type,
        limits="max_open_transfers: 6, max_open_transfers_per_connection: 4",
        extra="metrics: {enabled: true, port: 0}",
    )
    one, two = served.connect(), served.connect()
    one.root.write_bytes("f.bin", b"f")
    kept = [one.root.open_read("f.bin") for _ in range(4)]
    kept += [two.root.open_read("f.bin") for _ in range(2)]
    with pytest.raises(OSError) as refused:
        two.root.open_read("f.bin")
    assert refused.value.errno == errno.EMFILE and "limits.max_open_transfers: 6" in str(refused.value)
    assert served.ledger.held("open_transfers") == 6
    page = get(metrics_url(served.host) + "/metrics")[1]
    assert metric(page, "rpyc_host_limit_refusals_total", service="files", limit="max_open_transfers") == 1

    one.close()  # never closed its transfers: the host and the service give them back
    wait_until(lambda: served.ledger.held("open_transfers") == 2, 20, "one's transfers to be released")
    kept = [two.root.open_read("f.bin") for _ in range(2)]
    assert len(kept) == 2


# -- the bulk side channel -------------------------------------------------------------------------


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_a_silent_side_connection_does_not_block_the_ticket_holder(serve: Any, server_type: str) -> None:
    served = serve(server_type, options="transfer_timeout: 8")
    conn = served.connect()
    writer = conn.root.open_write("x.bin")
    ticket = tuple(writer.bulk(1 << 20))
    with socket.create_connection(ticket[:2], timeout=10) as squatter:  # connects first, says nothing
        data = os.urandom(1 << 20)
        with files._open_bulk(conn, ticket, 10) as sock:
            sock.sendall(data)
        assert wait_done(writer) == len(data)
        assert writer.commit()[0] == len(data)
        assert closed_by_server(squatter, 10)  # the offer is over: the squatter is let go
    assert conn.root.read_bytes("x.bin") == data


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_pending_side_connections_are_capped_and_cut_after_their_deadline(
    serve: Any, server_type: str
) -> None:
    served = serve(
        server_type,
        options="transfer_timeout: 60",
        limits="max_pending_side_connections_per_connection: 2",
    )
    conn = served.connect()
    writer = conn.root.open_write("x.bin")
    ticket = tuple(writer.bulk(4))
    with ExitStack() as squatters:
        silent = [
            squatters.enter_context(socket.create_connection(ticket[:2], timeout=10)) for _ in range(20)
        ]
        # The oldest were dropped for the newer ones (cap), the rest after their 2 s deadline:
        # well before the transfer's own 60 s.
        assert all(closed_by_server(s, 15) for s in silent)
        assert writer.wait(0) == (False, 0)  # still waiting for its ticket holder
        if server_type != "forking":  # a forking child's counts stay in the child
            limit = "max_pending_side_connections_per_connection"
            assert served.ledger.refusal_counts().get(limit, 0) >= 1
            assert served.ledger.held("pending_side_connections") == 0
        for _ in range(20):  # and more squatters, still there when the holder comes
            squatters.enter_context(socket.create_connection(ticket[:2], timeout=10))
        with files._open_bulk(conn, ticket, 10) as sock:
            sock.sendall(b"abcd")
        assert wait_done(writer) == 4
    assert writer.commit()[0] == 4


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_side_connections_survive_squatters(serve: Any, certs: Certificates, mutual: bool) -> None:
    ca = f', ca: "{certs.ca}"' if mutual else ""
    served = serve(
        "threaded",
        options="transfer_timeout: 8",
        extra=f'security: {{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"{ca}}}}}',
    )
    extra = {"cert": str(certs.client_cert), "key": str(certs.client_key)} if mutual else {}
    conn = served.connect(tls=True, ca=str(certs.ca), **extra)
    writer = conn.root.open_write("x.bin")
    ticket = tuple(writer.bulk(1 << 20))
    with ExitStack() as squatters:
        squatters.enter_context(socket.create_connection(ticket[:2], timeout=10))  # silent
        half = squatters.enter_context(socket.create_connection(ticket[:2], timeout=10))
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
        context = ssl.create_default_context(cafile=str(certs.ca))
        if mutual:
            context.load_cert_chain(certs.client_cert, certs.client_key)
        stalled = context.wrap_socket(
            socket.create_connection(ticket[:2], timeout=10), server_hostname="127.0.0.1"
        )
        squatters.enter_context(stalled)  # a finished handshake, then no token
        data = os.urandom(1 << 20)
        with files._open_bulk(conn, ticket, 10) as sock:
            sock.sendall(data)
            # Closed only after the server has read everything: closing a TLS socket with the
            # server's unread session tickets in it sends a reset, which discards data in flight.
            assert wait_done(writer) == len(data)
    assert writer.commit()[0] == len(data)
    assert conn.root.read_bytes("x.bin") == data

"""The TLS download's sending side alone: ``bulk.send_file`` beside a read-ahead pipeline.

    python benchmarks/bench_tls_send.py             # 256 MiB cached file, 5 interleaved rounds
    python benchmarks/bench_tls_send.py --size 64 --rounds 1

A child process receives over TLS on loopback (``recv_into`` a reused 4 MiB buffer, bytes
dropped) and reports its CPU; this process sends a cached file either with ``send_file`` (on
TLS: one thread, ``pread`` 4 MiB then ``sendall`` it) or with the design measured against it,
a reader thread ``pread``-ing the next of 3 reused 1 MiB buffers (``--buffers``, ``--chunk``)
while this thread encrypts and sends the current one (both calls release the GIL). Printed:
MB/s and CPU seconds per GiB on each side, medians, and each ratio to ``send_file``. CPU s/GiB
is the steadier figure: MB/s moves by +-30% between identical runs on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import fmt, table
from rpyc_host.testing import make_certificates
from rpyc_host.wire import bulk

MiB = 1 << 20
GiB = 1 << 30


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def receiver(ca: str, port: int, count: int, out: Any) -> None:
    """Child: connect, receive ``count`` bytes into a reused buffer, send back its CPU seconds."""
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        bulk.tune(raw)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            buf = memoryview(bytearray(bulk.CHUNK))
            start = cpu()
            got = 0
            while got < count:
                n = sock.recv_into(buf)
                if n == 0:
                    break
                got += n
            out.send((got, cpu() - start))


def read_ahead_send(sock: socket.socket, fd: int, count: int, chunk: int = 1 << 20, buffers: int = 3) -> int:
    """The alternative: a reader thread fills reused buffers while this thread sends."""
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    ready: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
    for _ in range(buffers):
        free.put(memoryview(bytearray(chunk)))

    def read() -> None:
        pos = 0
        while pos < count:
            view = free.get()
            n = os.preadv(fd, [view[: min(chunk, count - pos)]], pos)
            if n == 0:
                break
            ready.put((view, n))
            pos += n
        ready.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = 0
    while (item := ready.get()) is not None:
        view, n = item
        sock.sendall(view[:n])
        free.put(view)
        sent += n
    reader.join()
    return sent


def one(
    way: str, context: ssl.SSLContext, ca: str, fd: int, count: int, chunk: int, buffers: int
) -> dict[str, float]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        mine, theirs = multiprocessing.Pipe()
        child = multiprocessing.Process(target=receiver, args=(ca, port, count, theirs), daemon=True)
        child.start()
        try:
            listener.settimeout(30)
            raw, _ = listener.accept()
            bulk.tune(raw)
            with context.wrap_socket(raw, server_side=True) as sock:
                sock.settimeout(60)
                before, t0 = cpu(), time.perf_counter()
                sent = (
                    bulk.send_file(sock, fd, 0, count)
                    if way == "send_file"
                    else read_ahead_send(sock, fd, count, chunk, buffers)
                )
                if not mine.poll(60):
                    raise TimeoutError("receiver did not report within 60 s")
                got, child_cpu = mine.recv()
                wall, sender_cpu = time.perf_counter() - t0, cpu() - before
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()
    assert sent == got == count, (sent, got, count)
    return {
        "mb_s": count / wall / 1e6,
        "send_cpu": sender_cpu * GiB / count,
        "recv_cpu": child_cpu * GiB / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1024, help="KiB per read-ahead buffer")
    parser.add_argument("--buffers", type=int, default=3, help="read-ahead buffers")
    args = parser.parse_args(argv)
    count = args.size * MiB
    ways = ("send_file", "read-ahead thread")
    runs: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory(prefix="bench-tls-send-") as tmp:
        certs = make_certificates(Path(tmp) / "certs")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs.server_cert, certs.server_key)
        src = Path(tmp) / "src.bin"
        with open(src, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        with open(src, "rb") as f:
            while f.read(16 * MiB):  # in the page cache, as a download of a file read lately
                pass
            for r in range(args.rounds):
                for way in ways if r % 2 == 0 else ways[::-1]:
                    runs[way].append(
                        one(way, context, str(certs.ca), f.fileno(), count, args.chunk << 10, args.buffers)
                    )
    med = {w: {k: statistics.median(x[k] for x in runs[w]) for k in runs[w][0]} for w in ways}
    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.size} MiB over TLS on loopback, {args.rounds} rounds, medians; "
        f"load average {loads} (2 CPUs, shared)"
    )
    rows = [["sender", "MB/s", "x send_file", "sender CPU s/GiB", "receiver CPU s/GiB"]]
    for w in ways:
        m = med[w]
        ratio = f"{m['mb_s'] / med['send_file']['mb_s']:.2f}"
        rows.append([w, fmt(m["mb_s"]), ratio, fmt(m["send_cpu"], 2), fmt(m["recv_cpu"], 2)])
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

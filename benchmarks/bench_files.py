"""Bulk transfer benchmark: the file service's client library vs a raw socket vs stock rpyc.

    .venv/bin/python benchmarks/bench_files.py              # 1 GiB
    .venv/bin/python benchmarks/bench_files.py --size 256   # MiB, a quick run

Each server runs in its own process on 127.0.0.1 (port 0, real port read back over a pipe):
- raw: a socket ``sendall`` of the bytes, received with ``recv_into`` and discarded;
- rpyc-defaults: ``rpyc.connect`` with default settings (zlib, Nagle), one call per 1 MiB chunk;
- files: ``client.files.upload`` / ``download`` against ``python server.py`` serving FileService;
- disk: the server's uploaded copy read with O_DIRECT while another 1 GiB is written with O_DIRECT,
  4 MiB at a time, both at once: what a loopback download asks of the one disk both ends share
  (the upload's source is in the page cache, so only its server side touches the disk);
- files.download, server copy cached: the same download once the server's file is in the page
  cache, i.e. the data path without the disk read.

Prints MB/s, the ratio to raw, and the peak RSS growth of the server process and of this client.
Figures are noisy on a shared 2-core machine: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rpyc  # noqa: E402

import client  # noqa: E402
from client import files  # noqa: E402
from rpyc_host.testing import ServerProcess  # noqa: E402

MiB = 1 << 20
CHUNK = MiB


def rss_peak_kib(pid: int | None = None) -> int:
    """VmHWM (peak resident set) of a process, in KiB."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def rss_now_kib(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- raw socket server -------------------------------------------------------------------------------


def raw_server(port_pipe: Any, size: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port_pipe.send((listener.getsockname()[1], rss_now_kib()))
    sock, _ = listener.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    deadline = time.monotonic() + 300
    while got < size and time.monotonic() < deadline:
        n = sock.recv_into(view)
        if not n:
            break
        got += n
    sock.sendall(b"k")
    sock.close()
    port_pipe.send((got, rss_peak_kib()))


def bench_raw(data: bytes) -> tuple[float, int]:
    parent, child = mp.Pipe()
    proc = mp.Process(target=raw_server, args=(child, len(data)))
    proc.start()
    try:
        port, base = parent.recv()
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        view = memoryview(data)
        start = time.perf_counter()
        for i in range(0, len(data), CHUNK):
            sock.sendall(view[i : i + CHUNK])
        sock.recv(1)
        elapsed = time.perf_counter() - start
        sock.close()
        got, peak = parent.recv()
        assert got == len(data), f"raw server got {got} bytes"
        return len(data) / elapsed / 1e6, peak - base
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


# -- stock rpyc server -------------------------------------------------------------------------------


class SinkService(rpyc.Service):
    def __init__(self) -> None:
        self.count = 0

    def exposed_put(self, chunk: bytes) -> int:
        self.count += len(chunk)
        return self.count

    def exposed_rss(self) -> tuple[int, int]:
        return rss_now_kib(), rss_peak_kib()


def rpyc_server(port_pipe: Any) -> None:
    from rpyc.utils.server import OneShotServer

    server = OneShotServer(SinkService(), hostname="127.0.0.1", port=0)
    server._listen()  # before the port is sent, or the client can be refused (start() listens late)
    port_pipe.send((server.port, rss_now_kib()))
    server.start()


def bench_rpyc_defaults(data: bytes, limit_s: float) -> tuple[float, int, int]:
    """Stock rpyc is slow: send at most ``limit_s`` seconds' worth of chunks; returns MB/s of that."""
    parent, child = mp.Pipe()
    proc = mp.Process(target=rpyc_server, args=(child,))
    proc.start()
    try:
        port, base = parent.recv()
        conn = rpyc.connect("127.0.0.1", port)
        put = conn.root.put
        view = memoryview(data)
        start = time.perf_counter()
        sent = 0
        for i in range(0, len(data), CHUNK):
            put(bytes(view[i : i + CHUNK]))
            sent += CHUNK
            if time.perf_counter() - start > limit_s:
                break
        elapsed = time.perf_counter() - start
        _, peak = conn.root.rss()
        conn.close()
        return sent / elapsed / 1e6, peak - base, sent
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# -- the file service --------------------------------------------------------------------------------


def bench_disk(src: Path, scratch: Path) -> float | None:
    """MB/s of each of an O_DIRECT read of ``src`` and an O_DIRECT write of as many bytes, run at once.

    None where the filesystem refuses O_DIRECT (tmpfs). ``src`` must not be in the page cache for
    this to measure the disk (the service writes uploads with O_DIRECT, so it is not).
    """
    size = src.stat().st_size
    step = 4 * MiB
    try:
        rfd = os.open(src, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        wfd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        os.close(rfd)
        return None
    errors: list[BaseException] = []

    def run(fd: int, write: bool) -> None:
        buf = mmap.mmap(-1, step)
        try:
            for pos in range(0, size, step):
                if write:
                    os.pwrite(fd, buf, pos)
                else:
                    os.preadv(fd, [buf], pos)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fd, fd == wfd)) for fd in (rfd, wfd)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    os.close(rfd)
    os.close(wfd)
    scratch.unlink()
    return None if errors else size / elapsed / 1e6


def bench_files(src: Path, work: Path) -> dict[str, Any]:
    config = work / "files.yaml"
    config.write_text(
        textwrap.dedent(f"""
        services:
          files:
            class: services.files:FileService
            port: 0
            options: {{root: {work / "root"}}}
        logging: {{level: INFO}}
        """)
    )
    out: dict[str, Any] = {}
    with ServerProcess(config) as server:
        host, port = server.address("files")
        base = rss_now_kib(server.pid)
        with client.connect(host=host, port=port, timeout=60) as conn:
            reset_peak()  # the raw/rpyc rows held the whole buffer in this process
            client_base = rss_now_kib()
            start = time.perf_counter()
            size, digest = files.upload(conn, src, "bench.bin", overwrite=True)
            out["upload"] = size / (time.perf_counter() - start) / 1e6
            out["upload_client_rss"] = rss_peak_kib() - client_base
            out["server_rss_after_upload"] = rss_peak_kib(server.pid) - base
            dst = work / "back.bin"
            start = time.perf_counter()
            _, digest2 = files.download(conn, "bench.bin", dst, resume=False)
            out["download"] = size / (time.perf_counter() - start) / 1e6
            assert digest2 == digest
            out["client_rss"] = rss_peak_kib() - client_base
            out["server_rss"] = rss_peak_kib(server.pid) - base
            dst.unlink()
            stored = work / "root" / "bench.bin"
            out["disk"] = bench_disk(stored, work / "disk.bin")
            with open(stored, "rb") as f:  # into the page cache, as a file read lately would be
                while f.read(4 * MiB):
                    pass
            start = time.perf_counter()
            files.download(conn, "bench.bin", dst, resume=False)
            out["download_cached"] = size / (time.perf_counter() - start) / 1e6
            out["client_rss_cached"] = rss_peak_kib() - client_base
            out["server_rss_cached"] = rss_peak_kib(server.pid) - base
            dst.unlink()
            conn.root.rm("bench.bin")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB to transfer (default: 1024)")
    parser.add_argument("--rpyc-seconds", type=float, default=8.0, help="time cap for stock rpyc")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-files-") as tmp:
        work = Path(tmp)
        src = work / "src.bin"
        with open(src, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        data = src.read_bytes()  # only the raw and rpyc rows send from memory
        raw, raw_rss = bench_raw(data)
        stock, stock_rss, stock_sent = bench_rpyc_defaults(data, args.rpyc_seconds)
        del data
        result = bench_files(src, work)
    print(f"{args.size} MiB of random bytes over 127.0.0.1 (MB/s = 10^6 bytes/s; ratio to raw socket)")
    print(f"{'path':<34}{'MB/s':>9}{'ratio':>8}{'server RSS +MiB':>17}{'client RSS +MiB':>17}")
    rows = [
        ("raw socket sendall", raw, raw_rss, None),
        (f"rpyc defaults, 1 MiB calls ({stock_sent // MiB} MiB)", stock, stock_rss, None),
        ("files.upload", result["upload"], result["server_rss_after_upload"], result["upload_client_rss"]),
        ("files.download", result["download"], result["server_rss"], result["client_rss"]),
        ("disk: O_DIRECT read + write at once", result["disk"], None, None),
        (
            "files.download, server copy cached",
            result["download_cached"],
            result["server_rss_cached"],
            result["client_rss_cached"],
        ),
    ]
    for name, rate, srv, cli in rows:
        if rate is None:
            print(f"{name:<34}{'-':>9}{'-':>8}")
            continue
        srv_text = f"{srv / 1024:>17.1f}" if srv is not None else f"{'-':>17}"
        cli_text = f"{cli / 1024:>17.1f}" if cli is not None else f"{'-':>17}"
        print(f"{name:<34}{rate:>9.0f}{rate / raw:>8.2f}{srv_text}{cli_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bulk transfer benchmark: the file service's client library, per hash, vs a raw socket and stock rpyc.

    .venv/bin/python benchmarks/bench_files.py              # 1 GiB
    .venv/bin/python benchmarks/bench_files.py --size 256   # MiB, a quick run

Each server runs in its own process on 127.0.0.1 (port 0, real port read back over a pipe):
- raw: a socket ``sendall`` of the bytes, received with ``recv_into`` and discarded (the baseline);
- rpyc-defaults: ``rpyc.connect`` with default settings (zlib, Nagle), one call per 1 MiB chunk;
- files, for each hash (blake3, xxh3_128, sha256): ``client.files.upload`` (verified end to end,
  fsynced before commit returns), then ``download`` with the server's copy cold (dropped from the
  page cache with posix_fadvise DONTNEED; uploads are written with O_DIRECT, so it is not cached
  anyway) and warm (read into the page cache first), against ``python -m rpyc_host`` serving
  FileService;
- files on tmpfs, first hash only: the same upload and download with the service's root and
  the client's files on /dev/shm (fsync still called, free there): the transport without a disk;
- disk: the server's uploaded copy read with O_DIRECT while as many bytes are written with O_DIRECT,
  both at once: what a cold loopback download asks of the one disk both ends share.

Prints MB/s, the ratio to raw and to the sha256 row of the same direction, CPU seconds per GiB of
this client process (getrusage: every thread, hashing included) and of the server process
(/proc/<pid>/stat utime + stime, before and after), and peak RSS growth of both. Figures are
noisy on a shared 2-core machine: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import resource
import shutil
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
GiB = 1 << 30
CHUNK = MiB
HASHES = ("blake3", "xxh3_128", "sha256")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_self() -> float:
    """CPU seconds (user + system) this process has used, every thread counted."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_of(pid: int) -> float:
    """CPU seconds (utime + stime) of another process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


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


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped; clean ones can
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb") as f:  # into the page cache, as a file read lately would be
        while f.read(4 * MiB):
            pass


class Meter:
    """Wall time, CPU of both processes and peak RSS growth of both, around one transfer."""

    def __init__(self, server_pid: int, server_base_kib: int) -> None:
        self.pid = server_pid
        self.server_base = server_base_kib

    def __enter__(self) -> Meter:
        reset_peak()
        self.client_base = rss_now_kib()
        self.cpu0 = (cpu_self(), cpu_of(self.pid))
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.client_cpu = cpu_self() - self.cpu0[0]
        self.server_cpu = cpu_of(self.pid) - self.cpu0[1]
        self.client_rss = rss_peak_kib() - self.client_base
        self.server_rss = rss_peak_kib(self.pid) - self.server_base

    def row(self, name: str, size: int) -> dict[str, Any]:
        return {
            "name": name,
            "mb_s": size / self.elapsed / 1e6,
            "client_cpu": self.client_cpu / (size / GiB),
            "server_cpu": self.server_cpu / (size / GiB),
            "server_rss": self.server_rss,
            "client_rss": self.client_rss,
        }


def files_config(work: Path) -> Path:
    """A config file in ``work`` serving one file service rooted at ``work/root``."""
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
    return config


def bench_files(src: Path, work: Path, hash_names: tuple[str, ...]) -> tuple[list[dict[str, Any]], Any]:
    config = files_config(work)
    rows: list[dict[str, Any]] = []
    disk = None
    size = src.stat().st_size
    stored = work / "root" / "bench.bin"
    dst = work / "back.bin"
    with ServerProcess(config) as server:
        host, port = server.address("files")
        meter = Meter(server.pid, rss_now_kib(server.pid))
        with client.connect(host=host, port=port, timeout=60) as conn:
            for name in hash_names:
                with meter:
                    rsize, digest = files.upload(conn, src, "bench.bin", overwrite=True, hash=name)
                assert rsize == size
                rows.append(meter.row(f"files.upload {name}", size))
                if disk is None:  # once, while the server's copy is still uncached
                    disk = bench_disk(stored, work / "disk.bin")
                for state in ("cold", "warm"):
                    drop_cache(stored) if state == "cold" else warm_cache(stored)
                    with meter:
                        _, back = files.download(conn, "bench.bin", dst, resume=False, hash=name)
                    assert back == digest
                    rows.append(meter.row(f"files.download {name}, {state}", size))
                    dst.unlink()
            conn.root.rm("bench.bin")
    return rows, disk


MEMORY_FS = "/dev/shm"  # a tmpfs on Linux


def bench_files_in_memory(src: Path, hash_name: str) -> list[dict[str, Any]]:
    """``files.upload`` and a warm ``download`` with the service's root, the client's source and
    its downloaded copy all on a tmpfs (a temporary directory under :data:`MEMORY_FS`, removed
    afterwards): no disk under either end, so only the transport, the copies and the hash are left.
    fsync is still called; on a tmpfs it costs nothing."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-files-", dir=MEMORY_FS) as tmp:
        work = Path(tmp)
        local = work / "src.bin"
        shutil.copyfile(src, local)
        config = files_config(work)
        size = local.stat().st_size
        dst = work / "back.bin"
        with ServerProcess(config) as server:
            host, port = server.address("files")
            meter = Meter(server.pid, rss_now_kib(server.pid))
            with client.connect(host=host, port=port, timeout=60) as conn:
                with meter:
                    rsize, digest = files.upload(conn, local, "bench.bin", overwrite=True, hash=hash_name)
                assert rsize == size
                rows.append(meter.row(f"files.upload {hash_name}, tmpfs", size))
                with meter:
                    _, back = files.download(conn, "bench.bin", dst, resume=False, hash=hash_name)
                assert back == digest
                rows.append(meter.row(f"files.download {hash_name}, tmpfs", size))
                dst.unlink()
                conn.root.rm("bench.bin")
    return rows


def print_row(*cells: str) -> None:
    widths = (36, 7, 7, 9, 18, 18, 12, 12)
    print(cells[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB to transfer (default: 1024)")
    parser.add_argument("--rpyc-seconds", type=float, default=8.0, help="time cap for stock rpyc")
    parser.add_argument(
        "--hash", action="append", choices=HASHES, help="only these hashes (repeatable; default: all three)"
    )
    args = parser.parse_args(argv)
    hash_names = tuple(args.hash or HASHES)
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
        rows, disk = bench_files(src, work, hash_names)
        if os.path.isdir(MEMORY_FS):
            rows += bench_files_in_memory(src, hash_names[0])
    load = os.getloadavg()
    print(
        f"{args.size} MiB of random bytes over 127.0.0.1 (MB/s = 10^6 bytes/s); load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print("x raw: ratio to the raw socket row; x sha256: to the sha256 row of the same transfer")
    print_row(
        "path",
        "MB/s",
        "x raw",
        "x sha256",
        "client CPU s/GiB",
        "server CPU s/GiB",
        "srv RSS+MiB",
        "cli RSS+MiB",
    )
    print_row(
        "raw socket sendall (baseline)", f"{raw:.0f}", "1.00", "-", "-", "-", f"{raw_rss / 1024:.1f}", "-"
    )
    label = f"rpyc defaults ({stock_sent // MiB} MiB)"
    print_row(label, f"{stock:.0f}", f"{stock / raw:.2f}", "-", "-", "-", f"{stock_rss / 1024:.1f}", "-")
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        twin = by_name.get(r["name"].replace(next(h for h in HASHES if h in r["name"]), "sha256"))
        print_row(
            r["name"],
            f"{r['mb_s']:.0f}",
            f"{r['mb_s'] / raw:.2f}",
            f"{r['mb_s'] / twin['mb_s']:.2f}" if twin else "-",
            f"{r['client_cpu']:.2f}",
            f"{r['server_cpu']:.2f}",
            f"{r['server_rss'] / 1024:.1f}",
            f"{r['client_rss'] / 1024:.1f}",
        )
    if disk is not None:
        print_row("disk: O_DIRECT read + write at once", f"{disk:.0f}", f"{disk / raw:.2f}", *["-"] * 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

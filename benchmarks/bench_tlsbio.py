"""The pieces of TLS bulk transfer: ``ssl.SSLSocket`` against ``TLSChannel`` (memory BIOs).

    python benchmarks/bench_tlsbio.py            # 256 MiB per transfer, 4 interleaved rounds
    python benchmarks/bench_tlsbio.py --quick    # 32 MiB, one round

One process, two threads over a loopback TCP connection with 4 MiB kernel buffers: the sender
``sendall``s a 4 MiB buffer again and again, the receiver ``recv_into``s a 4 MiB buffer. Each
end is an ``SSLSocket`` (``wrap_socket``, what the host uses) or a
:class:`benchmarks.tlsbio_channel.TLSChannel` (memory BIOs, measured and not adopted), in every
combination; CPU seconds per GiB of each thread (``time.thread_time``) and MB/s. No
disk, no hashing: the transport alone. Server context and certificate as the host's
(ECDSA P-256, TLS 1.3, OpenSSL's default suite).
"""

from __future__ import annotations

import argparse
import os
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

from benchmarks.harness import fmt, machine, save, table
from benchmarks.tlsbio_channel import TLSChannel
from rpyc_host.testing import make_certificates
from rpyc_host.wire import bulk
from rpyc_host.wire.tls import client_context, server_context

GiB = 1 << 30
PIECE = 4 << 20


def endpoint(sock: socket.socket, ctx: ssl.SSLContext, kind: str, server: bool) -> Any:
    bulk.tune(sock)
    if kind == "SSLSocket":
        return ctx.wrap_socket(sock, server_side=server, server_hostname=None if server else "127.0.0.1")
    chan = TLSChannel(sock, ctx, server_side=server, server_hostname=None if server else "127.0.0.1")
    chan.handshake(10)
    return chan


def one(
    sctx: ssl.SSLContext, cctx: ssl.SSLContext, sender: str, receiver: str, total: int
) -> dict[str, float]:
    """``total`` bytes from a ``sender`` end to a ``receiver`` end; CPU s/GiB of each, MB/s."""
    out: dict[str, float] = {}
    data = os.urandom(PIECE)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def receive() -> None:
            raw, _ = listener.accept()
            raw.settimeout(60)
            with raw:
                end = endpoint(raw, sctx, receiver, server=True)
                t0 = time.thread_time()
                buf = memoryview(bytearray(PIECE))
                got = 0
                while got < total:
                    n = end.recv_into(buf)
                    if n == 0:
                        break
                    got += n
                out["receiver"] = (time.thread_time() - t0) / (total / GiB)

        thread = threading.Thread(target=receive, name="receiver")
        thread.start()
        raw = socket.create_connection(listener.getsockname()[:2], timeout=60)
        with raw:
            end = endpoint(raw, cctx, sender, server=False)
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(total // PIECE):
                end.sendall(data)
            out["sender"] = (time.thread_time() - c0) / (total / GiB)
            thread.join(120)
            out["mb_s"] = total / (time.perf_counter() - t0) / 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, one round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer")
    args = parser.parse_args(argv)
    rounds, total = (1, 32 << 20) if args.quick else (args.rounds, args.size << 20)
    kinds = ("SSLSocket", "TLSChannel")
    pairs = [(s, r) for s in kinds for r in kinds]
    runs: dict[str, list[dict[str, float]]] = {f"{s} -> {r}": [] for s, r in pairs}
    with tempfile.TemporaryDirectory(prefix="bench-tlsbio-") as tmp:
        certs = make_certificates(Path(tmp))
        sctx = server_context(str(certs.server_cert), str(certs.server_key))
        cctx = client_context(str(certs.ca))
        for r in range(rounds):
            for s, rc in pairs[r % len(pairs) :] + pairs[: r % len(pairs)]:
                runs[f"{s} -> {rc}"].append(one(sctx, cctx, s, rc, total))
    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{machine()['date']}  {rounds} round(s) of {total >> 20} MiB, medians; load {loads} (2 CPUs, shared)"
    )
    rows = [["sender -> receiver", "MB/s", "sender CPU s/GiB", "receiver CPU s/GiB"]]
    for name, got in runs.items():
        med = {k: statistics.median(x[k] for x in got) for k in got[0]}
        rows.append([name, fmt(med["mb_s"]), fmt(med["sender"], 2), fmt(med["receiver"], 2)])
    print(table(rows))
    print(f"\nJSON: {save('tlsbio', {'machine': machine(), 'rounds': rounds, 'bytes': total, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What TLS costs: small calls beside bare rpyc over TLS, and file transfers beside plaintext.

    python benchmarks/bench_tls.py              # 3 rounds of calls, 256 MiB files (~2 minutes)
    python benchmarks/bench_tls.py --quick      # one short round, 32 MiB, for CI smoke
    python benchmarks/bench_tls.py --files-only # the file transfers alone (~1 minute)

Small calls: bare rpyc's ThreadedServer with ``SSLAuthenticator`` and the host's ``threaded``
server with ``security.tls``, the same certificate and key, each also in plaintext; one client
(``rpyc.ssl_connect`` / ``rpyc.connect``, ``add`` cached) per system, in interleaved rounds.
The negotiated protocol and cipher are printed (both ends use OpenSSL's defaults, so the same
suite). Session set-up: connect (TCP + TLS handshake), first call, close, per second.

Files: ``client.files.upload`` then ``download`` (server copy in the page cache) of the same
file, over TLS and in plaintext, against one ``FileService`` host each, hash ``xxh3_128`` (the
cheapest, so the transport shows). CPU of both processes is read around each transfer; the
difference per GiB is what TLS costs in CPU.

Targets (ratios from this run): host small calls over TLS >= 1.0x bare rpyc over TLS; files over
TLS >= 0.8x the same transfer in plaintext, each direction.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import ssl
import statistics
import sys
import tempfile
import textwrap
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rpyc
from rpyc.core.stream import SocketStream

import client
from benchmarks.bench_files import Meter, MiB, rss_now_kib, warm_cache
from benchmarks.harness import fmt, machine, print_checks, python_server, save, setup_rate, table, timed_calls
from client import files
from rpyc_host.testing import ServerProcess, make_certificates

ROOT = Path(__file__).resolve().parent.parent
BARE_TLS = """
import sys
from rpyc.utils.authenticators import SSLAuthenticator
from rpyc.utils.server import ThreadedServer
from benchmarks.bench_service import AddService
auth = SSLAuthenticator(keyfile=sys.argv[2], certfile=sys.argv[1]) if len(sys.argv) > 1 else None
server = ThreadedServer(AddService, hostname="127.0.0.1", port=0, authenticator=auth)
server._listen()
print("READY", server.port, flush=True)
server.start()
"""
HASH = "xxh3_128"


def host_config(tls: str, files_root: Path | None = None) -> str:
    if files_root is None:
        service = "add: {class: benchmarks.bench_service:AddService, port: 0}"
    else:
        service = f"files: {{class: services.files:FileService, port: 0, options: {{root: {files_root}}}}}"
    return f"services:\n  {service}\n{tls}"


def start_host(stack: ExitStack, config: str, name: str, work: Path, tag: str) -> ServerProcess:
    path = work / f"bench-tls-{tag}.yaml"
    path.write_text(textwrap.dedent(config))
    proc = ServerProcess(path, cwd=ROOT)
    stack.callback(proc.stop)
    proc.start()
    return proc


def dial(port: int, ca: str | None) -> Any:
    if ca is None:
        return rpyc.connect("127.0.0.1", port)
    return rpyc.ssl_connect("127.0.0.1", port, ca_certs=ca)


_CONTEXTS: dict[str, ssl.SSLContext] = {}


def dial_once(port: int, ca: str | None) -> Any:
    """A connection whose client side costs the same for every server: one TLS context made once
    (``rpyc.ssl_connect`` builds one per call and loads the system CA store into it, which would
    dominate a set-up figure) and TCP_NODELAY on."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ca is not None:
        context = _CONTEXTS.get(ca)
        if context is None:
            context = _CONTEXTS[ca] = ssl.create_default_context(cafile=ca)
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    return rpyc.connect_stream(SocketStream(sock))


def calls(port: int, ca: str | None, count: int, seconds: float) -> dict[str, float]:
    conn = dial(port, ca)
    try:
        return timed_calls(conn.root.add, count, seconds)
    finally:
        conn.close()


def negotiated(port: int, ca: str) -> str:
    conn = dial(port, ca)
    try:
        sock = conn._channel.stream.sock
        name, version, bits = sock.cipher()
        return f"{version} {name} ({bits} bits)"
    finally:
        conn.close()


def transfer(proc: ServerProcess, tls: bool, ca: str, src: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Upload then download ``src`` once; MB/s and CPU per GiB of each."""
    host, port = proc.address("files")
    size = src.stat().st_size
    meter = Meter(proc.pid, rss_now_kib(proc.pid))
    out: dict[str, dict[str, Any]] = {}
    back = work / "back.bin"
    with client.connect(host=host, port=port, timeout=60, tls=tls or None, ca=ca if tls else None) as conn:
        with meter:
            got, digest = files.upload(conn, src, "bench.bin", overwrite=True, hash=HASH)
        assert got == size
        out["upload"] = meter.row("upload", size)
        warm_cache(Path(proc_root(proc)) / "bench.bin")
        with meter:
            _, digest_back = files.download(conn, "bench.bin", back, resume=False, hash=HASH)
        assert digest_back == digest
        out["download"] = meter.row("download", size)
        back.unlink()
        conn.root.rm("bench.bin")
    return out


_ROOTS: dict[int, Path] = {}


def proc_root(proc: ServerProcess) -> Path:
    return _ROOTS[id(proc)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round, 32 MiB (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="MiB to transfer")
    parser.add_argument("--files-only", action="store_true", help="skip the small calls")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    size_mib = 32 if args.quick else args.size
    n_calls, secs = (2_000, 2.0) if args.quick else (10_000, 5.0)
    n_setup, setup_secs = (50, 3.0) if args.quick else (300, 6.0)

    systems = ("bare rpyc, TLS", "host threaded, TLS", "bare rpyc, plain", "host threaded, plain")
    seq: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    setup: dict[str, list[float]] = {s: [] for s in systems}
    moves: dict[str, list[dict[str, dict[str, Any]]]] = {"TLS": [], "plain": []}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        work = Path(tmp)
        certs = make_certificates(work / "certs")
        ca = str(certs.ca)
        tls = f'security: {{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"}}}}\n'
        ciphers: dict[str, str] = {}
        if not args.files_only:
            ports: dict[str, int] = {}
            cas: dict[str, str | None] = {}
            bare_args = (str(certs.server_cert), str(certs.server_key))
            ports[systems[0]] = stack.enter_context(python_server(BARE_TLS, *bare_args))[0]
            ports[systems[1]] = start_host(stack, host_config(tls), "add", work, "calls-tls").address("add")[
                1
            ]
            ports[systems[2]] = stack.enter_context(python_server(BARE_TLS))[0]
            ports[systems[3]] = start_host(stack, host_config(""), "add", work, "calls-plain").address("add")[
                1
            ]
            for name in systems:
                cas[name] = ca if name.endswith("TLS") else None
            ciphers = {name: negotiated(ports[name], ca) for name in systems[:2]}
            for r in range(rounds):
                order = systems[r % len(systems) :] + systems[: r % len(systems)]
                for name in order:
                    seq[name].append(calls(ports[name], cas[name], n_calls, secs))
                for name in order:
                    setup[name].append(
                        setup_rate(functools.partial(dial_once, ports[name], cas[name]), n_setup, setup_secs)
                    )
        src = work / "src.bin"
        with open(src, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        servers = {}
        for kind, extra in (("TLS", tls), ("plain", "")):
            root = work / f"root-{kind}"
            root.mkdir()
            proc = start_host(stack, host_config(extra, root), "files", work, f"files-{kind}")
            _ROOTS[id(proc)] = root
            servers[kind] = proc
        for r in range(rounds):
            for kind in ("TLS", "plain") if r % 2 == 0 else ("plain", "TLS"):
                moves[kind].append(transfer(servers[kind], kind == "TLS", ca, src, work))

    checks: list[tuple[str, bool]] = []
    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{machine()['date']}  {rounds} round(s), medians; load average {loads} (2 CPUs, shared)")
    if not args.files_only:
        med = {
            name: {k: statistics.median(x[k] for x in seq[name]) for k in seq[name][0]} for name in systems
        }
        rate = {name: statistics.median(setup[name]) for name in systems}
        for name, text in ciphers.items():
            print(f"{name}: {text}")
        bare_tls = med[systems[0]]["calls_per_s"]
        rows = [["small calls, one client", "p50 us", "p99 us", "calls/s", "x bare TLS", "set-ups/s"]]
        for name in systems:
            m = med[name]
            cells = [
                fmt(m["p50_us"]),
                fmt(m["p99_us"]),
                fmt(m["calls_per_s"]),
                f"{m['calls_per_s'] / bare_tls:.2f}",
            ]
            rows.append([name, *cells, fmt(rate[name])])
        print(table(rows))
        per_call = med["host threaded, TLS"]["p50_us"] - med["host threaded, plain"]["p50_us"]
        per_setup = 1e3 / rate["host threaded, TLS"] - 1e3 / rate["host threaded, plain"]
        print(f"TLS costs the host {per_call:.1f} us per call (p50), {per_setup:.2f} ms per set-up")
        host_ratio = med["host threaded, TLS"]["calls_per_s"] / bare_tls
        text = f"host small calls over TLS = {host_ratio:.2f}x bare rpyc over TLS (target >= 1.0)"
        checks.append((text, host_ratio >= 1.0))

    def mmed(kind: str, way: str, key: str) -> float:
        return statistics.median(m[way][key] for m in moves[kind])

    print(f"\nfiles, {size_mib} MiB, hash {HASH}, server copy cached for downloads")
    rows = [["transfer", "MB/s", "x plain", "client CPU s/GiB", "server CPU s/GiB"]]
    ratios: dict[str, float] = {}
    for way in ("upload", "download"):
        plain = mmed("plain", way, "mb_s")
        for kind in ("plain", "TLS"):
            speed = mmed(kind, way, "mb_s")
            if kind == "TLS":
                ratios[way] = speed / plain
            cpu = [fmt(mmed(kind, way, "client_cpu"), 2), fmt(mmed(kind, way, "server_cpu"), 2)]
            rows.append([f"{way}, {kind}", fmt(speed), f"{speed / plain:.2f}", *cpu])
    print(table(rows))
    for way in ("upload", "download"):
        extra = sum(mmed("TLS", way, k) - mmed("plain", way, k) for k in ("client_cpu", "server_cpu"))
        print(f"TLS costs {extra:.2f} CPU s per GiB on {way} (both ends together)")
    for way, ratio in ratios.items():
        checks.append((f"files {way} over TLS = {ratio:.2f}x plaintext (target >= 0.8)", ratio >= 0.8))
    print()
    print_checks(checks)
    data = {
        "machine": machine(),
        "rounds": rounds,
        "size_mib": size_mib,
        "ciphers": ciphers,
        "calls": seq,
        "setup_per_s": setup,
        "files": moves,
        "checks": [{"check": t, "ok": ok} for t, ok in checks],
    }
    print(f"\nJSON: {save('tls', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

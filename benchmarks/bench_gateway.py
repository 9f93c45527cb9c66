"""Gateway calls/s for ``demo.add`` over XML-RPC and JSON-RPC beside the standard library's
``SimpleXMLRPCServer`` with ``ThreadingMixIn`` serving the same function.

    python benchmarks/bench_gateway.py              # full run (~1 minute)
    python benchmarks/bench_gateway.py --quick      # a few seconds, for CI smoke

Each server runs in its own process on 127.0.0.1: the host (``python server.py``, demo service
plus gateway) and two stdlib servers: as the seed articles write it (``HTTP/1.0``: one TCP
connection per call) and with ``protocol_version = "HTTP/1.1"`` (keep-alive, the stronger
baseline). 8 client processes (``--clients``) send the same pre-encoded request over one
keep-alive connection each (reconnecting when a server closes), so the clients' own cost is
small and equal for every server; every response is checked. Systems are measured in
interleaved rounds and the median round is reported. Target: gateway >= 1.5x the stdlib server.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    RESULTS,
    fmt,
    machine,
    median_of,
    percentile,
    python_server,
    run_clients,
    save,
    table,
)

STDLIB = """
import sys
from socketserver import ThreadingMixIn
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

class Handler(SimpleXMLRPCRequestHandler):
    protocol_version = sys.argv[1]

class ThreadXMLRPCServer(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True

def add(a, b):
    return a + b

server = ThreadXMLRPCServer(("127.0.0.1", 0), requestHandler=Handler, allow_none=True, logRequests=False)
server.register_function(add, "demo.add")
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""

HOST_CONFIG = """
services:
  demo: {class: services.demo:DemoService, port: 0}
gateway: {enabled: true, port: 0, services: [demo]}
logging: {level: WARNING}
"""

XML_BODY = (
    b"<?xml version='1.0'?>\n<methodCall>\n<methodName>demo.add</methodName>\n<params>\n"
    b"<param>\n<value><int>1</int></value>\n</param>\n<param>\n<value><int>2</int></value>\n"
    b"</param>\n</params>\n</methodCall>\n"
)
XML_EXPECT = b"<int>3</int>"
JSON_BODY = b'{"jsonrpc": "2.0", "method": "demo.add", "params": [1, 2], "id": 1}'
JSON_EXPECT = b'"result": 3'

# name -> (path, content type, body, what a good response contains)
PROTOCOLS = {
    "xmlrpc": ("/RPC2", "text/xml", XML_BODY, XML_EXPECT),
    "jsonrpc": ("/jsonrpc", "application/json", JSON_BODY, JSON_EXPECT),
}


@contextmanager
def gateway_server(timeout: float = 30) -> Iterator[int]:
    """``python server.py`` with the demo service behind the gateway; yields the gateway port."""
    from rpyc_host.testing import ServerProcess

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench-gateway-{id(timeout)}.yaml"
    path.write_text(HOST_CONFIG)
    proc = ServerProcess(path, "--log-level", "INFO", ready_timeout=timeout)
    try:
        ready = proc.start().ready
        assert ready is not None and ready["gateway"] is not None, proc.log
        yield int(ready["gateway"][1])
    finally:
        proc.stop()
        path.unlink(missing_ok=True)


class Client:
    """One keep-alive HTTP connection sending the same request and checking each response."""

    def __init__(self, port: int, protocol: str) -> None:
        path, ctype, body, self.expect = PROTOCOLS[protocol]
        self.port = port
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.sock: socket.socket | None = None
        self.reconnects = 0

    def call(self) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.reconnects += 1
        self.sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed mid-response")
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        lower = head.lower()
        length = int(re.search(rb"content-length: *(\d+)", lower)[1])  # type: ignore[index]
        while len(body) < length:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed mid-body")
            body += data
        if (
            not head.startswith(b"HTTP/1.")
            or b" 200 " not in head.split(b"\r\n", 1)[0]
            or self.expect not in body
        ):
            raise AssertionError(f"bad response: {buf[:300]!r}")
        if b"connection: close" in lower or (head.startswith(b"HTTP/1.0") and b"keep-alive" not in lower):
            self.sock.close()
            self.sock = None


def _worker(port: int, protocol: str, seconds: float, max_calls: int, start_at: float, out: Any) -> None:
    client = Client(port, protocol)
    try:
        client.call()
        while time.time() < start_at:
            time.sleep(0.001)
        lat: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(lat) < max_calls and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            client.call()
            lat.append(time.perf_counter() - t0)
        out.put((len(lat), sorted(lat)[:: max(1, len(lat) // 2000)], client.reconnects, ""))
    except Exception as exc:
        out.put((0, [], client.reconnects, f"{type(exc).__name__}: {exc}"))


def parallel(
    port: int, protocol: str, clients: int, seconds: float, max_calls: int = 500_000
) -> dict[str, float]:
    """``clients`` processes calling at once for ``seconds`` (each at most ``max_calls``)."""
    results = run_clients(_worker, (port, protocol, seconds, max_calls), clients, seconds)
    errors = [r[3] for r in results if r[3]]
    if errors:
        raise RuntimeError(f"client failed: {errors[0]}")
    total = sum(r[0] for r in results)
    samples = [s for r in results for s in r[1]]
    return {
        "calls_per_s": total / seconds,
        "p99_us": percentile(samples, 99) * 1e6,
        "calls": total,
        "connections": sum(r[2] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="per system per round")
    args = parser.parse_args(argv)
    rounds, seconds = (1, 1.5) if args.quick else (args.rounds, args.seconds)

    systems = {
        "stdlib HTTP/1.0 (as in the seeds)": ("stdlib10", "xmlrpc"),
        "stdlib HTTP/1.1 keep-alive": ("stdlib11", "xmlrpc"),
        "gateway XML-RPC": ("gateway", "xmlrpc"),
        "gateway JSON-RPC": ("gateway", "jsonrpc"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    with ExitStack() as stack:
        ports = {
            "stdlib10": stack.enter_context(python_server(STDLIB, "HTTP/1.0"))[0],
            "stdlib11": stack.enter_context(python_server(STDLIB, "HTTP/1.1"))[0],
            "gateway": stack.enter_context(gateway_server()),
        }
        for _ in range(rounds):
            for name, (server, protocol) in systems.items():
                runs[name].append(parallel(ports[server], protocol, args.clients, seconds))

    result = {name: median_of(r) for name, r in runs.items()}
    base10 = result["stdlib HTTP/1.0 (as in the seeds)"]["calls_per_s"]
    base11 = result["stdlib HTTP/1.1 keep-alive"]["calls_per_s"]
    rows = [
        ["system", f"{args.clients}-client calls/s", "x stdlib 1.0", "x stdlib 1.1", "p99 us", "connections"]
    ]
    for name, r in result.items():
        rows.append(
            [
                name,
                fmt(r["calls_per_s"]),
                f"{r['calls_per_s'] / base10:.2f}",
                f"{r['calls_per_s'] / base11:.2f}",
                fmt(r["p99_us"]),
                fmt(r["connections"]),
            ]
        )
    print(table(rows))
    checks = []
    for proto in ("XML-RPC", "JSON-RPC"):
        ratio = result[f"gateway {proto}"]["calls_per_s"] / base10
        ratio11 = result[f"gateway {proto}"]["calls_per_s"] / base11
        checks.append(
            (f"gateway {proto} = {ratio:.2f}x stdlib as in the seeds (target >= 1.5)", ratio >= 1.5)
        )
        checks.append(
            (f"gateway {proto} = {ratio11:.2f}x stdlib with keep-alive (target >= 1.5)", ratio11 >= 1.5)
        )
    print()
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'MISS'}] {text}")
    path = save(
        "gateway",
        {
            "machine": machine(),
            "rounds": rounds,
            "seconds": seconds,
            "clients": args.clients,
            "parallel": result,
            "checks": [{"check": t, "ok": ok} for t, ok in checks],
        },
    )
    print(f"\nJSON: {path}")
    print(json.dumps({k: round(v["calls_per_s"]) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

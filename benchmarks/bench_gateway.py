"""Gateway calls/s for ``demo.add`` over XML-RPC and JSON-RPC beside the standard library's
``SimpleXMLRPCServer`` with ``ThreadingMixIn`` serving the same function.

    python benchmarks/bench_gateway.py              # full run (~1 minute)
    python benchmarks/bench_gateway.py --quick      # a few seconds, for CI smoke

Each server runs in its own process on 127.0.0.1: the host (``python server.py``, demo service
plus gateway) and two stdlib servers: as it is usually written (``HTTP/1.0``: one TCP
connection per call) and with ``protocol_version = "HTTP/1.1"`` (keep-alive, the stronger
baseline). 8 client processes (``--clients``) send the same pre-encoded request over one
keep-alive connection each (reconnecting when a server closes), so the clients' own cost is
small and equal for every server; every response is checked. Systems are measured in
interleaved rounds and the median round is reported, with each server process's CPU time per
call (from ``/proc``: less disturbed by other load on the machine than calls/s). Target:
gateway >= 1.5x the stdlib server with keep-alive, p99 no worse.

Then the server's cost per call is split into stages, each timed in this process over many
repetitions of the same request: HTTP parsing (the gateway's httptools parser; the standard
library's ``email``-based header parser beside it), reading a request from a socket, decoding
and encoding each protocol (the gateway's encoders; the standard library's beside them), the
dispatch to ``demo.add`` (in-process, through the same Session an HTTP connection uses), and
writing the response to a socket.
"""

from __future__ import annotations

import argparse
import json
import os
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
    print_checks,
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
def gateway_server(timeout: float = 30) -> Iterator[tuple[int, int]]:
    """``python server.py`` with the demo service behind the gateway; yields (gateway port, pid)."""
    from rpyc_host.testing import ServerProcess

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench-gateway-{id(timeout)}.yaml"
    path.write_text(HOST_CONFIG)
    proc = ServerProcess(path, "--log-level", "INFO", ready_timeout=timeout)
    try:
        ready = proc.start().ready
        assert ready is not None and ready["gateway"] is not None, proc.log
        assert proc.proc is not None
        yield int(ready["gateway"][1]), proc.proc.pid
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parallel(
    port: int, protocol: str, clients: int, seconds: float, max_calls: int = 500_000, pid: int = 0
) -> dict[str, float]:
    """``clients`` processes calling at once for ``seconds`` (each at most ``max_calls``); with
    ``pid``, also the server's CPU time per call (its process, start-up of the clients included)."""
    cpu_before = cpu_seconds(pid) if pid else 0.0
    results = run_clients(_worker, (port, protocol, seconds, max_calls), clients, seconds)
    cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
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
        "server_cpu_us_per_call": cpu / total * 1e6 if total else 0.0,
    }


def _per_call(fn: Any, repeat: int) -> float:
    """Microseconds of this thread's CPU time per call of ``fn``, best of three runs of ``repeat``
    calls (CPU time, not wall time: on a shared machine the wall clock also counts other work)."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.thread_time() - started) / repeat)
    return best * 1e6


def stage_split(repeat: int = 20_000) -> dict[str, float]:
    """The server-side cost of one ``demo.add`` call, stage by stage (µs); see the module docstring."""
    import http.client
    import io
    from xmlrpc.client import dumps

    from rpyc_host.gateway import jsonrpc as gw_json
    from rpyc_host.gateway import xmlencode
    from rpyc_host.gateway import xmlrpc as gw_xml
    from rpyc_host.gateway.calls import Session
    from rpyc_host.gateway.http import HTTPConnection
    from rpyc_host.gateway.jsonencode import ENCODER, result_text
    from rpyc_host.gateway.xmlrpc import decode_request
    from rpyc_host.testing import running_host

    path, ctype, body, _ = PROTOCOLS["xmlrpc"]
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8888\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    head = raw.split(b"\r\n", 1)[1]
    stages: dict[str, float] = {}
    a, b = socket.socketpair()
    with a, b, running_host(HOST_CONFIG) as host:
        conn = HTTPConnection(a, 1 << 20)

        def parse() -> None:
            conn._feed(raw)
            conn._ready.pop()

        def read() -> None:
            b.sendall(raw)
            conn.read_request()

        stages["HTTP parse (httptools)"] = _per_call(parse, repeat)
        stages["HTTP read (recv + parse)"] = _per_call(read, repeat)
        stages["HTTP parse (stdlib email headers)"] = _per_call(
            lambda: http.client.parse_headers(io.BytesIO(head)), repeat
        )
        stages["XML-RPC decode"] = _per_call(lambda: decode_request(XML_BODY), repeat)
        stages["XML-RPC encode"] = _per_call(lambda: xmlencode.response(3), repeat)
        stages["XML-RPC encode (xmlrpc.client.dumps)"] = _per_call(
            lambda: dumps((3,), methodresponse=True, allow_none=True, encoding="utf-8").encode(), repeat
        )
        stages["JSON-RPC decode"] = _per_call(lambda: json.loads(JSON_BODY), repeat)
        stages["JSON-RPC encode"] = _per_call(lambda: result_text(3, 1).encode(), repeat)
        stages["JSON-RPC encode (json.JSONEncoder)"] = _per_call(
            lambda: ENCODER.encode({"jsonrpc": "2.0", "result": 3, "id": 1}).encode(), repeat
        )

        class Peer:
            address = ("127.0.0.1", 1)
            ip = "127.0.0.1"

        gateway = host.gateway
        session = Session(gateway.catalog, lambda name: gateway._open_link(name, Peer, a, session))
        try:
            stages["dispatch (in-process)"] = _per_call(lambda: session.call("demo.add", (1, 2), {}), repeat)
            stages["XML-RPC handler (decode+dispatch+encode)"] = _per_call(
                lambda: gw_xml.handle(XML_BODY, session), repeat
            )
            stages["JSON-RPC handler (decode+dispatch+encode)"] = _per_call(
                lambda: gw_json.handle(JSON_BODY, session), repeat
            )
        finally:
            session.close()
        reply = b"x" * 160

        def write() -> None:
            conn.send_response(200, reply, "text/xml", True)
            b.recv(65536)

        stages["response write (one send) + peer read"] = _per_call(write, repeat)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="per system per round")
    args = parser.parse_args(argv)
    rounds, seconds = (1, 1.5) if args.quick else (args.rounds, args.seconds)

    systems = {
        "stdlib HTTP/1.0 (one connection per call)": ("stdlib10", "xmlrpc"),
        "stdlib HTTP/1.1 keep-alive": ("stdlib11", "xmlrpc"),
        "gateway XML-RPC": ("gateway", "xmlrpc"),
        "gateway JSON-RPC": ("gateway", "jsonrpc"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    with ExitStack() as stack:
        servers = {
            "stdlib10": stack.enter_context(python_server(STDLIB, "HTTP/1.0")),
            "stdlib11": stack.enter_context(python_server(STDLIB, "HTTP/1.1")),
            "gateway": stack.enter_context(gateway_server()),
        }
        for _ in range(rounds):
            for name, (server, protocol) in systems.items():
                port, pid = servers[server]
                runs[name].append(parallel(port, protocol, args.clients, seconds, pid=pid))

    result = {name: median_of(r) for name, r in runs.items()}
    stages = stage_split(2_000 if args.quick else 20_000)
    base10 = result["stdlib HTTP/1.0 (one connection per call)"]["calls_per_s"]
    base11 = result["stdlib HTTP/1.1 keep-alive"]["calls_per_s"]
    rows = [
        [
            "system",
            f"{args.clients}-client calls/s",
            "x stdlib 1.0",
            "x stdlib 1.1",
            "p99 us",
            "server CPU us/call",
            "connections",
        ]
    ]
    for name, r in result.items():
        rows.append(
            [
                name,
                fmt(r["calls_per_s"]),
                f"{r['calls_per_s'] / base10:.2f}",
                f"{r['calls_per_s'] / base11:.2f}",
                fmt(r["p99_us"]),
                f"{r['server_cpu_us_per_call']:.1f}",
                fmt(r["connections"]),
            ]
        )
    print(table(rows))
    print()
    print(table([["server stage, one demo.add call", "us"]] + [[k, f"{v:.1f}"] for k, v in stages.items()]))
    checks = []
    for proto in ("XML-RPC", "JSON-RPC"):
        ratio = result[f"gateway {proto}"]["calls_per_s"] / base10
        ratio11 = result[f"gateway {proto}"]["calls_per_s"] / base11
        checks.append((f"gateway {proto} = {ratio:.2f}x stdlib HTTP/1.0 (target >= 1.5)", ratio >= 1.5))
        checks.append(
            (f"gateway {proto} = {ratio11:.2f}x stdlib with keep-alive (target >= 1.5)", ratio11 >= 1.5)
        )
        p99, base_p99 = result[f"gateway {proto}"]["p99_us"], result["stdlib HTTP/1.1 keep-alive"]["p99_us"]
        checks.append(
            (
                f"gateway {proto} p99 {p99:,.0f} us vs stdlib keep-alive {base_p99:,.0f} us (no worse)",
                p99 <= base_p99,
            )
        )
    print()
    print_checks(checks)
    path = save(
        "gateway",
        {
            "machine": machine(),
            "rounds": rounds,
            "seconds": seconds,
            "clients": args.clients,
            "parallel": result,
            "stages_us": stages,
            "checks": [{"check": t, "ok": ok} for t, ok in checks],
        },
    )
    print(f"\nJSON: {path}")
    print(json.dumps({k: round(v["calls_per_s"]) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

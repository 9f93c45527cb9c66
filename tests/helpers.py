"""Helpers shared by the test modules (test-only; what benchmarks also need is in rpyc_host.testing).

- configs: ``demo_config`` (one demo service on a server type), ``registered_demo_config``
  (a demo instance that registers with a registry), ``ingest_config`` (ingest alone, on SQLite);
- HTTP: ``http``/``read_response``/``read_responses``/``post``/``jsonrpc`` on raw sockets, ``curl`` and
  ``node_fetch`` as real clients, ``get`` for a URL, ``metric`` to read Prometheus text;
- processes: ``rss_kib``, ``refused`` (nothing listens at an address any more), ``LineDriver``
  (a child process asked one JSON line at a time);
- data: ``make_png``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the checkout under test
SERVER_TYPES = ["threaded", "threadpool", "forking"]


# -- configs --------------------------------------------------------------------------------------


def demo_config(server_type: str, extra: str = "") -> str:
    """One demo service on port 0 served by ``server_type`` (pool of 4), plus ``extra`` YAML."""
    return f"""
server: {{type: {server_type}, pool_size: 4}}
services:
  demo: {{class: services.demo:DemoService, port: 0}}
{extra}
"""


def ingest_config(db: Path, port: int = 0, metrics: bool = False) -> str:
    """The ingest service alone on a threaded server, storing into SQLite file ``db``."""
    text = f"""
server: {{type: threaded, host: 127.0.0.1}}
services:
  ingest:
    class: services.ingest:IngestService
    port: {port}
    options: {{database: "sqlite:///{db}"}}
"""
    return text + ("metrics: {enabled: true, port: 0}\n" if metrics else "")


def registered_demo_config(
    write: Callable[[str], Path],
    registry: tuple[str, int],
    greeting: str,
    *,
    host: str = "127.0.0.1",
    extra: str = "",
    interval: float = 0.5,
) -> Path:
    """A config serving one demo instance (``ping()`` answers ``greeting``) that registers."""
    base = f"""
        server: {{host: {host}, grace_period: 0}}
        services:
          demo:
            class: services.demo:DemoService
            port: 0
            options: {{greeting: {greeting}}}
        registry:
          {{enabled: true, host: {registry[0]}, port: {registry[1]}, interval: {interval}, timeout: 1}}
        logging: {{level: INFO}}
        """
    return write(textwrap.dedent(base) + textwrap.dedent(extra))


# -- processes ------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class LineDriver:
    """A Python child process (``code``, run with ``prefix`` before the interpreter) that answers each
    line written to its stdin with one JSON line; closing stdin ends it."""

    def __init__(self, prefix: list[str], code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )

    def ask(self, line: str) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the client driver exited"
        return dict(json.loads(answer))

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def refused(address: tuple[str, int]) -> bool:
    """True when a TCP connection to ``address`` is refused (or fails within 2 s)."""
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return True
    return False


# -- HTTP -----------------------------------------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    """GET ``url``: (status, body), also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics_url(host: Any) -> str:
    """The base URL of an in-process Host's metrics server."""
    address, port = host.metrics.address
    return f"http://{address}:{port}"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text; AssertionError if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


NODE_FETCH = """
const [url, body, ctype] = process.argv.slice(1);
fetch(url, {method: "POST", headers: {"Content-Type": ctype}, body})
  .then(async (r) => { console.log(JSON.stringify({status: r.status, body: await r.text()})); })
  .catch((e) => { console.error(String(e)); process.exit(1); });
"""


def http(
    address: tuple[str, int], raw: bytes, timeout: float = 10.0, source: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection (from loopback address ``source``); read one response."""
    bind = (source, 0) if source else None
    with socket.create_connection(address, timeout=timeout, source_address=bind) as sock:
        sock.sendall(raw)
        return read_response(sock)


def _next_response(sock: socket.socket, buf: bytes) -> tuple[int, dict[str, str], int, bytes]:
    """Read one response's head and body from ``sock`` after ``buf`` (bytes already read):
    ``(status, headers, body length, the body and whatever followed it)``."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a full response: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        rest += data
    return int(lines[0].split()[1]), headers, length, rest


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response; the body is everything read after the head (at least Content-Length bytes)."""
    status, headers, _, body = _next_response(sock, b"")
    return status, headers, body


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses (status, body) read in order from one connection, pipelining-safe."""
    buf, out = b"", []
    while len(out) < count:
        try:
            status, _, length, rest = _next_response(sock, buf)
        except ConnectionError:
            raise ConnectionError(f"closed after {len(out)} responses") from None
        out.append((status, rest[:length]))
        buf = rest[length:]
    return out


def post(path: str, body: bytes, host: str, *, ctype: str = "application/json", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def jsonrpc(
    address: tuple[str, int], payload: Any, headers: str = "", source: str | None = None
) -> tuple[int, Any]:
    body = json.dumps(payload).encode()
    raw = post("/jsonrpc", body, f"{address[0]}:{address[1]}", extra=headers)
    status, _, data = http(address, raw, source=source)
    return status, (json.loads(data) if data and status == 200 else data)


def curl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "15", *args], capture_output=True, text=True, timeout=timeout
    )


def node_fetch(url: str, body: str, ctype: str) -> dict[str, Any]:
    done = subprocess.run(
        ["node", "-e", NODE_FETCH, url, body, ctype], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def make_png(width: int = 8, height: int = 8) -> bytes:
    """A real (valid) RGB PNG: signature, IHDR, IDAT, IEND with correct CRCs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 30 % 256, y * 30 % 256, 128)) for x in range(width))
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# -- network namespaces -------------------------------------------------------------------------


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode:
        raise AssertionError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class Network:
    """Network namespaces of a test's own: one per host in ``hosts`` (name -> last address byte),
    each joined by a veth to a bridge in a namespace of its own (``sw``), on a /24 that exists only
    inside them; ``close()`` deletes every namespace it made."""

    def __init__(self, hosts: dict[str, int], prefix: str, subnet: str) -> None:
        self.hosts = hosts
        self.id = f"{prefix}{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
        self.subnet = f"{subnet}.{random.randrange(1, 255)}"
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.id}-{name}"

    def addr(self, name: str) -> str:
        return f"{self.subnet}.{self.hosts[name]}"

    def exec(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def create(self) -> Network:
        switch = self.ns("sw")
        for name in ["sw", *self.hosts]:
            ip("netns", "add", self.ns(name))
            self.made.append(self.ns(name))
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for name in self.hosts:
            ns = self.ns(name)
            ip("-n", switch, "link", "add", f"p-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", switch, "link", "set", f"p-{name}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def cut(self, name: str) -> None:
        """Unplug a host: its end of the cable goes down on the switch."""
        ip("-n", self.ns("sw"), "link", "set", f"p-{name}", "down")

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
        assert self.id not in left, f"namespaces left behind: {left}"


@contextmanager
def namespaces(hosts: dict[str, int], prefix: str, subnet: str) -> Iterator[Network]:
    """A :class:`Network` built for a test, failing it clearly (never skipping) where it cannot be."""
    if shutil.which("ip") is None:
        pytest.fail("the 'ip' command (iproute2) is missing: run bash scripts/test.sh", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (CI runs as root)", pytrace=False)
    net = Network(hosts, prefix, subnet)
    try:
        net.create()
    except AssertionError as exc:
        net.close()
        pytest.fail(f"cannot build network namespaces here: {exc}", pytrace=False)
    try:
        yield net
    finally:
        net.close()


# -- a chain of two hosts ---------------------------------------------------------------------------


@contextmanager
def relay_chain(events: Path, a_extra: str = "") -> Iterator[tuple[Any, Any]]:
    """Host B (``slow``: SlowService recording to ``events``; ``probe``: ContextProbeService) and
    host A (``relay`` and ``ask``: RelayService calling B's two), A's config extended by ``a_extra``;
    yields ``(a, b)``."""
    from rpyc_host.testing import running_host

    b_config = f"""
services:
  slow: {{class: tests.sample_services:SlowService, port: 0, options: {{events: "{events}"}}}}
  probe: {{class: tests.sample_services:ContextProbeService, port: 0}}
"""
    with running_host(b_config) as b:
        relay = "tests.sample_services:RelayService"
        a_config = f"""
services:
  relay: {{class: {relay}, port: 0, options: {{target_port: {b.address("slow")[1]}}}}}
  ask: {{class: {relay}, port: 0, options: {{target_port: {b.address("probe")[1]}}}}}
{a_extra}
"""
        with running_host(a_config) as a:
            yield a, b

"""Soak: hostile clients attack every shipped service at once while honest clients keep calling.

    .venv/bin/python benchmarks/soak.py               # 60 s of attack after a 15 s baseline
    .venv/bin/python benchmarks/soak.py --quick       # 15 s of attack after a 5 s baseline
    .venv/bin/python benchmarks/soak.py --seconds 120 --baseline 20
    .venv/bin/python benchmarks/soak.py --each        # each attack alone for 10 s, one table
    .venv/bin/python benchmarks/soak.py --server-type forking   # every service on that type

The services of ``config.yaml`` run as one ``python server.py`` process, from a temporary
config derived from it: ports 0, the gateway and /metrics enabled, one Bearer token, the file
service's ``max_total_bytes`` at 4 MiB, and files and the ingest database in a temporary
directory. Honest clients on 127.0.0.1 call every service (demo add/ping, files write_bytes and
read_bytes, ingest submit, gateway JSON-RPC) at a steady pace, first alone (the baseline), then
while nine attacks run at once, one per source address:

=========  ==================  ==================================================================
address    attack              what it sends
=========  ==================  ==================================================================
127.0.0.2  endless-iterator    an object posing as a list (len 1, iteration never ends) to add()
127.0.0.3  pinning-callback    countdown(10000, cb) with a callback that sleeps 1 s per call
127.0.0.4  open-read-leak      files open_read() handles that are never closed
127.0.0.5  quota-race          6 concurrent 1 MiB uploads per round against a 4 MiB quota
127.0.0.6  bulk-squat          silent TCP connections to files bulk side-channel ports
127.0.0.7  slowloris           200 gateway connections sending a request one byte per second
127.0.0.8  nesting-bomb        a gateway JSON-RPC body nested 100,000 deep
127.0.0.9  token-guess         gateway requests with wrong ``Authorization: Bearer`` tokens
127.0.0.10 classic-console     with the token, what a classic console answers (``getmodule``,
                               ``eval``, ``execute``, hidden attributes) on every service port,
                               and connections to the classic console's configured port
=========  ==================  ==================================================================

Prints the honest success rate during the attack (target 100%), the honest p99 during the attack
as a ratio to the baseline p99 of the same run (target <= 3x), the peak processes, memory (PSS),
descriptors and threads of the server and its connection processes (``/proc``; the forking
server serves each connection in a child), the file tree's peak size against its quota, the CPU
share of the server and its connection processes (baseline and attack), of each attack process
and of the honest clients, what each attack got (including refusals and their messages) and the
refusal counters of /metrics. ``--each`` runs every attack alone (10 s each by default) and ends
with one table row per attack.

The attacks hold resources rather than burn CPU (paced loops): denial of service by CPU from an
authenticated client is outside the threat model, and this machine has 2 cores. The attack
processes run at the lowest CPU priority (SCHED_IDLE): in life they are other machines, and here
their own work must not be charged to the server, while the work they cause in it still is. Every loop is
bounded in count and time; every process started here is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import queue
import re
import resource
import secrets
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpyc.core.channel import Channel  # noqa: E402
from rpyc.core.stream import SocketStream  # noqa: E402
from rpyc.utils.factory import connect_channel  # noqa: E402

import client  # noqa: E402
from benchmarks.harness import fmt, machine, percentile, save, table  # noqa: E402
from rpyc_host.config import load_config  # noqa: E402
from rpyc_host.testing import ServerProcess, wait_until  # noqa: E402

MiB = 1 << 20
QUOTA = 4 * MiB
UPLOAD_MIB = 1  # each of the quota race's 6 concurrent uploads: 6 MiB a round against 4
HONEST_INTERVAL = 0.005  # seconds between one honest client's calls
SAMPLE_EVERY = 0.5  # seconds between /proc samples
TREE_EVERY = 0.05  # seconds between measurements of the file tree
ATTACKS = {
    "endless-iterator": "127.0.0.2",
    "pinning-callback": "127.0.0.3",
    "open-read-leak": "127.0.0.4",
    "quota-race": "127.0.0.5",
    "bulk-squat": "127.0.0.6",
    "slowloris": "127.0.0.7",
    "nesting-bomb": "127.0.0.8",
    "token-guess": "127.0.0.9",
    "classic-console": "127.0.0.10",
}
HONEST = ("demo", "files", "ingest", "gateway")
# A failed honest call whose message names a limit or quota was refused clearly (nothing lost);
# anything else (a timeout, a cut connection, a server out of descriptors) is a host failure.
# "Too many open files" names no limit: the server ran out of descriptors.
CLEAR_REFUSAL = re.compile(r"limit|quota", re.IGNORECASE)


# -- the server ------------------------------------------------------------------------------------


def soak_config(token: str, server_type: str | None = None) -> str:
    """config.yaml with ports 0, the gateway and /metrics on, a token and a small files quota;
    ``server_type`` replaces the server type of every service."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    if server_type:
        data["server"]["type"] = server_type
        for svc in data["services"].values():
            svc.pop("type", None)
    for svc in data["services"].values():
        svc["port"] = 0
    files = data["services"]["files"].setdefault("options", {})
    files["root"] = "files"  # relative to the server's working directory: the temp dir
    files["max_total_bytes"] = QUOTA
    data["services"]["ingest"].setdefault("options", {})["database"] = "sqlite:///ingest.db"
    data["gateway"] = {**(data.get("gateway") or {}), "enabled": True, "host": "127.0.0.1", "port": 0}
    data["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    data["security"] = {"tokens": [token]}
    return yaml.safe_dump(data, sort_keys=False)


def ready_port(proc: ServerProcess, component: str) -> int:
    """The real port of ``gateway`` or ``metrics``, from the host's ready file."""
    address = (proc.ready or {}).get(component)
    assert address is not None, f"{component} is not listening:\n{proc.log}"
    return int(address[1])


@dataclass
class Ports:
    demo: int
    files: int
    ingest: int
    gateway: int
    classic: int  # the classic console's configured port (nothing listens: it is disabled)


# -- connections -----------------------------------------------------------------------------------


def send_token(sock: socket.socket, token: str) -> None:
    """The host's token handshake (SECURITY.md): magic, 2-byte length, token; read the verdict."""
    data = token.encode()
    sock.sendall(b"RPYHTOKEN1" + struct.pack("!H", len(data)) + data)
    head = recv_exact(sock, 4)
    if head != b"RPYH":
        raise ConnectionRefusedError("refused before the token was read (a connection limit)")
    status = recv_exact(sock, 1)[0]
    (length,) = struct.unpack("!H", recv_exact(sock, 2))
    message = recv_exact(sock, length).decode("utf-8", "replace")
    if status != 0:
        raise ConnectionRefusedError(f"token refused: {message}")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def hostile_connect(port: int, source: str, token: str, timeout: float) -> Any:
    """A plain rpyc connection from ``source`` (no client library: what any attacker can write)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_token(sock, token)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    config = {"sync_request_timeout": timeout, "allow_pickle": False}
    return connect_channel(Channel(SocketStream(sock), compress=False), config=config)


def first_line(exc: BaseException) -> str:
    text = str(exc).split("\n\n========= Remote Traceback")[0].strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:160]


# -- honest clients --------------------------------------------------------------------------------


@dataclass
class HonestLog:
    """One honest client's calls: (wall time, seconds, ok) and its error messages."""

    samples: list[tuple[float, float, bool]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


class GatewayClient:
    """JSON-RPC over one keep-alive HTTP connection, with the Bearer token."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.ids = 0

    def call(self, method: str, *params: Any) -> Any:
        self.ids += 1
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": self.ids})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        self.http.request("POST", "/jsonrpc", body, headers)
        response = self.http.getresponse()
        data = response.read()
        if response.status != 200:
            raise ConnectionError(f"HTTP {response.status}: {data[:100]!r}")
        reply = json.loads(data)
        if "error" in reply:
            raise RuntimeError(
                f"JSON-RPC error {reply['error'].get('code')}: {reply['error'].get('message')}"
            )
        return reply["result"]

    def close(self) -> None:
        self.http.close()


def honest_calls(name: str, ports: Ports, token: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A connected client for ``name``: (call number i, close). Raises if it cannot connect."""
    if name == "gateway":
        gw = GatewayClient(ports.gateway, token)
        gw.call("demo.ping")

        def gateway_call(i: int) -> None:
            if gw.call("demo.add", i, 1) != i + 1:
                raise AssertionError("demo.add through the gateway returned a wrong sum")

        return gateway_call, gw.close
    port = {"demo": ports.demo, "files": ports.files, "ingest": ports.ingest}[name]
    conn = client.connect(host="127.0.0.1", port=port, token=token, timeout=10, retries=0)
    root = conn.root
    if name == "demo":
        add, ping = root.add, root.ping

        def demo_call(i: int) -> None:
            if i % 2:
                if ping() != "pong":
                    raise AssertionError("ping did not answer pong")
            elif add(i, 1) != i + 1:
                raise AssertionError("add returned a wrong sum")

        return demo_call, conn.close
    if name == "files":
        root.mkdir("honest", True)
        write_bytes, read_bytes = root.write_bytes, root.read_bytes
        payload = b"h" * 1024

        def files_call(i: int) -> None:
            path = f"honest/{os.getpid()}-{(i // 2) % 8}.txt"
            if i % 2 == 0:
                write_bytes(path, payload, True)
            elif read_bytes(path) != payload:
                raise AssertionError("read_bytes returned other bytes than were written")

        return files_call, conn.close
    submit = root.submit
    batch = b'{"seq": 1, "host": "soak"}\n' * 10

    def ingest_call(i: int) -> None:
        receipt = submit("soak", batch, f"honest-{os.getpid()}-{i}")
        if receipt[1] != 10:
            raise AssertionError(f"ingest stored {receipt[1]} of 10 records")

    return ingest_call, conn.close


def answered(exc: BaseException) -> bool:
    """Whether the server answered (a remote exception, a JSON-RPC error, a wrong result): the
    connection is fine and is kept, as a real client would."""
    return hasattr(exc, "_remote_tb") or isinstance(exc, RuntimeError | AssertionError)


def honest_loop(name: str, ports: Ports, token: str, stop: Any, hard_end: float, log: HonestLog) -> None:
    """Call ``name`` every HONEST_INTERVAL s until ``stop``; reconnect after a failure."""
    call: Callable[[int], None] | None = None
    close: Callable[[], None] = lambda: None  # noqa: E731
    i = 0
    while not stop.is_set() and time.monotonic() < hard_end and i < 1_000_000:
        started = time.monotonic()
        wall = time.time()
        t0 = time.perf_counter()
        try:
            if call is None:
                call, close = honest_calls(name, ports, token)
            call(i)
            log.samples.append((wall, time.perf_counter() - t0, True))
        except Exception as exc:
            log.samples.append((wall, time.perf_counter() - t0, False))
            log.errors[first_line(exc)] += 1
            if not answered(exc):  # the connection may be broken: start a new one
                with contextlib.suppress(Exception):
                    close()
                call = None
        i += 1
        left = HONEST_INTERVAL - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)  # pacing, not synchronisation
    with contextlib.suppress(Exception):
        close()


def honest_main(ports: Ports, token: str, ready: Any, stop: Any, limit: float, out: Any) -> None:
    """The honest client process: one thread per service; puts {service: HonestLog} on ``out``."""
    logs = {name: HonestLog() for name in HONEST}
    hard_end = time.monotonic() + limit
    # Connect every client once before the baseline starts, so start-up is not measured.
    for name in HONEST:
        _, close = honest_calls(name, ports, token)
        close()
    threads = [
        threading.Thread(target=honest_loop, args=(n, ports, token, stop, hard_end, logs[n]), daemon=True)
        for n in HONEST
    ]
    for t in threads:
        t.start()
    cpu_before = cpu_seconds()
    ready.set()
    for t in threads:
        t.join(limit + 30)
    results: dict[str, Any] = {n: (lg.samples, dict(lg.errors)) for n, lg in logs.items()}
    results["cpu"] = cpu_seconds() - cpu_before
    out.put(("honest", results))


# -- attacks ---------------------------------------------------------------------------------------


@dataclass
class Attack:
    """What one attack process needs, and what it found (``tally`` and first ``messages``)."""

    name: str
    source: str
    ports: Ports
    token: str
    stop: Any
    hard_end: float
    tally: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    figures: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.hard_end

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.tally[key] += n

    def failed(self, key: str, exc: BaseException) -> None:
        with self.lock:
            self.tally[key] += 1
            self.messages[first_line(exc)] += 1

    def connect(self, port: int) -> Any:
        return hostile_connect(port, self.source, self.token, timeout=self.hard_end - time.monotonic() + 30)

    def pause(self, seconds: float) -> None:
        self.stop.wait(seconds)


def in_threads(attack: Attack, count: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` on ``count`` threads; an exception ends that thread and is tallied."""

    def run(i: int) -> None:
        try:
            target(i)
        except Exception as exc:
            attack.failed("thread ended by an error", exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, attack.hard_end - time.monotonic() + 60))


class EndlessList:
    """Poses as a list to the server (its type name is builtins.list, len() is 1) but iterating
    it never ends on its own: each item is one round trip. Ends when the soak does."""

    def __init__(self, attack: Attack) -> None:
        self.items = EndlessIterator(attack)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> EndlessIterator:
        # A separate object: the server sees this one's real type, which has __next__ (a netref
        # typed builtins.list would not).
        return self.items


class EndlessIterator:
    """The items of an :class:`EndlessList`, counted."""

    def __init__(self, attack: Attack) -> None:
        self.attack = attack
        self.pulled = 0

    def __iter__(self) -> EndlessIterator:
        return self

    def __next__(self) -> int:
        self.pulled += 1
        if self.pulled >= 10_000_000 or not self.attack.running():
            raise StopIteration
        time.sleep(0.005)  # hold the server's thread and memory without flooding the CPU
        return 1


EndlessList.__module__ = "builtins"
EndlessList.__name__ = EndlessList.__qualname__ = "list"


def attack_endless_iterator(a: Attack) -> None:
    def one(_: int) -> None:
        for _n in range(1000):
            if not a.running():
                return
            try:
                with a.connect(a.ports.demo) as conn:
                    items = EndlessList(a)
                    try:
                        conn.root.add(items, 1)
                        a.count("calls answered")
                    except Exception as exc:
                        a.failed("calls refused or failed", exc)
                    a.count("items pulled by the server", items.items.pulled)
            except Exception as exc:
                a.failed("connections refused or cut", exc)
                a.pause(0.2)

    in_threads(a, 4, one)


def attack_pinning_callback(a: Attack) -> None:
    def one(_: int) -> None:
        def callback(i: int) -> None:
            a.count("callbacks run")
            if a.stop.wait(1.0) or not a.running():
                raise RuntimeError("the soak is over")

        for _n in range(1000):
            if not a.running():
                return
            try:
                with a.connect(a.ports.demo) as conn:
                    started = time.monotonic()
                    try:
                        conn.root.countdown(10_000, callback)
                        a.count("countdowns finished")
                    except Exception as exc:
                        if a.running():
                            a.failed("countdowns refused or cut", exc)
                    a.count("seconds a server thread was held", int(time.monotonic() - started))
            except Exception as exc:
                a.failed("connections refused or cut", exc)
                a.pause(0.2)

    in_threads(a, 16, one)


def attack_open_read_leak(a: Attack) -> None:
    with a.connect(a.ports.files) as conn:
        conn.root.mkdir("soak-leak", True)
        conn.root.write_bytes("soak-leak/f.bin", b"x" * 4096, True)

    def one(_: int) -> None:
        handles: list[Any] = []
        with a.connect(a.ports.files) as conn:
            open_read = conn.root.open_read
            for _n in range(50_000):
                if not a.running():
                    break
                try:
                    handles.append(open_read("soak-leak/f.bin"))
                    a.count("handles held")
                    time.sleep(0.008)  # pace the calls: the attack is the descriptors held
                except Exception as exc:
                    a.failed("open_read refused or failed", exc)
                    a.pause(0.05)
            while a.running():
                a.pause(0.5)  # hold every handle until the soak ends; closing the connection frees them

    in_threads(a, 4, one)


def attack_quota_race(a: Attack) -> None:
    workers = 6
    chunk = os.urandom(MiB)
    with a.connect(a.ports.files) as conn:
        conn.root.mkdir("soak-quota", True)
    barrier = threading.Barrier(workers, timeout=60)

    def one(i: int) -> None:
        with a.connect(a.ports.files) as conn:
            root = conn.root
            for n in range(10_000):
                if not a.running():
                    barrier.abort()
                    return
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    return
                path = f"soak-quota/{i}-{n}.bin"
                try:
                    up = root.open_write(path, True, 0)
                    for _c in range(UPLOAD_MIB):
                        up.write(chunk)
                    up.commit()
                    a.count(f"{UPLOAD_MIB} MiB uploads committed")
                    root.rm(path)
                except Exception as exc:
                    a.failed("uploads refused or failed", exc)
                    with contextlib.suppress(Exception):
                        if root.exists(path):
                            root.rm(path)
                a.pause(1.0)  # between rounds, so honest small writes can find room

    in_threads(a, workers, one)


def attack_bulk_squat(a: Attack) -> None:
    """Squat on side-channel tickets, then make the real transfer and time it.

    Download tickets (``open_read(...).bulk()``): the side channel is the same as an upload's,
    and downloads do not compete with the quota race for the one storage quota.
    """
    size = MiB
    with a.connect(a.ports.files) as conn:
        conn.root.mkdir("soak-bulk", True)
        conn.root.write_bytes("soak-bulk/f.bin", os.urandom(size), True)
    times: dict[str, list[float]] = {"clear": [], "squatted": []}

    def one(i: int) -> None:
        with a.connect(a.ports.files) as conn:
            open_read = conn.root.open_read
            for n in range(1000):
                if not a.running():
                    return
                squat = n > 0  # the first transfer of each thread is the unsquatted reference
                kind = "squatted" if squat else "clear"
                silent: list[socket.socket] = []
                try:
                    down = open_read("soak-bulk/f.bin")
                    host, port, ticket = down.bulk()
                    for _s in range(3 if squat else 0):
                        silent.append(
                            socket.create_connection((host, port), timeout=5, source_address=(a.source, 0))
                        )
                        a.count("silent side connections opened")
                    started = time.monotonic()
                    got = receive(a, (host, port), bytes(ticket), size)
                    if got == size and down.wait(10)[0]:
                        times[kind].append(time.monotonic() - started)
                        a.count(f"{kind} transfers finished")
                    else:
                        a.count(f"{kind} transfers unfinished when the soak ended")
                    down.close()
                except Exception as exc:
                    a.failed(f"{kind} transfers refused or failed", exc)
                finally:
                    for s in silent:
                        s.close()
                a.pause(0.1)  # pacing: the attack is the squatted side channel, not the bandwidth

    in_threads(a, 3, one)
    for kind, values in times.items():
        if values:
            a.figures[f"median seconds per {kind} 1 MiB transfer"] = sorted(values)[len(values) // 2]


def receive(a: Attack, address: tuple[str, int], ticket: bytes, size: int) -> int:
    """Present ``ticket`` on a side connection and read up to ``size`` bytes; stops with the soak."""
    got = 0
    with socket.create_connection(address, timeout=5, source_address=(a.source, 0)) as sock:
        sock.sendall(ticket)
        sock.settimeout(1.0)
        for _n in range(100_000):
            if got >= size or not a.running():
                break
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += len(chunk)
    return got


def attack_slowloris(a: Attack) -> None:
    request = (
        b"POST /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 60\r\n\r\n"
    )
    conns: dict[int, tuple[socket.socket, int, float]] = {}  # slot -> (socket, bytes sent, opened at)
    lifetimes: list[float] = []

    def open_slot(slot: int) -> None:
        try:
            sock = socket.create_connection(
                ("127.0.0.1", a.ports.gateway), timeout=5, source_address=(a.source, 0)
            )
            sock.setblocking(False)
            conns[slot] = (sock, 0, time.monotonic())
            a.count("connections opened")
        except OSError as exc:
            a.failed("connections refused", exc)

    for slot in range(200):
        open_slot(slot)
    a.figures["connections open at the start"] = len(conns)
    peak = len(conns)
    reopened = 0
    for _tick in range(100_000):
        if not a.running() or a.stop.wait(1.0):
            break
        for slot in range(200):
            if slot not in conns:
                if reopened < 5000:
                    reopened += 1
                    open_slot(slot)
                continue
            sock, sent, opened = conns[slot]
            try:
                answer = sock.recv(200, socket.MSG_DONTWAIT)
            except BlockingIOError:
                answer = None
            except OSError:
                answer = b""
            if answer is None:
                try:
                    sock.send(request[sent % len(request) : sent % len(request) + 1])
                    conns[slot] = (sock, sent + 1, opened)
                    continue
                except OSError:
                    answer = b""
            status = answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else "closed without an answer"
            a.count(f"ended by the server: {status[:60]}")
            lifetimes.append(time.monotonic() - opened)
            sock.close()
            del conns[slot]
        peak = max(peak, len(conns))
    a.figures["peak connections held"] = peak
    if lifetimes:
        a.figures["median seconds a connection lasted"] = sorted(lifetimes)[len(lifetimes) // 2]
    for sock, _, _ in conns.values():
        sock.close()


def gateway_post(a: Attack, body: bytes, token: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(
        "127.0.0.1", a.ports.gateway, timeout=timeout, source_address=(a.source, 0)
    )
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        conn.request("POST", "/jsonrpc", body, headers)
        response = conn.getresponse()
        return response.status, response.read(300)
    finally:
        conn.close()


def attack_nesting_bomb(a: Attack) -> None:
    depth = 100_000
    body = b"[" * depth + b"]" * depth
    took: list[float] = []
    for _n in range(2000):
        if not a.running():
            break
        started = time.monotonic()
        try:
            status, data = gateway_post(a, body, a.token)
            code = ""
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                code = f" code {json.loads(data)['error']['code']}"
            a.count(f"HTTP {status}{code}")
            if status != 200 or code:
                a.messages[data[:120].decode("utf-8", "replace")] += 1
        except Exception as exc:
            a.failed("requests cut or failed", exc)
        took.append(time.monotonic() - started)
        a.pause(0.2)
    if took:
        a.figures["median seconds per request"] = sorted(took)[len(took) // 2]


def attack_token_guess(a: Attack) -> None:
    body = json.dumps({"jsonrpc": "2.0", "method": "demo.ping", "params": [], "id": 1}).encode()
    took: list[float] = []
    http_conn: http.client.HTTPConnection | None = None
    for _n in range(100_000):
        if not a.running():
            break
        started = time.monotonic()
        try:
            if http_conn is None:
                http_conn = http.client.HTTPConnection(
                    "127.0.0.1", a.ports.gateway, timeout=30, source_address=(a.source, 0)
                )
            guess = secrets.token_urlsafe(24)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {guess}"}
            http_conn.request("POST", "/jsonrpc", body, headers)
            response = http_conn.getresponse()
            response.read()
            a.count(f"HTTP {response.status}")
            if response.status == 200:
                a.messages["a wrong token was accepted"] += 1
            if response.will_close:
                http_conn.close()
                http_conn = None
        except Exception as exc:
            a.failed("requests cut or failed", exc)
            if http_conn is not None:
                http_conn.close()
            http_conn = None
        took.append(time.monotonic() - started)
        time.sleep(0.01)  # pacing: ~100 guesses/s at most
    if http_conn is not None:
        http_conn.close()
    if took:
        a.figures["median seconds per guess"] = sorted(took)[len(took) // 2]


# What rpyc's classic console (SlaveService) answers, asked of a service's root: each must fail.
CLASSIC_ASKS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("getmodule", lambda root: root.getmodule("os").getpid()),
    ("eval", lambda root: root.eval("__import__('os').getpid()")),
    ("execute", lambda root: root.execute("import os")),
    ("hidden attribute", lambda root: root.__class__.__mro__[-1].__subclasses__()),
    ("connection internals", lambda root: root._conn._config),
)


def attack_classic_console(a: Attack) -> None:
    ports = (a.ports.demo, a.ports.files, a.ports.ingest)
    conns: dict[int, Any] = {}
    for n in range(100_000):
        if not a.running():
            break
        port = ports[n % len(ports)]
        try:
            conn = conns.get(port)
            if conn is None:
                conn = conns[port] = a.connect(port)
            what, ask = CLASSIC_ASKS[n % len(CLASSIC_ASKS)]
            try:
                ask(conn.root)
            except (AttributeError, TypeError, ValueError, NameError) as exc:
                a.count("classic requests refused")
                a.messages[f"{what}: {first_line(exc)}"] += 1
            else:
                a.count("classic requests that ran code")
                a.messages[f"{what} ran on port {port}"] += 1
        except Exception as exc:
            a.failed("connections refused or cut", exc)
            conns.pop(port, None)
            a.pause(0.2)
        if n % 10 == 0:  # the classic console itself: disabled in config.yaml, so nothing listens
            try:
                socket.create_connection(
                    ("127.0.0.1", a.ports.classic), timeout=2, source_address=(a.source, 0)
                ).close()
                a.count("classic console connections accepted")
            except OSError:
                a.count("classic console connections refused")
        time.sleep(0.01)  # pacing: ~100 requests/s at most
    for conn in conns.values():
        conn.close()


ATTACK_FUNCTIONS: dict[str, Callable[[Attack], None]] = {
    "endless-iterator": attack_endless_iterator,
    "pinning-callback": attack_pinning_callback,
    "open-read-leak": attack_open_read_leak,
    "quota-race": attack_quota_race,
    "bulk-squat": attack_bulk_squat,
    "slowloris": attack_slowloris,
    "nesting-bomb": attack_nesting_bomb,
    "token-guess": attack_token_guess,
    "classic-console": attack_classic_console,
}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process, or by process ``pid`` and every
    connection process it has had: the children alive now and those it has reaped."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = _stat(pid)
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, and the reaped children's
    for child in children(pid):
        with contextlib.suppress(OSError):  # it exited meanwhile: reaped, it is in cutime
            ticks += sum(int(f) for f in _stat(child)[11:13])
    return ticks / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``: the forking server's connection processes."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def lowest_priority() -> None:
    """Run this process at the lowest CPU priority there is: SCHED_IDLE where Linux has it.

    nice 19 is not enough. The scheduler lets a nice-19 task that has just been given a core keep
    it for the rest of its time slice (about a millisecond) when a normal task wakes up, so
    every time an attacker thread runs, an honest client or the server could wait that long.
    A SCHED_IDLE task gives up the core at once to any normal task that wakes.
    """
    os.nice(19)
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def attack_main(name: str, ports: Ports, token: str, go: Any, stop: Any, seconds: float, out: Any) -> None:
    """One attack process: report ready, wait for ``go``, attack until ``stop``, report."""
    # Attackers are other machines in life; here they share the server's 2 cores. At the lowest
    # priority their own CPU comes out of idle time, and what they make the server do still counts.
    lowest_priority()
    out.put(("ready", name))
    if not go.wait(120):
        out.put(("attack", name, {"tally": {}, "messages": {"never started": 1}, "figures": {}}))
        return
    attack = Attack(name, ATTACKS[name], ports, token, stop, time.monotonic() + seconds + 10)
    cpu_before = cpu_seconds()
    try:
        ATTACK_FUNCTIONS[name](attack)
    except Exception as exc:
        attack.failed("attack ended by an error", exc)
    result = {
        "tally": dict(attack.tally),
        "messages": dict(attack.messages),
        "figures": attack.figures,
        "cpu": cpu_seconds() - cpu_before,
    }
    out.put(("attack", name, result))


# -- measuring the server --------------------------------------------------------------------------


@dataclass
class Peaks:
    """The largest values seen in /proc/PID and the file tree, per phase."""

    rss: dict[str, int] = field(default_factory=lambda: {"baseline": 0, "attack": 0})
    processes: dict[str, int] = field(default_factory=lambda: {"baseline": 0, "attack": 0})
    fds: dict[str, int] = field(default_factory=lambda: {"baseline": 0, "attack": 0})
    threads: dict[str, int] = field(default_factory=lambda: {"baseline": 0, "attack": 0})
    files_bytes: dict[str, int] = field(default_factory=lambda: {"baseline": 0, "attack": 0})


def proc_figures(pid: int) -> tuple[int, int, int, int]:
    """(memory bytes, open descriptors, threads, processes) of process ``pid`` and its children.

    Memory is the proportional set size (PSS) summed over the processes: a forked connection
    process shares most of its pages with the server, and the sum of RSS would count those once
    per process. For one process PSS is about its RSS."""
    memory = descriptors = threads = processes = 0
    for n, proc in enumerate([pid, *children(pid)]):
        try:
            for line in Path(f"/proc/{proc}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    memory += int(line.split()[1]) * 1024
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
            descriptors += len(os.listdir(f"/proc/{proc}/fd"))
            processes += 1
        except OSError:
            if n == 0:
                raise  # the server itself exited
    return memory, descriptors, threads, processes


def tree_bytes(root: Path) -> int:
    """Bytes in regular files under ``root``, unfinished uploads included."""
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def sample(pid: int, files_root: Path, phase: list[str], peaks: Peaks, stop: threading.Event) -> None:
    """Record peaks until ``stop``: the file tree every tick (uploads race past the quota for
    moments only), /proc every SAMPLE_EVERY seconds."""
    next_proc = 0.0
    for _n in range(1_000_000):
        if stop.is_set():
            return
        key = phase[0]
        peaks.files_bytes[key] = max(peaks.files_bytes[key], tree_bytes(files_root))
        if time.monotonic() >= next_proc:
            next_proc = time.monotonic() + SAMPLE_EVERY
            try:
                rss, fds, threads, processes = proc_figures(pid)
            except OSError:
                return  # the server exited
            peaks.rss[key] = max(peaks.rss[key], rss)
            peaks.fds[key] = max(peaks.fds[key], fds)
            peaks.threads[key] = max(peaks.threads[key], threads)
            peaks.processes[key] = max(peaks.processes[key], processes)
        stop.wait(TREE_EVERY)


def refusal_lines(metrics_port: int) -> list[str]:
    """The non-zero refusal counters of /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        return [f"/metrics unreachable: {exc}"]
    keep = ("rpyc_host_limit_refusals_total", "rpyc_host_connections_refused")
    return [line for line in text.splitlines() if line.startswith(keep) and not line.endswith((" 0", " 0.0"))]


# -- the run ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def descriptor_limit(soft: int) -> Iterator[None]:
    """Processes started inside get at most ``soft`` descriptors (this box allows many more, which
    a bounded run would not reach); this process's own limit is restored on exit."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


@contextlib.contextmanager
def processes(stop: Any, go: Any) -> Iterator[list[Any]]:
    """Processes the caller starts; on exit told to stop (``stop`` before ``go``, so an attack
    that has not begun never does), joined, then killed if still alive."""
    procs: list[Any] = []
    try:
        yield procs
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def run(
    seconds: float, baseline: float, attacks: tuple[str, ...], nofile: int, server_type: str | None = None
) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rpyc-soak-") as tmp:
        config = Path(tmp) / "soak.yaml"
        config.write_text(soak_config(token, server_type))
        served_type = "/".join(sorted({svc.type for svc in load_config(config).services}))
        server = ServerProcess(config, cwd=tmp, ready_timeout=60)
        try:
            with descriptor_limit(nofile):
                server.start()
            ports = Ports(
                demo=server.address("demo")[1],
                files=server.address("files")[1],
                ingest=server.address("ingest")[1],
                gateway=ready_port(server, "gateway"),
                classic=load_config(config).classic.port,
            )
            metrics_port = ready_port(server, "metrics")
            out = ctx.Queue()
            ready, go, stop = ctx.Event(), ctx.Event(), ctx.Event()
            limit = baseline + seconds + 60
            peaks, phase, sampler_stop = Peaks(), ["baseline"], threading.Event()
            sampler = threading.Thread(
                target=sample, args=(server.pid, Path(tmp) / "files", phase, peaks, sampler_stop), daemon=True
            )
            results: dict[str, Any] = {}
            with processes(stop, go) as procs:
                for name in attacks:
                    procs.append(
                        ctx.Process(target=attack_main, args=(name, ports, token, go, stop, seconds, out))
                    )
                    procs[-1].start()
                for _ in attacks:  # every attacker has started and waits for go
                    try:
                        item = out.get(timeout=120)
                    except queue.Empty:
                        raise RuntimeError("an attack process did not start within 120 s") from None
                    if item[0] != "ready":
                        raise RuntimeError(f"an attacker reported {item!r} before it was ready")
                honest = ctx.Process(target=honest_main, args=(ports, token, ready, stop, limit, out))
                procs.append(honest)
                honest.start()
                wait_until(ready.is_set, 60, "honest clients connected")
                sampler.start()
                baseline_start = time.time()
                server_cpu = [cpu_seconds(server.pid)]
                time.sleep(baseline)  # the baseline phase: honest clients alone
                phase[0] = "attack"
                attack_start = time.time()
                server_cpu.append(cpu_seconds(server.pid))
                go.set()
                time.sleep(seconds)  # the attack phase
                attack_end = time.time()
                server_cpu.append(cpu_seconds(server.pid))
                stop.set()
                for _ in range(len(attacks) + 1):
                    try:
                        item = out.get(timeout=120)
                    except queue.Empty:
                        break  # a process that never reported shows as empty in the report
                    results[item[1] if item[0] == "attack" else "honest"] = item[-1]
                sampler_stop.set()
            sampler.join(10)
            alive = server.proc is not None and server.proc.poll() is None
            refusals = refusal_lines(metrics_port) if alive else ["the server exited during the soak"]
            after_ok = alive and after_call(ports.demo, token)
        finally:
            server.stop()
    return {
        "seconds": seconds,
        "baseline": baseline,
        "nofile": nofile,
        "server_type": served_type,
        "phases": (baseline_start, attack_start, attack_end),
        "honest": results.get("honest", {}),
        "attacks": {n: results.get(n, {}) for n in attacks},
        "peaks": peaks,
        "alive": alive,
        "after_ok": after_ok,
        "refusals": refusals,
        # CPU seconds of the server in the baseline and attack phases.
        "server_cpu": (server_cpu[1] - server_cpu[0], server_cpu[2] - server_cpu[1]),
    }


def after_call(port: int, token: str) -> bool:
    """Whether a fresh client is served once the attackers are gone."""
    try:
        with client.connect(host="127.0.0.1", port=port, token=token, timeout=10, retries=2) as conn:
            return bool(conn.root.add(1, 2) == 3)
    except Exception:
        return False


# -- the report ------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> dict[str, Any]:
    baseline_start, attack_start, attack_end = r["phases"]
    rows = [
        ["honest", "calls before", "calls during", "ok during", "p99 before ms", "p99 during ms", "ratio"]
    ]
    all_ok = all_n = 0
    ratios: dict[str, float] = {}
    errors: dict[str, dict[str, int]] = {}
    for name in HONEST:
        samples, errs = r["honest"].get(name, ([], {}))
        before = [s for s in samples if baseline_start <= s[0] < attack_start]
        during = [s for s in samples if attack_start <= s[0] < attack_end]
        ok_before = [s[1] for s in before if s[2]]
        # A failed call counts with the time it took: a timeout is as slow as it looks.
        lat_during = [s[1] for s in during]
        ok = sum(1 for s in during if s[2])
        all_ok, all_n = all_ok + ok, all_n + len(during)
        p99_before = percentile(ok_before, 99) if ok_before else float("nan")
        p99_during = percentile(lat_during, 99) if lat_during else float("nan")
        ratios[name] = p99_during / p99_before if ok_before and lat_during else float("nan")
        errors[name] = errs
        rows.append(
            [
                name,
                fmt(len(before)),
                fmt(len(during)),
                f"{100 * ok / len(during):.2f}%" if during else "-",
                fmt(p99_before * 1e3, 2),
                fmt(p99_during * 1e3, 2),
                f"{ratios[name]:.2f}x",
            ]
        )
    success = 100 * all_ok / all_n if all_n else 0.0
    worst = max(ratios.values()) if ratios else float("nan")
    peaks: Peaks = r["peaks"]
    print(
        f"\nsoak: {r['server_type']} server; "
        f"{r['seconds']:g} s of attack after a {r['baseline']:g} s baseline; "
        f"{len(r['attacks'])} attack(s) from {', '.join(ATTACKS[n] for n in r['attacks'])}; "
        "honest clients on 127.0.0.1\n"
    )
    print(table(rows))
    print(f"\nhonest-call success during the attack: {success:.2f}% of {all_n:,} (target 100%)")
    print(f"honest p99 during / before, worst service: {worst:.2f}x (target <= 3x)")
    failures = Counter[str]()
    for errs in errors.values():
        for message, n in errs.items():
            failures["clear refusals naming a limit" if CLEAR_REFUSAL.search(message) else "other"] += n
    if failures:
        print(f"honest failures (whole run): {', '.join(f'{k} {v:,}' for k, v in failures.items())}")
    for name, errs in errors.items():
        # Failures of the host first, then the most frequent clear refusals.
        ranked = sorted(errs.items(), key=lambda kv: (bool(CLEAR_REFUSAL.search(kv[0])), -kv[1]))
        for message, n in ranked[:4]:
            print(f"  {name} error x{n}: {message}")
    mib = 1 / MiB
    server_rows = [
        ["server and its connection processes (/proc)", "baseline peak", "attack peak"],
        ["processes", fmt(peaks.processes["baseline"]), fmt(peaks.processes["attack"])],
        [
            "memory MiB (PSS, all processes)",
            fmt(peaks.rss["baseline"] * mib, 1),
            fmt(peaks.rss["attack"] * mib, 1),
        ],
        [
            f"open descriptors, all processes (limit {r['nofile']:,} each)",
            fmt(peaks.fds["baseline"]),
            fmt(peaks.fds["attack"]),
        ],
        ["threads, all processes", fmt(peaks.threads["baseline"]), fmt(peaks.threads["attack"])],
        [
            f"files tree MiB (quota {QUOTA * mib:.0f})",
            fmt(peaks.files_bytes["baseline"] * mib, 1),
            fmt(peaks.files_bytes["attack"] * mib, 1),
        ],
    ]
    print()
    print(table(server_rows))
    print(
        f"  alive after the attack: {'yes' if r['alive'] else 'NO'}; "
        f"a fresh client served after it: {'yes' if r['after_ok'] else 'NO'}"
    )
    cpu = cpu_report(r)
    print("\nattacks")
    for name, got in r["attacks"].items():
        source = ATTACKS[name]
        tally = ", ".join(f"{k} {v:,}" for k, v in sorted(got.get("tally", {}).items())) or "nothing"
        print(f"  {name} ({source}): {tally}")
        for k, v in got.get("figures", {}).items():
            print(f"      {k}: {v:,.2f}")
        for message, n in sorted(got.get("messages", {}).items(), key=lambda kv: -kv[1])[:3]:
            print(f"      x{n}: {message}")
    print("\nrefusals in /metrics" + ("" if r["refusals"] else ": none"))
    for line in r["refusals"]:
        print(f"  {line}")
    return {
        "machine": machine(),
        "seconds": r["seconds"],
        "baseline": r["baseline"],
        "nofile": r["nofile"],
        "honest_success_pct": success,
        "p99_ratio": ratios,
        "honest_errors": errors,
        "peaks": peaks.__dict__,
        "alive": r["alive"],
        "after_ok": r["after_ok"],
        "attacks": r["attacks"],
        "refusals": r["refusals"],
        "cpu": cpu,
    }


def cpu_report(r: dict[str, Any]) -> dict[str, float]:
    """Print and return the CPU share (of one core) of the server, the honest clients and the
    attackers during the attack, next to the server's share in the baseline."""
    before, during = r["server_cpu"]
    attackers = sum(got.get("cpu", 0.0) for got in r["attacks"].values())
    honest = float(r["honest"].get("cpu", 0.0))
    whole = r["baseline"] + r["seconds"]  # the honest process runs through both phases
    shares = {
        "server_baseline": before / r["baseline"],
        "server_attack": during / r["seconds"],
        "attackers": attackers / r["seconds"],
        "honest_clients": honest / whole,
    }
    print(
        f"\nCPU, share of one core (2 cores in all): server {100 * shares['server_baseline']:.0f}% in the "
        f"baseline, {100 * shares['server_attack']:.0f}% during the attack; attack processes "
        f"{100 * shares['attackers']:.0f}% (SCHED_IDLE); honest clients {100 * shares['honest_clients']:.0f}%"
    )
    for name, got in r["attacks"].items():
        if "cpu" in got:
            print(f"  {name}: {100 * got['cpu'] / r['seconds']:.1f}%")
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="attack phase length (default 60)")
    parser.add_argument(
        "--baseline", type=float, help="honest-only phase before it (default seconds/4, >= 5)"
    )
    parser.add_argument("--quick", action="store_true", help="15 s of attack after a 5 s baseline")
    parser.add_argument(
        "--nofile",
        type=int,
        default=4096,
        help="the server's soft descriptor limit (default 4096, a common default)",
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(ATTACKS), help="run only this attack (repeatable)"
    )
    parser.add_argument(
        "--samples",
        type=Path,
        metavar="FILE",
        help="also write every honest call (wall time, seconds, ok) and the phase times to FILE as JSON,"
        " to see when the slow calls happened",
    )
    parser.add_argument(
        "--server-type",
        choices=("threaded", "threadpool", "forking"),
        help="serve every service on this server type instead of config.yaml's",
    )
    parser.add_argument(
        "--each",
        action="store_true",
        help="run every attack alone (10 s each unless --seconds) and print a table of the ratios",
    )
    args = parser.parse_args()
    seconds = 15.0 if args.quick else 10.0 if args.each and args.seconds == 60.0 else args.seconds
    if not 1 <= seconds <= 3600:
        parser.error(f"--seconds must be 1 to 3600, got {seconds:g}")
    baseline = args.baseline if args.baseline is not None else max(5.0, seconds / 4)
    attacks = tuple(n for n in ATTACKS if n in args.only) if args.only else tuple(ATTACKS)
    if args.each:
        each = {
            name: report(run(seconds, baseline, (name,), args.nofile, args.server_type)) for name in attacks
        }
        print(each_table(each, seconds))
        print(f"\nsaved {save('soak-each', {'machine': machine(), 'seconds': seconds, 'attacks': each})}")
        return 0
    result = run(seconds, baseline, attacks, args.nofile, args.server_type)
    if args.samples is not None:
        args.samples.write_text(json.dumps({"phases": result["phases"], "honest": result["honest"]}))
    data = report(result)
    print(f"\nsaved {save('soak', data)}")
    return 0


def each_table(each: dict[str, dict[str, Any]], seconds: float) -> str:
    """One row per attack run alone: honest p99 ratios and the CPU shares of that run."""
    rows = [
        ["attack alone", *HONEST, "worst", "server CPU before", "server CPU during", "attacker CPU"],
    ]
    for name, data in each.items():
        ratios, cpu = data["p99_ratio"], data["cpu"]
        rows.append(
            [
                name,
                *(f"{ratios.get(h, float('nan')):.2f}x" for h in HONEST),
                f"{max(ratios.values(), default=float('nan')):.2f}x",
                f"{100 * cpu['server_baseline']:.0f}%",
                f"{100 * cpu['server_attack']:.0f}%",
                f"{100 * cpu['attackers']:.0f}%",
            ]
        )
    return f"\neach attack alone for {seconds:g} s (CPU as a share of one core; 2 cores)\n" + table(rows)


if __name__ == "__main__":
    sys.exit(main())

"""Garbage on the wire: random and mutated rpyc frames against every
shipped service's port, while a canary client keeps calling and the server's memory is sampled.

Deterministic (seeded) and bounded: at least FRAMES frames per service, at most BUDGET seconds.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rpyc.core import brine, consts

import client
from rpyc_host.testing import ServerProcess
from tests.helpers import ROOT, rss_kib

FRAMES = 10_000
BUDGET = 90.0
SERVICES = ["demo", "files", "ingest"]


def frame(payload: bytes, length: int | None = None, flag: int = 0) -> bytes:
    return struct.pack("!LB", len(payload) if length is None else length, flag) + payload + b"\n"


def request(handler: int, *args: object) -> bytes:
    boxed = tuple((consts.LABEL_VALUE, a) for a in args)
    return brine.I1.pack(consts.MSG_REQUEST) + brine.dump((1, (handler, (consts.LABEL_TUPLE, boxed))))


def templates() -> list[bytes]:
    """Well-formed requests a real client sends, to mutate."""
    getroot = brine.I1.pack(consts.MSG_REQUEST) + brine.dump(
        (0, (consts.HANDLE_GETROOT, (consts.LABEL_VALUE, ())))
    )
    out = [getroot]
    fake_ref = ("services.demo.DemoService", 1, 2)
    for handler in (
        consts.HANDLE_GETATTR,
        consts.HANDLE_CALL,
        consts.HANDLE_DIR,
        consts.HANDLE_DEL,
        consts.HANDLE_HASH,
        consts.HANDLE_STR,
        consts.HANDLE_INSPECT,
        consts.HANDLE_PICKLE,
    ):
        out.append(request(handler, fake_ref, "add", (1, 2)))
    out.append(brine.I1.pack(consts.MSG_REPLY) + brine.dump((5, (consts.LABEL_VALUE, 1))))
    out.append(brine.I1.pack(consts.MSG_EXCEPTION) + brine.dump((5, "x")))
    return out


def mutate(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    choice = rng.randrange(7)
    if choice == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return frame(bytes(data))
    if choice == 1:  # truncate the payload, keep the announced length honest
        return frame(bytes(data[: rng.randrange(len(data) + 1)]))
    if choice == 2:  # lie about the length (within the frame limit)
        return frame(bytes(data), length=rng.choice([0, 1, len(data) - 1, len(data) + 7, 4096]))
    if choice == 3:  # compressed flag on garbage
        return frame(bytes(data), flag=1)
    if choice == 4:  # pure noise
        return bytes(rng.randbytes(rng.randint(1, 300)))
    if choice == 5:  # random brine values as arguments
        value = rng.choice(
            [
                None,
                True,
                2**70,
                -1.5,
                "x" * rng.randint(0, 100),
                b"\0" * 10,
                (1, (2, (3,))),
                frozenset({1, 2}),
                slice(1, 2),
                complex(1, 2),
            ]
        )
        return frame(request(rng.randrange(40), value, value))
    return frame(bytes(data) + rng.randbytes(rng.randint(1, 50)))  # trailing junk


def blast(address: tuple[str, int], seed: int, deadline: float) -> int:
    """Send mutated frames over short-lived connections; return how many frames were delivered."""
    rng = random.Random(seed)
    bases = templates()
    sent = 0
    while sent < FRAMES and time.monotonic() < deadline:
        try:
            with socket.create_connection(address, timeout=5) as sock:
                for _ in range(rng.randint(1, 20)):
                    sock.sendall(mutate(rng, rng.choice(bases)))
                    sent += 1
                sock.settimeout(0.005)
                try:
                    sock.recv(65536)
                except (TimeoutError, OSError):
                    pass
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            continue  # the server closed on a bad frame: expected
    return sent


@pytest.mark.slow
def test_garbage_frames_against_every_shipped_service(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    ports = {name: "0" for name in ("DEMO_PORT", "FILES_PORT", "INGEST_PORT")}
    proc = start_server(ROOT / "config.yaml", env=ports, cwd=tmp_path)
    demo = proc.address("demo")
    baseline = rss_kib(proc.pid)
    stop = threading.Event()
    canary = {"ok": 0, "failed": 0}
    peak = [baseline]

    def call_forever() -> None:
        with client.connect(host=demo[0], port=demo[1], timeout=10) as conn:
            add = conn.root.add
            while not stop.is_set():
                try:
                    assert add(20, 22) == 42
                    canary["ok"] += 1
                except Exception:
                    canary["failed"] += 1
                peak[0] = max(peak[0], rss_kib(proc.pid))
                time.sleep(0.002)  # pacing the canary's calls, not waiting for anything

    watcher = threading.Thread(target=call_forever)
    watcher.start()
    totals = {}
    try:
        end = time.monotonic() + BUDGET
        for i, name in enumerate(SERVICES):
            totals[name] = blast(proc.address(name), seed=1000 + i, deadline=end)
    finally:
        stop.set()
        watcher.join(timeout=20)
    assert proc.proc is not None and proc.proc.poll() is None, "the server crashed:\n" + proc.log
    growth_mib = (peak[0] - baseline) / 1024
    print(
        f"\nfuzz: frames per service {totals}; canary calls ok={canary['ok']} failed={canary['failed']}; "
        f"server RSS baseline {baseline / 1024:.1f} MiB, peak growth {growth_mib:.1f} MiB"
    )
    assert all(count >= FRAMES for count in totals.values()), totals
    assert canary["failed"] == 0 and canary["ok"] > 100
    assert growth_mib < 128
    # Every service still answers a real client afterwards.
    for name, rpyc_name in zip(SERVICES, ["DEMO", "FILE", "INGEST"], strict=True):
        host, port = proc.address(name)
        with client.connect(host=host, port=port, timeout=10) as conn:
            assert conn.root.describe()[0] == rpyc_name

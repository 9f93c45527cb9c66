"""Frames over the limit, a 4 GiB header, stalled half-frames, silent connections, connection
caps and 2,000 connections at once."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import rpyc

import client
from rpyc_host.testing import ServerProcess, running_host, wait_until
from tests.helpers import SERVER_TYPES, rss_kib


def config(server_type: str, limits: str) -> str:
    return f"""
server: {{type: {server_type}, pool_size: 4}}
limits: {{{limits}}}
services:
  demo: {{class: services.demo:DemoService, port: 0}}
"""


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes ``sock`` within ``timeout`` seconds (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def calls_work(address: tuple[str, int]) -> None:
    with rpyc.connect(*address) as conn:
        add = conn.root.add
        assert [add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_header_claiming_4_gib_closes_that_connection_without_buffering(
    server_type: str, write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(config(server_type, "max_frame_bytes: 1048576")))
    address = proc.address("demo")
    before = rss_kib(proc.pid)
    for claimed in (0xFFFFFFFF, 2 * 1024 * 1024):
        with socket.create_connection(address) as sock:
            sock.sendall(struct.pack("!LB", claimed, 0) + b"x" * 1000)
            assert closed_by_server(sock, 10)
    calls_work(address)
    assert rss_kib(proc.pid) - before < 20 * 1024
    assert "-byte frame; the limit is 1048576" in proc.wait_for("the limit is 1048576")


def test_frame_over_the_limit_from_a_real_client() -> None:
    with running_host(config("threaded", "max_frame_bytes: 65536")) as host:
        address = host.address("demo")
        conn = rpyc.connect(*address)
        assert conn.root.echo("x" * 60_000) == "x" * 60_000
        with pytest.raises(EOFError):
            conn.root.echo("x" * 70_000)
        calls_work(address)


def test_compressed_frames_small_and_large_inflate_and_a_large_bomb_is_refused() -> None:
    """A plain rpyc client compresses frames; frames of 1 MiB and more take the server's other
    receive path, which inflates straight from its buffer: both give the same bytes back, and
    a large compressed frame that would inflate past the limit closes only that connection."""
    with running_host(config("threaded", "max_frame_bytes: 4194304")) as host:
        address = host.address("demo")
        conn = rpyc.connect(*address)
        assert conn._channel.compress  # rpyc's default on the client side
        # Random text compresses to about 3/4: a compressed frame of about 2 MiB.
        noise = base64.b64encode(os.urandom(2 * 1024 * 1024)).decode()
        assert conn.root.echo(noise) == noise
        assert conn.root.echo("a" * 3_000_000) == "a" * 3_000_000  # a small compressed frame
        bomb = zlib.compress(os.urandom(2 * 1024 * 1024) + bytes(8 * 1024 * 1024), 1)
        assert len(bomb) > 1024 * 1024
        with socket.create_connection(address) as sock:
            sock.sendall(struct.pack("!LB", len(bomb), 1) + bomb + b"\n")
            assert closed_by_server(sock, 10)
        assert conn.root.echo(noise[:100]) == noise[:100]  # the honest connection is untouched
        conn.close()
        calls_work(address)


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_stalled_half_frame_and_silent_connections_block_nobody(server_type: str) -> None:
    # The stall limit is well above the time allowed for the honest calls, so a call that
    # waited for a staller to be cut would fail here, and a loaded machine still has margin.
    limits = "handshake_timeout: 6, idle_timeout: 7"
    with running_host(config(server_type, limits)) as host:
        address = host.address("demo")
        stalled, silent = [], []
        # More stallers than the thread pool has workers (4): a stall must not starve the pool.
        for _ in range(3):
            sock = socket.create_connection(address)
            sock.sendall(struct.pack("!LB", 100, 0) + b"0123456789")  # 10 of 110 bytes, then nothing
            stalled.append(sock)
        for _ in range(6):
            silent.append(socket.create_connection(address))
        started = time.monotonic()
        calls_work(address)  # other clients and new connections are served meanwhile
        assert time.monotonic() - started < 3.0
        for sock in stalled:
            assert closed_by_server(sock, 20), "a stalled half-frame was never closed"
        for sock in silent:
            assert closed_by_server(sock, 20), "a silent connection was never closed"
        for sock in stalled + silent:
            sock.close()
        calls_work(address)


def test_token_handshake_that_never_comes_is_cut_off() -> None:
    text = config("threadpool", "handshake_timeout: 1") + 'security: {tokens: ["tok-0123456789abcdef"]}\n'
    with running_host(text) as host:
        address = host.address("demo")
        sock = socket.create_connection(address)
        sock.sendall(b"RPYHTOK")  # half the magic, then silence
        assert closed_by_server(sock, 10)
        sock.close()
        with client.connect(host=address[0], port=address[1], token="tok-0123456789abcdef") as conn:
            assert conn.root.ping() == "pong"


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_max_connections_refuses_extra_with_a_clear_message(server_type: str) -> None:
    with running_host(config(server_type, "max_connections: 5")) as host:
        address = host.address("demo")
        held = [rpyc.connect(*address) for _ in range(5)]
        for conn in held:
            assert conn.root.ping() == "pong"
        extra = rpyc.connect(*address)
        with pytest.raises(ConnectionRefusedError, match=r"'demo' is at its connection limit \(5\)"):
            extra.root.ping()
        with pytest.raises(client.ConnectError, match="connection limit"):
            client.connect(host=address[0], port=address[1], retries=0)
        assert host.refusals.snapshot()["limit"] == 2
        held.pop().close()
        wait_until(lambda: host.hosted[0].server.admitted == 4, what="the closed connection to be released")
        calls_work(address)
        for conn in held:
            conn.close()


def test_max_connections_per_ip() -> None:
    with running_host(config("threaded", "max_connections_per_ip: 2")) as host:
        address = host.address("demo")
        held = [client.connect(host=address[0], port=address[1]) for _ in range(2)]
        with pytest.raises(
            client.ConnectError, match=r"too many connections from 127\.0\.0\.1 to 'demo' \(limit 2\)"
        ):
            client.connect(host=address[0], port=address[1], retries=0)
        for conn in held:
            conn.close()


def test_per_service_limits_override_the_defaults() -> None:
    text = """
limits: {max_connections: 100}
services:
  a: {class: services.demo:DemoService, port: 0, limits: {max_connections: 1}}
  b: {class: services.demo:DemoService, port: 0}
"""
    with running_host(text) as host:
        assert host.hosted[0].server.limits.max_connections == 1
        assert host.hosted[1].server.limits.max_connections == 100
        first = rpyc.connect(*host.address("a"))
        first.root.ping()
        with pytest.raises(ConnectionRefusedError):
            rpyc.connect(*host.address("a")).root.ping()
        first.close()


@pytest.mark.slow
def test_two_thousand_connections_at_once_against_max_connections(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(config("threaded", "max_connections: 200")))
    address = proc.address("demo")
    before = rss_kib(proc.pid)
    socks = []
    deadline = time.monotonic() + 60
    for _ in range(2000):
        assert time.monotonic() < deadline
        socks.append(socket.create_connection(address, timeout=10))
    # Each asks for the root, as rpyc clients do first; refused ones get an exception frame.
    from rpyc.core import brine, consts

    request = brine.I1.pack(consts.MSG_REQUEST) + brine.dump(
        (0, (consts.HANDLE_GETROOT, (consts.LABEL_VALUE, ())))
    )
    frame = struct.pack("!LB", len(request), 0) + request + b"\n"
    for sock in socks:
        sock.sendall(frame)
    replies = {"served": 0, "refused": 0}
    for sock in socks:
        sock.settimeout(15)
        header = sock.recv(5, socket.MSG_WAITALL)
        length, _ = struct.unpack("!LB", header)
        body = sock.recv(length + 1, socket.MSG_WAITALL)
        kind = body[0]
        replies["served" if kind == consts.MSG_REPLY else "refused"] += 1
        if kind == consts.MSG_EXCEPTION:
            assert b"connection limit (200)" in body
    assert replies == {"served": 200, "refused": 1800}
    grown = rss_kib(proc.pid) - before
    for sock in socks:
        sock.close()

    def served_again() -> bool:
        try:
            calls_work(address)
        except ConnectionRefusedError:  # the 200 closed ones not all released yet (a loaded machine)
            return False
        return True

    wait_until(served_again, 30, "a call once the 2,000 connections are closed")
    assert grown < 200 * 1024, f"server grew {grown} KiB"
    print(f"2,000 connections: {replies}, server RSS growth {grown / 1024:.1f} MiB")

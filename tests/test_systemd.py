"""systemd: socket activation through ``systemd-socket-activate`` and sd_notify datagrams."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rpyc

from rpyc_host import systemd
from rpyc_host.testing import PROJECT_ROOT, ServerProcess, _LogPump, running_host, wait_until
from tests.helpers import refused

# Not skipped without it: scripts/test.sh installs Debian's systemd package, which has it.
assert shutil.which("systemd-socket-activate"), "systemd-socket-activate is missing: install Debian's systemd"


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def _drain(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    def states(self) -> list[str]:
        """Every KEY=value line received so far, in order."""
        self._drain()
        return [line for message in self.messages for line in message.splitlines()]

    def wait_for(self, line: str, count: int = 1, timeout: float = 20.0) -> None:
        wait_until(
            lambda: self.states().count(line) >= count, timeout, f"{count} x {line!r} on NOTIFY_SOCKET"
        )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket(f"@rpyc-host-test-{uuid.uuid4().hex}")  # abstract: no path length limit
    yield sock
    sock.close()


class ActivatedServer(ServerProcess):
    """``systemd-socket-activate ... python server.py``, handed a listening socket this test
    holds (at fd 3 with LISTEN_FDS, as systemd does), so no other process can take the port."""

    def __init__(self, config: Path, listener: socket.socket, fdname: str, env: dict[str, str]) -> None:
        super().__init__(config)
        self.listener = listener
        self.fdname = fdname
        self.extra_env = {"PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1", **env}

    def start(self, wait: bool = False) -> ActivatedServer:
        activate = ["systemd-socket-activate"]
        activate += [f"--fdname={self.fdname}"] if self.fdname else []
        # systemd-socket-activate passes on only LISTEN_* and the variables named with -E.
        activate += [f"--setenv={key}={value}" for key, value in self.extra_env.items()]
        activate += self.args  # python -m rpyc_host --config ... --ready-file ...
        # The socket arrives as stdin and moves to fd 3; LISTEN_PID=$$ names the shell, which
        # exec keeps as the process of both programs.
        script = 'LISTEN_FDS=1 LISTEN_PID=$$ exec "$@" 3<&0 0</dev/null'
        self.proc = subprocess.Popen(
            ["sh", "-c", script, "sh", *activate],
            cwd=self.cwd,
            env=self.env,
            stdin=self.listener.fileno(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._pump = _LogPump(self.proc)
        self.lines = self._pump.lines
        return self


@pytest.fixture
def activate() -> Iterator[Callable[..., tuple[ActivatedServer, tuple[str, int]]]]:
    """Start activated servers on a socket bound here; every one is stopped at the end.

    ``config_for(port)`` writes the config once the passed socket's port is known."""
    started: list[ActivatedServer] = []

    def start(
        config_for: Callable[[int], Path], fdname: str = "", **env: str
    ) -> tuple[ActivatedServer, tuple[str, int]]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        address = listener.getsockname()
        proc = ActivatedServer(config_for(address[1]), listener, fdname, env)
        started.append(proc)
        try:
            proc.start()
        finally:
            listener.close()  # the server's copy is now the only one
        return proc, address

    yield start
    for proc in started:
        proc.stop(timeout=20)
        assert proc.proc is not None and proc.proc.poll() is not None, "server still running"


@pytest.mark.parametrize(
    ("match", "server_type"), [("name", "threaded"), ("port", "threadpool"), ("name", "forking")]
)
def test_socket_activation_serves_on_the_passed_socket_and_notifies_each_state(
    match: str,
    server_type: str,
    write_config: Callable[[str], Path],
    activate: Callable[..., tuple[ActivatedServer, tuple[str, int]]],
    notify_socket: NotifySocket,
) -> None:
    def config_for(port: int) -> Path:
        # Matched by name, the configured port does not matter (0 would bind any free one).
        return write_config(
            f"""
            server: {{type: {server_type}}}
            services:
              demo: {{class: services.demo:DemoService, port: {0 if match == "name" else port}}}
            """
        )

    proc, address = activate(
        config_for,
        "demo" if match == "name" else "",
        NOTIFY_SOCKET=notify_socket.address,
        WATCHDOG_USEC="1000000",
    )

    # systemd-socket-activate starts the server at the first connection; it waits in the backlog.
    conn = rpyc.connect(*address, config={"sync_request_timeout": 30})
    try:
        proc.wait_ready(30)
        assert conn.root.add(1, 2) == 3  # the connection that started the server is served
    finally:
        conn.close()
    assert proc.address("demo") == address
    assert "using the listening socket systemd passed (fd 3" in proc.log
    notify_socket.wait_for("READY=1")
    assert notify_socket.states()[1] == "STATUS=serving 1 service(s)"
    notify_socket.wait_for("WATCHDOG=1", count=2)  # every 0.5 s: half of WATCHDOG_USEC

    proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    notify_socket.wait_for("READY=1", count=2)
    states = [s for s in notify_socket.states() if s.split("=")[0] in ("READY", "RELOADING")]
    assert states == ["READY=1", "RELOADING=1", "READY=1"]
    assert "reloaded" in proc.wait_for("reloaded")
    with rpyc.connect(*address) as again:
        assert again.root.echo("still") == "still"

    proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    notify_socket.wait_for("STOPPING=1")
    assert proc.wait_exit(30) == 0
    assert refused(address)  # only the host held the socket, and it closed it on exit
    assert not [line for line in proc.lines if "Traceback" in line], proc.log


def test_notifier_sends_to_a_path_and_to_the_abstract_namespace() -> None:
    directory = tempfile.mkdtemp(prefix="rpyc-notify-")  # short: socket paths are limited to 107 bytes
    try:
        for address in (os.path.join(directory, "notify"), f"@rpyc-host-test-{uuid.uuid4().hex}"):
            listener = NotifySocket(address)
            try:
                notifier = systemd.Notifier(address)
                assert notifier.ready("up") and notifier.reloading() and notifier.stopping()
                wait_until(lambda listener=listener: "STOPPING=1" in listener.states(), 10, "STOPPING=1")
                states = listener.states()
                assert states[:3] == ["READY=1", "STATUS=up", "RELOADING=1"]
                assert states[3].startswith("MONOTONIC_USEC=") and states[3].split("=")[1].isdigit()
            finally:
                listener.close()
        assert not systemd.Notifier(os.path.join(directory, "nobody-listens")).ready()  # logged, no raise
    finally:
        shutil.rmtree(directory)
    assert not systemd.Notifier(None).ready()  # outside systemd: nothing to do


def test_notifier_reads_watchdog_only_for_this_process() -> None:
    pid = str(os.getpid())
    mine = systemd.Notifier.from_environment(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": pid}
    )
    assert mine.enabled and mine.watchdog_interval == 1.5
    other = systemd.Notifier.from_environment(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval == 0


def test_listen_fds_takes_only_what_was_passed_to_this_process_and_unsets_it() -> None:
    env = {"LISTEN_PID": "41", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "demo:files", "OTHER": "x"}
    assert systemd.listen_fds(env, 42) == []
    assert env == {"OTHER": "x"}  # not passed on to processes the host starts
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "demo"}
    assert systemd.listen_fds(env, 42) == [(3, "demo"), (4, "unknown"), (5, "unknown")]
    assert systemd.listen_fds({}, 42) == []


def test_match_listeners_by_name_then_by_port_and_closes_the_rest() -> None:
    sockets = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sockets.append(sock)
    try:
        inherited = [
            systemd.Inherited(100 + i, name, systemd.InheritedListener(fileno=os.dup(s.fileno())))
            for i, (name, s) in enumerate(zip(("files", "unknown", "unknown"), sockets, strict=True))
        ]
        ports = [s.getsockname()[1] for s in sockets]
        matched = systemd.match_listeners([("demo", ports[1]), ("files", ports[1]), ("ingest", 0)], inherited)
        assert matched == {"files": inherited[0], "demo": inherited[1]}
        assert inherited[2].sock.fileno() == -1  # matched no service: closed
        # Shutting an inherited listener down would stop systemd's copy listening too: a no-op.
        matched["demo"].sock.shutdown(socket.SHUT_RDWR)
        socket.create_connection(sockets[1].getsockname(), timeout=2).close()
        for item in matched.values():
            item.sock.close()
    finally:
        for sock in sockets:
            sock.close()


def test_watchdog_pings_stop_when_an_accept_loop_dies(notify_socket: NotifySocket) -> None:
    with running_host(
        """
        services:
          demo: {class: services.demo:DemoService, port: 0}
        """
    ) as host:
        host.notifier = systemd.Notifier(notify_socket.address, watchdog_usec=100_000)  # every 50 ms
        pinger = threading.Thread(target=host._watchdog)
        pinger.start()
        try:
            notify_socket.wait_for("WATCHDOG=1", count=3)
            host.hosted[0].server.stop_accepting()  # its accept loop ends, the host is not stopping
            thread = host.hosted[0].thread
            assert thread is not None
            thread.join(timeout=10)
            pinger.join(timeout=10)
            assert not pinger.is_alive()
            count = notify_socket.states().count("WATCHDOG=1")
            with pytest.raises(AssertionError):
                notify_socket.wait_for("WATCHDOG=1", count=count + 1, timeout=0.5)
        finally:
            host.stop(grace=0)
            pinger.join(timeout=10)

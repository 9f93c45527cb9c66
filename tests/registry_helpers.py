"""A registry process for tests: ``python -m rpyc_host.registry`` (rpyc's TCPRegistryServer)
on one address and port 0, stopped by PID; and demo-instance configs that register with it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from rpyc.utils.registry import TCPRegistryClient

from rpyc_host.testing import PROJECT_ROOT

LISTENING = re.compile(r"registry listening on (?P<host>\S+):(?P<port>\d+)")


class RegistryProcess:
    """``python -m rpyc_host.registry --host HOST --port PORT``, optionally behind a prefix
    command (``ip netns exec NS``); ``address`` is the real (host, port) read from its log."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, prefix: Sequence[str] = ()) -> None:
        self.host, self.port, self.prefix = host, port, list(prefix)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.address: tuple[str, int] = (host, port)

    def start(self, timeout: float = 15.0) -> RegistryProcess:
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "rpyc_host.registry", "--host", self.host, "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*self.prefix, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._queue = queue.Queue()  # a restart reads only the new process's lines
        threading.Thread(target=self._pump, args=(self.proc, self._queue), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("registry did not start:\n" + "\n".join(self.lines))
            match = LISTENING.search(line)
            if match:
                self.address = (match["host"], int(match["port"]))
                self.port = self.address[1]
                return self

    def _pump(self, proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
                lines.put(line)
        except ValueError:  # stdout closed by stop()
            pass
        lines.put(None)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        assert self.proc.poll() is not None
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def spec(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def discover(self, name: str) -> tuple[tuple[str, int], ...]:
        return tuple(TCPRegistryClient(self.address[0], port=self.address[1], timeout=2).discover(name))

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def demo_config(
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

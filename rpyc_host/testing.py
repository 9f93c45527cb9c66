"""Start hosts for tests: as a ``server.py`` subprocess or in this process, on port 0.

Usage::

    with ServerProcess(config_path) as proc:          # python server.py --config config_path
        host, port = proc.address("demo")             # the real port, read from the log

    with running_host(config_text) as host:           # in-process Host
        conn = rpyc.connect(*host.address("demo"))

Readiness is awaited with a deadline (the host logs ``host ready``); stopping sends SIGTERM to
the process started here, by PID, and kills it only if it does not exit in time.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from .config import parse_config
from .host import Host

SERVING = re.compile(
    r"serving (?P<name>\S+) \((?P<cls>[^)]*)\) on (?P<host>\S+):(?P<port>\d+) "
    r"\[(?P<type>\w+)\]"
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``python server.py --config PATH`` as a child process with its log captured."""

    def __init__(
        self,
        config: str | os.PathLike[str],
        *extra_args: str,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.config = str(config)
        self.args = [sys.executable, str(PROJECT_ROOT / "server.py"), "--config", self.config, *extra_args]
        self.cwd = str(cwd or PROJECT_ROOT)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout = ready_timeout
        self.lines: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self.proc: subprocess.Popen[str] | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> ServerProcess:
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if wait:
            self.wait_for("host ready", self.ready_timeout)
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            match = SERVING.search(line)
            if match:
                self.addresses[match["name"]] = (match["host"], int(match["port"]))
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """Wait for a log line containing ``text``; AssertionError with the log on timeout/exit."""
        for line in self.lines:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{self.log}")
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self._queue.put(None)
                raise AssertionError(f"server exited before logging {text!r}:\n{self.log}")
            if text in item:
                return item

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        # Let the pump finish reading what the process wrote.
        deadline = time.monotonic() + 5
        while self.proc.stdout and not self.proc.stdout.closed and time.monotonic() < deadline:
            if self._queue.queue and self._queue.queue[-1] is None:
                self.proc.stdout.close()
                break
            time.sleep(0.01)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process; kill it if it has not exited within ``timeout``."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"server did not stop within {timeout} s:\n{self.log}") from None
        return self.proc.returncode

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def address(self, name: str) -> tuple[str, int]:
        return self.addresses[name]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextmanager
def running_host(config_text: str, source: str = "<test config>") -> Iterator[Host]:
    """An in-process :class:`Host` for ``config_text``, stopped (with zero grace) on exit."""
    host = Host(parse_config(config_text, source))
    host.start()
    try:
        yield host
    finally:
        host.stop(grace=0)


def run_cli(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` from the project root and capture its output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args],
        cwd=str(cwd or PROJECT_ROOT),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

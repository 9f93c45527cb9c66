"""Fixtures: config files in tmp_path and server processes that are always stopped."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rpyc_host.testing import ServerProcess


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write YAML text (dedented) to a file in tmp_path and return its path."""
    counter = iter(range(1000))

    def write(text: str) -> Path:
        path = tmp_path / f"config-{next(counter)}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``server.py`` processes; every one is stopped (by PID) when the test ends."""
    started: list[ServerProcess] = []

    def start(config: Path, *args: str, wait: bool = True, **kwargs: object) -> ServerProcess:
        proc = ServerProcess(config, *args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start(wait=wait)

    yield start
    for proc in started:
        proc.stop(timeout=20)
        assert proc.proc is not None and proc.proc.poll() is not None, "server still running"

"""Fixtures shared by the test modules: config files in tmp_path, and server processes that are
always stopped."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rpyc_host.testing import Certificates, RegistryProcess, ServerProcess, make_certificates
from tests.helpers import ROOT

# Server processes the tests start import tests.sample_services from this checkout, whatever
# directory they run in.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA with server and client certificates (and a rogue CA's), made once per run."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def registry() -> Iterator[RegistryProcess]:
    """A registry process on 127.0.0.1, port 0, stopped (by PID) when the test ends."""
    with RegistryProcess() as reg:
        yield reg


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write YAML text (dedented) to a file in tmp_path and return its path."""
    counter = iter(range(1000))

    def write(text: str) -> Path:
        path = tmp_path / f"config-{next(counter)}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def _stop_all(started: list[ServerProcess]) -> None:
    """Stop every process (stop() kills one that ignores SIGTERM), then report any that had to be."""
    failures = []
    for proc in started:
        try:
            proc.stop(timeout=20)
        except AssertionError as exc:
            failures.append(str(exc))
        assert proc.proc is None or proc.proc.poll() is not None, "server still running"
    assert not failures, "\n".join(failures)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """A list for the server processes a test builds itself; each is stopped (by PID) at the end."""
    started: list[ServerProcess] = []
    yield started
    _stop_all(started)


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start host processes; every one is stopped (by PID) when the test ends."""
    started: list[ServerProcess] = []

    def start(config: Path, *args: str, wait: bool = True, **kwargs: object) -> ServerProcess:
        proc = ServerProcess(config, *args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start(wait=wait)

    yield start
    _stop_all(started)

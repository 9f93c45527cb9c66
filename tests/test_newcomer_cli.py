"""Every mistake a new user makes with ``server.py`` / ``rpyc-host`` is one line and exit 2, and
``--check`` validates without creating, opening or deleting anything."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import rpyc

from rpyc_host.testing import PROJECT_ROOT, ServerProcess, run_cli

RPYC_HOST = str(Path(sys.executable).parent / "rpyc-host")

FAILING = """
class NeedsDatabase:
    def __init__(self, path: str = "x.db") -> None:
        raise RuntimeError(f"cannot open database {path}")


class NeedsFile:
    def __init__(self, path: str) -> None:
        open(path).close()

    def ping(self) -> str:
        return "pong"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "failing.py").write_text(FAILING)
    return tmp_path


def write(folder: Path, text: str, name: str = "app.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def server(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(str(PROJECT_ROOT / "server.py"), *args, cwd=cwd, timeout=60)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            "{class: failing:NeedsDatabase, port: 0, options: {path: /nowhere/app.db}}",
            "services.db: NeedsDatabase(...) failed: RuntimeError: cannot open database /nowhere/app.db",
        ),
        (
            "{class: failing:NeedsFile, port: 0, options: {path: /nowhere/file}}",
            "services.db: NeedsFile(...) failed: FileNotFoundError: [Errno 2] No such file or directory: "
            "'/nowhere/file'",
        ),
    ],
)
def test_a_constructor_raising_anything_is_one_line_and_exit_2(
    folder: Path, service: str, expected: str
) -> None:
    config = write(folder, f"services:\n  db: {service}\n")
    line = one_error_line(server("--config", str(config), cwd=folder))
    assert line == f"Error: {config}: {expected}"
    debug = server("--config", str(config), "--log-level", "DEBUG", cwd=folder)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == f"Error: {config}: {expected}"


@pytest.mark.parametrize("check", [(), ("--check",)])
def test_a_bad_log_level_is_one_line_with_a_suggestion(folder: Path, check: tuple[str, ...]) -> None:
    config = write(folder, "services:\n  demo: {class: services.demo:DemoService, port: 0}\n")
    line = one_error_line(server("--config", str(config), "--log-level", "LOUD", *check, cwd=folder))
    assert line == "Error: --log-level: 'LOUD' is not one of CRITICAL, DEBUG, ERROR, INFO, WARNING"
    line = one_error_line(server("--config", str(config), "--log-level", "debg", *check, cwd=folder))
    assert line.endswith("(did you mean 'DEBUG'?)")


def test_check_shows_the_log_level_override(folder: Path) -> None:
    config = write(folder, "services:\n  demo: {class: services.demo:DemoService, port: 0}\n")
    result = server("--config", str(config), "--check", "--log-level", "debug", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "  level: DEBUG\n" in result.stdout


def test_check_into_a_closed_pipe_exits_quietly(folder: Path) -> None:
    config = write(folder, "services:\n  demo: {class: services.demo:DemoService, port: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "server.py"), "--config", str(config), "--check"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # like `| head` having read what it wanted, before the host writes
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 0


@pytest.mark.parametrize("check", [(), ("--check",)])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "services: no services to serve: add one under services:, for example services: {demo: "),
        ("services: {}\n", "services: no services to serve: add one under services:"),
        (
            "services:\n  a: {class: services.demo:DemoService, port: 0, enabled: false}\n",
            "services: every service is disabled (services.a): set enabled: true on at least one",
        ),
    ],
)
def test_a_config_that_serves_nothing_is_refused(
    folder: Path, text: str, expected: str, check: tuple[str, ...]
) -> None:
    config = write(folder, text)
    line = one_error_line(server("--config", str(config), *check, cwd=folder))
    assert line.startswith(f"Error: {config}: {expected}")


def test_each_disabled_service_is_logged_at_start(
    folder: Path, start_server: Callable[..., ServerProcess]
) -> None:
    config = write(
        folder,
        """
        services:
          demo: {class: services.demo:DemoService, port: 0}
          spare: {class: services.demo:DemoService, port: 0, enabled: false}
        """,
    )
    proc = start_server(config, cwd=folder)
    assert "not serving services.spare: enabled is false" in proc.log
    with rpyc.connect(*proc.address("demo")) as conn:
        assert conn.root.add(1, 2) == 3


def test_check_creates_opens_and_deletes_nothing(folder: Path) -> None:
    files_root = folder / "var" / "files"
    database = folder / "var" / "ingest.db"
    config = write(
        folder,
        f"""
        services:
          files: {{class: services.files:FileService, port: 0, options: {{root: {files_root}}}}}
          ingest: {{class: services.ingest:IngestService, port: 0, options: {{database: "sqlite:///{database}"}}}}
          db: {{class: failing:NeedsDatabase, port: 0}}
        """,
    )
    before = sorted(p.name for p in folder.rglob("*"))
    result = server("--config", str(config), "--check", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert not files_root.exists() and not database.exists()
    # A partial upload left in an existing root survives --check (the service itself sweeps it).
    files_root.mkdir(parents=True)
    partial = files_root / ".upload-0123456789abcdef-0123456789abcdef.part"
    partial.write_bytes(b"half an upload")
    result = server("--config", str(config), "--check", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == b"half an upload"
    assert sorted(p.name for p in folder.rglob("*")) == sorted([*before, "var", "files", partial.name])


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            "{class: services.files:FileService, port: 0, options: {max_file_size: big}}",
            "services.s.options: FileService rejected its options: max_file_size must be an integer "
            "number of bytes, got 'big'",
        ),
        (
            "{class: services.files:FileService, port: 0, options: {partial_ttl: 0}}",
            "services.s.options: FileService rejected its options: partial_ttl must be a number of "
            "seconds > 0, got 0",
        ),
        (
            "{class: services.ingest:IngestService, port: 0, options: {database: 'mysql:///x.db'}}",
            "services.s.options: IngestService rejected its options: database 'mysql:///x.db': unknown "
            "scheme 'mysql'",
        ),
        (
            "{class: services.ingest:IngestService, port: 0, options: {max_batch_records: 0}}",
            "services.s.options: IngestService rejected its options: max_batch_records must be an "
            "integer >= 1, got 0",
        ),
        (
            "{class: failing:NeedsFile, port: 0}",
            "services.s.options: NeedsFile needs option(s) 'path': add them under options:",
        ),
        (
            "{class: failing:NeedsDatabase, port: 0, options: {pth: x}}",
            "services.s.options.pth: unknown option 'pth' (did you mean 'path'?); NeedsDatabase takes: path",
        ),
    ],
)
def test_check_finds_bad_options_without_building_the_service(
    folder: Path, service: str, expected: str
) -> None:
    # A valid files service first: building it (what --check must not do) would create var/ok.
    ok = "{class: services.files:FileService, port: 0, options: {root: var/ok}}"
    config = write(folder, f"services:\n  ok: {ok}\n  s: {service}\n")
    line = one_error_line(server("--config", str(config), "--check", cwd=folder))
    assert line.startswith(f"Error: {config}: {expected}")
    assert not (folder / "var").exists()


@pytest.mark.parametrize(
    ("command", "prog"),
    [
        ([RPYC_HOST], "rpyc-host"),
        ([sys.executable, str(PROJECT_ROOT / "server.py")], "server.py"),
        ([sys.executable, "-m", "rpyc_host"], "python -m rpyc_host"),
        ([sys.executable, "-m", "client"], "python -m client"),
        ([str(Path(sys.executable).parent / "rpyc-host-client")], "rpyc-host-client"),
    ],
)
def test_version_and_usage_name_the_command_that_ran(command: list[str], prog: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"{prog} 0.1.0 (rpyc {rpyc.__version__}, Python ")
    usage = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert usage.stdout.startswith(f"usage: {prog} ")

"""A new user's own service, in a folder of their own outside the repository, served by the
installed ``rpyc-host`` command and by ``python /path/to/server.py``, without PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import rpyc

from rpyc_host.testing import PROJECT_ROOT, ServerProcess

RPYC_HOST = str(Path(sys.executable).parent / "rpyc-host")

GREETER = '''
import rpyc


@rpyc.service
class Greeter(rpyc.Service):
    """Says hello."""

    def __init__(self, name: str = "world") -> None:
        self.name = name

    @rpyc.exposed
    def greet(self) -> str:
        return f"hello {self.name}"
'''


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """``myproject/myapp/greeter.py`` and ``myproject/mine.yaml``, outside the repository."""
    folder = tmp_path / "myproject"
    (folder / "myapp").mkdir(parents=True)
    (folder / "myapp" / "__init__.py").write_text("")
    (folder / "myapp" / "greeter.py").write_text(GREETER)
    (folder / "mine.yaml").write_text(
        "services:\n  greeter:\n    class: myapp.greeter:Greeter\n    port: 0\n"
        "    options: {name: newcomer}\n"
    )
    assert PROJECT_ROOT not in folder.resolve().parents
    return folder


def user_env() -> dict[str, str]:
    """The environment of a user who never heard of PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def rpyc_host(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RPYC_HOST, *args], cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=60
    )


def test_check_imports_the_service_from_the_current_folder(user_folder: Path) -> None:
    result = rpyc_host("--config", "mine.yaml", "--check", cwd=user_folder)
    assert result.returncode == 0, result.stderr
    assert "class_path: myapp.greeter:Greeter" in result.stdout


def test_check_imports_from_the_config_files_folder(user_folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = rpyc_host("--config", str(user_folder / "mine.yaml"), "--check", cwd=elsewhere)
    assert result.returncode == 0, result.stderr


def test_app_dir_adds_a_folder(user_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "mine.yaml"
    config.write_text((user_folder / "mine.yaml").read_text())
    result = rpyc_host("--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 2
    result = rpyc_host("--config", str(config), "--app-dir", str(user_folder), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_module_not_found_says_where_it_looked_and_how_to_fix_it(user_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "mine.yaml"
    config.write_text((user_folder / "mine.yaml").read_text())
    result = rpyc_host("--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot import module 'myapp.greeter'" in lines[0]
    assert "No module named 'myapp'" in lines[0]
    assert f"looked in {tmp_path}, {tmp_path / 'conf'}" in lines[0]
    assert "--app-dir DIR or PYTHONPATH=DIR" in lines[0]


def test_a_missing_dependency_of_the_module_is_named_as_such(user_folder: Path) -> None:
    (user_folder / "myapp" / "greeter.py").write_text("import no_such_dependency_xyz\n" + GREETER)
    result = rpyc_host("--config", "mine.yaml", "--check", cwd=user_folder)
    assert result.returncode == 2
    assert "importing 'myapp.greeter' failed: No module named 'no_such_dependency_xyz'" in result.stderr
    assert "install it" in result.stderr


SERVER_PY = [sys.executable, str(PROJECT_ROOT / "server.py")]


@pytest.mark.parametrize("command", [SERVER_PY, [RPYC_HOST]], ids=["server.py", "rpyc-host"])
@pytest.mark.parametrize("server_type", ["threaded", "forking"])
def test_serves_the_users_service_from_their_folder(
    user_folder: Path, server_type: str, command: list[str]
) -> None:
    config = user_folder / "mine.yaml"
    config.write_text(config.read_text() + f"server: {{type: {server_type}}}\n")
    # `python /path/to/server.py` or the installed `rpyc-host`, run from the user's folder.
    proc = ServerProcess(config, cwd=user_folder, env=user_env())
    proc.env = {**user_env(), "PYTHONUNBUFFERED": "1"}  # ServerProcess would keep a PYTHONPATH
    proc.args = [*command, "--config", "mine.yaml", "--ready-file", proc.ready_file]
    with proc, rpyc.connect(*proc.address("greeter")) as conn:
        assert conn.root.greet() == "hello newcomer"
    assert proc.proc is not None and proc.proc.returncode == 0


def test_exposed_methods_of_a_class_without_the_service_decorator_are_served(user_folder: Path) -> None:
    """``@rpyc.exposed`` marks without ``@rpyc.service`` on the class: plain rpyc refuses every
    call (``cannot access 'greet'``); the host serves them and says once what was missing."""
    (user_folder / "myapp" / "greeter.py").write_text(GREETER.replace("@rpyc.service\n", ""))
    proc = ServerProcess(user_folder / "mine.yaml", cwd=user_folder, env=user_env())
    with proc, rpyc.connect(*proc.address("greeter")) as conn:
        assert conn.root.greet() == "hello newcomer"
        assert [m[0] for m in conn.root.describe()[1]] == ["describe", "greet", "health"]
    warnings = [line for line in proc.lines if "@rpyc.exposed" in line]
    assert len(warnings) == 1, proc.lines
    assert (
        "myapp.greeter:Greeter marks greet with @rpyc.exposed but the class has no @rpyc.service"
        in warnings[0]
    )


def test_a_decorated_class_gets_no_warning(user_folder: Path) -> None:
    proc = ServerProcess(user_folder / "mine.yaml", cwd=user_folder, env=user_env())
    with proc, rpyc.connect(*proc.address("greeter")) as conn:
        assert conn.root.greet() == "hello newcomer"
    assert not [line for line in proc.lines if "@rpyc.exposed" in line], proc.lines

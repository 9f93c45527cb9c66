"""The built wheel, installed into a fresh virtualenv, tests a user's service from a directory
outside the checkout: the pytest plugin's fixtures and ``rpyc_host.testing.ServerProcess`` need
nothing but the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

# The user's own test file: a service module of theirs beside it, a config naming it.
USER_TEST = """
import rpyc
import pytest

import rpyc_host
from rpyc_host.testing import ServerProcess, wait_until
from inventory import InventoryService


def test_installed_not_the_checkout():
    assert "site-packages" in rpyc_host.__file__, rpyc_host.__file__


def test_rpyc_service_fixture(rpyc_service):
    served = rpyc_service(InventoryService, options={"start_stock": 5})
    assert served.root.receive("sku-1", 3) == 8


def test_rpyc_local_fixture(rpyc_local):
    assert rpyc_local(InventoryService, start_stock=2).root.level("b") == 2


def test_server_process(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "services:\\n"
        "  inventory: {class: 'inventory:InventoryService', port: 0, options: {start_stock: 1}}\\n"
        "  demo: {class: 'services.demo:DemoService', port: 0}\\n"
    )
    with ServerProcess(config) as proc:
        assert proc.ready["pid"] == proc.pid
        with rpyc.connect(*proc.address("inventory")) as conn:
            assert conn.root.receive("x", 1) == 2
        with rpyc.connect(*proc.address("demo")) as conn:
            assert conn.root.add(1, 2) == 3
        proc.stop()
    wait_until(lambda: "host stopped" in proc.log, 10, "the stop to be logged")
"""


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_a_user_test(tmp_path: Path) -> None:
    # Nothing may import the checkout: no PYTHONPATH (the suite's conftest sets one), no venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # Built from a copy, so the build's egg-info and build/ never land in the checkout.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "var", "build", "*.egg-info", "__pycache__", ".*_cache", "results"
        ),
    )
    wheels = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        tmp_path,
        env,
        300,
    )
    (wheel,) = wheels.glob("rpyc_host-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, 120)
    python = str(venv / "bin" / "python")
    # Dependencies come from the package index, as in a normal install (pip's cache makes it quick).
    run([python, "-m", "pip", "install", "-q", str(wheel), "pytest"], tmp_path, env, 300)

    user = tmp_path / "user"
    user.mkdir()
    shutil.copy(ROOT / "examples" / "inventory.py", user / "inventory.py")
    (user / "test_user.py").write_text(USER_TEST)
    done = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"], user, env, 120)
    assert "4 passed" in done.stdout, done.stdout

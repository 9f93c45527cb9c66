"""Every configuration mistake gives one actionable ``Error:`` line and exit status 2."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rpyc_host.cli import main
from rpyc_host.config import parse_config
from rpyc_host.errors import ConfigError
from rpyc_host.testing import run_cli
from rpyc_host.wire.configtext import expand_env
from tests.helpers import ROOT

DEMO = """
services:
  demo:
    class: services.demo:DemoService
    port: 0
"""


def run_check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--config", str(path), "--check"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "server:\n  typ: threaded\n" + DEMO,
            "server.typ: unknown key 'typ' (did you mean 'type'?); known keys:",
            id="unknown-key",
        ),
        pytest.param(
            "sevrices: {}\n",
            "sevrices: unknown key 'sevrices' (did you mean 'services'?)",
            id="unknown-top-level-key",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: '18861x'\n",
            "services.demo.port: '18861x' is not an integer",
            id="wrong-type",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: 70000\n",
            "services.demo.port: 70000 is not a port (1-65535, or 0 for any free port)",
            id="bad-port",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: true\n",
            "services.demo.port: True is not an integer",
            id="bool-port",
        ),
        pytest.param(
            "services:\n"
            "  a: {class: services.demo:DemoService, port: 18999}\n"
            "  b: {class: services.demo:DemoService, port: 18999}\n",
            "services.b.port: 18999 is already used by services.a.port",
            id="duplicate-port",
        ),
        pytest.param(
            "server:\n  type: threadpoll\n" + DEMO,
            "server.type: 'threadpoll' is not one of forking, threaded, threadpool "
            "(did you mean 'threadpool'?)",
            id="unknown-server-type",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: 0\n    type: forked\n",
            "services.demo.type: 'forked' is not one of forking, threaded, threadpool "
            "(did you mean 'forking'?)",
            id="unknown-service-type",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.nope:DemoService\n    port: 0\n",
            "services.demo.class: cannot import module 'services.nope' for "
            "'services.nope:DemoService': No module named 'services.nope'",
            id="module-not-importable",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoServise\n    port: 0\n",
            "services.demo.class: 'services.demo' has no attribute 'DemoServise' "
            "(did you mean 'DemoService'?)",
            id="class-not-found",
        ),
        pytest.param(
            "services:\n  demo:\n    class: tests.sample_services:NOT_A_CLASS\n    port: 0\n",
            "services.demo.class: 'tests.sample_services:NOT_A_CLASS' is a int, not a class",
            id="not-a-class",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo\n    port: 0\n",
            "services.demo.class: 'services.demo' is not of the form 'module:Class'",
            id="no-colon",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: 0\n"
            "    options: {greting: hi}\n",
            "services.demo.options.greting: unknown option 'greting' (did you mean 'greeting'?); "
            "DemoService takes: greeting, max_countdown",
            id="unknown-option",
        ),
        pytest.param(
            "services:\n  p:\n    class: tests.sample_services:PickyService\n    port: 0\n"
            "    options: {level: -1}\n",
            "services.p.options: PickyService rejected its options: level must be >= 0, got -1",
            id="option-rejected",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: [0\n",
            "YAML syntax error",
            id="yaml-syntax",
        ),
        pytest.param(
            "services:\n  demo:\n    class: services.demo:DemoService\n    port: ${NO_SUCH_VAR_X}\n",
            "services.demo.port: environment variable 'NO_SUCH_VAR_X' is not set "
            "(set it, or write ${NO_SUCH_VAR_X:-default})",
            id="env-missing",
        ),
        pytest.param(
            "debug:\n  classic: {enabled: true, host: 0.0.0.0, port: 0}\n",
            "debug.classic.host: '0.0.0.0' is not a loopback address",
            id="classic-not-loopback",
        ),
        pytest.param(
            "server:\n  pool_size: 0\n" + DEMO,
            "server.pool_size: 0 is too small (the minimum is 1)",
            id="pool-size-zero",
        ),
        pytest.param(
            "logging: {level: LOUD}\n",
            "logging.level: 'LOUD' is not one of CRITICAL, DEBUG, ERROR, INFO, WARNING",
            id="log-level",
        ),
    ],
)
def test_config_mistake_is_one_error_line_with_status_2(
    write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = write_config(text)
    code, out, err = run_check(path, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"Error: {path}: "), err
    assert expected in lines[0]


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    code, _, err = run_check(path, capsys)
    assert code == 2
    assert err.strip() == f"Error: {path}: file not found (pass --config with the path of a YAML file)"


def test_yaml_error_names_line_and_column(write_config: Callable[[str], Path]) -> None:
    path = write_config("services:\n  demo: {class: x, port: [0}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(path.read_text(), str(path))
    assert "line 2, column" in str(info.value)


def test_real_process_prints_no_traceback(write_config: Callable[[str], Path]) -> None:
    path = write_config("server:\n  type: threadpoll\n" + DEMO)
    result = run_cli(str(ROOT / "server.py"), "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"Error: {path}: server.type: 'threadpoll'")


def test_env_substitution_types_and_defaults() -> None:
    env = {"PORT": "18870", "NAME": "box"}
    raw = {"a": "${PORT}", "b": "${MISSING:-7}", "c": "x-${NAME}-y", "d": "${MISSING:-}", "e": ["${NAME}"]}
    assert expand_env(raw, environ=env) == {"a": 18870, "b": 7, "c": "x-box-y", "d": "", "e": ["box"]}


def test_check_prints_resolved_config_with_secrets_masked(
    write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DEMO_PORT", "18877")
    path = write_config(
        """
        server: {type: threadpool, pool_size: 4}
        services:
          demo:
            class: services.demo:DemoService
            port: ${TEST_DEMO_PORT}
            type: forking
          calc:
            class: tests.sample_services:Calculator
            port: 0
            options: {scale: 2}
        """
    )
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    data = yaml.safe_load(out)
    demo, calc = data["services"]["demo"], data["services"]["calc"]
    assert (demo["port"], demo["type"], demo["host"]) == (18877, "forking", "127.0.0.1")
    assert (calc["type"], calc["pool_size"], calc["options"]) == ("threadpool", 4, {"scale": 2})
    masked = parse_config(
        "services:\n  d:\n    class: services.demo:DemoService\n    port: 0\n"
        "    options: {api_token: s3cret, url: 'postgresql://u:pw@db/x'}\n"
    ).to_dict()
    options = masked["services"]["d"]["options"]
    assert options == {"api_token": "***", "url": "postgresql://u:***@db/x"}


def test_default_config_is_valid_and_serves_demo_on_18861(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the services create their data folders relative to the cwd
    code, out, err = run_check(ROOT / "config.yaml", capsys)
    assert code == 0, err
    data = yaml.safe_load(out)
    demo = data["services"]["demo"]
    assert (demo["host"], demo["port"], demo["class_path"]) == (
        "127.0.0.1",
        18861,
        "services.demo:DemoService",
    )
    assert data["debug"]["classic"]["enabled"] is False


def test_port_in_use_fails_cleanly(write_config: Callable[[str], Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(
            f"""
            services:
              first: {{class: services.demo:DemoService, port: 0}}
              second: {{class: services.demo:DemoService, port: {port}}}
            """
        )
        result = run_cli(str(ROOT / "server.py"), "--config", str(path), timeout=30)
    assert result.returncode == 1
    assert (
        f"Error: services.second: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "serving first" not in result.stderr  # nothing was left running or announced

"""The deployment recipes in deploy/: container build file, Kubernetes manifests, systemd units.

No container engine, cluster or systemd PID 1 runs here: each recipe is parsed and cross-checked
against the host configuration it ships (validated by the host's own parser), and what can run
here does (the image's health check command against a real server, systemd-analyze verify on
the units, kustomize rendering the manifests).
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rpyc_host.config import Config, parse_config
from rpyc_host.errors import ConfigError
from rpyc_host.testing import PROJECT_ROOT, ServerProcess, run_cli

DEPLOY = PROJECT_ROOT / "deploy"
CONFIG_PATH = "/etc/rpyc-host/config.yaml"
TOKEN = secrets.token_urlsafe(32)
CONSOLE_SCRIPTS = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


# -- container build file ---------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    return result


def exec_form(arguments: str) -> list[str]:
    """An instruction's JSON argument list: the exec form, which receives SIGTERM directly."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


@pytest.fixture(scope="module")
def containerfile() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for keyword, arguments in instructions(DEPLOY / "Containerfile"):
        found.setdefault(keyword, []).append(arguments)
    return found


def test_containerfile_builds_from_python_slim_as_a_non_root_user(
    containerfile: dict[str, list[str]],
) -> None:
    assert containerfile["FROM"] == ["python:3.11-slim"]
    for keyword in ("COPY", "RUN", "USER", "HEALTHCHECK", "ENTRYPOINT", "CMD", "EXPOSE"):
        assert keyword in containerfile, f"no {keyword} instruction"
    user = containerfile["USER"][-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "the image must run as a numeric non-root user"
    assert any(run.startswith("pip install .") for run in containerfile["RUN"])
    for copy in containerfile["COPY"]:
        *sources, _ = copy.split()
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"COPY {source}: not in the project"
    exposed = {int(p) for line in containerfile["EXPOSE"] for p in line.split()}
    assert exposed == {18861, 9464}


def test_container_command_is_the_console_script_with_the_config(
    containerfile: dict[str, list[str]],
) -> None:
    command = exec_form(containerfile["ENTRYPOINT"][-1]) + exec_form(containerfile["CMD"][-1])
    assert command == ["rpyc-host", "--config", CONFIG_PATH]
    assert CONSOLE_SCRIPTS["rpyc-host"] == "rpyc_host.cli:main"
    script = Path(sys.executable).with_name("rpyc-host")  # installed by pip from pyproject
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--config" in done.stdout
    copied = [c.split() for c in containerfile["COPY"]]
    assert ["deploy/config.yaml", CONFIG_PATH] in copied


def healthcheck_command(containerfile: dict[str, list[str]]) -> list[str]:
    options, _, command = containerfile["HEALTHCHECK"][-1].partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    return exec_form(command.strip())


def test_healthcheck_is_the_clients_health_command(containerfile: dict[str, list[str]]) -> None:
    argv = healthcheck_command(containerfile)
    assert argv[:4] == ["python", "-m", "client", "health"]
    done = run_cli("-m", "client", "health", "--help")
    assert done.returncode == 0, done.stderr
    for option in (a for a in argv if a.startswith("--")):
        assert option in done.stdout, f"python -m client health has no {option} option"
    assert argv[argv.index("--config") + 1] == CONFIG_PATH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthcheck_command_passes_against_the_shipped_config_and_fails_with_a_wrong_token(
    containerfile: dict[str, list[str]], start_server: Callable[..., ServerProcess]
) -> None:
    env = {
        "RPYC_HOST_TOKEN": TOKEN,
        "RPYC_HOST_BIND": "127.0.0.1",  # the image binds every interface; tests stay on loopback
        "RPYC_HOST_METRICS_BIND": "127.0.0.1",
        "DEMO_PORT": str(free_port()),
        "METRICS_PORT": "0",
    }
    proc = start_server(DEPLOY / "config.yaml", env=env)
    argv = healthcheck_command(containerfile)
    argv[argv.index("--config") + 1] = str(DEPLOY / "config.yaml")
    done = run_cli(*argv[1:], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("demo: ok")
    done = run_cli(*argv[1:], env={**env, "RPYC_HOST_TOKEN": secrets.token_urlsafe(32)})
    assert done.returncode == 1 and "demo: down" in done.stdout
    assert proc.stop() == 0


def test_shipped_config_refuses_to_start_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RPYC_HOST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="RPYC_HOST_TOKEN"):
        parse_config((DEPLOY / "config.yaml").read_text())
    monkeypatch.setenv("RPYC_HOST_TOKEN", TOKEN)
    config = parse_config((DEPLOY / "config.yaml").read_text())
    assert config.service("demo").host == "0.0.0.0" and config.security.tokens == (TOKEN,)


# -- Kubernetes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


@pytest.fixture
def k8s_config(manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    monkeypatch.setenv("RPYC_HOST_TOKEN", TOKEN)
    yield parse_config(manifests["ConfigMap"]["data"]["config.yaml"], "ConfigMap rpyc-host-config")


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def test_deployment_serves_the_configmap_config_with_the_secret_token(
    manifests: dict[str, dict[str, Any]], k8s_config: Config
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    main = container(manifests)
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    (mount,) = main["volumeMounts"]
    assert mount["name"] == volume["name"] and mount["readOnly"] is True
    config_arg = main["args"][main["args"].index("--config") + 1]
    assert config_arg == f"{mount['mountPath']}/config.yaml" == CONFIG_PATH
    (env,) = main["env"]
    assert env["name"] == "RPYC_HOST_TOKEN"
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == manifests["Secret"]["metadata"]["name"]
    assert ref["key"] in manifests["Secret"]["stringData"]
    assert "${RPYC_HOST_TOKEN}" in manifests["ConfigMap"]["data"]["config.yaml"]
    assert k8s_config.security.tokens == (TOKEN,)
    # As shipped the Secret is empty, and the host refuses to start with it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RPYC_HOST_TOKEN", manifests["Secret"]["stringData"][ref["key"]])
        with pytest.raises(ConfigError, match="too short"):
            parse_config(manifests["ConfigMap"]["data"]["config.yaml"])


def test_ports_probes_and_termination_match_the_config(
    manifests: dict[str, dict[str, Any]], k8s_config: Config
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    main = container(manifests)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    demo = k8s_config.service("demo")
    assert ports == {"rpyc": demo.port, "metrics": k8s_config.metrics.port}
    assert demo.host == "0.0.0.0" and k8s_config.metrics.host == "0.0.0.0"  # reachable on the pod IP
    assert k8s_config.metrics.enabled
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert k8s_config.drain_delay > 0
    assert pod["terminationGracePeriodSeconds"] > k8s_config.grace_period + k8s_config.drain_delay
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False


def test_headless_service_publishes_srv_records_for_the_rpyc_port(
    manifests: dict[str, dict[str, Any]], k8s_config: Config
) -> None:
    service, deployment = manifests["Service"], manifests["Deployment"]
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "rpyc" and port["protocol"] == "TCP"  # SRV: _rpyc._tcp.<service>
    assert port["port"] == k8s_config.service("demo").port
    assert port["targetPort"] in {p["name"] for p in container(manifests)["ports"]}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kustomization_applies_everything_but_the_secret() -> None:
    directory = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed | {"secret.yaml", "kustomization.yaml"} == {p.name for p in directory.glob("*.yaml")}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {d["kind"] for d in yaml.safe_load_all(done.stdout)} == {"ConfigMap", "Deployment", "Service"}


# -- systemd ----------------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_socket_units_name_a_configured_service_on_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPYC_HOST_TOKEN", TOKEN)
    config = parse_config((DEPLOY / "config.yaml").read_text())
    service_unit = unit(DEPLOY / "systemd" / "rpyc-host.service")
    sockets = sorted((DEPLOY / "systemd").glob("rpyc-host-*.socket"))
    assert sockets
    for path in sockets:
        section = unit(path)["Socket"]
        (name,) = section["FileDescriptorName"]
        (listen,) = section["ListenStream"]
        assert section["Service"] == ["rpyc-host.service"]
        # Matched by name; the configured port is the same, so matching by port agrees.
        assert int(listen.rsplit(":", 1)[-1]) == config.service(name).port
        assert path.name in service_unit["Unit"]["Requires"] and path.name in service_unit["Unit"]["After"]


def test_service_unit_is_notify_with_watchdog_reload_and_enough_stop_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RPYC_HOST_TOKEN", TOKEN)
    config = parse_config((DEPLOY / "config.yaml").read_text())
    service = unit(DEPLOY / "systemd" / "rpyc-host.service")["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name in CONSOLE_SCRIPTS and argv[1:] == ["--config", CONFIG_PATH]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(service["WatchdogSec"][0]) > 0
    assert int(service["TimeoutStopSec"][0]) > config.grace_period + config.drain_delay
    assert service["User"] != ["root"]


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: install Debian's systemd"
    # verify checks that ExecStart exists: point it at this checkout's console script.
    script = Path(sys.executable).with_name("rpyc-host")
    for path in (DEPLOY / "systemd").iterdir():
        text = path.read_text().replace("/opt/rpyc-host/.venv/bin/rpyc-host", str(script))
        (tmp_path / path.name).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr

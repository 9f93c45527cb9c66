"""Operating the host: health, readiness, metrics, JSON logs with connection ids, hot reload,
and the pytest plugin for users' own services."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rpyc

import client
from rpyc_host.testing import ServerProcess, run_cli, running_host, wait_until
from tests.helpers import ROOT, get, metric, metrics_url
from tests.sample_services import Calculator

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"


METRICS_CONFIG = """
services:
  demo: {class: services.demo:DemoService, port: 0}
  calc: {class: tests.sample_services:Calculator, port: 0, limits: {max_connections: 1}}
metrics: {enabled: true, port: 0}
"""


def test_every_service_answers_health() -> None:
    with running_host(METRICS_CONFIG) as host:
        for name, rpyc_name in (("demo", "DEMO"), ("calc", "CALCULATOR")):
            with rpyc.connect(*host.address(name)) as conn:
                facts = dict(conn.root.health())
                assert facts["status"] == "ok" and facts["service"] == rpyc_name
                assert 0 <= facts["uptime"] < 60


def test_healthz_and_readyz_up_and_partly_up() -> None:
    with running_host(METRICS_CONFIG) as host:
        base = metrics_url(host)
        status, body = get(base + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = get(base + "/readyz")
        assert status == 200 and json.loads(body) == {
            "status": "ready",
            "services": {"demo": "accepting", "calc": "accepting"},
        }
        host.hosted[1].server.stop_accepting()  # one listener down: partly up
        status, body = get(base + "/readyz")
        assert status == 503 and json.loads(body)["services"] == {"demo": "accepting", "calc": "down"}
        assert get(base + "/healthz")[0] == 200  # the process itself is alive
        assert get(base + "/nope")[0] == 404


def test_metrics_change_as_expected_after_calls_errors_and_refusals() -> None:
    text = METRICS_CONFIG + f'security: {{tokens: ["{TOKEN_A}"]}}\n'
    with running_host(text) as host:
        url = metrics_url(host) + "/metrics"
        address = host.address("demo")
        with client.connect(host=address[0], port=address[1], token=TOKEN_A) as conn:
            add = conn.root.add
            for i in range(3):
                add(i, i)
            with pytest.raises(TypeError):
                add("x", 1)
            page = get(url)[1]
            assert metric(page, "rpyc_host_calls_total", service="demo", method="add") == 4
            assert metric(page, "rpyc_host_call_errors_total", service="demo", method="add") == 1
            assert metric(page, "rpyc_host_call_duration_seconds_count", service="demo", method="add") == 4
            assert metric(page, "rpyc_host_connections_open", service="demo") == 1
        with pytest.raises(client.AuthError):
            client.connect(host=address[0], port=address[1], token="wrong-0123456789abcdef")
        calc = host.address("calc")
        held = client.connect(host=calc[0], port=calc[1], token=TOKEN_A)
        with pytest.raises(client.ConnectError):
            client.connect(host=calc[0], port=calc[1], token=TOKEN_A, retries=0)
        page = get(url)[1]
        assert metric(page, "rpyc_host_connections_refused_total", service="demo", reason="auth") == 1
        assert metric(page, "rpyc_host_connections_refused_total", service="calc", reason="limit") == 1
        assert metric(page, "rpyc_host_connections_total", service="demo") == 2
        assert metric(page, "rpyc_host_calls_in_flight", service="demo") == 0
        held.close()


def test_ingest_publishes_its_records_and_rejects(tmp_path: Path) -> None:
    text = f"""
services:
  ingest: {{class: services.ingest:IngestService, port: 0, options: {{database: "sqlite:///{tmp_path}/i.db"}}}}
metrics: {{enabled: true, port: 0}}
"""
    with running_host(text) as host, rpyc.connect(*host.address("ingest")) as conn:
        conn.root.submit("t", b'{"a": 1}\n{"a": 2}\nnot json\n')
        page = get(metrics_url(host) + "/metrics")[1]
        assert metric(page, "rpyc_host_service_ingest_records", service="ingest") == 2
        assert metric(page, "rpyc_host_service_ingest_rejects", service="ingest") == 1


def test_client_health_command(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config("services:\n  demo: {class: services.demo:DemoService, port: 0}\n"))
    port = proc.address("demo")[1]
    client_config = write_config(f"services:\n  demo: {{class: services.demo:DemoService, port: {port}}}\n")
    result = run_cli("-m", "client", "health", "--config", str(client_config))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"demo: ok \(up \d+ s\)\n", result.stdout)
    assert proc.stop() == 0
    result = run_cli("-m", "client", "health", "demo", "--config", str(client_config))
    assert result.returncode == 1
    assert result.stdout.startswith("demo: down (")


def test_json_logs_parse_and_carry_the_connection_id(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    path = write_config(
        "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"
        "logging: {level: DEBUG, format: json}\n"
    )
    proc = ServerProcess(path)
    proc.start(wait=False)
    try:
        line = proc.wait_for('"msg": "host ready')
        with rpyc.connect(*proc.address("demo")) as conn:
            conn.root.add(1, 2)
            connid = dict(conn.root.session())["connection_id"]
        proc.wait_for("disconnected after")
    finally:
        assert proc.stop() == 0
    records = [json.loads(text) for text in proc.lines if text.startswith("{")]
    assert len(records) == len(proc.lines), "every line is a JSON object"
    assert json.loads(line)["level"] == "INFO"
    mine = [r for r in records if r.get("conn") == connid]
    messages = " | ".join(r["msg"] for r in mine)
    assert "connected" in [r["msg"] for r in mine] and "disconnected after" in messages
    assert all(r["peer"].startswith("127.0.0.1:") for r in mine)
    calls = [r for r in mine if r["msg"].startswith("call add ")]
    assert calls and calls[0]["level"] == "DEBUG" and re.fullmatch(r"call add \d+\.\d{3} ms", calls[0]["msg"])


def test_logging_dict_passthrough(
    write_config: Callable[[str], Path], tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    log_file = tmp_path / "demo.log"
    path = write_config(
        f"""
        services:
          demo: {{class: services.demo:DemoService, port: 0}}
        logging:
          dict:
            handlers: {{file: {{class: logging.FileHandler, filename: "{log_file}"}}}}
            loggers: {{rpyc_host.demo: {{handlers: [file], level: INFO}}}}
        """
    )
    proc = start_server(path)
    rpyc.connect(*proc.address("demo")).close()
    wait_until(
        lambda: log_file.exists() and "disconnected after" in log_file.read_text(), what="the file log"
    )


def test_sighup_reloads_tokens_and_limits_without_dropping_connections(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "services:\n  demo: {class: services.demo:DemoService, port: 0, limits: {max_connections: 2}}\n"
        f'security: {{tokens: ["{TOKEN_A}"]}}\n'
    )
    proc = start_server(path)
    host, port = proc.address("demo")
    old = client.connect(host=host, port=port, token=TOKEN_A)
    assert old.root.ping() == "pong"

    # New token, larger limit, and a port change that needs a restart.
    path.write_text(
        f"services:\n  demo: {{class: services.demo:DemoService, port: {port + 1 if port < 65535 else 1}, "
        "limits: {max_connections: 3}}\n"
        f'security: {{tokens: ["{TOKEN_B}"]}}\n'
    )
    proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    proc.wait_for("reloaded ")
    assert "services.demo.port changed; that needs a restart, ignored" in proc.log
    assert old.root.ping() == "pong"  # the open connection stays
    with pytest.raises(client.AuthError):
        client.connect(host=host, port=port, token=TOKEN_A)
    extra = [client.connect(host=host, port=port, token=TOKEN_B) for _ in range(2)]  # 3 open now
    with pytest.raises(client.ConnectError, match=r"connection limit \(3\)"):
        client.connect(host=host, port=port, token=TOKEN_B, retries=0)

    # A broken file: the old configuration stays, the exact error is logged.
    path.write_text("services:\n  demo: {class: services.demo:DemoService, port: [oops\n")
    proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    line = proc.wait_for("reload failed")
    assert f"reload failed, keeping the running configuration: {path}: line " in line
    assert "YAML syntax error" in line
    for conn in extra:
        conn.close()

    def answers() -> bool:
        # The server frees a closed connection's slot when it sees the close: not instantly.
        try:
            with client.connect(host=host, port=port, token=TOKEN_B, retries=0) as conn:
                return bool(conn.root.ping() == "pong")
        except client.ConnectError:
            return False

    wait_until(answers, 10, "a slot freed by the closed connections")
    assert old.root.ping() == "pong"
    old.close()


def test_sighup_applies_a_new_log_level(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    path = tmp_path / "config.yaml"
    base = "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"
    path.write_text(base + "logging: {level: INFO}\n")
    proc = start_server(path)
    address = proc.address("demo")
    with rpyc.connect(*address) as conn:
        conn.root.add(1, 1)
    assert "call add" not in proc.log
    path.write_text(base + "logging: {level: DEBUG}\n")
    proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    proc.wait_for("reloaded ")
    with rpyc.connect(*address) as conn:
        conn.root.add(1, 1)
    proc.wait_for("call add ")


def test_the_plugin_runs_the_sample_user_test_in_examples() -> None:
    result = run_cli(
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "examples" / "test_inventory.py"),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_plugin_fixtures_in_this_suite(
    rpyc_service: Callable[..., Any], rpyc_local: Callable[..., Any]
) -> None:
    served = rpyc_service("tests.sample_services:Calculator", options={"scale": 2})
    assert served.root.add(1, 1) == 4
    assert rpyc_local(Calculator, scale=3).root.mul(1, 2) == 6

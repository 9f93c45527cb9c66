"""Real ``server.py`` processes: graceful shutdown, forking children, the CLI, the default config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import rpyc

from rpyc_host.testing import ServerProcess, run_cli, wait_until
from tests.helpers import ROOT, SERVER_TYPES, demo_config


def children_of(pid: int) -> dict[int, str]:
    """{child pid: state letter} from /proc, for processes whose parent is ``pid``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found[int(entry)] = fields[0]
    return found


def refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("server_type", SERVER_TYPES)
def test_graceful_shutdown_lets_the_call_in_flight_finish(
    server_type: str,
    tmp_path: Path,
    write_config: Callable[[str], Path],
    start_server: Callable[..., ServerProcess],
) -> None:
    events = tmp_path / "events.log"
    path = write_config(
        f"""
        server: {{type: {server_type}, grace_period: 10}}
        services:
          slow:
            class: tests.sample_services:SlowService
            port: 0
            options: {{events: "{events}"}}
        """
    )
    proc = start_server(path)
    address = proc.address("slow")
    conn = rpyc.connect(*address)
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["value"] = conn.root.sleep(1.5)
        except Exception as exc:
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: events.exists() and "call-start" in events.read_text(), what="the call to start")
    proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    proc.wait_for("stopped accepting connections")
    assert refused(address)
    caller.join(timeout=20)
    assert result == {"value": 1.5}
    assert proc.wait_exit(timeout=20) == 0
    assert events.read_text().splitlines() == ["connect", "call-start", "call-end", "disconnect"]
    assert "host stopped" in proc.log
    conn.close()


def test_grace_period_cuts_calls_that_run_too_long(
    tmp_path: Path, write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    events = tmp_path / "events.log"
    path = write_config(
        f"""
        server: {{grace_period: 0.5}}
        services:
          slow: {{class: tests.sample_services:SlowService, port: 0, options: {{events: "{events}"}}}}
        """
    )
    proc = start_server(path)
    conn = rpyc.connect(*proc.address("slow"))

    def call() -> None:
        with pytest.raises(EOFError):
            conn.root.sleep(30)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: events.exists() and "call-start" in events.read_text(), what="the call to start")
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 15
    caller.join(timeout=20)
    assert "still running after the 0.5 s grace period" in proc.log
    assert "disconnect" in events.read_text()  # on_disconnect ran even for the cut connection


def test_forking_reaps_children_no_zombies_after_50_connections(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(demo_config("forking")))
    address = proc.address("demo")
    for i in range(50):
        with rpyc.connect(*address) as conn:
            assert conn.root.add(i, 1) == i + 1
    wait_until(lambda: not children_of(proc.pid), what="all 50 children to exit and be reaped")
    assert "Z" not in children_of(proc.pid).values()


def test_forking_stop_stops_the_children(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(demo_config("forking")))
    conns = [rpyc.connect(*proc.address("demo")) for _ in range(3)]
    for conn in conns:
        assert conn.root.ping() == "pong"
    kids = children_of(proc.pid)
    assert len(kids) == 3
    assert proc.stop() == 0
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or children_of(proc.pid) == {}
    for conn in conns:
        with pytest.raises(EOFError):
            conn.root.ping()


def test_sigint_stops_gracefully_too(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(demo_config("threaded")))
    assert proc.stop(signal.SIGINT) == 0
    assert "received SIGINT" in proc.log


def test_startup_logs_one_line_per_service_with_the_real_port(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    path = write_config(
        """
        services:
          demo: {class: services.demo:DemoService, port: 0, type: threadpool}
          calc: {class: tests.sample_services:Calculator, port: 0, type: forking}
        """
    )
    proc = start_server(path)

    def serving() -> list[str]:
        return [line for line in proc.lines if "serving " in line]

    # The log is read from the process's stderr by a thread: the ready file may come first.
    wait_until(lambda: len(serving()) >= 2, 10, "both 'serving' lines")
    lines = serving()
    assert len(lines) == 2
    demo_port = proc.address("demo")[1]
    assert demo_port > 0
    assert f"serving demo (services.demo:DemoService) on 127.0.0.1:{demo_port} [threadpool]" in lines[0]
    assert "serving calc (tests.sample_services:Calculator) on 127.0.0.1:" in lines[1]
    assert lines[1].endswith("[forking]")


def test_ready_file_names_every_real_address(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    extra = (
        "metrics: {enabled: true, host: 127.0.0.1, port: 0}\n"
        "gateway: {enabled: true, port: 0, services: [demo]}\n"
        "debug:\n  classic: {enabled: true, host: 127.0.0.1, port: 0}\n"
    )
    ready = tmp_path / "run" / "ready.json"
    ready.parent.mkdir()
    args = [sys.executable, "-m", "rpyc_host", "--config", str(write_config(demo_config("forking", extra)))]
    log = tmp_path / "host.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*args, "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 20, "the ready file")
        assert ready.exists(), log.read_text()
        event = json.loads(ready.read_text())
        assert event["pid"] == proc.pid
        assert set(event) == {"pid", "services", "gateway", "metrics", "classic"}
        demo = event["services"]["demo"]
        assert (demo["host"], demo["type"]) == ("127.0.0.1", "forking") and demo["port"] > 0
        with rpyc.connect(demo["host"], demo["port"]) as conn:
            assert conn.root.add(2, 3) == 5  # the port is the one really accepting
        for component in ("gateway", "metrics", "classic"):
            host, port = event[component]
            assert host == "127.0.0.1" and port > 0
            socket.create_connection((host, port), timeout=5).close()
        assert [p.name for p in ready.parent.iterdir()] == ["ready.json"]  # no temporary left
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_ready_file_that_cannot_be_written_stops_the_host(
    write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "ready.json"
    path = write_config(demo_config("threaded"))
    result = run_cli("-m", "rpyc_host", "--config", str(path), "--ready-file", str(missing), timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: --ready-file: cannot write {missing}: No such file or directory"
    )
    assert "Traceback" not in result.stderr and "host ready" not in result.stderr


def test_server_process_reports_why_a_host_never_got_ready(
    write_config: Callable[[str], Path], servers: list[ServerProcess]
) -> None:
    bad = write_config("services:\n  demo: {class: services.demo:DemoService, port: 70000}\n")
    servers.append(proc := ServerProcess(bad))
    with pytest.raises(AssertionError) as failed:
        proc.start()
    assert "server exited with status 2 before it was ready" in str(failed.value)
    assert "services.demo.port: 70000 is not a port" in str(failed.value)  # the log is in the message

    good = ServerProcess(write_config(demo_config("threaded")))
    servers.append(good.start())
    with pytest.raises(KeyError, match="no service 'dmeo'; serving: demo"):
        good.address("dmeo")
    ready_dir = Path(good.ready_file).parent
    assert good.stop() == 0
    assert not ready_dir.exists()  # nothing left in the temporary directory


def test_cli_call_and_describe(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(demo_config("threaded")))
    port = proc.address("demo")[1]
    client_config = write_config(f"services:\n  demo: {{class: services.demo:DemoService, port: {port}}}\n")
    result = run_cli("-m", "client", "call", "demo", "add", "1", "2", "--config", str(client_config))
    assert (result.returncode, result.stdout, result.stderr) == (0, "3\n", "")
    result = run_cli(
        "-m",
        "client",
        "call",
        "demo",
        "echo",
        "hello world",
        "--port",
        str(port),
        "--config",
        str(client_config),
    )
    assert result.stdout == "hello world\n"
    result = run_cli("-m", "client", "call", "demo", "add", "1.5", "2", "--config", str(client_config))
    assert result.stdout == "3.5\n"
    result = run_cli("-m", "client", "describe", "demo", "--config", str(client_config))
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "DEMO"
    assert "  add(a: Any, b: Any) -> Any  - Return ``a + b`` for two numbers." in result.stdout
    result = run_cli("-m", "client", "call", "demo", "add", "x", "1", "--config", str(client_config))
    assert result.returncode == 1
    assert result.stderr == "Error: demo: TypeError: add(a, b): a must be a number, got str\n"
    result = run_cli("-m", "client", "call", "demo", "nope", "--config", str(client_config))
    assert (result.returncode, result.stderr) == (1, "Error: demo: AttributeError: cannot access 'nope'\n")
    result = run_cli("-m", "client", "call", "dmeo", "ping", "--config", str(client_config))
    assert result.returncode == 2
    assert "no service named 'dmeo' (did you mean 'demo'?)" in result.stderr
    result = run_cli("-m", "client", "call")
    assert result.returncode == 2


def test_cli_shell_binds_conn_and_root(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(demo_config("threaded")))
    port = proc.address("demo")[1]
    client_config = write_config(f"services:\n  demo: {{class: services.demo:DemoService, port: {port}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "client", "shell", "demo", "--config", str(client_config)],
        input="print('sum', root.add(20, 22))\nprint('closed', conn.closed)\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "sum 42" in result.stdout and "closed False" in result.stdout
    assert "Connected to 'demo'" in result.stderr


def test_default_config_serves_plain_rpyc_clients(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # The shipped config.yaml, with every port moved to 0 through its ${..._PORT} variables,
    # run from an empty folder (its data folders are relative to the working directory).
    ports = {name: "0" for name in ("DEMO_PORT", "FILES_PORT", "INGEST_PORT")}
    proc = start_server(ROOT / "config.yaml", env=ports, cwd=tmp_path)
    host, port = proc.address("demo")
    assert host == "127.0.0.1"
    assert rpyc.connect(host, port).root.add(1, 2) == 3

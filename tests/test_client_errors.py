"""Errors as a caller of the client library reads them: a service's error as its own type with
its message alone, one error tree, Ctrl-C that returns at once, and a client that never needs
the server's own files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import client
from client import errors
from client.settings import load_settings
from rpyc_host.host import Host
from rpyc_host.testing import make_certificates, running_host, wait_until

SLOW = """
services:
  slow: {{class: tests.sample_services:SlowService, port: 0, options: {{events: "{events}"}}}}
  demo: {{class: services.demo:DemoService, port: 0}}
"""
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with running_host(SLOW.format(events=tmp_path / "events")) as running:
        yield running


def test_a_service_error_is_its_own_type_with_the_message_alone(host: Host) -> None:
    with (
        client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn,
        pytest.raises(TypeError) as caught,
    ):
        conn.root.add("a", 1)
    exc = caught.value
    assert str(exc) == "add(a, b): a must be a number, got str"
    assert "Remote Traceback" not in str(exc) and "traceback denied" not in repr(exc)
    assert errors.is_remote(exc)
    assert errors.describe_error(exc) == "TypeError: add(a, b): a must be a number, got str"
    assert not errors.is_remote(TypeError("local"))


def test_a_service_oserror_keeps_its_errno_and_message(host: Host, tmp_path: Path) -> None:
    config = f"""
services:
  files: {{class: services.files:FileService, port: 0, options: {{root: "{tmp_path}"}}}}
"""
    with (
        running_host(config) as files_host,
        client.connect(host="127.0.0.1", port=files_host.address("files")[1]) as conn,
        pytest.raises(FileNotFoundError) as caught,
    ):
        conn.root.stat("nowhere.txt")
    assert caught.value.errno == 2
    assert caught.value.strerror == "'nowhere.txt': no such file or directory"
    assert (
        errors.describe_error(caught.value) == "FileNotFoundError: 'nowhere.txt': no such file or directory"
    )


def test_one_tree_for_what_the_client_raises(tmp_path: Path) -> None:
    for cls in (errors.ConfigError, errors.ConnectError, errors.AuthError, errors.NoInstanceError):
        assert issubclass(cls, errors.ClientError)
    for cls in (errors.BatchRejected, errors.DeliveryError, errors.ChecksumError):
        assert issubclass(cls, errors.ClientError)
    with pytest.raises(errors.ConnectError, match=r"cannot connect to 127\.0\.0\.1:1"):
        client.connect(host="127.0.0.1", port=1, retries=0)
    with pytest.raises(errors.ConfigError, match=r"needs a service name, or both host= and port="):
        client.connect(port=1)


def test_connecting_by_name_outside_a_project_says_what_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RPYC_HOST_CONFIG", raising=False)
    with pytest.raises(errors.ConfigError) as caught:
        client.connect("files")
    text = str(caught.value)
    assert "config.yaml: config file not found" in text
    assert "config='path/to/config.yaml'" in text and "RPYC_HOST_CONFIG" in text


def test_a_client_never_needs_the_servers_key_or_token_file(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    token = "client-test-token-0123456789"
    server_config = f"""
security:
  tokens: ["{token}"]
  tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"}}
services:
  demo: {{class: services.demo:DemoService, port: 0}}
"""
    with running_host(server_config) as served:
        port = served.address("demo")[1]
        # The client machine's copy of the config names server-only files it does not have.
        client_config = tmp_path / "client.yaml"
        client_config.write_text(
            textwrap.dedent(f"""
            security:
              tokens: ["{token}"]
              token_file: /nonexistent/tokens
              tls: {{cert: /nonexistent/server.crt, key: /nonexistent/server.key}}
            services:
              demo: {{class: services.demo:DemoService, port: {port}}}
            """)
        )
        settings = load_settings(client_config)
        assert settings.tls and settings.token == token
        with client.connect("demo", config=settings, ca=str(certs.ca)) as conn:
            assert conn.root.add(2, 3) == 5


SCRIPT = """
import sys, time
import client
conn = client.connect(host="127.0.0.1", port=int(sys.argv[1]))
print("calling", flush=True)
try:
    with conn:
        conn.root.sleep(8)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(7)
"""


def _interrupt(host: Host, args: list[str]) -> tuple[int, float, str, str]:
    """Run ``args``, send SIGINT once its call runs in ``host``; exit code, seconds to exit, output."""
    events = Path(host.hosted[0].service.events)  # type: ignore[attr-defined]
    # A shell runs a background job with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: the child gets the default disposition back, as a terminal's foreground job has.
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # The slow method itself has started (not only the connection's first round trips).
        wait_until(lambda: events.exists() and "call-start" in events.read_text(), 30, "the slow call")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        return proc.returncode, time.monotonic() - started, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_in_the_python_api_returns_at_once(host: Host) -> None:
    port = host.address("slow")[1]
    code, took, out, _ = _interrupt(host, [sys.executable, "-c", SCRIPT, str(port)])
    assert "calling" in out and "interrupted" in out
    assert code == 7
    assert took < 3.0, f"took {took:.1f} s after SIGINT; the call had 7 s left"
    # The server notices the client left and the slow call's connection is cleaned up.
    wait_until(lambda: host.hosted[0].server.admitted == 0, 15, "the interrupted connection to close")


def test_ctrl_c_in_the_cli_is_one_line_and_status_130(host: Host) -> None:
    port = host.address("slow")[1]
    cmd = [sys.executable, "-m", "client", "call", "slow", "sleep", "8", "--host", "127.0.0.1"]
    code, took, _, err = _interrupt(host, [*cmd, "--port", str(port)])
    assert code == 130
    assert took < 3.0, f"took {took:.1f} s after SIGINT"
    assert err.strip() == "Error: interrupted", err

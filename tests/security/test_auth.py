"""Tokens, TLS, mutual TLS and safe binding."""

from __future__ import annotations

import socket
import ssl
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rpyc

import client
from rpyc_host.cli import main
from rpyc_host.testing import Certificates, ServerProcess, running_host

TOKEN = "s3cret-token-0123456789abcdef"
DEMO = "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"


def token_config(*tokens: str) -> str:
    listed = ", ".join(f'"{t}"' for t in tokens)
    return DEMO + f"security: {{tokens: [{listed}]}}\n"


def tls_config(certs: Certificates, mutual: bool, token: str | None = None) -> str:
    ca = f', ca: "{certs.ca}"' if mutual else ""
    tokens = f', tokens: ["{token}"]' if token else ""
    return (
        DEMO + f'security: {{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"{ca}}}{tokens}}}\n'
    )


@pytest.fixture
def token_host() -> Iterator[tuple[str, int]]:
    with running_host(token_config(TOKEN, "another-token-0123456789")) as host:
        yield host.address("demo")


def still_serves(address: tuple[str, int], **kwargs: object) -> None:
    with client.connect(host=address[0], port=address[1], timeout=10, **kwargs) as conn:  # type: ignore[arg-type]
        assert conn.root.add(2, 2) == 4


def test_right_token_works_and_either_configured_token_is_accepted(token_host: tuple[str, int]) -> None:
    still_serves(token_host, token=TOKEN)
    still_serves(token_host, token="another-token-0123456789")


def test_wrong_token_is_refused_with_a_clear_error(token_host: tuple[str, int]) -> None:
    with pytest.raises(client.AuthError, match="the server refused the token: invalid token"):
        client.connect(host=token_host[0], port=token_host[1], token="wrong-token-0123456789")
    still_serves(token_host, token=TOKEN)


def test_missing_token_plain_rpyc_client_is_told_why(token_host: tuple[str, int]) -> None:
    conn = rpyc.connect(*token_host)
    with pytest.raises(ConnectionRefusedError, match="authentication required by 'demo'"):
        conn.root.add(1, 1)
    with pytest.raises(client.ConnectError, match="authentication required"):
        client.connect(host=token_host[0], port=token_host[1])
    still_serves(token_host, token=TOKEN)


def test_token_from_environment(token_host: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPYC_HOST_TOKEN", TOKEN)
    still_serves(token_host)


def test_failures_are_logged_without_the_token_counted_and_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with running_host(token_config(TOKEN)) as host:
        host_addr, port = host.address("demo")
        for _ in range(5):
            with pytest.raises(client.AuthError):
                client.connect(host=host_addr, port=port, token="not-the-token-0123456789")
        assert host.refusals.snapshot() == {"auth": 5}
        # The address is now refused outright, even with the right token, for a while.
        with pytest.raises(client.ConnectError, match=r"too many failed logins from 127\.0\.0\.1"):
            client.connect(host=host_addr, port=port, token=TOKEN, retries=0)
        assert host.refusals.snapshot()["throttle"] == 1
    text = caplog.text
    assert "refused demo connection from 127.0.0.1:" in text and "wrong token" in text
    assert TOKEN not in text and "not-the-token" not in text


def test_token_file_and_env_tokens(
    tmp_path: Path,
    write_config: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# one per line\nfile-token-0123456789abcdef\n")
    monkeypatch.setenv("DEMO_TOKEN", "env-token-0123456789abcdef")
    config = DEMO + f'security: {{tokens: ["${{DEMO_TOKEN}}"], token_file: "{token_file}"}}\n'
    with running_host(config) as host:
        address = host.address("demo")
        still_serves(address, token="file-token-0123456789abcdef")
        still_serves(address, token="env-token-0123456789abcdef")
    # --check never prints a token.
    assert main(["--config", str(write_config(config)), "--check"]) == 0
    out = capsys.readouterr().out
    assert "file-token" not in out and "env-token" not in out
    assert "tokens:\n  - '***'\n  - '***'" in out


def test_short_token_is_a_config_error(
    write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(token_config("short"))
    assert main(["--config", str(path), "--check"]) == 2
    assert "security.tokens[0]: token #1 is too short (5 characters)" in capsys.readouterr().err


def test_tls_with_plain_rpyc_ssl_connect_and_the_client_library(certs: Certificates) -> None:
    with running_host(tls_config(certs, mutual=False)) as host:
        address = host.address("demo")
        conn = rpyc.ssl_connect(address[0], address[1], ca_certs=str(certs.ca))
        assert conn.root.add(1, 2) == 3
        conn.close()
        still_serves(address, tls=True, ca=str(certs.ca))


def test_plaintext_to_a_tls_port_and_tls_to_a_plaintext_port(certs: Certificates) -> None:
    with running_host(tls_config(certs, mutual=False)) as tls_host, running_host(DEMO) as plain_host:
        tls_addr, plain_addr = tls_host.address("demo"), plain_host.address("demo")
        with pytest.raises(client.ConnectError, match=r"refused the connection|cannot connect"):
            client.connect(host=tls_addr[0], port=tls_addr[1], timeout=5)
        with pytest.raises(client.ConnectError, match=r"SSL|ssl|EOF|closed"):
            client.connect(host=plain_addr[0], port=plain_addr[1], tls=True, ca=str(certs.ca), timeout=5)
        assert tls_host.refusals.snapshot() == {"tls": 1}
        still_serves(tls_addr, tls=True, ca=str(certs.ca))
        still_serves(plain_addr)


def test_token_on_a_tls_port_without_tls(certs: Certificates) -> None:
    with running_host(tls_config(certs, mutual=False, token=TOKEN)) as host:
        address = host.address("demo")
        with pytest.raises(client.ConnectError):
            client.connect(host=address[0], port=address[1], token=TOKEN, timeout=5)
        still_serves(address, tls=True, ca=str(certs.ca), token=TOKEN)


def test_mutual_tls_requires_a_certificate_from_the_configured_ca(certs: Certificates) -> None:
    with running_host(tls_config(certs, mutual=True)) as host:
        address = host.address("demo")
        with pytest.raises(client.ConnectError):
            client.connect(host=address[0], port=address[1], tls=True, ca=str(certs.ca), timeout=5)
        with pytest.raises(client.ConnectError):
            client.connect(
                host=address[0],
                port=address[1],
                ca=str(certs.ca),
                cert=str(certs.rogue_cert),
                key=str(certs.rogue_key),
                timeout=5,
            )
        conn = rpyc.ssl_connect(
            address[0],
            address[1],
            ca_certs=str(certs.ca),
            certfile=str(certs.client_cert),
            keyfile=str(certs.client_key),
        )
        assert conn.root.ping() == "pong"
        conn.close()
        still_serves(address, ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))
        assert host.refusals.snapshot()["tls"] == 2


def test_tls_below_1_2_is_refused(certs: Certificates) -> None:
    with running_host(tls_config(certs, mutual=False)) as host:
        address = host.address("demo")
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1: the server must say no
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.1 is the point
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(address, timeout=5) as raw, pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname=address[0])
        still_serves(address, tls=True, ca=str(certs.ca))


def test_non_loopback_bind_needs_security(
    write_config: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    start_server: Callable[..., ServerProcess],
) -> None:
    exposed = "services:\n  demo: {class: services.demo:DemoService, port: 0, host: 0.0.0.0}\n"
    assert main(["--config", str(write_config(exposed)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "services.demo.host: '0.0.0.0' is reachable from other machines, and no security.tokens" in err
    proc = start_server(write_config(exposed + "security: {insecure: true}\n"))
    assert "security.insecure is true" in proc.log
    with rpyc.connect("127.0.0.1", proc.address("demo")[1]) as conn:
        assert conn.root.ping() == "pong"

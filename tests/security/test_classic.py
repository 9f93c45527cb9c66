"""The classic console: loopback, or remote only with its own switch and its own CA."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import rpyc

from rpyc_host.cli import main
from rpyc_host.config import parse_config
from rpyc_host.errors import ConfigError
from rpyc_host.testing import Certificates, make_certificates, running_host

DEMO = "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def with_console(certs: Certificates, classic: str, mutual: bool = True, tls: bool = True) -> str:
    """DEMO with services' TLS (mutual: client certificates from the services' CA) and a console."""
    security = ""
    if tls:
        ca = f', ca: "{certs.ca}"' if mutual else ""
        security = f'security: {{tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"{ca}}}}}\n'
    return DEMO + security + f"debug:\n  classic: {{enabled: true, port: 0, {classic}}}\n"


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_non_loopback_console_needs_allow_remote_even_with_mutual_tls(certs: Certificates) -> None:
    # A client certificate for the services must not be enough to get code execution.
    message = config_error(with_console(certs, "host: 0.0.0.0"))
    assert "debug.classic.host: '0.0.0.0' is not a loopback address" in message
    assert "add debug.classic.allow_remote: true and debug.classic.ca" in message


def test_allow_remote_alone_is_not_enough(certs: Certificates) -> None:
    message = config_error(with_console(certs, "host: 0.0.0.0, allow_remote: true"))
    assert "debug.classic.host: '0.0.0.0' is not a loopback address" in message
    assert "add debug.classic.ca" in message


def test_the_console_ca_must_be_its_own(certs: Certificates) -> None:
    message = config_error(with_console(certs, f'host: 0.0.0.0, allow_remote: true, ca: "{certs.ca}"'))
    assert "debug.classic.ca:" in message
    assert "is also security.tls.ca; give the console a CA of its own" in message


def test_the_console_ca_needs_a_server_certificate_and_a_real_file(
    certs: Certificates, tmp_path: Path
) -> None:
    no_tls = with_console(certs, f'allow_remote: true, host: 0.0.0.0, ca: "{certs.rogue_ca}"', tls=False)
    message = config_error(no_tls + "security: {insecure: true}\n")
    assert "debug.classic.ca: the console's TLS needs a server certificate: add security.tls" in message
    missing = tmp_path / "nope.crt"
    message = config_error(with_console(certs, f'ca: "{missing}"'))
    assert f"debug.classic.ca: '{missing}' is not a readable file" in message


def test_a_remote_console_with_its_own_ca_is_accepted(certs: Certificates) -> None:
    config = parse_config(with_console(certs, f'host: 0.0.0.0, allow_remote: true, ca: "{certs.rogue_ca}"'))
    assert config.classic.allow_remote and config.classic.ca == str(certs.rogue_ca)


def test_check_reports_the_rule_in_one_line(
    certs: Certificates, write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write_config(with_console(certs, "host: 0.0.0.0"))), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "debug.classic.allow_remote: true" in err


def test_only_a_certificate_from_the_consoles_own_ca_opens_a_console(
    certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    # The second CA of make_certificates plays the console's own CA here.
    console_ca, console_cert, console_key = certs.rogue_ca, certs.rogue_cert, certs.rogue_key
    with running_host(with_console(certs, f'host: 127.0.0.1, ca: "{console_ca}"')) as host:
        assert host.classic is not None
        address = host.classic.address
        with pytest.raises((ssl.SSLError, EOFError, ConnectionError)):
            rpyc.classic.ssl_connect(address[0], address[1], ca_certs=str(certs.ca)).eval("1")
        with pytest.raises((ssl.SSLError, EOFError, ConnectionError)):
            # A valid client certificate for the services, from the services' CA.
            rpyc.classic.ssl_connect(
                address[0],
                address[1],
                ca_certs=str(certs.ca),
                certfile=str(certs.client_cert),
                keyfile=str(certs.client_key),
            ).eval("1")
        conn = rpyc.classic.ssl_connect(
            address[0],
            address[1],
            ca_certs=str(certs.ca),
            certfile=str(console_cert),
            keyfile=str(console_key),
        )
        assert conn.eval("6 * 7") == 42
        conn.close()
        # The services still take their own client certificates.
        services = rpyc.ssl_connect(
            *host.address("demo"),
            ca_certs=str(certs.ca),
            certfile=str(certs.client_cert),
            keyfile=str(certs.client_key),
        )
        assert services.root.ping() == "pong"
        services.close()
    assert "classic console session opened by ('127.0.0.1'" in caplog.text


def test_a_loopback_console_without_a_ca_is_plain(certs: Certificates) -> None:
    with running_host(DEMO + "debug:\n  classic: {enabled: true, host: 127.0.0.1, port: 0}\n") as host:
        assert host.classic is not None
        conn = rpyc.classic.connect(*host.classic.address)
        assert conn.eval("1 + 1") == 2
        conn.close()

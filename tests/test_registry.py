"""The registrar: hosts register their services with rpyc's registry, keep them fresh, and
unregister on stop; it never broadcasts."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from rpyc.utils.registry import UDPRegistryClient, UDPRegistryServer

from rpyc_host.config import parse_config
from rpyc_host.errors import StartupError
from rpyc_host.registry import Registrar
from rpyc_host.testing import RegistryProcess, running_host, wait_until


def config_text(registry: tuple[str, int], mode: str = "tcp", interval: float = 0.3) -> str:
    return f"""
services:
  demo: {{class: services.demo:DemoService, port: 0, aliases: [adder, calc]}}
registry:
  {{enabled: true, mode: {mode}, host: {registry[0]}, port: {registry[1]}, interval: {interval}, timeout: 1}}
"""


def test_registers_every_name_refreshes_and_unregisters(registry: RegistryProcess) -> None:
    with running_host(config_text(registry.address)) as host:
        address = host.address("demo")
        for name in ("DEMO", "ADDER", "calc"):  # rpyc name, config key, aliases; any case
            wait_until(lambda n=name: address in registry.discover(n), 5, f"{name} registered")
        # The registry restarts empty on the same port: entries come back within an interval.
        registry.stop()
        registry.start()
        wait_until(lambda: address in registry.discover("ADDER"), 5, "re-registration after a restart")
    assert registry.discover("DEMO") == () and registry.discover("ADDER") == ()


def test_host_starts_while_the_registry_is_down_and_registers_later(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rpyc_host.registry")
    reg = RegistryProcess()
    reg.start()
    address = reg.address
    reg.stop()  # the port is known and nothing listens on it
    with running_host(config_text(address, interval=0.2)) as host:
        wait_until(lambda: "did not answer" in caplog.text, 5, "a warning about the registry")
        reg2 = RegistryProcess(port=address[1]).start()
        try:
            wait_until(lambda: host.address("demo") in reg2.discover("DEMO"), 5, "late registration")
            # Logged once the registrar's round is over, which can be just after the entry shows.
            wait_until(lambda: "is back" in caplog.text, 5, "the registry-is-back line")
        finally:
            reg2.stop()


def fake_host(*addresses: tuple[str, int]) -> Any:
    hosted = [
        SimpleNamespace(config=SimpleNamespace(name=f"s{i}", aliases=()), address=address, service=object())
        for i, address in enumerate(addresses)
    ]
    return SimpleNamespace(hosted=hosted)


def test_advertise_host_must_be_an_address_of_this_machine() -> None:
    config = parse_config(
        "registry: {enabled: true, host: 127.0.0.1, port: 18811, advertise_host: 203.0.113.7}"
    )
    with pytest.raises(
        StartupError, match=r"cannot advertise s0 at '203\.0\.113\.7'.*address of this machine"
    ):
        Registrar(config, fake_host(("0.0.0.0", 4000)))


def test_advertise_host_is_used_for_wildcard_binds_only() -> None:
    config = parse_config(
        "registry: {enabled: true, host: 127.0.0.1, port: 18811, advertise_host: 127.0.0.1}"
    )
    registrar = Registrar(config, fake_host(("0.0.0.0", 4000), ("127.0.0.2", 4001)))
    assert [(e.source, e.port, e.names) for e in registrar.entries] == [
        ("127.0.0.1", 4000, ("S0",)),
        ("127.0.0.2", 4001, ("S1",)),
    ]


def test_loopback_service_is_not_registered_with_a_remote_registry(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config("registry: {enabled: true, host: 192.0.2.1, port: 18811}")
    registrar = Registrar(config, fake_host(("127.0.0.1", 4000)))
    assert registrar.entries == ()
    assert "other machines cannot reach" in caplog.text


def test_udp_mode_is_unicast_to_the_registry() -> None:
    server = UDPRegistryServer(host="127.0.0.1", port=0, allow_listing=True)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        address = ("127.0.0.1", server.port)
        with running_host(config_text(address, mode="udp")) as host:
            assert host.registrar.client.bcast is False
            lookup = UDPRegistryClient(ip="127.0.0.1", port=server.port, timeout=1, bcast=False)
            wait_until(lambda: host.address("demo") in lookup.discover("CALC"), 5, "UDP registration")
        wait_until(lambda: lookup.discover("CALC") == (), 5, "UDP unregistration")
    finally:
        server.close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_udp_to_a_broadcast_address_is_refused() -> None:
    with pytest.raises(Exception, match="broadcast"):
        parse_config("registry: {enabled: true, mode: udp, host: 255.255.255.255}")

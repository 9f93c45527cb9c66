"""pytest fixtures for testing your own services (loaded automatically once rpyc-host is installed).

    def test_level(rpyc_service):
        served = rpyc_service(InventoryService, options={"warehouse": "east"})
        assert served.root.level("sku-1") == 0              # a real server on 127.0.0.1, port 0

    def test_level_in_process(rpyc_local):
        svc = rpyc_local(InventoryService, warehouse="east")
        assert svc.root.level("sku-1") == 0                 # no server: direct calls, hooks run

- ``rpyc_service(cls_or_path, options=None, server_type="threaded", config="")``: hosts the
  class (an ``rpyc.Service`` or any plain class, defined at module level) in this process on a
  free port and returns a :class:`Served` (``conn``, ``root``, ``host``, ``address``).
  ``config`` is extra YAML (``security:``, ``limits:`` ...) for the generated config file.
- ``rpyc_host_config(text)``: runs a whole configuration (ports 0) and returns the Host.
- ``rpyc_local(cls, **options)``: a :class:`rpyc_host.testing.LocalService`.

Everything a fixture starts is stopped and closed when the test ends.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from .host import Host
from .testing import LocalService, running_host
from .wire import dial


@dataclass
class Served:
    """A service hosted for one test: the client connection, its root, the host and its address."""

    conn: Any
    root: Any
    host: Host
    address: tuple[str, int]


def _class_path(service: type | str) -> str:
    if isinstance(service, str):
        return service
    if "<locals>" in service.__qualname__:
        raise ValueError(f"{service.__qualname__} is defined inside a function; define it at module level")
    return f"{inspect.getmodule(service).__name__}:{service.__qualname__}"  # type: ignore[union-attr]


@pytest.fixture
def rpyc_service() -> Iterator[Callable[..., Served]]:
    with ExitStack() as stack:

        def serve(
            service: type | str,
            options: dict[str, Any] | None = None,
            server_type: str = "threaded",
            config: str = "",
            token: str | None = None,
        ) -> Served:
            lines = [
                f"server: {{type: {server_type}}}",
                "services:",
                "  svc:",
                f"    class: {_class_path(service)!r}",
                "    port: 0",
                f"    options: {dict(options or {})!r}",
                config,
            ]
            host = stack.enter_context(running_host("\n".join(lines) + "\n", source="<rpyc_service fixture>"))
            address = host.address("svc")
            conn = dial(address[0], address[1], token=token, timeout=30)
            stack.callback(conn.close)
            return Served(conn, conn.root, host, address)

        yield serve


@pytest.fixture
def rpyc_host_config() -> Iterator[Callable[[str], Host]]:
    with ExitStack() as stack:
        yield lambda text: stack.enter_context(running_host(text, source="<rpyc_host_config fixture>"))


@pytest.fixture
def rpyc_local() -> Iterator[Callable[..., LocalService]]:
    with ExitStack() as stack:
        yield lambda cls, **options: stack.enter_context(LocalService(cls, **options))

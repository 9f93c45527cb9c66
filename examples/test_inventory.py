"""How a team tests its own service with rpyc-host's pytest plugin (no server plumbing).

Run with: .venv/bin/python -m pytest examples/test_inventory.py
"""

from __future__ import annotations

import pytest

from examples.inventory import InventoryService


def test_over_a_real_connection(rpyc_service):
    served = rpyc_service(InventoryService, options={"warehouse": "east", "start_stock": 5})
    assert served.root.level("sku-1") == 5
    assert served.root.receive("sku-1", 3) == 8
    assert served.root.moves_on_this_connection() == 1
    with pytest.raises(ValueError, match="units must be positive"):
        served.root.receive("sku-1", 0)


def test_on_every_server_type(rpyc_service):
    for server_type in ("threaded", "threadpool", "forking"):
        served = rpyc_service(InventoryService, server_type=server_type)
        assert served.root.receive("a", 1) == 1
        assert dict(served.root.health())["status"] == "ok"


def test_in_process(rpyc_local):
    svc = rpyc_local(InventoryService, start_stock=2)
    assert svc.root.receive("b", 2) == 4
    assert svc.root.moves_on_this_connection() == 1
    with pytest.raises(AttributeError):
        svc.root.on_connect  # noqa: B018 - not exposed, so refused


def test_bad_options_are_reported(rpyc_local):
    from rpyc_host.errors import ConfigError

    with pytest.raises(ConfigError, match="start_stock must be >= 0"):
        rpyc_local(InventoryService, start_stock=-1)

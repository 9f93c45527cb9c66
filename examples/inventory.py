"""A user's own service, as a team would write it: the subject of examples/test_inventory.py."""

from __future__ import annotations

import threading
from typing import Any

import rpyc


@rpyc.service
class InventoryService(rpyc.Service):
    """Stock levels for one warehouse."""

    def __init__(self, warehouse: str = "main", start_stock: int = 0) -> None:
        if start_stock < 0:
            raise ValueError(f"start_stock must be >= 0, got {start_stock}")
        self.warehouse = warehouse
        self.start_stock = start_stock
        self._stock: dict[str, int] = {}
        self._lock = threading.Lock()

    def on_connect(self, conn: Any) -> None:
        self.moves = 0  # per connection

    @rpyc.exposed
    def level(self, sku: str) -> int:
        """Units in stock for one SKU."""
        return self._stock.get(sku, self.start_stock)

    @rpyc.exposed
    def receive(self, sku: str, units: int) -> int:
        """Add units; returns the new level."""
        if units <= 0:
            raise ValueError(f"units must be positive, got {units}")
        with self._lock:
            self._stock[sku] = self.level(sku) + units
            self.moves += 1
            return self._stock[sku]

    @rpyc.exposed
    def moves_on_this_connection(self) -> int:
        return self.moves

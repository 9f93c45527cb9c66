"""What a client may hold: one ledger per service, one account per connection.

Every resource a connection can keep busy (open file handles, upload bytes in flight, pending
side connections, ...) is counted here against two caps from ``limits:``: one for the whole
service and one for each connection. A refusal names the limit and its value, is counted by
limit for ``/metrics``, and changes nothing; a connection's account is settled when it closes,
so whatever it still held is given back even if the service forgot to.

Usage (the host builds the ledger; a service reaches its connection's account)::

    ledger = Ledger("files", {"open_transfers": Cap(512, 32)})
    account = ledger.open_account("files-7")
    account.acquire("open_transfers")          # LimitExceeded past either cap
    account.release("open_transfers")
    account.close()                            # gives back anything still held

Inside a service: ``account_of(conn)`` in ``on_connect`` (None when the connection does not
come from the host, e.g. in unit tests with a stand-in connection).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONFIG_KEY = "host_account"


class LimitExceeded(Exception):
    """A request would pass a cap; nothing was taken.

    ``limit`` is the ``limits:`` key that was hit (``max_open_transfers_per_connection``),
    ``value`` its configured value.
    """

    def __init__(self, limit: str, value: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


@dataclass(frozen=True)
class Cap:
    """Caps on one resource: for the whole service and for one connection (0: no cap)."""

    service: int
    connection: int


class Ledger:
    """The counts of one service; thread-safe (rpyc threads, pool workers, bulk threads)."""

    def __init__(self, service: str, caps: dict[str, Cap], units: dict[str, str] | None = None) -> None:
        self.service = service
        self.caps = dict(caps)
        self.units = dict(units or {})
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.refusals: Counter[str] = Counter()  # by limit key

    def open_account(self, owner: str) -> Account:
        return Account(self, owner)

    def held(self, resource: str) -> int:
        with self._lock:
            return self._held[resource]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def refusal_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.refusals)

    def count_refusal(self, limit: str) -> None:
        """Count a refusal by a cap kept outside the ledger (a service's own option, or
        ``request_timeout``), for /metrics."""
        with self._lock:
            self.refusals[limit] += 1

    def _take(self, account: Account, resource: str, amount: int) -> None:
        cap = self.caps.get(resource)
        with self._lock:
            if cap is not None:
                if cap.connection and account._held[resource] + amount > cap.connection:
                    self._refuse(resource, cap.connection, "_per_connection", "this connection")
                if cap.service and self._held[resource] + amount > cap.service:
                    self._refuse(resource, cap.service, "", f"service {self.service!r}")
            self._held[resource] += amount
            account._held[resource] += amount

    def _refuse(self, resource: str, value: int, suffix: str, scope: str) -> None:
        limit = f"max_{resource}{suffix}"
        self.refusals[limit] += 1
        unit = self.units.get(resource, resource.replace("_", " "))
        raise LimitExceeded(
            limit,
            value,
            f"{scope} already holds the most {unit} allowed (limits.{limit}: {value}); close some and retry",
        )

    def _give(self, account: Account, resource: str, amount: int) -> None:
        with self._lock:
            amount = min(amount, account._held[resource])
            account._held[resource] -= amount
            self._held[resource] -= amount


class Account:
    """What one connection holds; see the module docstring."""

    def __init__(self, ledger: Ledger, owner: str) -> None:
        self.ledger = ledger
        self.owner = owner
        self._held: Counter[str] = Counter()
        self.closed = False
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the account closes, before its holdings are given back (to
        close what holds them, e.g. open streams); at once if it is already closed."""
        if self.closed:
            callback()
            return
        self._on_close.append(callback)

    def acquire(self, resource: str, amount: int = 1) -> None:
        """Take ``amount`` of ``resource``; LimitExceeded (and nothing taken) past a cap."""
        if self.closed:
            raise LimitExceeded("closed", 0, f"connection {self.owner} is closed")
        self.ledger._take(self, resource, amount)

    def release(self, resource: str, amount: int = 1) -> None:
        """Give back ``amount`` (never more than this account holds)."""
        self.ledger._give(self, resource, amount)

    def held(self, resource: str) -> int:
        with self.ledger._lock:
            return self._held[resource]

    def close(self) -> None:
        """Close what registered with :meth:`on_close`, then give back everything; later
        acquires are refused."""
        self.closed = True
        callbacks, self._on_close = self._on_close, []
        try:
            for callback in callbacks:
                callback()
        finally:
            for resource in list(self._held):
                self.ledger._give(self, resource, self._held[resource])


def account_of(conn: Any) -> Account | None:
    """The host's account for an rpyc connection (None when the host did not make it)."""
    config = getattr(conn, "_config", None)
    if not isinstance(config, dict):
        return None
    account = config.get(CONFIG_KEY)
    return account if isinstance(account, Account) else None


def caps_from_limits(limits: Any) -> dict[str, Cap]:
    """Caps for every ``max_<resource>`` / ``max_<resource>_per_connection`` pair of a limits section."""
    caps: dict[str, Cap] = {}
    for name in (f.name for f in dataclasses.fields(limits)):
        if not name.startswith("max_") or name.endswith("_per_connection"):
            continue
        per_connection = getattr(limits, f"{name}_per_connection", None)
        if per_connection is not None:
            caps[name[len("max_") :]] = Cap(int(getattr(limits, name)), int(per_connection))
    return caps

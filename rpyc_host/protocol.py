"""The rpyc connection settings and connection class the host serves with.

rpyc's defaults send server tracebacks and versions to clients; the host keeps them in its own
log instead. Attribute access is limited to exposed names and rpyc's safe dunders; pickling,
setattr and delattr stay off.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rpyc.core.protocol import Connection

SAFE_PROTOCOL: dict[str, Any] = {
    "allow_safe_attrs": True,
    "allow_exposed_attrs": True,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_pickle": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "include_local_traceback": False,
    "include_local_version": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "instantiate_oldstyle_exceptions": False,
    # rpyc logs every remote exception with a traceback at DEBUG; HostConnection logs them.
    "log_exceptions": False,
    "sync_request_timeout": 30,
}


class InflightTracker:
    """Counts requests being dispatched, so a graceful stop can wait for them to finish.

    enter/exit run on every request, so they take a plain lock and nothing else; waiting
    (only at shutdown) polls.
    """

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def enter(self) -> None:
        with self._lock:
            self._count += 1

    def exit(self) -> None:
        with self._lock:
            self._count -= 1

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


class HostConnection(Connection):
    """An rpyc ``Connection`` that counts requests in flight and logs remote errors locally.

    The host passes ``host_tracker`` (an :class:`InflightTracker`) and ``host_logger`` in the
    connection config.
    """

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        tracker: InflightTracker | None = self._config.get("host_tracker")
        if tracker is None:
            super()._dispatch_request(seq, raw_args)
            return
        tracker.enter()
        try:
            super()._dispatch_request(seq, raw_args)
        finally:
            tracker.exit()

    def _box_exc(self, typ: type[BaseException], val: BaseException, tb: Any) -> Any:
        logger: logging.Logger | None = self._config.get("host_logger")
        if logger is not None and typ is not StopIteration:
            # User errors (bad arguments, missing files) are routine; keep their tracebacks at DEBUG
            # and show unexpected ones at WARNING, so the server log has what the client does not.
            routine = isinstance(val, ValueError | TypeError | LookupError | OSError | AttributeError)
            level = logging.DEBUG if routine else logging.WARNING
            logger.log(
                level,
                "[%s] call failed: %s: %s",
                self._config.get("connid"),
                typ.__name__,
                val,
                exc_info=(typ, val, tb),
            )
        return super()._box_exc(typ, val, tb)

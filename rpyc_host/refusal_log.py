"""Rate-limited log lines for refusals: one line per address and kind per interval, with a count.

A hostile address can make the host refuse it thousands of times a second; a log line each time
would cost more than the refusal (formatting and writing hold the GIL, and fill the disk). The
first refusal of an address and kind is logged at once; the next ones within ``every`` seconds
are only counted, and the first line after the interval says how many were not logged. The
counters in ``/metrics`` still count every refusal.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

LOG_EVERY = 10.0
MAX_TRACKED = 10_000  # (address, kind) pairs remembered; past it, the stale ones are dropped


class RefusalLog:
    """Writes refusal lines to ``logger`` at WARNING, at most one per (address, kind) per ``every`` s.

    Usage::

        refusals = RefusalLog(log)
        refusals.refused(ip, "limit", "refused %s connection from %s: %s", service, peer, reason)
    """

    def __init__(
        self,
        logger: logging.Logger,
        every: float = LOG_EVERY,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self.max_tracked = max_tracked
        self._clock = clock
        # (address, kind) -> (when last logged, refusals not logged since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def refused(self, ip: str, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless this address and kind were logged within the interval;
        True if a line was written."""
        now = self._clock()
        key = (ip, kind)
        with self._lock:
            last, quiet = self._seen.get(key, (-math.inf, 0))
            if now - last < self.every:
                self._seen[key] = (last, quiet + 1)
                return False
            if key not in self._seen and len(self._seen) >= self.max_tracked:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.every}
            self._seen[key] = (now, 0)
        if quiet:
            message += " (%d more from this address not logged in the last %.0f s)"
            args = (*args, quiet, now - last)
        self.logger.warning(message, *args)
        return True

    def unlogged(self, ip: str, kind: str) -> int:
        """Refusals of this address and kind counted but not yet written in a line."""
        with self._lock:
            return self._seen.get((ip, kind), (0.0, 0))[1]

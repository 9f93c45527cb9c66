"""Bearer tokens at the gateway, throttled together with the rpyc ports.

The host has one :class:`~rpyc_host.security.AuthThrottle` (``host.throttle``): a wrong or
missing token here counts against the address as a failed rpyc handshake does, and an address
blocked by either door gets ``429`` with ``Retry-After`` here (and is refused on the rpyc
ports). Refused tokens are logged with the peer address, at most once per address every
:data:`LOG_EVERY` seconds (with the number not logged since), so guessing cannot flood the log.
"""

from __future__ import annotations

import hmac
import logging
import math

from ..refusal_log import RefusalLog
from ..security import AuthThrottle
from .http import HTTPError

log = logging.getLogger("rpyc_host.gateway")

LOG_EVERY = 10.0


class Doorman:
    """Checks a request's ``Authorization`` header and the shared throttle for its address."""

    def __init__(self, tokens: tuple[str, ...], throttle: AuthThrottle) -> None:
        self.tokens = tuple(t.encode() for t in tokens)
        self.needed = bool(self.tokens)  # read per request: an attribute, not a property
        self.throttle = throttle
        self._refusal_log = RefusalLog(log, LOG_EVERY)

    def screen(self, ip: str) -> None:
        """HTTPError(429) while the address is blocked after repeated failed logins."""
        blocked = self.throttle.check(ip)
        if blocked:
            wait = max(1, math.ceil(blocked))
            raise HTTPError(
                429,
                f"too many failed logins from {ip}; try again in {wait} s",
                {"Retry-After": str(wait)},
                reason="throttled",
            )

    def check(self, ip: str, port: int, header: str) -> None:
        """Pass, or HTTPError(401) for a missing or wrong token (counted against ``ip``)."""
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare with every token, always, so the time taken does not say which one was close.
        ok = False
        for expected in self.tokens:
            ok |= hmac.compare_digest(given, expected)
        if ok and given:
            return
        self.throttle.failed(ip)
        self._log_refusal(ip, port, "missing token" if not given else "wrong token")
        raise HTTPError(
            401,
            "missing or wrong token: send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": 'Bearer realm="rpyc-host"'},
            reason="auth",
        )

    def succeeded(self, ip: str) -> None:
        self.throttle.succeeded(ip)

    def _log_refusal(self, ip: str, port: int, why: str) -> None:
        self._refusal_log.refused(
            ip, "auth", "gateway: refused a request from %s:%d: %s (401)", ip, port, why
        )

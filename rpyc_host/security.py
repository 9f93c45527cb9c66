"""Who may connect: TLS, a token handshake, per-address throttling, and clear refusals.

The handshake runs on a new connection before rpyc sees a byte:

1. TLS (``security.tls``): TLS 1.2 or newer; with ``ca``, the client must present a
   certificate signed by it (mutual TLS). Plain ``rpyc.ssl_connect`` works.
2. Token (``security.tokens``): the client sends it in the frame :mod:`rpyc_host.wire.handshake`
   describes; the server compares it in constant time with every configured token and answers
   with a status frame. Tokens are never logged.

A client that skips the token (plain ``rpyc.connect``) has sent an rpyc request instead; it
is answered with an rpyc exception for that request (``ConnectionRefusedError: ...``), so even
a client without this library reads why. Connections refused for limits get the same.

Error handling: every refusal is counted, and logged with the peer and the reason (one line
per address and kind every 10 s, with the number not logged since); an address with repeated
token failures is refused outright for a growing period.
"""

from __future__ import annotations

import hmac
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from .config import LimitsSection, SecurityConfig
from .errors import Refused
from .refusal_log import RefusalLog
from .wire.handshake import (
    LENGTH,
    MAX_TOKEN_BYTES,
    STATUS_OK,
    STATUS_REFUSED,
    TOKEN_MAGIC,
    recv_exact,
    rpyc_refusal_frame,
    status_frame,
)
from .wire.tls import server_context

log = logging.getLogger("rpyc_host.security")

# Throttling: after this many failures from one address within the window, refuse it for a while.
FAILURES_ALLOWED = 5
FAILURE_WINDOW = 60.0
MAX_BLOCK = 300.0


# -- refusals ---------------------------------------------------------------------------------


class Closer:
    """Closes refused sockets politely from one background thread.

    Closing a socket with unread data makes the kernel send RST, which can destroy the refusal
    message before the client reads it; so the write side is shut, what the client still sends
    is read and dropped, and the socket is closed on EOF or after ``linger`` seconds.
    """

    def __init__(self, linger: float = 2.0) -> None:
        self.linger = linger
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._deadlines: dict[socket.socket, float] = {}
        self._fds: dict[socket.socket, int] = {}
        # fd -> the socket registered under it: a refusal flood leaves thousands lingering, and
        # the accept thread must not search them all for each new one.
        self._by_fd: dict[int, socket.socket] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="refusal-closer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and close what still lingers (the process-wide closer never is)."""
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for sock in list(self._deadlines):
                sock.close()
            self._deadlines.clear()
            self._fds.clear()
            self._by_fd.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def close_after(self, sock: socket.socket, data: bytes = b"") -> None:
        try:
            sock.settimeout(1.0)
            if data:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        with self._lock:
            # Whoever else holds a socket may close it while it lingers here (a server stopping
            # closes its clients): the kernel then forgets it, the selector does not, and the
            # fd number comes back with a new socket. So the fd is kept, and a stale one freed.
            self._forget_fd(sock.fileno())
            try:
                fd = self._fds[sock] = self._selector.register(sock, selectors.EVENT_READ).fd
            except (ValueError, OSError):  # closed meanwhile
                sock.close()
                return
            self._by_fd[fd] = sock
            self._deadlines[sock] = time.monotonic() + self.linger
        self._wake_w.send(b"x")

    def _forget_fd(self, fd: int) -> None:
        stale = self._by_fd.pop(fd, None)
        if stale is not None:
            self._fds.pop(stale, None)
            self._deadlines.pop(stale, None)
            stale.close()
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                timeout = (
                    min((d for d in self._deadlines.values()), default=time.monotonic() + 1)
                    - time.monotonic()
                )
            for key, _ in self._selector.select(max(0.0, timeout)):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    continue
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(65536):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._drop(sock)
            now = time.monotonic()
            with self._lock:
                expired = [s for s, d in self._deadlines.items() if d <= now]
            for sock in expired:
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            if self._deadlines.pop(sock, None) is None:
                return
            fd = self._fds.pop(sock, -1)
            if self._by_fd.get(fd) is sock:
                del self._by_fd[fd]
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        sock.close()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._deadlines)


_CLOSER: Closer | None = None
_CLOSER_LOCK = threading.Lock()


def closer() -> Closer:
    global _CLOSER
    with _CLOSER_LOCK:
        if _CLOSER is None:
            _CLOSER = Closer()
        return _CLOSER


# -- counting ---------------------------------------------------------------------------------


@dataclass
class RefusalCounts:
    """Refused connections by reason kind, and token failures; shared by a host's servers."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, service: str = "") -> None:
        with self.lock:
            self.counts[(service, kind)] += 1

    def snapshot(self) -> dict[str, int]:
        """Refusals by kind, all services together."""
        totals: Counter[str] = Counter()
        with self.lock:
            for (_, kind), count in self.counts.items():
                totals[kind] += count
        return dict(totals)

    def by_service(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return dict(self.counts)


class AuthThrottle:
    """Refuses an address outright after repeated token failures, for a growing period."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._blocked_until: dict[str, float] = {}
        self._strikes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check(self, ip: str) -> float:
        """Seconds this address is still blocked for (0 when it may try)."""
        with self._lock:
            left = self._blocked_until.get(ip, 0.0) - time.monotonic()
            return max(0.0, left)

    def failed(self, ip: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._failures[ip]
            recent.append(now)
            while recent and recent[0] < now - FAILURE_WINDOW:
                recent.popleft()
            if len(recent) >= FAILURES_ALLOWED:
                self._strikes[ip] += 1
                block = min(MAX_BLOCK, 2.0 ** self._strikes[ip])
                self._blocked_until[ip] = now + block
                recent.clear()
                log.warning(
                    "%s: %d failed logins within %.0f s: refusing it for %.0f s",
                    ip,
                    FAILURES_ALLOWED,
                    FAILURE_WINDOW,
                    block,
                )

    def succeeded(self, ip: str) -> None:
        with self._lock:
            self._failures.pop(ip, None)
            self._strikes.pop(ip, None)


# -- the handshake ----------------------------------------------------------------------------


def server_tls_context(config: SecurityConfig) -> ssl.SSLContext | None:
    """The server TLS context for ``security.tls``, or None without TLS."""
    tls = config.tls
    return None if tls is None else server_context(tls.cert, tls.key, tls.ca)


class Gatekeeper:
    """Runs the TLS and token handshake for one service's new connections."""

    def __init__(
        self,
        security: SecurityConfig,
        limits: LimitsSection,
        refusals: RefusalCounts,
        throttle: AuthThrottle,
        service: str,
    ) -> None:
        self.tokens = [t.encode("utf-8") for t in security.tokens]
        self.tls = server_tls_context(security)
        self.limits = limits
        self.refusals = refusals
        self.throttle = throttle
        self.service = service
        self.refusal_log = RefusalLog(log)

    def reconfigure(
        self, security: SecurityConfig, limits: LimitsSection, tls: ssl.SSLContext | None
    ) -> None:
        """New tokens, limits and (when TLS was on) certificates, for connections from now on;
        turning TLS on or off needs a restart."""
        self.tokens = [t.encode("utf-8") for t in security.tokens]
        if self.tls is not None and tls is not None:
            self.tls = tls
        self.limits = limits

    @property
    def needed(self) -> bool:
        """Whether new connections have anything to do before rpyc takes over."""
        return bool(self.tokens) or self.tls is not None

    def screen(self, ip: str) -> None:
        """Cheap checks at accept time (in the accept thread)."""
        blocked = self.throttle.check(ip)
        if blocked:
            raise Refused(
                f"address blocked for {blocked:.0f} s after repeated failed logins",
                f"too many failed logins from {ip}; try again in {blocked:.0f} s",
                "throttle",
            )

    def handshake(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        """TLS then token; returns (socket to use, credentials). Raises Refused."""
        peer = _peer_ip(sock)
        credentials: dict[str, Any] = {}
        sock.settimeout(self.limits.handshake_timeout)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                raise Refused(f"TLS handshake failed: {reason}", "", "tls") from None
            cert: Any = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            if cert:
                credentials["subject"] = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
        if self.tokens:
            self._check_token(sock, peer)
            credentials["token"] = True
        sock.settimeout(None)
        return sock, credentials or None

    def _check_token(self, sock: socket.socket, peer: str) -> None:
        try:
            magic = recv_exact(sock, len(TOKEN_MAGIC))
        except (OSError, EOFError) as exc:
            raise Refused(f"no token sent ({_why(exc)})", "", "auth") from None
        if magic != TOKEN_MAGIC:
            # A plain rpyc client: its first request is waiting for an answer.
            self.throttle.failed(peer)
            raise Refused(
                "missing token",
                f"authentication required by {self.service!r}: connect with a token, e.g. "
                "client.connect(..., token=...) or RPYC_HOST_TOKEN",
                "auth",
            )
        try:
            (length,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
            if length > MAX_TOKEN_BYTES:
                raise Refused(f"token of {length} bytes", "token too long", "auth", after_token=True)
            offered = recv_exact(sock, length)
        except (OSError, EOFError) as exc:
            raise Refused(f"incomplete token ({_why(exc)})", "", "auth") from None
        # Compare against every token, without stopping early, so timing says nothing.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(offered, token)
        if not matched:
            self.throttle.failed(peer)
            raise Refused("wrong token", "invalid token", "auth", after_token=True)
        self.throttle.succeeded(peer)
        sock.sendall(status_frame(STATUS_OK, "ok"))

    def refuse(self, sock: socket.socket, refusal: Refused, peer: Any) -> None:
        """Log, count and close a refused connection, telling the client why where it can listen:
        a status frame once its token was read, an rpyc exception frame before that."""
        self.refusals.add(refusal.kind, self.service)
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        self.refusal_log.refused(
            ip,
            refusal.kind,
            "refused %s connection from %s: %s",
            self.service,
            _fmt_peer(peer),
            refusal.reason,
        )
        if not refusal.message:
            closer().close_after(sock)
        elif refusal.after_token:
            closer().close_after(sock, status_frame(STATUS_REFUSED, refusal.message))
        else:
            closer().close_after(sock, rpyc_refusal_frame(refusal.message))


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__


def _peer_ip(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _fmt_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)

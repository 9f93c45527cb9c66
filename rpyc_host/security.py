"""Who may connect: TLS, a token handshake, per-address throttling, and clear refusals.

The handshake runs on a new connection before rpyc sees a byte:

1. TLS (``security.tls``): TLS 1.2 or newer; with ``ca``, the client must present a
   certificate signed by it (mutual TLS). Plain ``rpyc.ssl_connect`` works.
2. Token (``security.tokens``): the client sends ``RPYHTOKEN1`` + a 2-byte length + the token;
   the server compares it in constant time with every configured token and answers ``RPYH`` +
   one status byte (0 accepted, 1 refused) + a 2-byte length + a UTF-8 message. A connection
   refused before its token was read (limits) is answered with an rpyc exception frame
   instead, which the client library tells apart by the missing ``RPYH``. Tokens are never
   logged.

A client that skips the token (plain ``rpyc.connect``) has sent an rpyc request instead; it
is answered with an rpyc exception for that request (``ConnectionRefusedError: ...``), so even
a client without this library reads why. Connections refused for limits get the same.

Error handling: every refusal is logged with the peer and the reason, and counted; an
address with repeated token failures is refused outright for a growing period.
"""

from __future__ import annotations

import hmac
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from rpyc.core import brine, consts

from .config import LimitsSection, SecurityConfig

log = logging.getLogger("rpyc_host.security")

TOKEN_MAGIC = b"RPYHTOKEN1"
# An rpyc frame starts with its length; "RPYH" would announce a 1.3 GiB frame, which no host sends.
STATUS_MAGIC = b"RPYH"
_LEN = struct.Struct("!H")
STATUS_OK, STATUS_REFUSED = 0, 1
MAX_TOKEN_BYTES = 4096

# Throttling: after this many failures from one address within the window, refuse it for a while.
FAILURES_ALLOWED = 5
FAILURE_WINDOW = 60.0
MAX_BLOCK = 300.0


class Refused(Exception):
    """A connection was refused; ``reason`` is for the log, ``message`` for the client."""

    def __init__(self, reason: str, message: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.kind = kind  # "auth", "tls", "limit", "throttle"


# -- refusals ---------------------------------------------------------------------------------


def rpyc_refusal_frame(message: str) -> bytes:
    """An rpyc frame answering a fresh connection's first request (seq 0) with an exception."""
    # Built by hand rather than with vinegar.dump: an OSError's None attributes would make the
    # client's copy print "[Errno None] None: None -> None" instead of the message.
    exc_info = (("builtins", "ConnectionRefusedError"), (message,), (), "<refused by the server>")
    payload = brine.I1.pack(consts.MSG_EXCEPTION) + brine.dump((0, exc_info))
    return struct.pack("!LB", len(payload), 0) + payload + b"\n"


def status_frame(status: int, message: str) -> bytes:
    """The server's answer to a token: ``RPYH``, status byte, 2-byte length, UTF-8 message."""
    data = message.encode("utf-8")[:1000]
    return STATUS_MAGIC + bytes([status]) + _LEN.pack(len(data)) + data


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
        self._thread = threading.Thread(target=self._run, name="refusal-closer", daemon=True)
        self._thread.start()

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
            self._deadlines[sock] = time.monotonic() + self.linger
            self._selector.register(sock, selectors.EVENT_READ)
        self._wake_w.send(b"x")

    def _run(self) -> None:
        while True:
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
            self._selector.unregister(sock)
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
    tls = config.tls
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


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
            (length,) = _LEN.unpack(recv_exact(sock, _LEN.size))
            if length > MAX_TOKEN_BYTES:
                raise Refused(f"token of {length} bytes", "token too long", "auth")
            offered = recv_exact(sock, length)
        except (OSError, EOFError) as exc:
            raise Refused(f"incomplete token ({_why(exc)})", "", "auth") from None
        # Compare against every token, without stopping early, so timing says nothing.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(offered, token)
        if not matched:
            self.throttle.failed(peer)
            raise Refused("wrong token", "invalid token", "auth")
        self.throttle.succeeded(peer)
        sock.sendall(status_frame(STATUS_OK, "ok"))

    def refuse(self, sock: socket.socket, refusal: Refused, peer: Any, *, after_magic: bool = False) -> None:
        """Log, count and close a refused connection, telling the client why where it can listen."""
        self.refusals.add(refusal.kind, self.service)
        log.warning("refused %s connection from %s: %s", self.service, _fmt_peer(peer), refusal.reason)
        if not refusal.message:
            closer().close_after(sock)
        elif after_magic or refusal.reason == "wrong token" or refusal.message == "token too long":
            closer().close_after(sock, status_frame(STATUS_REFUSED, refusal.message))
        else:
            closer().close_after(sock, rpyc_refusal_frame(refusal.message))


# -- the client side --------------------------------------------------------------------------


class AuthError(ConnectionRefusedError):
    """The server refused this client's credentials (wrong token, throttled address)."""


def client_handshake(sock: socket.socket, token: str) -> None:
    """Send ``token`` and read the server's verdict; AuthError / ConnectionRefusedError if refused."""
    data = token.encode("utf-8")
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"token is {len(data)} bytes; the limit is {MAX_TOKEN_BYTES}")
    sock.sendall(TOKEN_MAGIC + _LEN.pack(len(data)) + data)
    try:
        head = recv_exact(sock, len(STATUS_MAGIC))
        if head == STATUS_MAGIC:
            status = recv_exact(sock, 1)[0]
            (length,) = _LEN.unpack(recv_exact(sock, _LEN.size))
            message = recv_exact(sock, length).decode("utf-8", "replace")
            if status != STATUS_OK:
                raise AuthError(f"the server refused the token: {message}")
            return
        # Refused before the token was read (a limit): the answer is an rpyc exception frame.
        (length,) = struct.unpack("!L", head)
        if length > 65536:
            raise ConnectionRefusedError(
                "the server sent an unexpected answer to the token (does it expect one?)"
            )
        rest = recv_exact(sock, 1 + length + 1)
        raise ConnectionRefusedError(refusal_message(rest[1:-1]))
    except (EOFError, ConnectionResetError):
        raise ConnectionRefusedError(
            "the server closed the connection during the token handshake "
            "(it may not expect a token, or it expects TLS)"
        ) from None


def refusal_message(payload: bytes) -> str:
    """The message of an rpyc exception frame payload (as :func:`rpyc_refusal_frame` builds)."""
    try:
        _, (_, args, _, _) = brine.load(payload[1:])
        return str(args[0]) if args else "connection refused"
    except Exception:
        return "connection refused"


def recv_exact(sock: socket.socket, count: int) -> bytes:
    """Exactly ``count`` bytes from ``sock``; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


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

"""HTTP/1.1 for RPC bodies on one socket: requests in (parsed by httptools), responses out.

Parsing is llhttp's (Node.js's parser, through ``httptools``): strict about request lines,
header syntax, ``Content-Length`` (a duplicate, a sign or an overflow is an error) and the
``Content-Length`` + ``Transfer-Encoding`` pair that request smuggling relies on. On top of it,
this module refuses ``Transfer-Encoding`` altogether (411: every XML-RPC and JSON-RPC client
can send a length), a POST without a length (411), headers over :data:`MAX_HEADER_BYTES`
(431), a body over ``max_body`` (413, before it is read, also after ``Expect: 100-continue``),
a repeated ``Authorization`` or ``Host`` (400) and versions other than 1.0 and 1.1 (505).

Time limits: a connection silent between requests for ``idle_timeout`` is closed quietly;
once a request's first byte arrives, the whole request (headers and body) must arrive within
``request_timeout`` and no single read may wait longer than ``idle_timeout``, otherwise 408.
Keep-alive follows HTTP/1.1 (on unless ``Connection: close``) and HTTP/1.0 (off unless
``Connection: keep-alive``); pipelined requests are answered in order.
"""

from __future__ import annotations

import os
import socket
import time
from http import HTTPStatus

import httptools

MAX_HEADER_BYTES = 64 * 1024
# Below glibc's 128 KiB mmap threshold: socket.recv allocates its whole size up front, and a
# 256 KiB read cost an mmap/munmap pair (about 10 us) on every request, however small.
_RECV = 64 * 1024
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_SINGLE = ("content-length", "authorization", "host")


class HTTPError(Exception):
    """A request the server answers with an error status and then closes the connection.

    ``reason`` names the refusal for the gateway's refusal counts (``body_too_large``, ...).
    """

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, reason: str = "bad_request"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.reason = reason


def too_long_headers() -> HTTPError:
    return HTTPError(
        431, f"request headers are longer than {MAX_HEADER_BYTES} bytes", reason="headers_too_large"
    )


class ClientGone(Exception):
    """The peer closed the connection or stayed silent between requests: close quietly."""


class Request:
    """One parsed request: header names lower-cased, repeated headers joined with ", "."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "version")

    def __init__(
        self,
        method: str,
        path: str,
        version: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = {} if headers is None else headers
        self.body = body
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"Request({self.method!r}, {self.path!r}, {self.version!r}, {len(self.body)} bytes)"


class _Parse:
    """httptools callbacks: collects one request at a time into ``done``."""

    def __init__(self, conn: HTTPConnection) -> None:
        self.conn = conn
        self.url = b""
        self.headers: dict[str, str] = {}
        self.repeated: HTTPError | None = None  # the first header that may appear once, twice
        self.body: list[bytes] = []
        self.request: Request | None = None
        self.in_head = False
        self.head_bytes = 0
        self.pending_bytes = 0
        self.error: HTTPError | None = None

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0  # of the request line and headers parsed so far
        self.pending_bytes = 0  # received while the head was still incomplete
        self.url = b""
        self.headers = {}
        self.repeated = None
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEADER_BYTES:
            self._fail(too_long_headers())

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools calls this once per whole header, however the bytes arrived.
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEADER_BYTES:
            self._fail(too_long_headers())
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        headers = self.headers
        old = headers.get(key)
        if old is not None:
            if key in _SINGLE and self.repeated is None:
                # Refused once the head is complete, so an oversize head is still a 431.
                self.repeated = HTTPError(400, f"header {name.decode('latin-1')!r} sent twice")
            text = f"{old}, {text}"
        headers[key] = text

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.repeated is not None:
            self._fail(self.repeated)
        headers = self.headers
        parser = self.conn._parser
        raw_version = parser.get_http_version()
        version = _VERSIONS.get(raw_version)
        if version is None:
            self._fail(HTTPError(505, f"HTTP/{raw_version[:10]} is not supported; use HTTP/1.1"))
        method = parser.get_method().decode("ascii", "replace")
        if "transfer-encoding" in headers:
            self._fail(
                HTTPError(411, "Transfer-Encoding is not supported; send the body with a Content-Length")
            )
        raw = headers.get("content-length")
        if raw is None and method == "POST":
            self._fail(HTTPError(411, "a POST needs a Content-Length header"))
        length = int(raw) if raw is not None else 0  # llhttp has checked it is digits
        max_body = self.conn.max_body
        if length > max_body:
            self._fail(
                HTTPError(
                    413,
                    f"the body is {length} bytes; this gateway accepts at most {max_body} "
                    "(gateway.max_body_bytes)",
                    reason="body_too_large",
                )
            )
        if length and headers.get("expect", "").lower() == "100-continue":
            self.conn._continue = True
        path = self.url.partition(b"?")[0].decode("latin-1")
        self.request = Request(method, path, version or "HTTP/1.1", headers, b"", parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = self.request
        assert request is not None
        request.body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body = []
        self.request = None
        self.conn._ready.append(request)

    def _fail(self, error: HTTPError) -> None:
        self.error = error
        raise error


class HTTPConnection:
    """Reads requests from and writes responses to one connected socket; see the module docstring."""

    def __init__(
        self, sock: socket.socket, max_body: int, idle_timeout: float = 60.0, request_timeout: float = 10.0
    ) -> None:
        self.sock = sock
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._callbacks = _Parse(self)
        self._parser = httptools.HttpRequestParser(self._callbacks)
        self._ready: list[Request] = []
        self._deadline: float | None = None  # of the request being received
        self._continue = False
        self._timeout: float | None = None
        self._set_timeout(idle_timeout)
        # A plain socket with a timeout is non-blocking underneath: a response is first written
        # straight to its descriptor, without the readiness poll socket.sendall makes first
        # (the send buffer almost always has room); what does not fit goes through sendall.
        self._fd = sock.fileno() if type(sock) is socket.socket and self._timeout else -1

    def read_request(self) -> Request:
        """The next request.

        Raises:
            ClientGone: the peer closed, or sent nothing within ``idle_timeout``, between requests.
            HTTPError: a malformed, oversize or too slow request (the caller answers and closes).
        """
        ready = self._ready
        while not ready:
            data = self._recv()
            if self._deadline is None:  # any byte, even a stray line break, starts the clock
                self._deadline = time.monotonic() + self.request_timeout
            self._feed(data)
        request = ready.pop(0)
        if not ready:
            callbacks = self._callbacks
            mid_request = callbacks.in_head or callbacks.request is not None
            # A pipelined request already begun gets its own full deadline from now.
            self._deadline = time.monotonic() + self.request_timeout if mid_request else None
        return request

    def _recv(self) -> bytes:
        deadline = self._deadline
        if deadline is None:
            self._set_timeout(self.idle_timeout)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._too_slow()
            self._set_timeout(min(self.idle_timeout, left))
        try:
            data = self.sock.recv(_RECV)
        except TimeoutError:
            if deadline is not None:
                raise self._too_slow() from None
            raise ClientGone() from None
        except OSError:
            raise ClientGone() from None
        if not data:
            raise ClientGone()
        return data

    def _too_slow(self) -> HTTPError:
        return HTTPError(
            408,
            f"the request did not arrive in time (gateway.request_timeout {self.request_timeout:g} s, "
            f"gateway.timeout {self.idle_timeout:g} s per read)",
            reason="request_timeout",
        )

    def _feed(self, data: bytes) -> None:
        callbacks = self._callbacks
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise HTTPError(400, "protocol upgrades and CONNECT are not supported") from None
        except httptools.HttpParserCallbackError:
            assert callbacks.error is not None
            raise callbacks.error from None
        except httptools.HttpParserError as exc:
            raise HTTPError(400, f"malformed request: {exc}") from None
        if callbacks.in_head:
            callbacks.head_bytes += len(data)
            if callbacks.head_bytes > MAX_HEADER_BYTES:
                raise HTTPError(
                    431,
                    f"request headers are longer than {MAX_HEADER_BYTES} bytes",
                    reason="headers_too_large",
                )
        if self._continue:
            self._continue = False
            if callbacks.request is not None:  # the body has not all arrived: ask for it
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def send_response(
        self,
        status: int,
        body: bytes,
        content_type: str,
        keep_alive: bool,
        version: str = "HTTP/1.1",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send one response (one system call for bodies up to 64 kB)."""
        key = (status, content_type, keep_alive, version, not body)
        cached = _HEADS.get(key)
        if cached is None:
            cached = _head(status, content_type if body or status != 204 else None, keep_alive, version)
            if len(_HEADS) < _MAX_HEADS:
                _HEADS[key] = cached
        line, rest = cached
        if headers:
            rest += "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1")
        if len(body) <= 65536:
            self._send(b"%s\r\nContent-Length: %d\r\n%s\r\n%s" % (line, len(body), rest, body))
        else:
            self._send(b"%s\r\nContent-Length: %d\r\n%s\r\n" % (line, len(body), rest))
            self.sock.sendall(body)

    def _send(self, data: bytes) -> None:
        sent = 0
        if self._fd >= 0:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                pass
            if sent == len(data):
                return
        self.sock.sendall(memoryview(data)[sent:] if sent else data)

    def linger_close(self, seconds: float = 1.0, limit: int = 1 << 20) -> None:
        """Stop sending, read and drop what the client is still sending (up to ``limit`` bytes or
        ``seconds``), then close: closing with unread data would reset the connection and the
        client could lose the error response already sent."""
        linger_close(self.sock, seconds, limit)


def linger_close(sock: socket.socket, seconds: float = 1.0, limit: int = 1 << 20) -> None:
    """See :meth:`HTTPConnection.linger_close`."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        sock.close()


def plain_response(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole ``Connection: close`` text response, for refusals sent before any request is read."""
    body = f"{message}\n".encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1") + body


# The fixed parts of a response head, around its Content-Length, by what they depend on: a
# keep-alive connection's responses differ only in length and body.
_HEADS: dict[tuple[int, str, bool, str, bool], tuple[bytes, bytes]] = {}
_MAX_HEADS = 256


def _head(status: int, content_type: str | None, keep_alive: bool, version: str) -> tuple[bytes, bytes]:
    """The status line, and the headers after Content-Length (each ending in CRLF)."""
    rest = f"Content-Type: {content_type}\r\n" if content_type is not None else ""
    if not keep_alive:
        rest += "Connection: close\r\n"
    elif version == "HTTP/1.0":
        rest += "Connection: keep-alive\r\n"
    return f"HTTP/1.1 {status} {_reason(status)}".encode("latin-1"), rest.encode("latin-1")


_REASONS: dict[int, str] = {}


def _reason(status: int) -> str:
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        _REASONS[status] = phrase
    return phrase

"""A minimal HTTP/1.1 server side for RPC bodies: requests in, responses out, on one socket.

Only what RPC clients send is understood: a request line, headers, and a body sized by
``Content-Length`` (``Transfer-Encoding`` is refused with 411, which every XML-RPC and JSON-RPC
client handles by sending a length). Keep-alive follows HTTP/1.1 (on unless ``Connection:
close``) and HTTP/1.0 (off unless ``Connection: keep-alive``). ``Expect: 100-continue`` is
answered, so ``curl`` sending a large body does not wait a second first, and an oversize body
is refused with 413 before it is read.

Why not ``http.server``: it parses headers with the ``email`` package and writes a response in
several system calls; this parser does one ``split`` per request and one ``send`` per response,
which is most of the gateway's speed-up over ``SimpleXMLRPCServer`` (benchmarks/bench_gateway.py).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from http import HTTPStatus

MAX_HEADER_BYTES = 64 * 1024
_RECV = 256 * 1024


class HTTPError(Exception):
    """A request the server answers with an error status and then closes the connection."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ClientGone(Exception):
    """The peer closed the connection or stayed silent between requests: close quietly."""


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection


class HTTPConnection:
    """Reads requests from and writes responses to one connected socket (blocking, with the
    socket's timeout)."""

    def __init__(self, sock: socket.socket, max_body: int) -> None:
        self.sock = sock
        self.max_body = max_body
        self._buf = bytearray()

    def read_request(self) -> Request:
        """The next request.

        Raises:
            ClientGone: the peer closed, or sent nothing within the timeout, between requests.
            HTTPError: a malformed, oversize or too slow request (the caller answers and closes).
        """
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(buf) > MAX_HEADER_BYTES:
                raise HTTPError(431, f"request headers are longer than {MAX_HEADER_BYTES} bytes")
            start = max(0, len(buf) - 3)
            self._recv_more(partial=bool(buf))
        head = bytes(buf[:end])
        del buf[: end + 4]
        request = _parse_head(head)
        length = _content_length(request, self.max_body)
        if length > len(buf) and request.headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < length:
            self._recv_more(partial=True)
        request.body = bytes(buf[:length])
        del buf[:length]
        return request

    def _recv_more(self, partial: bool) -> None:
        try:
            data = self.sock.recv(_RECV)
        except TimeoutError:
            if partial:
                raise HTTPError(408, "the request did not arrive within the gateway timeout") from None
            raise ClientGone() from None
        except OSError:
            raise ClientGone() from None
        if not data:
            raise ClientGone()
        self._buf += data

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
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}",
            "Server: rpyc-host",
            f"Content-Length: {len(body)}",
        ]
        if body or status != 204:
            lines.append(f"Content-Type: {content_type}")
        if not keep_alive:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if len(body) <= 65536:
            self.sock.sendall(head + body)
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)

    def linger_close(self, seconds: float = 1.0, limit: int = 1 << 20) -> None:
        """Stop sending, read and drop what the client is still sending (up to ``limit`` bytes or
        ``seconds``), then close: closing with unread data would reset the connection and the
        client could lose the error response already sent."""
        sock = self.sock
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


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        method, path, version = lines[0].split(" ")
    except ValueError:
        raise HTTPError(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(505, f"{version[:20]!r} is not supported; use HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(400, f"malformed header line {line[:40]!r}")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key in ("content-length", "authorization", "host"):
                raise HTTPError(400, f"header {name!r} sent twice")
            value = f"{headers[key]}, {value}"
        headers[key] = value
    return Request(method, path.split("?", 1)[0], version, headers)


def _content_length(request: Request, max_body: int) -> int:
    if "transfer-encoding" in request.headers:
        raise HTTPError(411, "Transfer-Encoding is not supported; send the body with a Content-Length")
    raw = request.headers.get("content-length")
    if raw is None:
        if request.method == "POST":
            raise HTTPError(411, "a POST needs a Content-Length header")
        return 0
    if not raw.isdigit():
        raise HTTPError(400, f"Content-Length {raw[:20]!r} is not a number")
    length = int(raw)
    if length > max_body:
        raise HTTPError(
            413,
            f"the body is {length} bytes; this gateway accepts at most {max_body} (gateway.max_body_bytes)",
        )
    return length

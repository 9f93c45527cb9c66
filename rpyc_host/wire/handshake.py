"""The frames exchanged before rpyc starts: the token handshake and the refusal answers.

1. The client sends ``RPYHTOKEN1`` + a 2-byte big-endian length + the token (UTF-8, at most
   4096 bytes).
2. The server answers ``RPYH`` + one status byte (0 accepted, 1 refused) + a 2-byte length + a
   UTF-8 message. (An rpyc frame starts with its length; ``RPYH`` would announce a 1.3 GiB
   frame, which no host sends, so the two cannot be confused.)

A connection refused before its token was read (limits, a throttled address) is answered with
an rpyc exception frame for request 0 instead (:func:`rpyc_refusal_frame`): a client that sent a
token tells it apart by the missing ``RPYH``, and a plain rpyc client that sent a request reads
the reason as a ``ConnectionRefusedError``.
"""

from __future__ import annotations

import socket
import struct

from rpyc.core import brine, consts

from .errors import CredentialsRefused, DialError

TOKEN_MAGIC = b"RPYHTOKEN1"
STATUS_MAGIC = b"RPYH"
LENGTH = struct.Struct("!H")
STATUS_OK, STATUS_REFUSED = 0, 1
MAX_TOKEN_BYTES = 4096
MAX_REFUSAL_FRAME = 65536


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
    return STATUS_MAGIC + bytes([status]) + LENGTH.pack(len(data)) + data


def refusal_message(payload: bytes) -> str:
    """The message of an rpyc exception frame payload (as :func:`rpyc_refusal_frame` builds)."""
    try:
        _, (_, args, _, _) = brine.load(payload[1:])
        return str(args[0]) if args else "connection refused"
    except Exception:
        return "connection refused"


def client_handshake(sock: socket.socket, token: str) -> None:
    """Send ``token`` and read the server's verdict.

    Raises:
        CredentialsRefused: the server refused the token.
        DialError: the server refused the connection for another reason (its message), or
            closed it during the handshake.
        ValueError: the token is longer than :data:`MAX_TOKEN_BYTES`.
    """
    data = token.encode("utf-8")
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"token is {len(data)} bytes; the limit is {MAX_TOKEN_BYTES}")
    sock.sendall(TOKEN_MAGIC + LENGTH.pack(len(data)) + data)
    try:
        head = recv_exact(sock, len(STATUS_MAGIC))
        if head == STATUS_MAGIC:
            status = recv_exact(sock, 1)[0]
            (length,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
            message = recv_exact(sock, length).decode("utf-8", "replace")
            if status != STATUS_OK:
                raise CredentialsRefused(f"the server refused the token: {message}")
            return
        # Refused before the token was read (a limit): the answer is an rpyc exception frame.
        (length,) = struct.unpack("!L", head)
        if length > MAX_REFUSAL_FRAME:
            raise DialError("the server sent an unexpected answer to the token (does it expect one?)")
        rest = recv_exact(sock, 1 + length + 1)
        raise DialError(refusal_message(rest[1:-1]))
    except (EOFError, ConnectionResetError):
        raise DialError(
            "the server closed the connection during the token handshake "
            "(it may not expect a token, or it expects TLS)"
        ) from None


def recv_exact(sock: socket.socket, count: int) -> bytes:
    """Exactly ``count`` bytes from ``sock``; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)

"""TLS on the bulk side connection: a whole-handshake deadline and errors that say what happened.

The side connection is an ``ssl.SSLSocket`` with the control connection's context. Its raw
errors are unclear to a caller ("The handshake operation timed out", "[SSL:
DECRYPTION_FAILED_OR_BAD_RECORD_MAC] ...", "The read operation timed out"); the helpers here
replace them with messages naming the timeout, or the bytes received before a damaged record.

Memory BIOs (``ssl.SSLObject``, many records per system call) were measured for this
connection and were slower than ``SSLSocket`` on both ends (``benchmarks/bench_tlsbio.py``).
"""

from __future__ import annotations

import socket
import ssl


class TLSRecordError(ConnectionError):
    """A TLS record from the peer was refused (failed integrity check, malformed record)."""


def handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """The client handshake on a blocking ``sock``, within ``timeout`` seconds in total.

    ``SSLSocket.do_handshake`` counts its socket timeout as one deadline over all the reads and
    writes of the handshake, so a server that trickles bytes is cut off as a silent one is.
    """
    before = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    except TimeoutError:
        raise TimeoutError(f"TLS handshake not finished within {timeout:g} s") from None
    finally:
        sock.settimeout(before)


def send_error(exc: OSError, sock: socket.socket, sent: int, count: int) -> OSError:
    """What to raise for ``exc`` from a send after ``sent`` of ``count`` bytes, or ``exc``."""
    if isinstance(exc, TimeoutError):
        return TimeoutError(f"peer took no data for {sock.gettimeout():g} s (after {sent} of {count} bytes)")
    return exc


def receive_error(exc: OSError, sock: socket.socket, received: int, count: int) -> OSError:
    """What to raise for ``exc`` from a receive after ``received`` of ``count`` bytes, or ``exc``."""
    if isinstance(exc, TimeoutError):
        return TimeoutError(
            f"data connection sent nothing for {sock.gettimeout():g} s (after {received} of {count} bytes)"
        )
    if isinstance(exc, ConnectionResetError):
        # A TLS peer that closes with session tickets unread makes its kernel send a reset.
        return ConnectionError(
            f"data connection closed after {received} of {count} bytes (reset by the peer)"
        )
    if isinstance(exc, ssl.SSLError):
        return TLSRecordError(f"TLS record refused after {received} bytes: {exc.reason or exc}")
    return exc

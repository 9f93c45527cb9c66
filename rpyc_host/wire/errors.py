"""What the wire layer raises: the errors of one connection, below both the host and the client.

    WireError                         base of everything raised here on purpose
    ├── FrameTooLarge (EOFError)      the peer announced a frame over the limit; closed unread
    ├── PeerStalled (EOFError)        the peer stopped in the middle of a frame or a reply
    ├── DeadlineExceeded (TimeoutError)
    │                                 a call's deadline passed (here, or at the service on arrival)
    └── DialError (ConnectionError)   no connection could be made: the message says where and why
        └── CredentialsRefused (ConnectionRefusedError)
                                      the server refused this side's token or certificate

The host logs these; the client library maps them once, in ``client.connect``, to its own tree
(``client.errors``). Errors a *service* raised are not wire errors: they arrive as their own type
with a clean message (see :mod:`rpyc_host.wire.remote`). :func:`did_you_mean` words the
suggestions both sides' messages offer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WireError(Exception):
    """Base of the wire layer's own errors."""


class FrameTooLarge(WireError, EOFError):
    """The peer announced a frame over the limit; the connection is closed unread."""


class PeerStalled(WireError, EOFError):
    """The peer stopped sending in the middle of a frame, or stopped reading a reply."""


class DeadlineExceeded(WireError, TimeoutError):
    """A call's deadline passed: before it was sent, while waiting, or when it reached the service
    (which then did not start it)."""


class DialError(WireError, ConnectionError):
    """No connection could be made (after retries)."""


class CredentialsRefused(DialError, ConnectionRefusedError):
    """The server refused the credentials this side sent (a wrong token, a throttled address)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

"""Errors raised on the other side, as this side reads them: their own type, a clean message.

rpyc rebuilds a remote exception as a subclass of its type whose ``str()`` appends a
``========= Remote Traceback (1) =========`` banner and the traceback text (``<traceback
denied>`` from a host). :class:`WireConnection` rebuilds it once more, at the wire, as the plain
type: ``str(exc)`` is the message alone, ``except ValueError`` still works, and the traceback
text stays on ``exc._remote_tb`` for whoever wants it. :func:`is_remote` tells a service's error
from a local one; :func:`describe` gives the one line a person reads.

:class:`WireConnection` also closes promptly when its owner gives up: rpyc's ``close()`` sends a
close request and waits for the answer, which a server busy with the call that was interrupted
(Ctrl-C, a deadline) gives only when that call ends. With a request still unanswered the socket
is shut first, so ``close()`` returns at once.
"""

from __future__ import annotations

import socket
from typing import Any

from rpyc.core.protocol import Connection

REMOTE_TB = "_remote_tb"


def clean(exc: Any, raw: Any) -> Any:
    """``exc`` (what rpyc's vinegar made of ``raw``) as its plain type, attributes kept."""
    if not isinstance(exc, BaseException) or not hasattr(exc, REMOTE_TB):
        return exc
    plain: Any = type(exc).__mro__[1]  # vinegar's subclass sits right above the real type
    try:
        rebuilt = plain.__new__(plain)
        rebuilt.args = exc.args
        for name, value in raw[2]:
            try:
                setattr(rebuilt, name, value)
            except AttributeError:  # read-only attributes: vinegar skips them too
                pass
        setattr(rebuilt, REMOTE_TB, getattr(exc, REMOTE_TB))
    except Exception:  # an exotic type that cannot be rebuilt: keep rpyc's version
        return exc
    return rebuilt


def is_remote(exc: BaseException) -> bool:
    """True for an error the other side raised (and relayed), False for a local one."""
    return hasattr(exc, REMOTE_TB)


def message(exc: BaseException) -> str:
    """The message alone: an OSError's ``strerror`` (rpyc relays it without filenames), else
    ``str()`` without any remote-traceback banner."""
    strerror = getattr(exc, "strerror", None)
    if isinstance(exc, OSError) and isinstance(strerror, str) and strerror:
        return strerror
    if len(exc.args) == 1:
        return str(exc.args[0])
    text = str(exc).split("\n\n========= Remote Traceback")[0].strip()
    return text


def describe(exc: BaseException) -> str:
    """``Type: message`` (the type's own name, also for a service's custom exception)."""
    name = type(exc).__name__.rsplit(".", 1)[-1]
    text = message(exc)
    return f"{name}: {text}" if text else name


class WireConnection(Connection):
    """An rpyc ``Connection`` whose remote errors read cleanly and whose close never waits on a
    busy peer; see the module docstring."""

    def _unbox_exc(self, raw: Any) -> Any:
        return clean(super()._unbox_exc(raw), raw)

    def close(self) -> None:
        if not self._closed and self._request_callbacks:
            # A request is unanswered (interrupted, timed out): the polite close request would
            # wait behind it. Shut the socket: the peer sees EOF and runs its disconnect hooks.
            sock = getattr(getattr(self._channel, "stream", None), "sock", None)
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().close()

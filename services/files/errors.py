"""Errors as the file service's clients see them.

The standard OSError types (rpyc relays them by type) whose message names the path relative to
``root``, never the server's own paths; :func:`exposed_op` exposes a method and rewords any raw
OS error that escapes it.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import rpyc

GiB = 1 << 30
MiB = 1 << 20
F = TypeVar("F", bound=Callable[..., Any])


_ERRNO = {
    PermissionError: errno.EACCES,
    FileNotFoundError: errno.ENOENT,
    FileExistsError: errno.EEXIST,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
    ConnectionError: errno.ECONNABORTED,
}


def err(cls: type[OSError], message: str, code: int | None = None) -> OSError:
    """An error for the client: ``strerror`` is ``message``, which names the path as the client sees it.

    (rpyc re-creates OSErrors from ``(errno, strerror)``; a one-argument OSError arrives empty.)
    ``code`` is the errno the client sees (default: the usual one for ``cls``, else EIO).
    """
    exc = cls(code if code is not None else _ERRNO.get(cls, errno.EIO), message)
    exc._for_client = True  # type: ignore[attr-defined]
    return exc


def client_error(exc: OSError, shown: str) -> Exception:
    """A raw OSError from the OS, reworded for the client with the path as the client sees it."""
    code = exc.errno
    if code == errno.ENOENT:
        return err(FileNotFoundError, f"{shown!r}: no such file or directory")
    if code == errno.EEXIST:
        return err(FileExistsError, f"{shown!r}: already exists")
    if code == errno.EISDIR:
        return err(IsADirectoryError, f"{shown!r}: is a directory")
    if code == errno.ENOTDIR:
        return err(NotADirectoryError, f"{shown!r}: not a directory")
    if code in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return err(PermissionError, f"{shown!r}: permission denied")
    if code == errno.ENOTEMPTY:
        # The errno lets a front end word the fix its own way (the CLI says -r).
        return err(OSError, f"{shown!r}: directory not empty (pass recursive=True)", errno.ENOTEMPTY)
    if code == errno.ENAMETOOLONG:
        return ValueError(f"{shown!r}: name too long")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return err(OSError, f"{shown!r}: no space left on the server's disk")
    if code == errno.EINVAL:
        return ValueError(f"{shown!r}: invalid operation on this path")
    return err(OSError, f"{shown!r}: {exc.strerror or 'operation failed'}")


@contextmanager
def reworded(shown: str) -> Iterator[None]:
    """Reword raw OS errors (they carry an errno); errors made for clients pass through."""
    try:
        yield
    except OSError as exc:
        if getattr(exc, "_for_client", False):
            raise
        raise client_error(exc, shown) from None


def exposed_op(fn: F) -> F:
    """Expose ``fn``; any raw OS error that escapes is reworded without server paths."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if getattr(exc, "_for_client", False):
                raise
            raise client_error(exc, "?") from None

    return rpyc.exposed(call)


def human_size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"

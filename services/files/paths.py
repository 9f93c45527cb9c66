"""Sandboxed path resolution: client paths under ``root``, reached without following symlinks.

Paths are resolved one component at a time from an open descriptor of ``root`` with
``O_NOFOLLOW``; every operation then acts relative to the descriptor of its parent directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat as stat_mod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import client_error, err

NAME_MAX = 255
PATH_MAX = 4096
TEMP_NAME = re.compile(r"^\.upload-[0-9a-f]{16}-[0-9a-f]{16}\.part$")
# The quota's reservation records (see quota.py) and the file they are rewritten through.
STATE_NAME = re.compile(r"^\.upload-reservations(\.tmp)?$")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us

Entry = tuple[str, str, int, float, int]  # name, kind, size, mtime, mode


def shown_path(parts: tuple[str, ...]) -> str:
    return "/".join(parts) or "."


def hidden(name: str) -> bool:
    """Whether ``name`` is the service's own (partial uploads, reservations): never listed or copied."""
    return bool(TEMP_NAME.match(name) or STATE_NAME.match(name))


def check_name(name: str, path: str) -> None:
    if len(os.fsencode(name)) > NAME_MAX:
        raise ValueError(f"{path!r}: name {name[:24]!r}... is longer than {NAME_MAX} bytes")
    if hidden(name):
        raise err(
            PermissionError,
            f"{path!r}: names of the form .upload-*.part and .upload-reservations are reserved for uploads",
        )


class Sandbox:
    """Resolve client paths under ``root`` without following symlinks; see the module docstring."""

    def __init__(self, root: str) -> None:
        self.root = root

    def parts(self, cwd: tuple[str, ...], path: Any) -> tuple[str, ...]:
        """``path`` relative to ``cwd``, normalized; errors for anything that leaves ``root``."""
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, got {type(path).__name__}")
        if "\x00" in path:
            raise ValueError(f"path {path!r} contains a NUL byte")
        if len(path) > PATH_MAX:
            raise ValueError(f"path {path[:32]!r}... is longer than {PATH_MAX} characters")
        try:
            os.fsencode(path)
        except UnicodeError:
            raise ValueError(f"path {path!r} is not valid text") from None
        if path.startswith("/"):
            raise err(
                PermissionError,
                f"{path!r}: absolute paths are not allowed; paths are relative to the current "
                f"directory ({shown_path(cwd)!r}, inside the service's root)",
            )
        out = list(cwd)
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    raise err(PermissionError, f"{path!r}: leads outside the service's root")
                out.pop()
                continue
            check_name(part, path)
            out.append(part)
        return tuple(out)

    @contextmanager
    def directory(self, parts: tuple[str, ...]) -> Iterator[int]:
        """An open descriptor of directory ``parts``, reached without following any symlink."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    shown = shown_path(parts[: i + 1])
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and is_link(fd, part):
                        raise err(
                            PermissionError, f"{shown!r}: is a symbolic link; links are not followed"
                        ) from None
                    raise client_error(exc, shown) from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, parts: tuple[str, ...], what: str = "use") -> Iterator[tuple[int, str]]:
        """``(descriptor of the parent directory, last name)`` for a path other than the root."""
        if not parts:
            raise err(PermissionError, f"cannot {what} the service's root directory")
        with self.directory(parts[:-1]) as fd:
            yield fd, parts[-1]


def is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat_mod.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def lstat_or_none(dir_fd: int, name: str, shown: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise client_error(exc, shown) from None


def kind_of(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


def entry_of(name: str, st: os.stat_result) -> Entry:
    kind = kind_of(st.st_mode)
    size = st.st_size if kind == "file" else 0  # a link's size is its target's length: not shown
    return (name, kind, size, st.st_mtime, stat_mod.S_IMODE(st.st_mode))


def temp_name(name: str) -> str:
    return f".upload-{name_hash(name)}-{secrets.token_hex(8)}.part"


def name_hash(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def open_regular(dir_fd: int, name: str, shown: str) -> int:
    """Open an existing regular file for reading; directories, links and devices are refused."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise err(PermissionError, f"{shown!r}: is a symbolic link; links are not followed") from None
        raise client_error(exc, shown) from None
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode):
        os.close(fd)
        if stat_mod.S_ISDIR(st.st_mode):
            raise err(IsADirectoryError, f"{shown!r}: is a directory")
        raise err(PermissionError, f"{shown!r}: not a regular file")
    return fd

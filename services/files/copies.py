"""``cp``'s copies: files with ``copy_file_range``, directories recursively, nothing else."""

from __future__ import annotations

import os
import stat as stat_mod

from .errors import MiB, client_error, err
from .paths import (
    DIR_FLAGS,
    hidden,
    kind_of,
    open_regular,
)


def copy_file(sfd: int, sname: str, dfd: int, dname: str, shown: str) -> None:
    src = open_regular(sfd, sname, shown)
    try:
        dst = os.open(
            dname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd
        )
        try:
            size = os.fstat(src).st_size
            done = 0
            while done < size:
                n = os.copy_file_range(src, dst, min(64 * MiB, size - done), done, done)
                if n == 0:
                    break
                done += n
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def copy_tree(sfd: int, sname: str, dfd: int, dname: str, shown: str) -> None:
    """Copy directory ``sname`` (relative to ``sfd``) into the existing empty ``dname``."""
    src = os.open(sname, DIR_FLAGS, dir_fd=sfd)
    try:
        dst = os.open(dname, DIR_FLAGS, dir_fd=dfd)
        try:
            for entry in sorted(os.listdir(src)):
                if hidden(entry):
                    continue
                path = f"{shown}/{entry}"
                st = os.lstat(entry, dir_fd=src)
                if stat_mod.S_ISDIR(st.st_mode):
                    os.mkdir(entry, dir_fd=dst)
                    copy_tree(src, entry, dst, entry, path)
                elif stat_mod.S_ISREG(st.st_mode):
                    copy_file(src, entry, dst, entry, path)
                else:
                    raise err(
                        PermissionError,
                        f"{path!r}: is a {kind_of(st.st_mode)}; cp copies files and directories only",
                    )
        finally:
            os.close(dst)
    finally:
        os.close(src)


def copy_size(sfd: int, sname: str, shown: str) -> int:
    total = 0
    stack: list[tuple[int, str, bool]] = [(sfd, sname, False)]
    opened: list[int] = []
    try:
        while stack:
            parent, name, _ = stack.pop()
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            opened.append(fd)
            for entry in os.listdir(fd):
                st = os.lstat(entry, dir_fd=fd)
                if stat_mod.S_ISREG(st.st_mode):
                    total += st.st_size
                elif stat_mod.S_ISDIR(st.st_mode):
                    stack.append((fd, entry, True))
    except OSError as exc:
        raise client_error(exc, shown) from None
    finally:
        for fd in opened:
            os.close(fd)
    return total

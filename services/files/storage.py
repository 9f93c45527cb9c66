"""What the service keeps beside the files: digests in xattrs, bytes in use, partial uploads."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat as stat_mod
import time
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from rpyc_host.wire import hashes

from .errors import MiB
from .paths import STATE_NAME, TEMP_NAME

XATTR_PREFIX = "user.rpyc_host."  # + hash name: "size:mtime_ns:hex", written by commit()
XATTR_SHA256 = XATTR_PREFIX + "sha256"
HASH_CHUNK = 4 * MiB


def hash_fd(fd: int, start: int, end: int, hasher: Any = None) -> Any:
    """``hasher`` (default: a new SHA-256) updated with bytes ``start:end`` of ``fd``.

    Read into one reused buffer rather than hashed from an mmap: a file cut short while it is
    mapped would kill the whole server with SIGBUS.
    """
    h = hasher or hashes.new("sha256")
    if end <= start:
        return h  # a new upload hashes no prefix: no buffer to allocate
    # Sized to the range: zeroing a 4 MiB buffer holds the GIL for about a millisecond.
    buf = bytearray(min(HASH_CHUNK, end - start))
    view = memoryview(buf)
    pos = start
    while pos < end:
        n = os.preadv(fd, [view[: min(HASH_CHUNK, end - pos)]], pos)
        if n == 0:
            break
        h.update(view[:n])
        pos += n
    return h


def file_digest(fd: int, name: str) -> str:
    """Hex digest ``name`` of an open file: from its commit-time xattr if unchanged, else computed."""
    st = os.fstat(fd)
    key = f"{st.st_size}:{st.st_mtime_ns}:"
    try:
        cached = os.getxattr(fd, XATTR_PREFIX + name).decode()
        if cached.startswith(key):
            return cached[len(key) :]
    except OSError:
        pass
    digest: str = hash_fd(fd, 0, st.st_size, hashes.new(name)).hexdigest()
    remember_digest(fd, name, digest, st)
    return digest


def file_sha256(fd: int) -> str:
    """SHA-256 of an open file (cached in the ``XATTR_SHA256`` xattr like every digest)."""
    return file_digest(fd, "sha256")


def remember_digest(fd: int, name: str, digest: str, st: os.stat_result | None = None) -> None:
    st = st or os.fstat(fd)
    try:  # a cache only: a filesystem without user xattrs just recomputes next time
        os.setxattr(fd, XATTR_PREFIX + name, f"{st.st_size}:{st.st_mtime_ns}:{digest}".encode())
    except OSError:
        pass


def remember_sha256(fd: int, digest: str, st: os.stat_result | None = None) -> None:
    remember_digest(fd, "sha256", digest, st)


def tree_usage(
    root: str, held: Mapping[tuple[int, int], int] | None = None, skip: tuple[int, int] | None = None
) -> int:
    """Bytes in regular files under ``root`` (links not followed).

    ``held`` maps ``(st_dev, st_ino)`` of files being written to the bytes reserved for them:
    such a file counts as the larger of its size and its reservation, and a reservation whose
    file is not found counts too (it is still held). The file ``skip`` is not counted at all.
    """
    held = held or {}
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        with suppress(OSError), os.scandir(stack.pop()) as it:
            for entry in it:
                if STATE_NAME.match(entry.name):
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat_mod.S_ISREG(st.st_mode):
                    ident = (st.st_dev, st.st_ino)
                    if ident == skip:
                        continue
                    if ident in held:
                        seen.add(ident)
                        total += max(st.st_size, held[ident])
                    else:
                        total += st.st_size
                elif stat_mod.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total + sum(amount for ident, amount in held.items() if ident not in seen and ident != skip)


def sweep_partials(root: str, older_than: float | None = None) -> int:
    """Remove upload temporaries under ``root`` that no live upload holds; returns how many."""
    removed = 0
    stack = [root]
    now = time.time()
    while stack:
        with suppress(OSError), os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    if TEMP_NAME.match(entry.name):
                        shutil.rmtree(entry.path, ignore_errors=True)  # a cp that died mid-copy
                        removed += 1
                    else:
                        stack.append(entry.path)
                elif TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    if older_than is not None and now - entry.stat().st_mtime < older_than:
                        continue
                    if _unlink_if_unlocked(entry.path):
                        removed += 1
    return removed


def _unlink_if_unlocked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live upload holds this lock
    except OSError:
        os.close(fd)
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)

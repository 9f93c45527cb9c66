"""Writes that skip the page cache: ``O_DIRECT`` for the aligned middle of a large write.

On a VM that hands free memory back to its host, every fresh page-cache page costs a host
fault: a buffered write of 1 MiB into a new file spends milliseconds of CPU in the kernel, and
on ext4 (``data=ordered``) its blocks are written during the next journal commit, which every
other ``fsync`` on the filesystem then waits for. A direct write goes from an aligned buffer to
the device at once: no new memory touched, nothing left for a later commit to carry.

:func:`pwrite_all` writes the unaligned head and tail of a write buffered and the aligned middle
directly, through a few reused page-aligned buffers shared by the process (so a thousand open
uploads cost no more memory than four). When every buffer is in use, or the filesystem refuses
``O_DIRECT`` (older tmpfs, some network filesystems), the write is buffered, never delayed.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the largest in common use)
PIECE = 1 << 20  # one aligned buffer; a longer middle is written piece by piece
POOL = 4  # aligned buffers shared by every writer in the process
MIN_DIRECT = 64 << 10  # below this, a direct write's two fcntl calls cost more than they save

_pool: queue.SimpleQueue[mmap.mmap] | None = None


def direct_io_allowed(fd: int) -> bool:
    """Whether ``fd`` (a regular file) accepts O_DIRECT; it is left off either way."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        set_direct(fd, True)
    except OSError:
        return False  # some filesystems (older tmpfs, some network ones): buffered writes it is
    set_direct(fd, False)
    return True


def set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if want != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


def _borrow() -> mmap.mmap | None:
    global _pool
    if _pool is None:
        fresh: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(POOL):
            fresh.put(mmap.mmap(-1, PIECE))  # page-aligned, as O_DIRECT needs
        _pool = fresh
    try:
        return _pool.get_nowait()
    except queue.Empty:
        return None


def _pwrite(fd: int, view: memoryview, pos: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], pos + done)


def pwrite_all(fd: int, data: bytes | memoryview, pos: int, direct: bool) -> bool:
    """Write all of ``data`` at ``pos``; the aligned middle with O_DIRECT when ``direct``.

    Returns whether direct writes may still be tried on this file: False once the filesystem
    refused the flag or a write (EINVAL), after which the rest went buffered. ``fd`` must not be written by
    another thread meanwhile (its O_DIRECT flag is toggled).
    """
    with memoryview(data) as view:
        head = -pos % ALIGN
        middle = (len(view) - head) // ALIGN * ALIGN if len(view) > head else 0
        buf = _borrow() if direct and middle >= MIN_DIRECT else None
        if buf is None:
            _pwrite(fd, view, pos)
            return direct
        try:
            _pwrite(fd, view[:head], pos)
            done = head
            try:
                set_direct(fd, True)  # tmpfs refuses the flag itself (EINVAL)
                with memoryview(buf) as aligned:
                    while done < head + middle:
                        n = min(PIECE, head + middle - done)
                        aligned[:n] = view[done : done + n]
                        _pwrite(fd, aligned[:n], pos + done)
                        done += n
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False  # the filesystem wants another alignment after all: go buffered
            finally:
                set_direct(fd, False)
            _pwrite(fd, view[done:], pos + done)
        finally:
            assert _pool is not None
            _pool.put(buf)
    return direct

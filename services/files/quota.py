"""The storage quota (``max_total_bytes``), held across threads and processes.

Bytes in use are the regular files under ``root``, except that the partial file of a live
upload counts as what that upload reserved (at least its size), and a ``cp`` in progress adds
what it will copy. Uploads reserve before their bytes arrive (``bulk(length)``, ``write``), so
concurrent uploads cannot together pass the quota, and ``commit()`` checks once more.

Reservations are records in ``<root>/.upload-reservations`` (JSON), read and rewritten only
under an exclusive ``flock`` of the root directory, so every thread and every process (each
connection of the ``forking`` server is one) sees the same figures. A record names its process
(pid and start time): one whose process is gone is dropped at the next look, so a crashed
connection frees what it held.

Usage::

    quota = Quota(root, 10**9)
    quota.reserve("upload-1", 5000, inode=(st.st_dev, st.st_ino))   # QuotaExceeded past the limit
    quota.commit("upload-1", 4096, inode, publish)                  # checks, runs publish(), drops
    quota.release("upload-1")                                       # on abort or disconnect
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from .errors import human_size
from .storage import tree_usage

STATE = ".upload-reservations"
STATE_TMP = STATE + ".tmp"
Inode = tuple[int, int]  # (st_dev, st_ino)


class QuotaExceeded(Exception):
    """``wanted`` bytes more do not fit: ``others`` are already in use or reserved elsewhere."""

    def __init__(self, limit: int, others: int, wanted: int) -> None:
        super().__init__(f"{human_size(wanted)} would not fit in {quota_text(limit, others)}")
        self.limit = limit
        self.others = others
        self.wanted = wanted


def quota_text(limit: int, in_use: int) -> str:
    return (
        f"the storage quota (max_total_bytes: {limit} bytes = {human_size(limit)}; "
        f"{human_size(in_use)} in use or reserved)"
    )


@dataclass(frozen=True)
class _Record:
    process: str  # "pid:start time", see _process_id
    inode: Inode | None  # the partial file it is for (None: a cp in progress)
    amount: int


class Quota:
    """``limit`` bytes under ``root``; see the module docstring. Holds no state of its own."""

    def __init__(self, root: str, limit: int) -> None:
        self.root = root
        self.limit = limit

    def reserve(self, key: str, amount: int, inode: Inode | None = None) -> None:
        """Hold ``amount`` bytes in all for ``key`` (replacing what it held before).

        QuotaExceeded, and nothing changed, if that and everything else would pass the limit.
        ``inode`` is the partial file the bytes go to: its own size is part of ``amount``.
        """
        with self._records() as (dir_fd, records):
            records.pop(key, None)
            self._check(records, amount, inode)
            records[key] = _Record(_process_id(os.getpid()) or "", inode, amount)
            _save(dir_fd, records)

    def commit(self, key: str, amount: int, inode: Inode, publish: Callable[[], None]) -> None:
        """Check the final ``amount`` once more and run ``publish`` under the same lock.

        The reservation is dropped either way; QuotaExceeded (publish not run) past the limit.
        """
        with self._records() as (dir_fd, records):
            had = records.pop(key, None) is not None
            try:
                self._check(records, amount, inode)
                publish()
            finally:
                if had:
                    _save(dir_fd, records)

    def release(self, key: str) -> None:
        """Give back what ``key`` reserved (nothing if it holds nothing)."""
        with self._records() as (dir_fd, records):
            if records.pop(key, None) is not None:
                _save(dir_fd, records)

    def in_use(self) -> int:
        """Bytes in use or reserved now."""
        with self._records() as (_, records):
            return self._usage(records)

    def _check(self, records: dict[str, _Record], amount: int, inode: Inode | None) -> None:
        others = self._usage(records, skip=inode)
        if others + amount > self.limit:
            raise QuotaExceeded(self.limit, others, amount)

    def _usage(self, records: dict[str, _Record], skip: Inode | None = None) -> int:
        held: dict[Inode, int] = {}
        loose = 0
        for record in records.values():
            if record.inode is None:
                loose += record.amount
            else:
                held[record.inode] = max(held.get(record.inode, 0), record.amount)
        # ``skip`` is counted by the caller as what it asks for, not by its present size.
        return tree_usage(self.root, held, skip) + loose

    @contextmanager
    def _records(self) -> Iterator[tuple[int, dict[str, _Record]]]:
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # released when dir_fd is closed
            records = _load(dir_fd)
            alive = {r.process for r in records.values() if _is_alive(r.process)}
            live = {k: r for k, r in records.items() if r.process in alive}
            if len(live) != len(records):
                _save(dir_fd, live)  # their processes are gone: what they held is free again
            yield dir_fd, live
        finally:
            os.close(dir_fd)


def _load(dir_fd: int) -> dict[str, _Record]:
    try:
        fd = os.open(STATE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return {}
    try:
        with os.fdopen(fd, "rb") as fh:
            raw = json.loads(fh.read(1 << 24) or b"{}")
        records = {}
        for key, (process, inode, amount) in raw.items():
            records[str(key)] = _Record(
                str(process), (int(inode[0]), int(inode[1])) if inode else None, int(amount)
            )
        return records
    except (OSError, ValueError, TypeError, IndexError):
        # Torn by a crash mid-write (it is replaced atomically, so only by a full disk): the
        # reservations are lost, and commit() still checks the real usage.
        return {}


def _save(dir_fd: int, records: dict[str, _Record]) -> None:
    if not records:
        with suppress(FileNotFoundError):
            os.unlink(STATE, dir_fd=dir_fd)  # nothing reserved: leave the root as clients see it
        return
    data = json.dumps({k: (r.process, r.inode, r.amount) for k, r in records.items()}).encode()
    fd = os.open(
        STATE_TMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
    )
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(STATE_TMP, STATE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _process_id(pid: int) -> str | None:
    """``"pid:start time"`` of a running process (a reused pid has another start time), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None  # a zombie holds nothing any more
    return f"{pid}:{fields[19]}"


def _is_alive(process: str) -> bool:
    pid, _, _ = process.partition(":")
    return pid.isdigit() and _process_id(int(pid)) == process

"""``FileService``: navigation, changes, small files and the start of streaming transfers."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat as stat_mod
import time
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import rpyc

from rpyc_host import budget
from rpyc_host.wire import bulk, hashes

from .copies import copy_file, copy_size, copy_tree
from .errors import GiB, MiB, client_error, err, exposed_op, human_size, reworded
from .paths import (
    TEMP_NAME,
    Entry,
    Sandbox,
    entry_of,
    hidden,
    lstat_or_none,
    name_hash,
    open_regular,
    shown_path,
    temp_name,
)
from .quota import Quota, QuotaExceeded
from .sidechannel import ServerTLS, server_wrapper
from .storage import sweep_partials
from .transfers import Download, Transfer, TransferCounts, Upload

log = logging.getLogger("services.files")


def _int_option(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of bytes, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _hash_option(shown: str, name: Any) -> str:
    """``name`` if it is a known hash, else ValueError naming the path and the known hashes."""
    try:
        return hashes.check_name(name)
    except ValueError as exc:
        raise ValueError(f"{shown!r}: {exc}") from None


@rpyc.service
class FileService(rpyc.Service):
    """A sandboxed file tree: pwd/cd/ls/stat/mkdir/cp/mv/rm and atomic, resumable transfers.

    Options (config ``options:``): ``root`` (created if missing), ``max_file_size``,
    ``max_total_bytes`` (None: no quota), ``small_io_limit`` (read_bytes/write_bytes and per-call
    read/write), ``transfer_timeout`` (seconds a side connection may stall) and ``partial_ttl``
    (seconds an interrupted upload is kept for resuming).
    """

    def __init__(
        self,
        root: str = "var/files",
        max_file_size: int = 64 * GiB,
        max_total_bytes: int | None = None,
        small_io_limit: int = 16 * MiB,
        transfer_timeout: float = 30.0,
        partial_ttl: float = 24 * 3600.0,
    ) -> None:
        self.check_options(
            root, max_file_size, max_total_bytes, small_io_limit, transfer_timeout, partial_ttl
        )
        self.max_file_size = max_file_size
        self.max_total_bytes = max_total_bytes
        self.small_io_limit = small_io_limit
        self.transfer_timeout = float(transfer_timeout)
        self.partial_ttl = float(partial_ttl)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"root {root!r} cannot be created: {exc.strerror}") from None
        if not os.path.isdir(root):
            raise ValueError(f"root {root!r} is not a directory")
        self.root = os.path.abspath(root)
        self.sandbox = Sandbox(self.root)
        removed = sweep_partials(self.root)  # left by a crash or by clients that never came back
        if removed:
            log.info("removed %d unfinished upload(s) under %s", removed, self.root)
        self._cwd: tuple[str, ...] = ()
        # Shared by every connection and process: reservations live under root (see quota.py).
        self.quota = Quota(self.root, self.max_total_bytes) if self.max_total_bytes is not None else None
        self._bind_host = "127.0.0.1"
        self._side_tls: ServerTLS | None = None
        self._account: budget.Account | None = None  # what this connection holds (open transfers, ...)
        self._transfers: set[Transfer] = set()
        self.counts = TransferCounts()  # shared by every connection's copy of this instance

    @staticmethod
    def check_options(
        root: str = "var/files",
        max_file_size: int = 64 * GiB,
        max_total_bytes: int | None = None,
        small_io_limit: int = 16 * MiB,
        transfer_timeout: float = 30.0,
        partial_ttl: float = 24 * 3600.0,
    ) -> None:
        """Validate the options' types and values without touching the disk (``--check``).

        Raises:
            TypeError, ValueError: naming the option and the value given.
        """
        if not isinstance(root, str) or not root or "\x00" in root:
            raise TypeError(f"root must be a directory path, got {root!r}")
        _int_option("max_file_size", max_file_size, 0)
        _int_option("max_total_bytes", max_total_bytes, 0, allow_none=True)
        _int_option("small_io_limit", small_io_limit, 1)
        for name, value in (("transfer_timeout", transfer_timeout), ("partial_ttl", partial_ttl)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")

    def metrics(self) -> dict[str, int]:
        """For the host's /metrics (not exposed): bytes in and out, uploads and downloads so far.

        Counted across this instance's connections. Under the ``forking`` server type each
        connection runs in a child process and its counts are not visible here.
        """
        return self.counts.snapshot()

    def on_connect(self, conn: Any) -> None:
        self._cwd = ()
        self._transfers = set()
        self._account = budget.account_of(conn)
        endpoints = conn._config.get("endpoints")
        if endpoints and endpoints[0]:
            self._bind_host = endpoints[0][0]  # side connections use the interface the client reached
        # A TLS control connection means TLS side connections, with the same server context.
        self._side_tls = server_wrapper(bulk.control_socket(conn))

    def on_disconnect(self, conn: Any) -> None:
        for transfer in list(self._transfers):
            try:
                if isinstance(transfer, Upload):
                    transfer.detach()
                else:
                    transfer._release()
            except Exception:
                log.exception("closing a transfer failed")

    def _parts(self, path: Any) -> tuple[str, ...]:
        return self.sandbox.parts(self._cwd, path)

    # -- navigation --------------------------------------------------------------------------------

    @exposed_op
    def pwd(self) -> str:
        """The current directory, relative to the service's root ("." at the root)."""
        return shown_path(self._cwd)

    @exposed_op
    def cd(self, path: str = "") -> str:
        """Change this connection's current directory ("" or no argument: the root); returns it."""
        parts = self._parts(path) if path != "" else ()
        with self.sandbox.directory(parts):
            self._cwd = parts
        return shown_path(parts)

    @exposed_op
    def ls(self, path: str = ".", long: bool = False) -> tuple[Any, ...]:
        """Sorted names in a directory, or with ``long`` ``(name, kind, size, mtime, mode)`` entries."""
        parts = self._parts(path)
        with self.sandbox.directory(parts) as fd, reworded(shown_path(parts)):
            entries: list[Any] = []
            for name in sorted(os.listdir(fd)):
                if hidden(name):
                    continue
                if not long:
                    entries.append(name)
                    continue
                with suppress(FileNotFoundError):
                    entries.append(entry_of(name, os.lstat(name, dir_fd=fd)))
            return tuple(entries)

    @exposed_op
    def scan(self, path: str = ".", long: bool = False) -> Iterator[Any]:
        """What ``ls`` lists, streamed in directory order (unsorted): for folders too large to
        list in one reply. The directory stays open until the stream ends or is closed."""
        parts = self._parts(path)
        with self.sandbox.directory(parts) as fd, reworded(shown_path(parts)):
            return _Scan(os.dup(fd), long)

    @exposed_op
    def stat(self, path: str) -> Entry:
        """``(name, kind, size, mtime, mode)``; kind is file, dir, symlink or other."""
        parts = self._parts(path)
        if not parts:
            with self.sandbox.directory(parts) as fd:
                return entry_of(".", os.fstat(fd))
        with self.sandbox.parent(parts) as (fd, name):
            st = lstat_or_none(fd, name, shown_path(parts))
            if st is None:
                raise err(FileNotFoundError, f"{shown_path(parts)!r}: no such file or directory")
            return entry_of(name, st)

    @exposed_op
    def exists(self, path: str) -> bool:
        """Whether anything (file, directory, link) has this name."""
        parts = self._parts(path)
        if not parts:
            return True
        try:
            with self.sandbox.parent(parts) as (fd, name):
                return lstat_or_none(fd, name, shown_path(parts)) is not None
        except (FileNotFoundError, NotADirectoryError):
            return False

    # -- changes -----------------------------------------------------------------------------------

    @exposed_op
    def mkdir(self, path: str, parents: bool = False) -> str:
        """Create a directory (with ``parents``, missing parents too and no error if it exists)."""
        parts = self._parts(path)
        if parents:
            for i in range(1, len(parts) + 1):
                with self.sandbox.parent(parts[:i], "create") as (fd, name):
                    try:
                        os.mkdir(name, dir_fd=fd)
                    except FileExistsError:
                        st = os.lstat(name, dir_fd=fd)
                        if not stat_mod.S_ISDIR(st.st_mode):
                            raise err(
                                NotADirectoryError,
                                f"{shown_path(parts[:i])!r}: exists and is not a directory",
                            ) from None
                    except OSError as exc:
                        raise client_error(exc, shown_path(parts[:i])) from None
        else:
            with self.sandbox.parent(parts, "create") as (fd, name), reworded(shown_path(parts)):
                os.mkdir(name, dir_fd=fd)
        return shown_path(parts)

    @exposed_op
    def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file or link, an empty directory, or with ``recursive`` a whole tree."""
        parts = self._parts(path)
        shown = shown_path(parts)
        if self._cwd[: len(parts)] == parts:
            raise err(PermissionError, f"{shown!r}: cannot remove the current directory or one above it")
        with self.sandbox.parent(parts, "remove") as (fd, name):
            st = lstat_or_none(fd, name, shown)
            if st is None:
                raise err(FileNotFoundError, f"{shown!r}: no such file or directory")
            with reworded(shown):
                if not stat_mod.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=fd)
                elif recursive:
                    shutil.rmtree(name, dir_fd=fd)  # fd-based: never follows a link out of the tree
                else:
                    os.rmdir(name, dir_fd=fd)

    @exposed_op
    def mv(self, src: str, dst: str) -> str:
        """Move/rename; into ``dst`` if it is a directory. Never replaces; returns the new path."""
        sparts, dparts = self._parts(src), self._parts(dst)
        with self.sandbox.parent(sparts, "move") as (sfd, sname):
            sst = self._source(sfd, sname, shown_path(sparts))
            dparts = self._destination(dparts, sname)
            if stat_mod.S_ISDIR(sst.st_mode) and dparts[: len(sparts)] == sparts:
                raise ValueError(f"{shown_path(sparts)!r}: cannot move a directory into itself")
            with self.sandbox.parent(dparts, "replace") as (dfd, dname), reworded(shown_path(dparts)):
                if lstat_or_none(dfd, dname, shown_path(dparts)) is not None:
                    raise err(FileExistsError, f"{shown_path(dparts)!r}: already exists")
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return shown_path(dparts)

    @exposed_op
    def cp(self, src: str, dst: str) -> str:
        """Copy a file, or a directory recursively; into ``dst`` if it is a directory. Never replaces."""
        sparts, dparts = self._parts(src), self._parts(dst)
        with self.sandbox.parent(sparts, "copy") as (sfd, sname):
            sst = self._source(sfd, sname, shown_path(sparts))
            dparts = self._destination(dparts, sname)
            is_dir = stat_mod.S_ISDIR(sst.st_mode)
            if is_dir and dparts[: len(sparts)] == sparts:
                raise ValueError(f"{shown_path(sparts)!r}: cannot copy a directory into itself")
            with self.sandbox.parent(dparts, "replace") as (dfd, dname):
                if lstat_or_none(dfd, dname, shown_path(dparts)) is not None:
                    raise err(FileExistsError, f"{shown_path(dparts)!r}: already exists")
                size = copy_size(sfd, sname, shown_path(sparts)) if is_dir else sst.st_size
                hold = self._hold_new_bytes(size, shown_path(dparts), largest=0 if is_dir else size)
                temp = temp_name(dname)
                try:
                    with reworded(shown_path(sparts)):
                        if is_dir:
                            os.mkdir(temp, dir_fd=dfd)
                            copy_tree(sfd, sname, dfd, temp, shown_path(sparts))
                        else:
                            copy_file(sfd, sname, dfd, temp, shown_path(sparts))
                    with reworded(shown_path(dparts)):
                        if lstat_or_none(dfd, dname, shown_path(dparts)) is not None:
                            raise err(FileExistsError, f"{shown_path(dparts)!r}: already exists")
                        os.rename(temp, dname, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with suppress(OSError):
                        if is_dir:
                            shutil.rmtree(temp, dir_fd=dfd)
                        else:
                            os.unlink(temp, dir_fd=dfd)
                    raise
                finally:
                    if hold is not None and self.quota is not None:
                        self.quota.release(hold)  # the copy is in place (or gone): counted by size
        return shown_path(dparts)

    def _source(self, dir_fd: int, name: str, shown: str) -> os.stat_result:
        st = lstat_or_none(dir_fd, name, shown)
        if st is None:
            raise err(FileNotFoundError, f"{shown!r}: no such file or directory")
        if stat_mod.S_ISLNK(st.st_mode):
            raise err(
                PermissionError, f"{shown!r}: is a symbolic link; links are not followed, copied or moved"
            )
        return st

    def _destination(self, dparts: tuple[str, ...], src_name: str) -> tuple[str, ...]:
        """``dst``, or ``dst/<src name>`` when ``dst`` is an existing directory."""
        if not dparts:
            return (src_name,)
        with self.sandbox.parent(dparts) as (fd, name):
            st = lstat_or_none(fd, name, shown_path(dparts))
            if st is not None and stat_mod.S_ISDIR(st.st_mode):
                return (*dparts, src_name)
        return dparts

    def _hold_new_bytes(self, size: int, shown: str, largest: int) -> str | None:
        """Check the limits for ``size`` new bytes and reserve them; the reservation's key, if any."""
        if largest > self.max_file_size:
            raise ValueError(
                f"{shown!r}: {human_size(largest)} is over the largest file allowed "
                f"({human_size(self.max_file_size)})"
            )
        if self.quota is None:
            return None
        key = f"cp-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.quota.reserve(key, size)
        except QuotaExceeded as exc:
            self.count_refusal("max_total_bytes")
            raise ValueError(f"{shown!r}: {exc}; nothing was written") from None
        return key

    def count_refusal(self, limit: str) -> None:
        """Count a refusal by one of this service's own caps in the host's /metrics."""
        if self._account is not None:
            self._account.ledger.count_refusal(limit)

    def claim_transfer(self, shown: str) -> None:
        """Take one open transfer from this connection's budget; EMFILE naming the limit past a cap."""
        if self._account is None:
            return
        try:
            self._account.acquire("open_transfers")
        except budget.LimitExceeded as exc:
            raise err(OSError, f"{shown!r}: not opened: {exc}", errno.EMFILE) from None

    def release_transfer(self) -> None:
        if self._account is not None:
            self._account.release("open_transfers")

    # -- small files -------------------------------------------------------------------------------

    @exposed_op
    def read_bytes(self, path: str) -> bytes:
        """A whole small file (up to the small-file limit; use open_read for more)."""
        parts = self._parts(path)
        shown = shown_path(parts)
        with self.sandbox.parent(parts, "read") as (dfd, name):
            fd = open_regular(dfd, name, shown)
        try:
            size = os.fstat(fd).st_size
            if size > self.small_io_limit:
                raise ValueError(
                    f"{shown!r}: {human_size(size)} is over the small-file limit "
                    f"({human_size(self.small_io_limit)}); use open_read"
                )
            data = os.pread(fd, size, 0)
            while len(data) < size and (more := os.pread(fd, size - len(data), len(data))):
                data += more
            self.counts.add(bytes_out=len(data), downloads=1)
            return data
        finally:
            os.close(fd)

    @exposed_op
    def write_bytes(self, path: str, data: bytes, overwrite: bool = True) -> tuple[int, str]:
        """Write a whole small file atomically; returns ``(size, sha256 hex)``."""
        if not isinstance(data, bytes):
            raise TypeError(f"write_bytes(path, data): data must be bytes, got {type(data).__name__}")
        if len(data) > self.small_io_limit:
            raise ValueError(
                f"{path!r}: {human_size(len(data))} is over the small-file limit "
                f"({human_size(self.small_io_limit)}); use open_write"
            )
        upload = self._open_upload(path, bool(overwrite), 0, hashes.LEGACY)
        try:
            upload.write(data)
            return upload.commit()
        finally:
            upload._discard()

    # -- streaming ---------------------------------------------------------------------------------

    @exposed_op
    def open_read(self, path: str, offset: int = 0, hash: str = hashes.LEGACY) -> Download:
        """A file open for reading from ``offset``: read(n), bulk(), size(), digest(), sha256(), close().

        ``hash`` names what ``digest()`` reports: blake3, xxh3_128 or sha256 (the default, for
        clients that name none).
        """
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"open_read(path, offset): offset must be an int >= 0, got {offset!r}")
        parts = self._parts(path)
        shown = shown_path(parts)
        hash_name = _hash_option(shown, hash)
        self.claim_transfer(shown)  # before any descriptor is opened: a refusal costs nothing
        try:
            with self.sandbox.parent(parts, "read") as (dfd, name):
                fd = open_regular(dfd, name, shown)
            size = os.fstat(fd).st_size
            if offset > size:
                os.close(fd)
                raise ValueError(f"{shown!r}: offset {offset} is past the end of the file ({size} bytes)")
            transfer = Download(self, fd, shown, offset, hash_name)  # owns the claim from here on
        except BaseException:
            self.release_transfer()
            raise
        self._transfers.add(transfer)
        return transfer

    @exposed_op
    def open_write(
        self, path: str, overwrite: bool = False, offset: int = 0, hash: str = hashes.LEGACY
    ) -> Upload:
        """Start an upload (``offset`` > 0: resume an interrupted one); commit() to publish it.

        ``hash`` names what ``digest()``, ``prefix_digest()`` and ``commit()`` report: blake3,
        xxh3_128 or sha256 (the default, for clients that name none).
        """
        return self._open_upload(path, bool(overwrite), offset, hash)

    def _open_upload(self, path: str, overwrite: bool, offset: Any, hash_name: Any) -> Upload:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(
                f"open_write(path, overwrite, offset): offset must be an int >= 0, got {offset!r}"
            )
        parts = self._parts(path)
        shown = shown_path(parts)
        hash_name = _hash_option(shown, hash_name)
        self.claim_transfer(shown)
        try:
            upload = self._new_upload(parts, shown, overwrite, offset, hash_name)  # owns the claim now
        except BaseException:
            self.release_transfer()
            raise
        self._transfers.add(upload)
        return upload

    def _new_upload(
        self, parts: tuple[str, ...], shown: str, overwrite: bool, offset: int, hash_name: str
    ) -> Upload:
        with self.sandbox.parent(parts, "replace") as (dfd, name):
            st = lstat_or_none(dfd, name, shown)
            if st is not None:
                if stat_mod.S_ISDIR(st.st_mode):
                    raise err(IsADirectoryError, f"{shown!r}: is a directory")
                if stat_mod.S_ISLNK(st.st_mode):
                    raise err(PermissionError, f"{shown!r}: is a symbolic link; links are not followed")
                if not overwrite:
                    raise err(
                        FileExistsError, f"{shown!r}: already exists (pass overwrite=True to replace it)"
                    )
            if offset > self.max_file_size:
                raise ValueError(f"{shown!r}: offset {offset} is over the largest file allowed")
            own_dfd = os.dup(dfd)
        try:
            with reworded(shown):
                fd, temp = (
                    self._resume(own_dfd, name, shown, offset) if offset else self._create(own_dfd, name)
                )
        except BaseException:
            os.close(own_dfd)
            raise
        try:
            upload = Upload(
                self,
                fd=fd,
                dir_fd=own_dfd,
                dir_parts=parts[:-1],
                name=name,
                temp=temp,
                overwrite=overwrite,
                offset=offset,
                hash_name=hash_name,
            )
        except BaseException:
            os.close(fd)
            os.close(own_dfd)
            raise
        return upload

    def _create(self, dir_fd: int, name: str) -> tuple[int, str]:
        self._sweep_dir(dir_fd)
        temp = temp_name(name)
        fd = os.open(
            temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, temp

    def _resume(self, dir_fd: int, name: str, shown: str, offset: int) -> tuple[int, str]:
        """The largest unlocked partial upload of ``name`` with at least ``offset`` bytes, cut to it."""
        prefix = f".upload-{name_hash(name)}-"
        best: tuple[int, int, str] | None = None
        for entry in os.listdir(dir_fd):
            if not (entry.startswith(prefix) and TEMP_NAME.match(entry)):
                continue
            try:
                fd = os.open(entry, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # another connection is still writing this one
                continue
            size = os.fstat(fd).st_size
            if size >= offset and (best is None or size > best[0]):
                if best is not None:
                    os.close(best[1])
                best = (size, fd, entry)
            else:
                os.close(fd)
        if best is None:
            raise ValueError(
                f"{shown!r}: no interrupted upload with {offset} bytes to resume; start at offset 0"
            )
        _, fd, temp = best
        os.ftruncate(fd, offset)
        return fd, temp

    def _sweep_dir(self, dir_fd: int) -> None:
        """Drop partial uploads in this directory that nobody resumed within ``partial_ttl``."""
        now = time.time()
        for entry in os.listdir(dir_fd):
            if TEMP_NAME.match(entry):
                with suppress(OSError):
                    st = os.lstat(entry, dir_fd=dir_fd)
                    if stat_mod.S_ISREG(st.st_mode) and now - st.st_mtime > self.partial_ttl:
                        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            os.unlink(entry, dir_fd=dir_fd)
                        finally:
                            os.close(fd)

    @exposed_op
    def resumable(self, path: str) -> int:
        """Bytes held by the largest interrupted upload of ``path`` (0 if none)."""
        parts = self._parts(path)
        with self.sandbox.parent(parts) as (dfd, name), reworded(shown_path(parts)):
            prefix = f".upload-{name_hash(name)}-"
            best = 0
            for entry in os.listdir(dfd):
                if entry.startswith(prefix) and TEMP_NAME.match(entry):
                    with suppress(OSError):
                        st = os.lstat(entry, dir_fd=dfd)
                        if stat_mod.S_ISREG(st.st_mode):
                            best = max(best, st.st_size)
            return best

    @exposed_op
    def limits(self) -> tuple[tuple[str, Any], ...]:
        """The configured limits, as ``(name, value)`` pairs."""
        return (
            ("max_file_size", self.max_file_size),
            ("max_total_bytes", self.max_total_bytes),
            ("small_io_limit", self.small_io_limit),
        )


class _Scan:
    """Names (or entries) of an open directory, one per ``next()``; ``close()`` closes the
    directory, also when nothing was read (a generator that never started could not)."""

    def __init__(self, fd: int, long: bool) -> None:
        self._fd = fd  # DirEntry.stat() reads relative to it: open until the end
        self._entries = os.scandir(fd)
        self._long = long

    def __iter__(self) -> _Scan:
        return self

    def __next__(self) -> Any:
        for entry in self._entries:
            if hidden(entry.name):
                continue
            if not self._long:
                return entry.name
            with suppress(FileNotFoundError):
                return entry_of(entry.name, entry.stat(follow_symlinks=False))
        self.close()
        raise StopIteration

    def close(self) -> None:
        if self._fd >= 0:
            self._entries.close()
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

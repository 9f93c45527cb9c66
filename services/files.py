"""The remote file service: a sandboxed directory tree with streaming, atomic, resumable transfers.

Every path a client gives is relative to its connection's current directory inside ``root``
(``pwd()`` shows it relative to ``root``; absolute paths are refused). Paths are resolved one
component at a time from an open descriptor of ``root`` with ``O_NOFOLLOW``, and every operation
then acts relative to the descriptor of its parent directory, so:

- nothing outside ``root`` is read, written, listed or revealed, even if a directory is swapped
  for a symlink between two calls;
- symbolic links are never followed: ``ls`` and ``stat`` show them, ``rm`` removes them, and
  any other use of one is a ``PermissionError``.

Uploads go to a hidden temporary file (``.upload-<hash>-<random>.part``, not listed) in the
target directory and are linked under their name only by ``commit()``, after ``fsync``. A
connection that drops mid-upload leaves its partial file for ``open_write(..., offset=N)`` to
resume; partials are removed at the next start, after ``partial_ttl`` seconds, or by ``abort()``.

Bulk bytes do not travel over rpyc: ``bulk(length)`` on a transfer object returns a one-time
ticket for a side connection (``rpyc_host.bulk``). ``read``/``write`` over rpyc stay available
for small pieces and for clients without the side channel.

Errors reach clients as ``PermissionError``, ``FileNotFoundError``, ``FileExistsError``,
``IsADirectoryError``, ``NotADirectoryError``, ``ValueError`` or ``TypeError`` whose message
names the path as the client sees it (relative to ``root``), never the server's own paths.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import rpyc

from rpyc_host import bulk

log = logging.getLogger("services.files")

NAME_MAX = 255
PATH_MAX = 4096
GiB = 1 << 30
MiB = 1 << 20
XATTR_SHA256 = "user.rpyc_host.sha256"  # "size:mtime_ns:hex", written by commit()
_TEMP = re.compile(r"^\.upload-[0-9a-f]{16}-[0-9a-f]{16}\.part$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us
_HASH_CHUNK = 4 * MiB

Entry = tuple[str, str, int, float, int]  # name, kind, size, mtime, mode
F = TypeVar("F", bound=Callable[..., Any])


# -- errors ------------------------------------------------------------------------------------------


_ERRNO = {
    PermissionError: errno.EACCES,
    FileNotFoundError: errno.ENOENT,
    FileExistsError: errno.EEXIST,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
    ConnectionError: errno.ECONNABORTED,
}


def _err(cls: type[OSError], message: str, code: int | None = None) -> OSError:
    """An error for the client: ``strerror`` is ``message``, which names the path as the client sees it.

    (rpyc re-creates OSErrors from ``(errno, strerror)``; a one-argument OSError arrives empty.)
    ``code`` is the errno the client sees (default: the usual one for ``cls``, else EIO).
    """
    exc = cls(code if code is not None else _ERRNO.get(cls, errno.EIO), message)
    exc._for_client = True  # type: ignore[attr-defined]
    return exc


def _client_error(exc: OSError, shown: str) -> Exception:
    """A raw OSError from the OS, reworded for the client with the path as the client sees it."""
    code = exc.errno
    if code == errno.ENOENT:
        return _err(FileNotFoundError, f"{shown!r}: no such file or directory")
    if code == errno.EEXIST:
        return _err(FileExistsError, f"{shown!r}: already exists")
    if code == errno.EISDIR:
        return _err(IsADirectoryError, f"{shown!r}: is a directory")
    if code == errno.ENOTDIR:
        return _err(NotADirectoryError, f"{shown!r}: not a directory")
    if code in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return _err(PermissionError, f"{shown!r}: permission denied")
    if code == errno.ENOTEMPTY:
        # The errno lets a front end word the fix its own way (the CLI says -r).
        return _err(OSError, f"{shown!r}: directory not empty (pass recursive=True)", errno.ENOTEMPTY)
    if code == errno.ENAMETOOLONG:
        return ValueError(f"{shown!r}: name too long")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return _err(OSError, f"{shown!r}: no space left on the server's disk")
    if code == errno.EINVAL:
        return ValueError(f"{shown!r}: invalid operation on this path")
    return _err(OSError, f"{shown!r}: {exc.strerror or 'operation failed'}")


@contextmanager
def _reworded(shown: str) -> Iterator[None]:
    """Reword raw OS errors (they carry an errno); errors made for clients pass through."""
    try:
        yield
    except OSError as exc:
        if getattr(exc, "_for_client", False):
            raise
        raise _client_error(exc, shown) from None


def _op(fn: F) -> F:
    """Expose ``fn``; any raw OS error that escapes is reworded without server paths."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if getattr(exc, "_for_client", False):
                raise
            raise _client_error(exc, "?") from None

    return rpyc.exposed(call)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# -- paths -------------------------------------------------------------------------------------------


def _shown(parts: tuple[str, ...]) -> str:
    return "/".join(parts) or "."


def _check_name(name: str, path: str) -> None:
    if len(os.fsencode(name)) > NAME_MAX:
        raise ValueError(f"{path!r}: name {name[:24]!r}... is longer than {NAME_MAX} bytes")
    if _TEMP.match(name):
        raise _err(PermissionError, f"{path!r}: names of the form .upload-*.part are reserved for uploads")


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
            raise _err(
                PermissionError,
                f"{path!r}: absolute paths are not allowed; paths are relative to the current "
                f"directory ({_shown(cwd)!r}, inside the service's root)",
            )
        out = list(cwd)
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    raise _err(PermissionError, f"{path!r}: leads outside the service's root")
                out.pop()
                continue
            _check_name(part, path)
            out.append(part)
        return tuple(out)

    @contextmanager
    def directory(self, parts: tuple[str, ...]) -> Iterator[int]:
        """An open descriptor of directory ``parts``, reached without following any symlink."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    shown = _shown(parts[: i + 1])
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(fd, part):
                        raise _err(
                            PermissionError, f"{shown!r}: is a symbolic link; links are not followed"
                        ) from None
                    raise _client_error(exc, shown) from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, parts: tuple[str, ...], what: str = "use") -> Iterator[tuple[int, str]]:
        """``(descriptor of the parent directory, last name)`` for a path other than the root."""
        if not parts:
            raise _err(PermissionError, f"cannot {what} the service's root directory")
        with self.directory(parts[:-1]) as fd:
            yield fd, parts[-1]


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat_mod.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _lstat(dir_fd: int, name: str, shown: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _client_error(exc, shown) from None


def _kind(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


def _entry(name: str, st: os.stat_result) -> Entry:
    kind = _kind(st.st_mode)
    size = st.st_size if kind == "file" else 0  # a link's size is its target's length: not shown
    return (name, kind, size, st.st_mtime, stat_mod.S_IMODE(st.st_mode))


def _temp_name(name: str) -> str:
    return f".upload-{_name_hash(name)}-{secrets.token_hex(8)}.part"


def _name_hash(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _open_regular(dir_fd: int, name: str, shown: str) -> int:
    """Open an existing regular file for reading; directories, links and devices are refused."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _err(PermissionError, f"{shown!r}: is a symbolic link; links are not followed") from None
        raise _client_error(exc, shown) from None
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode):
        os.close(fd)
        if stat_mod.S_ISDIR(st.st_mode):
            raise _err(IsADirectoryError, f"{shown!r}: is a directory")
        raise _err(PermissionError, f"{shown!r}: not a regular file")
    return fd


def _hash_fd(fd: int, start: int, end: int, hasher: Any = None) -> Any:
    h = hasher or hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    pos = start
    while pos < end:
        n = os.preadv(fd, [view[: min(_HASH_CHUNK, end - pos)]], pos)
        if n == 0:
            break
        h.update(view[:n])
        pos += n
    return h


def file_sha256(fd: int) -> str:
    """SHA-256 of an open file: from the commit-time xattr if the file is unchanged, else computed."""
    st = os.fstat(fd)
    key = f"{st.st_size}:{st.st_mtime_ns}:"
    try:
        cached = os.getxattr(fd, XATTR_SHA256).decode()
        if cached.startswith(key):
            return cached[len(key) :]
    except OSError:
        pass
    digest: str = _hash_fd(fd, 0, st.st_size).hexdigest()
    _remember_sha256(fd, digest, st)
    return digest


def _remember_sha256(fd: int, digest: str, st: os.stat_result | None = None) -> None:
    st = st or os.fstat(fd)
    try:  # a cache only: a filesystem without user xattrs just recomputes next time
        os.setxattr(fd, XATTR_SHA256, f"{st.st_size}:{st.st_mtime_ns}:{digest}".encode())
    except OSError:
        pass


def _tree_usage(root: str) -> int:
    """Bytes in regular files under ``root`` (links not followed)."""
    total = 0
    stack = [root]
    while stack:
        with suppress(OSError), os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if stat_mod.S_ISREG(st.st_mode):
                    total += st.st_size
                elif stat_mod.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def _sweep_partials(root: str, older_than: float | None = None) -> int:
    """Remove upload temporaries under ``root`` that no live upload holds; returns how many."""
    removed = 0
    stack = [root]
    now = time.time()
    while stack:
        with suppress(OSError), os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    if _TEMP.match(entry.name):
                        shutil.rmtree(entry.path, ignore_errors=True)  # a cp that died mid-copy
                        removed += 1
                    else:
                        stack.append(entry.path)
                elif _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
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


# -- transfers ---------------------------------------------------------------------------------------


class _Transfer:
    """What uploads and downloads share: the file, the position, and one bulk side transfer."""

    def __init__(self, service: FileService, fd: int, shown: str, pos: int) -> None:
        self._svc = service
        self._fd = fd
        self._shown = shown
        self._pos = pos
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._offer: bulk.BulkOffer | None = None
        self._bulk_sock: Any = None
        self._bulk_done = 0
        self._bulk_error: BaseException | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._shown!r}: transfer is closed")

    def _check_idle(self) -> None:
        self._check_open()
        if self._thread is not None:
            raise ValueError(f"{self._shown!r}: a bulk transfer is running; call wait() until it is done")

    def _start_bulk(self, count: int, work: Callable[[Any, int], None]) -> bulk.Ticket:
        self._check_idle()
        self._offer = offer = bulk.BulkOffer(
            self._svc._bind_host, timeout=self._svc.transfer_timeout, wrap=self._svc._bulk_wrap
        )
        self._bulk_done = 0
        self._bulk_error = None

        def run() -> None:
            try:
                sock = offer.accept()
                self._bulk_sock = sock
                try:
                    sock.settimeout(self._svc.transfer_timeout)
                    work(sock, count)
                finally:
                    sock.close()
            except BaseException as exc:
                self._bulk_error = exc

        self._thread = threading.Thread(target=run, name=f"files-bulk {self._shown}", daemon=True)
        self._thread.start()
        return offer.ticket

    def _wait_bulk(self, timeout: Any) -> tuple[bool, int]:
        self._check_open()
        thread = self._thread
        if thread is None:
            raise ValueError(f"{self._shown!r}: no bulk transfer was started")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= 60:
            raise ValueError(f"wait(timeout): timeout must be 0 to 60 seconds, got {timeout!r}")
        thread.join(timeout)
        if thread.is_alive():
            return False, self._bulk_done
        self._thread = None
        error = self._bulk_error
        if error is not None:
            self._on_bulk_failed()
            if isinstance(error, ValueError | PermissionError):
                raise error
            raise _err(ConnectionError, f"{self._shown!r}: data transfer failed: {error}")
        return True, self._bulk_done

    def _on_bulk_failed(self) -> None:
        """Hook: what a failed side transfer leaves behind."""

    def _stop_bulk(self) -> None:
        if self._offer is not None:
            self._offer.close()
        sock = self._bulk_sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(2)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_bulk()
        os.close(self._fd)
        self._svc._transfers.discard(self)

    @rpyc.exposed
    def tell(self) -> int:
        """The position the next read/write/bulk starts at."""
        return self._pos


@rpyc.service
class Download(_Transfer):
    """A file open for reading, returned by ``open_read``."""

    def __init__(self, service: FileService, fd: int, shown: str, pos: int) -> None:
        super().__init__(service, fd, shown, pos)
        self._length = os.fstat(fd).st_size

    @_op
    def size(self) -> int:
        """The file's size in bytes."""
        return self._length

    @_op
    def sha256(self) -> str:
        """SHA-256 (hex) of the whole file."""
        self._check_open()
        return file_sha256(self._fd)

    @_op
    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes from the current position (at most the small-file limit per call)."""
        self._check_idle()
        limit = self._svc.small_io_limit
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"read(n): n must be an int, got {type(n).__name__}")
        if n < 0 or n > limit:
            n = limit
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data

    @_op
    def bulk(self, length: int = -1) -> bulk.Ticket:
        """Send ``length`` bytes (-1: to the end) over a side connection; returns its ticket."""
        self._check_idle()
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"bulk(length): length must be an int, got {type(length).__name__}")
        left = max(0, self._length - self._pos)
        count = left if length < 0 else min(length, left)

        def work(sock: Any, count: int) -> None:
            def sent(n: int) -> None:
                self._bulk_done += n
                self._pos += n

            bulk.send_file(sock, self._fd, self._pos, count, sent)

        return self._start_bulk(count, work)

    @_op
    def wait(self, timeout: float = 1.0) -> tuple[bool, int]:
        """Wait up to ``timeout`` s for the bulk transfer: ``(finished, bytes so far)``."""
        return self._wait_bulk(timeout)

    @_op
    def close(self) -> None:
        """Release the file."""
        self._release()


@rpyc.service
class Upload(_Transfer):
    """A file being written, returned by ``open_write``; nothing appears until ``commit()``."""

    def __init__(
        self,
        service: FileService,
        *,
        fd: int,
        dir_fd: int,
        dir_parts: tuple[str, ...],
        name: str,
        temp: str,
        overwrite: bool,
        offset: int,
    ) -> None:
        super().__init__(service, fd, _shown((*dir_parts, name)), offset)
        self._dir_fd = dir_fd
        self._dir_parts = dir_parts
        self._name = name
        self._temp = temp
        self._overwrite = overwrite
        self._start = offset
        self._hash = _hash_fd(fd, 0, offset)
        self._prefix_sha256 = self._hash.hexdigest()
        os.lseek(fd, offset, os.SEEK_SET)
        limit = service.max_total_bytes
        self._base_usage = _tree_usage(service.root) if limit is not None else 0

    # -- limits ----------------------------------------------------------------------------------

    def _check_room(self, extra: int) -> None:
        """ValueError (and the upload aborted) if ``extra`` more bytes would pass a limit."""
        svc = self._svc
        new_size = self._pos + extra
        problem = None
        if new_size > svc.max_file_size:
            problem = f"{_size(new_size)} would exceed the largest file allowed ({_size(svc.max_file_size)})"
        elif svc.max_total_bytes is not None:
            used = self._base_usage + (self._pos - self._start) + extra
            if used > svc.max_total_bytes:
                problem = (
                    f"{_size(extra)} more would exceed the storage quota "
                    f"({_size(svc.max_total_bytes)}, {_size(self._base_usage)} in use)"
                )
        if problem:
            self._discard()
            raise ValueError(f"{self._shown!r}: {problem}; upload aborted, nothing was written")

    # -- data ------------------------------------------------------------------------------------

    @_op
    def prefix_sha256(self) -> str:
        """SHA-256 of the bytes before the resume offset (compare with yours before resuming)."""
        return self._prefix_sha256

    @_op
    def sha256(self) -> str:
        """SHA-256 of everything written so far (check it before commit())."""
        self._check_idle()
        return str(self._hash.copy().hexdigest())

    @_op
    def write(self, data: bytes) -> int:
        """Append ``data`` (at most the small-file limit per call); returns the new size."""
        self._check_idle()
        if not isinstance(data, bytes):
            raise TypeError(f"write(data): data must be bytes, got {type(data).__name__}")
        if len(data) > self._svc.small_io_limit:
            raise ValueError(
                f"write(data): {_size(len(data))} in one call is over the {_size(self._svc.small_io_limit)} "
                "limit; split it or use bulk()"
            )
        self._check_room(len(data))
        view = memoryview(data)
        pos = self._pos
        with _reworded(self._shown):
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
        self._hash.update(data)
        self._pos += len(data)
        return self._pos

    @_op
    def bulk(self, length: int) -> bulk.Ticket:
        """Receive exactly ``length`` bytes over a side connection; returns its ticket."""
        self._check_idle()
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"bulk(length): length must be an int >= 0, got {length!r}")
        self._check_room(length)

        def work(sock: Any, count: int) -> None:
            def stored(n: int) -> None:  # written and hashed, in order
                self._bulk_done += n
                self._pos += n

            bulk.recv_to_file(sock, self._fd, self._pos, count, self._hash, stored)

        return self._start_bulk(length, work)

    def _on_bulk_failed(self) -> None:
        # Bytes past the last complete write may be torn: keep the file resumable up to _pos only.
        os.ftruncate(self._fd, self._pos)

    @_op
    def wait(self, timeout: float = 1.0) -> tuple[bool, int]:
        """Wait up to ``timeout`` s for the bulk transfer: ``(finished, bytes so far)``."""
        return self._wait_bulk(timeout)

    @_op
    def commit(self) -> tuple[int, str]:
        """Make the file appear under its name (after fsync); returns ``(size, sha256 hex)``."""
        self._check_idle()
        shown = self._shown
        try:
            os.fsync(self._fd)
            digest = self._hash.hexdigest()
            _remember_sha256(self._fd, digest)
            self._check_same_directory()
            with _reworded(shown):
                if self._overwrite:
                    os.replace(self._temp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
                else:
                    # link() fails if the name exists: of two racing uploads, one wins whole.
                    os.link(
                        self._temp,
                        self._name,
                        src_dir_fd=self._dir_fd,
                        dst_dir_fd=self._dir_fd,
                        follow_symlinks=False,
                    )
                    os.unlink(self._temp, dir_fd=self._dir_fd)
                os.fsync(self._dir_fd)
        except BaseException:
            self._discard()
            raise
        size = self._pos
        self._temp = ""
        self._release()
        log.info("committed %s: %d bytes", shown, size)
        return size, digest

    def _check_same_directory(self) -> None:
        """The target directory must still be where its path leads (no symlink swapped in)."""
        try:
            with self._svc.sandbox.directory(self._dir_parts) as now:
                a, b = os.fstat(now), os.fstat(self._dir_fd)
                same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        except OSError as exc:
            raise _err(
                PermissionError,
                f"{self._shown!r}: the target directory changed during the upload ({exc}); "
                "nothing was written",
            ) from None
        if not same:
            raise _err(
                PermissionError,
                f"{self._shown!r}: the target directory was replaced during the upload; nothing was written",
            )

    @_op
    def abort(self) -> None:
        """Give up: the temporary file is removed and nothing appears."""
        self._discard()

    @_op
    def close(self) -> None:
        """Abort unless committed."""
        self._discard()

    def _discard(self) -> None:
        if self._temp:
            with suppress(OSError):
                os.unlink(self._temp, dir_fd=self._dir_fd)
            self._temp = ""
        self._release()

    def detach(self) -> None:
        """The client went away: keep the partial file (resumable) but let go of it."""
        if self._temp and self._thread is not None:
            self._stop_bulk()
            if self._bulk_error is not None:
                with suppress(OSError):
                    os.ftruncate(self._fd, self._pos)
        self._release()

    def _release(self) -> None:
        was_closed = self._closed
        super()._release()
        if not was_closed:
            os.close(self._dir_fd)


# -- the service -------------------------------------------------------------------------------------


def _int_option(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of bytes, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


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
        if not isinstance(root, str) or not root or "\x00" in root:
            raise TypeError(f"root must be a directory path, got {root!r}")
        self.max_file_size: int = _int_option("max_file_size", max_file_size, 0)  # type: ignore[assignment]
        self.max_total_bytes = _int_option("max_total_bytes", max_total_bytes, 0, allow_none=True)
        self.small_io_limit: int = _int_option("small_io_limit", small_io_limit, 1)  # type: ignore[assignment]
        for name, value in (("transfer_timeout", transfer_timeout), ("partial_ttl", partial_ttl)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
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
        removed = _sweep_partials(self.root)  # left by a crash or by clients that never came back
        if removed:
            log.info("removed %d unfinished upload(s) under %s", removed, self.root)
        self._cwd: tuple[str, ...] = ()
        self._bind_host = "127.0.0.1"
        self._bulk_wrap: bulk.SocketWrapper | None = None
        self._transfers: set[_Transfer] = set()

    def on_connect(self, conn: Any) -> None:
        self._cwd = ()
        self._transfers = set()
        endpoints = conn._config.get("endpoints")
        if endpoints and endpoints[0]:
            self._bind_host = endpoints[0][0]  # side connections use the interface the client reached
        # A TLS control connection means TLS side connections, with the same server context.
        self._bulk_wrap = bulk.server_wrapper(bulk.control_socket(conn))

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

    @_op
    def pwd(self) -> str:
        """The current directory, relative to the service's root ("." at the root)."""
        return _shown(self._cwd)

    @_op
    def cd(self, path: str = "") -> str:
        """Change this connection's current directory ("" or no argument: the root); returns it."""
        parts = self._parts(path) if path != "" else ()
        with self.sandbox.directory(parts):
            self._cwd = parts
        return _shown(parts)

    @_op
    def ls(self, path: str = ".", long: bool = False) -> tuple[Any, ...]:
        """Sorted names in a directory, or with ``long`` ``(name, kind, size, mtime, mode)`` entries."""
        parts = self._parts(path)
        with self.sandbox.directory(parts) as fd, _reworded(_shown(parts)):
            entries: list[Any] = []
            for name in sorted(os.listdir(fd)):
                if _TEMP.match(name):
                    continue
                if not long:
                    entries.append(name)
                    continue
                with suppress(FileNotFoundError):
                    entries.append(_entry(name, os.lstat(name, dir_fd=fd)))
            return tuple(entries)

    @_op
    def stat(self, path: str) -> Entry:
        """``(name, kind, size, mtime, mode)``; kind is file, dir, symlink or other."""
        parts = self._parts(path)
        if not parts:
            with self.sandbox.directory(parts) as fd:
                return _entry(".", os.fstat(fd))
        with self.sandbox.parent(parts) as (fd, name):
            st = _lstat(fd, name, _shown(parts))
            if st is None:
                raise _err(FileNotFoundError, f"{_shown(parts)!r}: no such file or directory")
            return _entry(name, st)

    @_op
    def exists(self, path: str) -> bool:
        """Whether anything (file, directory, link) has this name."""
        parts = self._parts(path)
        if not parts:
            return True
        try:
            with self.sandbox.parent(parts) as (fd, name):
                return _lstat(fd, name, _shown(parts)) is not None
        except (FileNotFoundError, NotADirectoryError):
            return False

    # -- changes -----------------------------------------------------------------------------------

    @_op
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
                            raise _err(
                                NotADirectoryError, f"{_shown(parts[:i])!r}: exists and is not a directory"
                            ) from None
                    except OSError as exc:
                        raise _client_error(exc, _shown(parts[:i])) from None
        else:
            with self.sandbox.parent(parts, "create") as (fd, name), _reworded(_shown(parts)):
                os.mkdir(name, dir_fd=fd)
        return _shown(parts)

    @_op
    def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file or link, an empty directory, or with ``recursive`` a whole tree."""
        parts = self._parts(path)
        shown = _shown(parts)
        if self._cwd[: len(parts)] == parts:
            raise _err(PermissionError, f"{shown!r}: cannot remove the current directory or one above it")
        with self.sandbox.parent(parts, "remove") as (fd, name):
            st = _lstat(fd, name, shown)
            if st is None:
                raise _err(FileNotFoundError, f"{shown!r}: no such file or directory")
            with _reworded(shown):
                if not stat_mod.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=fd)
                elif recursive:
                    shutil.rmtree(name, dir_fd=fd)  # fd-based: never follows a link out of the tree
                else:
                    os.rmdir(name, dir_fd=fd)

    @_op
    def mv(self, src: str, dst: str) -> str:
        """Move/rename; into ``dst`` if it is a directory. Never replaces; returns the new path."""
        sparts, dparts = self._parts(src), self._parts(dst)
        with self.sandbox.parent(sparts, "move") as (sfd, sname):
            sst = self._source(sfd, sname, _shown(sparts))
            dparts = self._destination(dparts, sname)
            if stat_mod.S_ISDIR(sst.st_mode) and dparts[: len(sparts)] == sparts:
                raise ValueError(f"{_shown(sparts)!r}: cannot move a directory into itself")
            with self.sandbox.parent(dparts, "replace") as (dfd, dname), _reworded(_shown(dparts)):
                if _lstat(dfd, dname, _shown(dparts)) is not None:
                    raise _err(FileExistsError, f"{_shown(dparts)!r}: already exists")
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return _shown(dparts)

    @_op
    def cp(self, src: str, dst: str) -> str:
        """Copy a file, or a directory recursively; into ``dst`` if it is a directory. Never replaces."""
        sparts, dparts = self._parts(src), self._parts(dst)
        with self.sandbox.parent(sparts, "copy") as (sfd, sname):
            sst = self._source(sfd, sname, _shown(sparts))
            dparts = self._destination(dparts, sname)
            is_dir = stat_mod.S_ISDIR(sst.st_mode)
            if is_dir and dparts[: len(sparts)] == sparts:
                raise ValueError(f"{_shown(sparts)!r}: cannot copy a directory into itself")
            with self.sandbox.parent(dparts, "replace") as (dfd, dname):
                if _lstat(dfd, dname, _shown(dparts)) is not None:
                    raise _err(FileExistsError, f"{_shown(dparts)!r}: already exists")
                size = _copy_size(sfd, sname, _shown(sparts)) if is_dir else sst.st_size
                self._check_new_bytes(size, _shown(dparts), largest=0 if is_dir else size)
                temp = _temp_name(dname)
                try:
                    with _reworded(_shown(sparts)):
                        if is_dir:
                            os.mkdir(temp, dir_fd=dfd)
                            _copy_tree(sfd, sname, dfd, temp, _shown(sparts))
                        else:
                            _copy_file(sfd, sname, dfd, temp, _shown(sparts))
                    with _reworded(_shown(dparts)):
                        if _lstat(dfd, dname, _shown(dparts)) is not None:
                            raise _err(FileExistsError, f"{_shown(dparts)!r}: already exists")
                        os.rename(temp, dname, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with suppress(OSError):
                        if is_dir:
                            shutil.rmtree(temp, dir_fd=dfd)
                        else:
                            os.unlink(temp, dir_fd=dfd)
                    raise
        return _shown(dparts)

    def _source(self, dir_fd: int, name: str, shown: str) -> os.stat_result:
        st = _lstat(dir_fd, name, shown)
        if st is None:
            raise _err(FileNotFoundError, f"{shown!r}: no such file or directory")
        if stat_mod.S_ISLNK(st.st_mode):
            raise _err(
                PermissionError, f"{shown!r}: is a symbolic link; links are not followed, copied or moved"
            )
        return st

    def _destination(self, dparts: tuple[str, ...], src_name: str) -> tuple[str, ...]:
        """``dst``, or ``dst/<src name>`` when ``dst`` is an existing directory."""
        if not dparts:
            return (src_name,)
        with self.sandbox.parent(dparts) as (fd, name):
            st = _lstat(fd, name, _shown(dparts))
            if st is not None and stat_mod.S_ISDIR(st.st_mode):
                return (*dparts, src_name)
        return dparts

    def _check_new_bytes(self, size: int, shown: str, largest: int) -> None:
        if largest > self.max_file_size:
            raise ValueError(
                f"{shown!r}: {_size(largest)} is over the largest file allowed ({_size(self.max_file_size)})"
            )
        if self.max_total_bytes is not None:
            used = _tree_usage(self.root)
            if used + size > self.max_total_bytes:
                raise ValueError(
                    f"{shown!r}: {_size(size)} more would exceed the storage quota "
                    f"({_size(self.max_total_bytes)}, {_size(used)} in use); nothing was written"
                )

    # -- small files -------------------------------------------------------------------------------

    @_op
    def read_bytes(self, path: str) -> bytes:
        """A whole small file (up to the small-file limit; use open_read for more)."""
        parts = self._parts(path)
        shown = _shown(parts)
        with self.sandbox.parent(parts, "read") as (dfd, name):
            fd = _open_regular(dfd, name, shown)
        try:
            size = os.fstat(fd).st_size
            if size > self.small_io_limit:
                raise ValueError(
                    f"{shown!r}: {_size(size)} is over the small-file limit "
                    f"({_size(self.small_io_limit)}); use open_read"
                )
            data = os.pread(fd, size, 0)
            while len(data) < size and (more := os.pread(fd, size - len(data), len(data))):
                data += more
            return data
        finally:
            os.close(fd)

    @_op
    def write_bytes(self, path: str, data: bytes, overwrite: bool = True) -> tuple[int, str]:
        """Write a whole small file atomically; returns ``(size, sha256 hex)``."""
        if not isinstance(data, bytes):
            raise TypeError(f"write_bytes(path, data): data must be bytes, got {type(data).__name__}")
        if len(data) > self.small_io_limit:
            raise ValueError(
                f"{path!r}: {_size(len(data))} is over the small-file limit "
                f"({_size(self.small_io_limit)}); use open_write"
            )
        upload = self._open_upload(path, bool(overwrite), 0)
        try:
            upload.write(data)
            return upload.commit()
        finally:
            upload._discard()

    # -- streaming ---------------------------------------------------------------------------------

    @_op
    def open_read(self, path: str, offset: int = 0) -> Download:
        """A file open for reading from ``offset``: read(n), bulk(), size(), sha256(), close()."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"open_read(path, offset): offset must be an int >= 0, got {offset!r}")
        parts = self._parts(path)
        shown = _shown(parts)
        with self.sandbox.parent(parts, "read") as (dfd, name):
            fd = _open_regular(dfd, name, shown)
        size = os.fstat(fd).st_size
        if offset > size:
            os.close(fd)
            raise ValueError(f"{shown!r}: offset {offset} is past the end of the file ({size} bytes)")
        transfer = Download(self, fd, shown, offset)
        self._transfers.add(transfer)
        return transfer

    @_op
    def open_write(self, path: str, overwrite: bool = False, offset: int = 0) -> Upload:
        """Start an upload (``offset`` > 0: resume an interrupted one); commit() to publish it."""
        return self._open_upload(path, bool(overwrite), offset)

    def _open_upload(self, path: str, overwrite: bool, offset: Any) -> Upload:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(
                f"open_write(path, overwrite, offset): offset must be an int >= 0, got {offset!r}"
            )
        parts = self._parts(path)
        shown = _shown(parts)
        with self.sandbox.parent(parts, "replace") as (dfd, name):
            st = _lstat(dfd, name, shown)
            if st is not None:
                if stat_mod.S_ISDIR(st.st_mode):
                    raise _err(IsADirectoryError, f"{shown!r}: is a directory")
                if stat_mod.S_ISLNK(st.st_mode):
                    raise _err(PermissionError, f"{shown!r}: is a symbolic link; links are not followed")
                if not overwrite:
                    raise _err(
                        FileExistsError, f"{shown!r}: already exists (pass overwrite=True to replace it)"
                    )
            if offset > self.max_file_size:
                raise ValueError(f"{shown!r}: offset {offset} is over the largest file allowed")
            own_dfd = os.dup(dfd)
        try:
            with _reworded(shown):
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
            )
        except BaseException:
            os.close(fd)
            os.close(own_dfd)
            raise
        self._transfers.add(upload)
        return upload

    def _create(self, dir_fd: int, name: str) -> tuple[int, str]:
        self._sweep_dir(dir_fd)
        temp = _temp_name(name)
        fd = os.open(
            temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, temp

    def _resume(self, dir_fd: int, name: str, shown: str, offset: int) -> tuple[int, str]:
        """The largest unlocked partial upload of ``name`` with at least ``offset`` bytes, cut to it."""
        prefix = f".upload-{_name_hash(name)}-"
        best: tuple[int, int, str] | None = None
        for entry in os.listdir(dir_fd):
            if not (entry.startswith(prefix) and _TEMP.match(entry)):
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
            if _TEMP.match(entry):
                with suppress(OSError):
                    st = os.lstat(entry, dir_fd=dir_fd)
                    if stat_mod.S_ISREG(st.st_mode) and now - st.st_mtime > self.partial_ttl:
                        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            os.unlink(entry, dir_fd=dir_fd)
                        finally:
                            os.close(fd)

    @_op
    def resumable(self, path: str) -> int:
        """Bytes held by the largest interrupted upload of ``path`` (0 if none)."""
        parts = self._parts(path)
        with self.sandbox.parent(parts) as (dfd, name), _reworded(_shown(parts)):
            prefix = f".upload-{_name_hash(name)}-"
            best = 0
            for entry in os.listdir(dfd):
                if entry.startswith(prefix) and _TEMP.match(entry):
                    with suppress(OSError):
                        st = os.lstat(entry, dir_fd=dfd)
                        if stat_mod.S_ISREG(st.st_mode):
                            best = max(best, st.st_size)
            return best

    @_op
    def limits(self) -> tuple[tuple[str, Any], ...]:
        """The configured limits, as ``(name, value)`` pairs."""
        return (
            ("max_file_size", self.max_file_size),
            ("max_total_bytes", self.max_total_bytes),
            ("small_io_limit", self.small_io_limit),
        )


# -- copies ------------------------------------------------------------------------------------------


def _copy_file(sfd: int, sname: str, dfd: int, dname: str, shown: str) -> None:
    src = _open_regular(sfd, sname, shown)
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


def _copy_tree(sfd: int, sname: str, dfd: int, dname: str, shown: str) -> None:
    """Copy directory ``sname`` (relative to ``sfd``) into the existing empty ``dname``."""
    src = os.open(sname, _DIR_FLAGS, dir_fd=sfd)
    try:
        dst = os.open(dname, _DIR_FLAGS, dir_fd=dfd)
        try:
            for entry in sorted(os.listdir(src)):
                if _TEMP.match(entry):
                    continue
                path = f"{shown}/{entry}"
                st = os.lstat(entry, dir_fd=src)
                if stat_mod.S_ISDIR(st.st_mode):
                    os.mkdir(entry, dir_fd=dst)
                    _copy_tree(src, entry, dst, entry, path)
                elif stat_mod.S_ISREG(st.st_mode):
                    _copy_file(src, entry, dst, entry, path)
                else:
                    raise _err(
                        PermissionError,
                        f"{path!r}: is a {_kind(st.st_mode)}; cp copies files and directories only",
                    )
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_size(sfd: int, sname: str, shown: str) -> int:
    total = 0
    stack: list[tuple[int, str, bool]] = [(sfd, sname, False)]
    opened: list[int] = []
    try:
        while stack:
            parent, name, _ = stack.pop()
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            opened.append(fd)
            for entry in os.listdir(fd):
                st = os.lstat(entry, dir_fd=fd)
                if stat_mod.S_ISREG(st.st_mode):
                    total += st.st_size
                elif stat_mod.S_ISDIR(st.st_mode):
                    stack.append((fd, entry, True))
    except OSError as exc:
        raise _client_error(exc, shown) from None
    finally:
        for fd in opened:
            os.close(fd)
    return total

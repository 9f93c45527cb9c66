"""Upload and download files through the file service, verified end to end and resumable.

Usage::

    import client
    from client import files

    with client.connect("files") as conn:
        size, digest = files.upload(conn, "big.iso", "isos/big.iso", progress=print)
        files.download(conn, "isos/big.iso", "copy.iso")    # resumes copy.iso.part if present
        for entry in files.ls(conn, "isos"):
            print(entry.name, entry.size)

Bytes travel over a one-time side connection (``bulk=True``, the default) at close to raw socket
speed; ``bulk=False`` sends them as rpyc calls instead (slower, but needs no second connection).

Integrity: both ends hash the bytes (off the socket thread) and the digests must match before an
upload is committed or a download renamed into place. ``hash=`` picks the algorithm per transfer:
``"blake3"`` (the default; cryptographic and several times faster than SHA-256), ``"xxh3_128"``
(faster still, but it detects corruption only, not a deliberate change) or ``"sha256"``.

Error handling: the service's own errors arrive as the standard types (``FileNotFoundError``,
``PermissionError``, ``FileExistsError``, ``IsADirectoryError``, ``ValueError``); a checksum that
does not match raises :class:`ChecksumError` and nothing is published (upload) or left under
the local name (download).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import rpyc

from rpyc_host.wire import bulk as bulk_io
from rpyc_host.wire import hashes

from .errors import ChecksumError

__all__ = ["HASHES", "ChecksumError", "Entry", "Progress", "download", "ls", "stat", "upload"]

HASHES = tuple(sorted(hashes.HASHES))  # the names ``hash=`` takes
DEFAULT_HASH = hashes.DEFAULT

Progress = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while a transfer runs."""

PART_SUFFIX = ".part"
RPC_CHUNK = 4 << 20  # bulk=False: bytes per write()/read() call
_HASH_CHUNK = 4 << 20


class Entry(NamedTuple):
    """One ``ls(long=True)`` / ``stat`` result."""

    name: str
    kind: str  # file, dir, symlink, other
    size: int
    mtime: float
    mode: int


def ls(conn: Any, path: str = ".") -> list[Entry]:
    """Entries of a remote directory, with kind, size, mtime and mode."""
    return [Entry(*e) for e in conn.root.ls(path, True)]


def stat(conn: Any, path: str) -> Entry:
    """One remote entry (links are described, not followed)."""
    return Entry(*conn.root.stat(path))


def upload(
    conn: Any,
    local: str | os.PathLike[str],
    remote: str,
    *,
    overwrite: bool = False,
    resume: bool = True,
    progress: Progress | None = None,
    timeout: float = 30.0,
    bulk: bool = True,
    hash: str = hashes.DEFAULT,
) -> tuple[int, str]:
    """Send a local file to ``remote``; returns ``(size, hex digest)`` as the server committed it.

    Returns once the file is on the server's disk (fsync) under its name.

    Args:
        overwrite: replace an existing remote file (else FileExistsError).
        resume: continue an interrupted upload of the same file if the server kept one and its
            bytes match ours (checked by ``hash``); otherwise start over.
        progress: ``progress(done, total)`` callback.
        timeout: seconds the side connection may stall.
        bulk: use the side connection (fast); False sends rpyc calls of 4 MiB.
        hash: the integrity hash, one of :data:`HASHES` (ValueError naming them otherwise).

    Raises:
        ChecksumError: the server's hash differs from ours; the upload was aborted.
    """
    hashes.check_name(hash)
    root = conn.root
    with open(local, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        writer, offset = _open_writer(root, fd, size, remote, overwrite, resume, hash)
        try:
            hasher = _BackgroundHash(fd, size, hash)  # overlaps hashing our copy with sending it
            report = _Reporter(progress, size, offset)
            if bulk:
                ticket = writer.bulk(size - offset)
                with _open_bulk(conn, ticket, timeout) as sock:
                    sent = bulk_io.send_file(sock, fd, offset, size - offset, report.add)
                    if sent != size - offset:
                        raise ValueError(f"{os.fspath(local)!r} shrank while it was being sent")
                    _wait_remote(writer, timeout)
            else:
                write = writer.write
                pos = offset
                while pos < size:
                    chunk = os.pread(fd, min(RPC_CHUNK, size - pos), pos)
                    if not chunk:
                        raise ValueError(f"{os.fspath(local)!r} shrank while it was being sent")
                    write(chunk)
                    pos += len(chunk)
                    report.add(len(chunk))
            ours = hasher.result()
            theirs = writer.digest()
            if theirs != ours:
                raise ChecksumError(
                    f"upload of {os.fspath(local)!r} to {remote!r}: server has {hash} {theirs}, "
                    f"we sent {ours}; the upload was aborted"
                )
            rsize, digest = writer.commit()
        except (Exception, KeyboardInterrupt) as exc:
            if not isinstance(exc, KeyboardInterrupt | EOFError | ConnectionError):
                _quietly(writer.abort)  # a connection that drops keeps the partial for resuming
            raise
    if (rsize, digest) != (size, ours):
        raise ChecksumError(
            f"upload of {os.fspath(local)!r}: server committed {rsize} bytes, {hash} {digest}"
        )
    return rsize, digest


def _open_writer(
    root: Any, fd: int, size: int, remote: str, overwrite: bool, resume: bool, hash_name: str
) -> tuple[Any, int]:
    if resume:
        have = root.resumable(remote)
        if 0 < have <= size:
            try:
                writer = root.open_write(remote, overwrite, have, hash_name)
            except ValueError:  # someone else resumed it first
                writer = None
            if writer is not None:
                if writer.prefix_digest() == _hash_range(fd, 0, have, hashes.new(hash_name)):
                    return writer, have
                writer.abort()  # the partial is not a prefix of this file: start over
    return root.open_write(remote, overwrite, 0, hash_name), 0


def download(
    conn: Any,
    remote: str,
    local: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: Progress | None = None,
    timeout: float = 30.0,
    bulk: bool = True,
    hash: str = hashes.DEFAULT,
) -> tuple[int, str]:
    """Fetch ``remote`` into ``local``; returns ``(size, hex digest)`` by ``hash``.

    Bytes go to ``local + ".part"`` first and are renamed to ``local`` only once the digest
    (``hash``, one of :data:`HASHES`) matches the server's; with ``resume`` an existing
    ``.part`` is continued, not restarted.

    Raises:
        ChecksumError: the bytes differ from the server's; the ``.part`` file was removed.
    """
    hashes.check_name(hash)
    root = conn.root
    local = os.fspath(local)
    part = local + PART_SUFFIX
    offset = os.path.getsize(part) if resume and os.path.isfile(part) else 0
    if offset and offset > root.stat(remote)[2]:
        offset = 0  # the .part is not a prefix of this file: start over
    reader = root.open_read(remote, offset, hash)
    try:
        size = reader.size()
        digest_call = rpyc.async_(reader.digest)()  # the server hashes while it sends
        with open(part, "r+b" if offset else "wb") as f:
            fd = f.fileno()
            os.ftruncate(fd, offset)
            hasher = hashes.new(hash)
            _hash_range(fd, 0, offset, hasher)
            os.lseek(fd, offset, os.SEEK_SET)
            report = _Reporter(progress, size, offset)
            if bulk:
                ticket = reader.bulk(-1)
                with _open_bulk(conn, ticket, timeout) as sock:
                    bulk_io.recv_to_file(sock, fd, offset, size - offset, hasher, report.add)
                _wait_remote(reader, timeout)
            else:
                read = reader.read
                pos = offset
                while pos < size:
                    data = read(RPC_CHUNK)
                    if not data:
                        raise ValueError(f"{remote!r} shrank while it was being read")
                    os.write(fd, data)
                    hasher.update(data)
                    report.add(len(data))
                    pos += len(data)
            os.fsync(fd)
        digest_call.wait()
        theirs = digest_call.value
        ours = hasher.hexdigest()
        if theirs != ours:
            os.unlink(part)
            raise ChecksumError(f"download of {remote!r}: server has {hash} {theirs}, we received {ours}")
        os.replace(part, local)
    finally:
        _quietly(reader.close)
    return size, ours


def _open_bulk(conn: Any, ticket: Any, timeout: float) -> Any:
    """The side connection for ``ticket``, with TLS when ``conn`` has it (same context and name)."""
    wrap = bulk_io.client_wrapper(bulk_io.control_socket(conn))
    return bulk_io.open_bulk(tuple(ticket), timeout=timeout, wrap=wrap)


def _wait_remote(transfer: Any, timeout: float) -> None:
    """Wait for the server's side of a bulk transfer; error if it makes no progress for ``timeout``."""
    wait = transfer.wait
    last, stalled_since = -1, time.monotonic()
    while True:
        done, count = wait(1.0)
        if done:
            return
        now = time.monotonic()
        if count != last:
            last, stalled_since = count, now
        elif now - stalled_since > timeout:
            raise TimeoutError(f"server made no progress for {timeout:g} s")


class _Reporter:
    """Turns per-chunk byte counts into cumulative ``progress(done, total)`` calls."""

    def __init__(self, progress: Progress | None, total: int, done: int) -> None:
        self.progress = progress
        self.total = total
        self.done = done
        if progress is not None:
            progress(done, total)

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


class _BackgroundHash:
    """The digest of a file computed in a thread (every hash in ``hashes`` releases the GIL)."""

    def __init__(self, fd: int, size: int, hash_name: str) -> None:
        self._fd = os.dup(fd)
        self._size = size
        self._hash_name = hash_name
        self._digest = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._digest = _hash_range(self._fd, 0, self._size, hashes.new(self._hash_name))
        except BaseException as exc:
            self._error = exc
        finally:
            os.close(self._fd)

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest


def _hash_range(fd: int, start: int, end: int, hasher: Any) -> str:
    """Update ``hasher`` with bytes ``start:end`` of ``fd`` (read into a reused buffer: no mmap,
    whose pages would SIGBUS this process if another one cut the file short); its hex digest."""
    h = hasher
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    pos = start
    while pos < end:
        n = os.preadv(fd, [view[: min(_HASH_CHUNK, end - pos)]], pos)
        if n == 0:
            raise ValueError("file shrank while it was being hashed")
        h.update(view[:n])
        pos += n
    return str(h.hexdigest())


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass

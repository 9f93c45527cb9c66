"""The remote file objects ``open_read`` and ``open_write`` return: :class:`Download`, :class:`Upload`."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import rpyc

from rpyc_host.wire import bulk, hashes

from .errors import err, exposed_op, human_size, reworded
from .paths import shown_path
from .quota import QuotaExceeded, quota_text
from .sidechannel import BulkOffer
from .storage import file_digest, file_sha256, hash_fd, remember_digest

if TYPE_CHECKING:
    from .service import FileService


log = logging.getLogger("services.files")


class TransferCounts:
    """Bytes and files moved by every connection of one service instance (for ``metrics()``).

    One object is made by ``FileService.__init__`` and shared by the per-connection copies, so
    updates from rpyc threads and bulk threads meet here, under a lock. Under the ``forking``
    server type each connection runs in a child process: its counts stay in that child and the
    parent's figures do not include them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # write_bytes and read_bytes count too: they are a small upload and download in one call.
        self.bytes_in = 0  # stored by uploads (committed or not)
        self.bytes_out = 0  # handed to clients by downloads
        self.uploads = 0  # uploads committed
        self.downloads = 0  # downloads that reached the end of their file

    def add(self, *, bytes_in: int = 0, bytes_out: int = 0, uploads: int = 0, downloads: int = 0) -> None:
        with self._lock:
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out
            self.uploads += uploads
            self.downloads += downloads

    def snapshot(self) -> dict[str, int]:
        """The four figures, named as the host's /metrics shows them (after ``rpyc_host_service_``)."""
        with self._lock:
            return {
                "files_bytes_in": self.bytes_in,
                "files_bytes_out": self.bytes_out,
                "files_uploads": self.uploads,
                "files_downloads": self.downloads,
            }


class Transfer:
    """What uploads and downloads share: the file, the position, the hash, one bulk side transfer.

    A transfer holds one of its connection's ``open_transfers`` (claimed by the service before
    the file was opened) until it is released. ``hash_name`` (one of ``hashes.HASHES``) is the
    digest ``digest()`` and ``commit()`` report; ``sha256()`` stays SHA-256 whatever it is.
    """

    def __init__(self, service: FileService, fd: int, shown: str, pos: int, hash_name: str) -> None:
        self._svc = service
        self._fd = fd
        self._shown = shown
        self._pos = pos
        self._hash_name = hash_name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._offer: BulkOffer | None = None
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
        self._offer = offer = BulkOffer(
            self._svc._bind_host,
            timeout=self._svc.transfer_timeout,
            tls=self._svc._side_tls,
            account=self._svc._account,
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
            raise err(ConnectionError, f"{self._shown!r}: data transfer failed: {error}")
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
        try:
            self._stop_bulk()
            os.close(self._fd)
        finally:
            self._svc.release_transfer()
            self._svc._transfers.discard(self)

    @rpyc.exposed
    def tell(self) -> int:
        """The position the next read/write/bulk starts at."""
        return self._pos

    @rpyc.exposed
    def hash_name(self) -> str:
        """The hash ``digest()`` (and an upload's ``commit()``) reports: blake3, xxh3_128 or sha256."""
        return self._hash_name


@rpyc.service
class Download(Transfer):
    """A file open for reading, returned by ``open_read``."""

    def __init__(self, service: FileService, fd: int, shown: str, pos: int, hash_name: str) -> None:
        super().__init__(service, fd, shown, pos, hash_name)
        self._length = os.fstat(fd).st_size
        self._finished = False  # counted as a download already

    def _count_if_finished(self) -> None:
        if not self._finished and self._pos >= self._length:
            self._finished = True
            self._svc.counts.add(downloads=1)

    @exposed_op
    def size(self) -> int:
        """The file's size in bytes."""
        return self._length

    @exposed_op
    def sha256(self) -> str:
        """SHA-256 (hex) of the whole file."""
        self._check_open()
        return file_sha256(self._fd)

    @exposed_op
    def digest(self, name: str | None = None) -> str:
        """Hex digest of the whole file by this transfer's hash, or by the hash ``name``."""
        self._check_open()
        return file_digest(self._fd, self._hash_name if name is None else hashes.check_name(name))

    @exposed_op
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
        self._svc.counts.add(bytes_out=len(data))
        self._count_if_finished()
        return data

    @exposed_op
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
                self._svc.counts.add(bytes_out=n)

            bulk.send_file(sock, self._fd, self._pos, count, sent)
            self._count_if_finished()

        return self._start_bulk(count, work)

    @exposed_op
    def wait(self, timeout: float = 1.0) -> tuple[bool, int]:
        """Wait up to ``timeout`` s for the bulk transfer: ``(finished, bytes so far)``."""
        return self._wait_bulk(timeout)

    @exposed_op
    def close(self) -> None:
        """Release the file."""
        self._release()


@rpyc.service
class Upload(Transfer):
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
        hash_name: str,
    ) -> None:
        super().__init__(service, fd, shown_path((*dir_parts, name)), offset, hash_name)
        self._dir_fd = dir_fd
        self._dir_parts = dir_parts
        self._name = name
        self._temp = temp
        self._overwrite = overwrite
        self._offset = offset
        self._hash = hash_fd(fd, 0, offset, hashes.new(hash_name))
        self._prefix_digest = str(self._hash.hexdigest())
        os.lseek(fd, offset, os.SEEK_SET)
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)
        # The quota counts the partial file by its size until the first reservation is made.
        self._quota_key = f"up-{os.getpid()}-{secrets.token_hex(8)}"
        self._reserved = 0

    # -- limits ----------------------------------------------------------------------------------

    def _check_room(self, extra: int) -> None:
        """Reserve room for ``extra`` more bytes; ValueError (and the upload aborted) past a limit."""
        svc = self._svc
        new_size = self._pos + extra
        problem = None
        if new_size > svc.max_file_size:
            problem = (
                f"{human_size(new_size)} would exceed the largest file allowed "
                f"({human_size(svc.max_file_size)})"
            )
        elif svc.quota is not None and new_size > self._reserved:
            try:
                svc.quota.reserve(self._quota_key, new_size, self._inode)
                self._reserved = new_size
            except QuotaExceeded as exc:
                svc.count_refusal("max_total_bytes")
                problem = (
                    f"{human_size(extra)} more would exceed {quota_text(exc.limit, exc.others + self._pos)}"
                )
        if problem:
            self._discard()
            raise ValueError(f"{self._shown!r}: {problem}; upload aborted, nothing was written")

    # -- data ------------------------------------------------------------------------------------

    @exposed_op
    def prefix_digest(self) -> str:
        """This upload's hash of the bytes before the resume offset (compare with yours first)."""
        return self._prefix_digest

    @exposed_op
    def prefix_sha256(self) -> str:
        """SHA-256 of the bytes before the resume offset (compare with yours before resuming)."""
        if self._hash_name == "sha256":
            return self._prefix_digest
        return str(hash_fd(self._fd, 0, self._offset).hexdigest())  # read again: asked for by name

    @exposed_op
    def digest(self, name: str | None = None) -> str:
        """This upload's hash (or the hash ``name``) of all written so far; check it before commit()."""
        self._check_idle()
        if name is None or hashes.check_name(name) == self._hash_name:
            return str(self._hash.copy().hexdigest())
        return str(hash_fd(self._fd, 0, self._pos, hashes.new(name)).hexdigest())  # read again: asked for

    @exposed_op
    def sha256(self) -> str:
        """SHA-256 of everything written so far, whatever this upload's hash (check it before commit())."""
        self._check_idle()
        return self.digest("sha256")

    @exposed_op
    def write(self, data: bytes) -> int:
        """Append ``data`` (at most the small-file limit per call); returns the new size."""
        self._check_idle()
        if not isinstance(data, bytes):
            raise TypeError(f"write(data): data must be bytes, got {type(data).__name__}")
        if len(data) > self._svc.small_io_limit:
            raise ValueError(
                f"write(data): {human_size(len(data))} in one call is over the "
                f"{human_size(self._svc.small_io_limit)} limit; split it or use bulk()"
            )
        self._check_room(len(data))
        view = memoryview(data)
        pos = self._pos
        with reworded(self._shown):
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
        self._hash.update(data)
        self._pos += len(data)
        self._svc.counts.add(bytes_in=len(data))
        return self._pos

    @exposed_op
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
                self._svc.counts.add(bytes_in=n)

            bulk.recv_to_file(sock, self._fd, self._pos, count, self._hash, stored)

        return self._start_bulk(length, work)

    def _on_bulk_failed(self) -> None:
        # Bytes past the last complete write may be torn: keep the file resumable up to _pos only.
        os.ftruncate(self._fd, self._pos)

    @exposed_op
    def wait(self, timeout: float = 1.0) -> tuple[bool, int]:
        """Wait up to ``timeout`` s for the bulk transfer: ``(finished, bytes so far)``."""
        return self._wait_bulk(timeout)

    @exposed_op
    def commit(self) -> tuple[int, str]:
        """Make the file appear under its name (after fsync); returns ``(size, hex digest)``.

        The digest is by this upload's hash (``hash_name()``; SHA-256 unless ``open_write`` named another).
        """
        self._check_idle()
        shown = self._shown
        try:
            os.fsync(self._fd)
            digest = str(self._hash.hexdigest())
            remember_digest(self._fd, self._hash_name, digest)
            self._check_same_directory()
            with reworded(shown):
                quota = self._svc.quota
                if quota is None:
                    self._publish()
                else:
                    # Once more under the quota's lock: the file appears only if it still fits.
                    quota.commit(self._quota_key, self._pos, self._inode, self._publish)
                    self._reserved = 0
            # The directory's fsync makes the new name durable; it need not hold the quota's
            # lock (the name is already there), so other uploads' checks do not wait on the disk.
            os.fsync(self._dir_fd)
        except QuotaExceeded as exc:
            self._svc.count_refusal("max_total_bytes")
            self._discard()
            raise ValueError(
                f"{shown!r}: {human_size(self._pos)} would exceed {quota_text(exc.limit, exc.others)}; "
                "upload aborted, nothing was written"
            ) from None
        except BaseException:
            self._discard()
            raise
        size = self._pos
        self._temp = ""
        self._release()
        self._svc.counts.add(uploads=1)
        log.info("committed %s: %d bytes", shown, size)
        return size, digest

    def _publish(self) -> None:
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

    def _check_same_directory(self) -> None:
        """The target directory must still be where its path leads (no symlink swapped in)."""
        try:
            with self._svc.sandbox.directory(self._dir_parts) as now:
                a, b = os.fstat(now), os.fstat(self._dir_fd)
                same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        except OSError as exc:
            raise err(
                PermissionError,
                f"{self._shown!r}: the target directory changed during the upload ({exc}); "
                "nothing was written",
            ) from None
        if not same:
            raise err(
                PermissionError,
                f"{self._shown!r}: the target directory was replaced during the upload; nothing was written",
            )

    @exposed_op
    def abort(self) -> None:
        """Give up: the temporary file is removed and nothing appears."""
        self._discard()

    @exposed_op
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
        try:
            super()._release()
        finally:
            if not was_closed:
                os.close(self._dir_fd)
                if self._reserved and self._svc.quota is not None:
                    self._reserved = 0
                    # A partial kept for resuming now counts by its size, like any file.
                    self._svc.quota.release(self._quota_key)

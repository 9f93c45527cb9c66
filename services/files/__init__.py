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
ticket for a side connection (``rpyc_host.wire.bulk``). ``read``/``write`` over rpyc stay available
for small pieces and for clients without the side channel.

Errors reach clients as ``PermissionError``, ``FileNotFoundError``, ``FileExistsError``,
``IsADirectoryError``, ``NotADirectoryError``, ``ValueError`` or ``TypeError`` whose message
names the path as the client sees it (relative to ``root``), never the server's own paths.

Modules, by responsibility: ``paths`` (sandboxed resolution), ``errors`` (what clients see),
``storage`` (checksum xattrs, usage, partial uploads), ``copies`` (``cp``), ``transfers``
(:class:`Download`, :class:`Upload`) and ``service`` (:class:`FileService`).
"""

from .service import FileService
from .storage import XATTR_SHA256, file_sha256
from .transfers import Download, Upload

__all__ = ["XATTR_SHA256", "Download", "FileService", "Upload", "file_sha256"]

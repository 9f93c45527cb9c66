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

Every transfer is hashed as it moves, by the hash its client named (``open_write(...,
hash=...)``, ``open_read(..., hash=...)``: blake3, xxh3_128 or sha256, the last for clients that
name none; ``rpyc_host.wire.hashes``); ``digest()`` reports it and ``sha256()`` stays SHA-256.

Bulk bytes do not travel over rpyc: ``bulk(length)`` on a transfer object returns a one-time
ticket for a side connection (``sidechannel``; the bytes move with ``rpyc_host.wire.bulk``).
``read``/``write`` over rpyc stay available for small pieces and for clients without the side
channel.

No client can take the service down for the others: the quota (``max_total_bytes``) is
reserved when an upload announces its bytes and holds across threads and processes
(``quota``); open transfers count against ``limits.max_open_transfers`` and
``..._per_connection`` (OSError EMFILE past a cap); side connections that have not shown their
token are served side by side, each for at most 2 s, and count against
``limits.max_pending_side_connections``.

Errors reach clients as ``PermissionError``, ``FileNotFoundError``, ``FileExistsError``,
``IsADirectoryError``, ``NotADirectoryError``, ``ValueError`` or ``TypeError`` whose message
names the path as the client sees it (relative to ``root``), never the server's own paths.

Modules, by responsibility: ``paths`` (sandboxed resolution), ``errors`` (what clients see),
``storage`` (checksum xattrs, usage, partial uploads), ``quota`` (reservations shared by every
process), ``copies`` (``cp``), ``sidechannel`` (the listener behind a ticket), ``transfers``
(:class:`Download`, :class:`Upload`) and ``service`` (:class:`FileService`).
"""

from .service import FileService
from .storage import XATTR_SHA256, file_sha256
from .transfers import Download, Upload

__all__ = ["XATTR_SHA256", "Download", "FileService", "Upload", "file_sha256"]

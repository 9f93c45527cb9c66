"""Durable stores for ingested records, chosen by the scheme of a database URL.

Usage::

    store = open_store("sqlite:///var/ingest.db")        # relative to the working directory
    duplicate = store.write(BatchWrite("load", "b-1", ('{"load1": 0.4}',), receipt="..."))
    store.count("load"), store.topics(), store.query("load", after_id=0, limit=100)
    store.close()

A backend is a class with ``from_url(url, group)`` that implements :class:`Store`; add it to
:data:`BACKENDS` under its URL scheme (``"postgresql"``: :mod:`.postgres`). The service only
ever talks to :class:`Store`, so a new backend needs no change there. A backend's ``write``
goes through a :class:`~.group.GroupCommit` around its own ``write_group`` (one transaction
for every batch queued together).

Errors a backend raises to callers::

    StoreError (OSError)       the write did not happen (disk full, I/O error, ...): retryable
    └── StoreBusy              another writer held the database longer than the busy timeout
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload
from urllib.parse import urlsplit

from rpyc_host.errors import did_you_mean


class StoreError(OSError):
    """A storage operation failed; nothing of the batch was stored."""


class StoreBusy(StoreError):
    """The database stayed locked by another writer for longer than the busy timeout."""


class JsonLines(Sequence[str]):
    """Rows as one block: each row's JSON text in UTF-8 followed by ``b"\\n"``, no row holding a
    newline or a tab, carriage return or other control character (compact JSON as msgspec writes
    it, control characters escaped).

    The service's fast path encodes a whole batch in one call; a backend can write ``block``
    as it is (one COPY block) instead of handling a thousand ``str`` objects. As a
    sequence it still reads as the row texts (split on first use).
    """

    __slots__ = ("_texts", "block", "length")

    def __init__(self, block: bytes, length: int) -> None:
        self.block = block
        self.length = length
        self._texts: list[str] | None = None

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.texts()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts())

    def texts(self) -> list[str]:
        """The rows as ``str``."""
        if self._texts is None:
            self._texts = self.block.decode().split("\n")[: self.length]
        return self._texts

    @property
    def size(self) -> int:
        """Bytes of row text, without the newlines."""
        return len(self.block) - self.length


def rows_size(rows: Sequence[str]) -> int:
    """Characters (bytes, for :class:`JsonLines`) of row text: what the group limits count."""
    return rows.size if type(rows) is JsonLines else sum(map(len, rows))


@dataclass(frozen=True)
class BatchWrite:
    """One batch to store atomically, under a batch id that makes it idempotent.

    ``rows`` are the JSON texts of the records to keep (after processing), a list or a
    :class:`JsonLines` block; ``receipt`` is an opaque text the store keeps with the batch and
    hands back when the id is seen again.
    """

    topic: str
    batch_id: str
    rows: Sequence[str]
    receipt: str
    rejected: int = 0
    dropped: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class Stats:
    """Totals since the store was created (they survive restarts)."""

    records: int = 0
    batches: int = 0
    rejects: int = 0
    dropped: int = 0
    duplicates: int = 0
    bytes: int = 0


class Store(Protocol):
    """What the ingest service needs from a database."""

    url: str

    def write(self, batch: BatchWrite) -> str | None:
        """Store ``batch`` and commit (in one transaction with batches other threads submit at
        the same moment); return None, or the stored receipt if the id is known."""

    def duplicate(self, batch_id: str) -> str | None:
        """The stored receipt of ``batch_id`` (counting one duplicate), or None if unknown."""

    def count(self, topic: str | None = None) -> int:
        """Records stored under ``topic``, or in all topics."""

    def topics(self) -> tuple[str, ...]:
        """Every topic with stored records, sorted."""

    def query(self, topic: str, after_id: int, limit: int) -> tuple[tuple[int, str], ...]:
        """Up to ``limit`` ``(id, record JSON)`` of ``topic`` with id > ``after_id``, by id."""

    def stats(self) -> Stats:
        """Totals: records, batches, rejects, dropped, duplicates, bytes."""

    def close(self) -> None:
        """Release what this process holds (connections); safe to call twice."""


class Backend(Protocol):
    @classmethod
    def from_url(cls, url: str, group: GroupLimits | None = None) -> Store: ...


def _backends() -> dict[str, type[Backend]]:
    from .postgres import PostgresStore  # imports psycopg only when a store is opened
    from .sqlite import SQLiteStore

    return {"postgresql": PostgresStore, "sqlite": SQLiteStore}


from .group import GroupLimits  # noqa: E402  (needs BatchWrite and StoreError above)

BACKENDS = _backends()
"""URL scheme -> backend class."""


def open_store(url: str, group: GroupLimits | None = None) -> Store:
    """Open (creating if needed) the store a database URL names; ``group`` bounds what its
    group-commit writer puts in one transaction (:class:`~.group.GroupLimits` defaults if None).

    Raises:
        TypeError: ``url`` is not a string.
        ValueError: unknown scheme, or a URL the backend rejects; the message says which part.
        StoreError: the database could not be opened or created.
    """
    if not isinstance(url, str):
        raise TypeError(f"database must be a URL string such as 'sqlite:///var/ingest.db', got {url!r}")
    scheme = urlsplit(url).scheme
    backend = BACKENDS.get(scheme)
    if backend is None:
        known = ", ".join(sorted(BACKENDS))
        what = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(
            f"database {url!r}: {what}{did_you_mean(scheme, BACKENDS)}; known schemes: {known} "
            f"(for example 'sqlite:///var/ingest.db')"
        )
    return backend.from_url(url, group)

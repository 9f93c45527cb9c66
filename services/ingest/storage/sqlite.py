"""The SQLite backend: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

Durability: the database runs in WAL mode with ``synchronous=FULL``. A transaction is
committed only after its WAL frames are written *and fsync()ed*, so a batch whose receipt was
returned survives a crash of the server process (SIGKILL) and of the machine (power loss),
as far as the disk honours fsync. ``?synchronous=normal`` in the URL trades that last part
away: in WAL mode NORMAL still survives a process crash and never corrupts the database, but
the most recent commits may roll back after a power loss. Measured on the project's 2-core
machine FULL cost no measurable throughput at 1,000-record batches, so it is the default.

Concurrency: batches submitted together by threads of one process are written in one
transaction by the group-commit writer (:mod:`.group`), so one fsync covers them all; processes
(the ``forking`` server, each child with its own writer) queue on SQLite's own lock with
``BEGIN IMMEDIATE`` and a busy timeout (``?busy_timeout=30`` seconds by default), so a writer
waits instead of failing. A writer that still cannot get the lock gets :class:`StoreBusy`, a
retryable error, never a lost write. Readers never block writers (WAL).

Fork safety: SQLite connections must not cross ``fork()``. Connections are opened lazily, one
per thread, and remembered per process id; a forked child opens its own and never touches
(or closes) the ones it inherited.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from . import BatchWrite, Stats, StoreBusy, StoreError
from .group import GroupCommit, GroupLimits

SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}
QUERY_KEYS = ("busy_timeout", "synchronous")

SCHEMA_VERSION = 1
"""Kept in ``PRAGMA user_version``; a file with another layout is refused, not misread."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    records INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL UNIQUE,
    topic_id INTEGER NOT NULL REFERENCES topics(id),
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    created REAL NOT NULL,
    receipt TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_topic ON batches (topic_id, last_id);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    records INTEGER NOT NULL, batches INTEGER NOT NULL, rejects INTEGER NOT NULL,
    dropped INTEGER NOT NULL, duplicates INTEGER NOT NULL, bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0, 0, 0);
"""
# A batch's records get consecutive ids (first_id..last_id), so the records table needs no
# topic column and no second index: finding a topic's records goes through its batches.

# Rows go in without their ids: under the write lock SQLite gives each the largest id so far
# plus one, the ids the batch rows name (checked after the insert). Binding no id per row cuts
# the insert's CPU by a quarter.
INSERT_RECORD = "INSERT INTO records (data) VALUES (?)"
CHUNK_ROWS = 999
"""Rows per multi-row INSERT: 999 parameters, SQLite's smallest compiled-in limit."""
INSERT_CHUNK = "INSERT INTO records (data) VALUES " + ", ".join(["(?)"] * CHUNK_ROWS)


class _PerProcess:
    """Connections and the writer lock of one process (a forked child makes its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.local = threading.local()
        self.write_lock = threading.Lock()
        self.connections: list[sqlite3.Connection] = []
        self.connections_lock = threading.Lock()


class SQLiteStore:
    """A :class:`~services.ingest.storage.Store` in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        synchronous: str = "full",
        busy_timeout: float = 30.0,
        group: GroupLimits | None = None,
    ) -> None:
        if synchronous.lower() not in SYNCHRONOUS:
            raise ValueError(f"synchronous={synchronous!r} is not one of {', '.join(sorted(SYNCHRONOUS))}")
        if not busy_timeout > 0:
            raise ValueError(f"busy_timeout={busy_timeout!r} must be a number of seconds > 0")
        self.path = Path(path)
        self.synchronous = SYNCHRONOUS[synchronous.lower()]
        self.busy_timeout = float(busy_timeout)
        self.url = f"sqlite:///{self.path}"
        self._proc = _PerProcess()
        self._group = GroupCommit(self._write_group, group)
        self._topic_ids: dict[str, int] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._open()
            try:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
                self._check_version(conn)
                conn.executescript(SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            finally:
                # Closed again before any fork: each process opens its own (module docstring).
                conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open SQLite database {str(self.path)!r}: {exc}") from None

    def _check_version(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'records'").fetchone()[0]
        if tables and version != SCHEMA_VERSION:
            raise StoreError(
                f"{str(self.path)!r} has table layout version {version}, this version of the ingest "
                f"store uses {SCHEMA_VERSION}: move the file aside (or migrate it) and start again"
            )

    @classmethod
    def from_url(cls, url: str, group: GroupLimits | None = None) -> SQLiteStore:
        """``sqlite:///rel.db``, ``sqlite:////abs.db``, ``?synchronous=normal&busy_timeout=5``."""
        parts = urlsplit(url)
        if parts.netloc:
            raise ValueError(
                f"database {url!r}: a SQLite URL has no host; use 'sqlite:///relative/path.db' or "
                f"'sqlite:////absolute/path.db'"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path or path == ":memory:":
            raise ValueError(
                f"database {url!r}: needs a file path (an in-memory database is not durable), "
                f"e.g. 'sqlite:///var/ingest.db'"
            )
        options: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in QUERY_KEYS:
                raise ValueError(f"database {url!r}: unknown option {key!r}; known: {', '.join(QUERY_KEYS)}")
            options[key] = value
        try:
            timeout = float(options.get("busy_timeout", "30"))
        except ValueError:
            raise ValueError(
                f"database {url!r}: busy_timeout must be seconds, got {options['busy_timeout']!r}"
            ) from None
        return cls(path, synchronous=options.get("synchronous", "full"), busy_timeout=timeout, group=group)

    # -- connections ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn

    def _here(self) -> _PerProcess:
        proc = self._proc
        if proc.pid != os.getpid():  # a forked child: leave the parent's connections alone
            proc = self._proc = _PerProcess()
        return proc

    def _conn(self) -> sqlite3.Connection:
        proc = self._here()
        conn: sqlite3.Connection | None = getattr(proc.local, "conn", None)
        if conn is None:
            try:
                conn = self._open()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open SQLite database {str(self.path)!r}: {exc}") from None
            proc.local.conn = conn
            with proc.connections_lock:
                proc.connections.append(conn)
        return conn

    def close(self) -> None:
        proc = self._proc
        if proc.pid != os.getpid():
            return
        with proc.connections_lock:
            conns, proc.connections = proc.connections, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        proc.local = threading.local()

    # -- writes --------------------------------------------------------------------------------

    def _begin(self, conn: sqlite3.Connection) -> None:
        started = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreBusy(
                    f"database {str(self.path)!r} stayed locked by another writer for "
                    f"{time.monotonic() - started:.1f} s; nothing was stored, retry with the same batch id"
                ) from None
            raise StoreError(f"database {str(self.path)!r}: cannot start a write: {exc}") from None

    def write(self, batch: BatchWrite) -> str | None:
        return self._group.write(batch)

    def _write_group(self, group: Sequence[BatchWrite]) -> list[str | None]:
        """Write ``group`` in one transaction (called by the group-commit writer)."""
        conn = self._conn()
        with self._here().write_lock:
            self._begin(conn)
            try:
                results, topic_ids = self._write_in_transaction(conn, group)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(
                        f"database {str(self.path)!r}: write failed, nothing of {len(group)} "
                        f"batch(es) stored, retry with the same batch id: {exc}"
                    ) from None
                raise
            self._topic_ids.update(topic_ids)  # committed: safe to remember
        return results

    def _write_in_transaction(
        self, conn: sqlite3.Connection, group: Sequence[BatchWrite]
    ) -> tuple[list[str | None], dict[str, int]]:
        """Per batch None (stored) or the receipt stored before; and the topic ids used.

        A batch id seen earlier in the group or already in the database stores nothing and
        answers with the first batch's receipt, as a repeat in a later transaction would.
        """
        results: list[str | None] = []
        receipts: dict[str, str] = {}  # batch id -> receipt, for ids this group has seen
        topic_ids: dict[str, int] = {}
        per_topic: dict[int, int] = {}
        records = rejects = dropped = nbytes = batches = duplicates = 0
        # Ids are given explicitly (we hold the write lock): each batch's range is known.
        next_id = int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM records").fetchone()[0])
        first_id = next_id
        now = time.time()
        texts: list[str] = []
        for batch in group:
            known = receipts.get(batch.batch_id)
            if known is None:
                row = conn.execute(
                    "SELECT receipt FROM batches WHERE batch_id = ?", (batch.batch_id,)
                ).fetchone()
                known = None if row is None else str(row[0])
            if known is not None:
                receipts[batch.batch_id] = known
                results.append(known)
                duplicates += 1
                continue
            topic_id = topic_ids.get(batch.topic)
            if topic_id is None:
                topic_id = topic_ids[batch.topic] = self._topic_id(conn, batch.topic)
            n = len(batch.rows)
            conn.execute(
                "INSERT INTO batches (batch_id, topic_id, first_id, last_id, created, receipt) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (batch.batch_id, topic_id, next_id, next_id + n - 1, now, batch.receipt),
            )
            texts += batch.rows
            next_id += n
            per_topic[topic_id] = per_topic.get(topic_id, 0) + n
            receipts[batch.batch_id] = batch.receipt
            results.append(None)
            records += n
            batches += 1
            rejects += batch.rejected
            dropped += batch.dropped
            nbytes += batch.nbytes
        _insert_records(conn, first_id, texts)
        for topic_id, n in per_topic.items():
            conn.execute("UPDATE topics SET records = records + ? WHERE id = ?", (n, topic_id))
        conn.execute(
            "UPDATE totals SET records = records + ?, batches = batches + ?, rejects = rejects + ?, "
            "dropped = dropped + ?, bytes = bytes + ?, duplicates = duplicates + ?",
            (records, batches, rejects, dropped, nbytes, duplicates),
        )
        return results, topic_ids

    def _topic_id(self, conn: sqlite3.Connection, topic: str) -> int:
        # Only ids of committed topics are cached (write() adds them after COMMIT).
        cached = self._topic_ids.get(topic)
        if cached is None:
            conn.execute("INSERT OR IGNORE INTO topics (name) VALUES (?)", (topic,))
            cached = int(conn.execute("SELECT id FROM topics WHERE name = ?", (topic,)).fetchone()[0])
        return cached

    def duplicate(self, batch_id: str) -> str | None:
        conn = self._conn()
        row = conn.execute("SELECT receipt FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            return None
        with self._here().write_lock:
            self._begin(conn)
            try:
                conn.execute("UPDATE totals SET duplicates = duplicates + 1")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return str(row[0])

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"database {str(self.path)!r}: read failed: {exc}") from None

    def count(self, topic: str | None = None) -> int:
        if topic is None:
            rows = self._read("SELECT records FROM totals")
        else:
            rows = self._read("SELECT records FROM topics WHERE name = ?", (topic,))
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def topics(self) -> tuple[str, ...]:
        return tuple(str(r[0]) for r in self._read("SELECT name FROM topics WHERE records > 0 ORDER BY name"))

    def query(self, topic: str, after_id: int, limit: int) -> tuple[tuple[int, str], ...]:
        found: list[tuple[int, str]] = []
        try:
            conn = self._conn()
            batches = conn.execute(
                "SELECT b.first_id, b.last_id FROM batches b JOIN topics t ON t.id = b.topic_id "
                "WHERE t.name = ? AND b.last_id > ? AND b.last_id >= b.first_id ORDER BY b.last_id",
                (topic, after_id),
            )
            for first, last in batches:
                found += conn.execute(
                    "SELECT id, data FROM records WHERE id BETWEEN ? AND ? ORDER BY id LIMIT ?",
                    (max(first, after_id + 1), last, limit - len(found)),
                ).fetchall()
                if len(found) >= limit:
                    break
        except sqlite3.Error as exc:
            raise StoreError(f"database {str(self.path)!r}: read failed: {exc}") from None
        return tuple((int(i), str(d)) for i, d in found)

    def stats(self) -> Stats:
        rows = self._read("SELECT records, batches, rejects, dropped, duplicates, bytes FROM totals")
        return Stats(*(int(v) for v in rows[0]))  # type: ignore[call-overload]


def _insert_records(conn: sqlite3.Connection, first_id: int, texts: list[str]) -> None:
    """Insert ``texts`` as the records ``first_id, first_id + 1, ...``: whole chunks as one
    multi-row INSERT each (half the CPU of ``executemany``, which steps the statement once per
    row), the rest with ``executemany``."""
    n = len(texts)
    full = n - n % CHUNK_ROWS
    for k in range(0, full, CHUNK_ROWS):
        conn.execute(INSERT_CHUNK, texts[k : k + CHUNK_ROWS])
    if full < n:
        conn.executemany(INSERT_RECORD, zip(texts[full:]))
    last = conn.execute("SELECT max(id) FROM records").fetchone()[0]
    if n and last != first_id + n - 1:  # no id above the largest was left: SQLite picked others
        raise sqlite3.DatabaseError(f"records got ids up to {last}, not {first_id}..{first_id + n - 1}")

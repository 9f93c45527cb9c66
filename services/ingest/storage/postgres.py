"""The PostgreSQL backend (psycopg 3): ``postgresql://user:password@host:5432/dbname``.

Several ingest instances, on one machine or many, share one database; a batch id is stored
once across all of them. Install with ``pip install 'rpyc-host[postgres]'``.

Options in the URL's query (besides libpq's own, such as ``sslmode`` or ``connect_timeout``)::

    pool_size=8        connections kept open by each server process
    lock_timeout=30    seconds a writer waits for another one before StoreBusy (retryable)

Group commit: batches submitted together to one process are written in one transaction
(:mod:`.group`); each gets its receipt after that COMMIT.

Exactly once: ``ingest_batches.batch_id`` is the primary key and a batch's records are written
in the same transaction as its batch row; an id repeated inside one group is stored once, the
later copies answering with the first one's receipt. Two instances storing the same id at once: the second
``INSERT ... ON CONFLICT DO NOTHING`` waits for the first transaction, then sees the id and
answers with the stored receipt. An instance killed mid-write leaves nothing: PostgreSQL
rolls back the transaction of a dropped connection.

Record ids: writers of one topic take turns on the topic's row lock, so a topic's record ids
grow in commit order and ``query(topic, after_id)`` never skips a record that commits later.
Writers of different topics do not wait for each other. A group locks its topics in name
order and inserts its batch rows in id order, so instances never wait on each other in a cycle.

Durability: a receipt is returned after COMMIT, which with PostgreSQL's defaults
(``synchronous_commit = on``, ``fsync = on``) means the WAL is flushed to disk.

Fork safety: connections are opened lazily and remembered per process id; a forked child
opens its own and never touches the ones it inherited.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import BatchWrite, JsonLines, Stats, StoreBusy, StoreError
from .group import GroupCommit, GroupLimits

SCHEMA_VERSION = 1
OUR_KEYS = ("pool_size", "lock_timeout")
# Serializes schema creation between instances starting together (any fixed 64-bit number).
SCHEMA_LOCK = 0x7270_7963_686F_7374

SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ingest_topics (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    records BIGINT NOT NULL DEFAULT 0,
    batches BIGINT NOT NULL DEFAULT 0,
    rejects BIGINT NOT NULL DEFAULT 0,
    dropped BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ingest_batches (
    batch_id TEXT PRIMARY KEY,
    topic_id BIGINT NOT NULL REFERENCES ingest_topics(id),
    records INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    receipt TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_records (
    id BIGSERIAL PRIMARY KEY,
    topic_id BIGINT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ingest_records_by_topic ON ingest_records (topic_id, id);
CREATE TABLE IF NOT EXISTS ingest_duplicates (one INTEGER PRIMARY KEY CHECK (one = 1), n BIGINT NOT NULL);
INSERT INTO ingest_duplicates VALUES (1, 0) ON CONFLICT DO NOTHING;
"""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "the PostgreSQL backend needs psycopg 3: pip install 'rpyc-host[postgres]' "
            "(or: pip install 'psycopg[binary]')"
        ) from None
    return psycopg


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class PostgresStore:
    """A :class:`~services.ingest.storage.Store` in a PostgreSQL database (see the module docstring)."""

    def __init__(
        self,
        conninfo: str,
        pool_size: int = 8,
        lock_timeout: float = 30.0,
        group: GroupLimits | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size={pool_size!r} must be >= 1")
        if not lock_timeout > 0:
            raise ValueError(f"lock_timeout={lock_timeout!r} must be a number of seconds > 0")
        self.psycopg = _psycopg()
        self.conninfo = conninfo
        self.url = _masked(conninfo)
        self.pool_size = pool_size
        self.lock_timeout = lock_timeout
        self._pid = os.getpid()
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._group = GroupCommit(self._write_group, group)
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                self._check_version(conn)
                conn.execute(SCHEMA)
                conn.execute(
                    "INSERT INTO ingest_meta VALUES ('schema_version', %s) ON CONFLICT DO NOTHING",
                    (str(SCHEMA_VERSION),),
                )
        except self.psycopg.Error as exc:
            raise StoreError(f"cannot open PostgreSQL database {self.url!r}: {_first_line(exc)}") from None

    def _check_version(self, conn: Any) -> None:
        exists = conn.execute("SELECT to_regclass('ingest_meta') IS NOT NULL").fetchone()[0]
        if not exists:
            return
        row = conn.execute("SELECT value FROM ingest_meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.url!r} has ingest table layout version {row[0]}, this version uses "
                f"{SCHEMA_VERSION}: use another database (or migrate it) and start again"
            )

    @classmethod
    def from_url(cls, url: str, group: GroupLimits | None = None) -> PostgresStore:
        """``postgresql://user:pw@host:5432/db?pool_size=8&lock_timeout=30&sslmode=require``."""
        parts = urlsplit(url)
        if not parts.path.strip("/"):
            raise ValueError(
                f"database {_masked(url)!r}: name the database, e.g. 'postgresql://ingest@db.internal/ingest'"
            )
        ours: dict[str, str] = {}
        libpq: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            (ours.__setitem__(key, value) if key in OUR_KEYS else libpq.append((key, value)))
        try:
            pool_size = int(ours.get("pool_size", "8"))
            lock_timeout = float(ours.get("lock_timeout", "30"))
        except ValueError:
            raise ValueError(
                f"database {_masked(url)!r}: pool_size must be an integer and lock_timeout seconds"
            ) from None
        conninfo = urlunsplit(parts._replace(query=urlencode(libpq)))
        return cls(conninfo, pool_size=pool_size, lock_timeout=lock_timeout, group=group)

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection from this process's idle list (opened if none); a broken one is dropped."""
        if self._pid != os.getpid():  # a forked child: forget the parent's connections
            self._pid, self._idle, self._lock = os.getpid(), [], threading.Lock()
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = self.psycopg.connect(self.conninfo, autocommit=True)
                conn.execute(f"SET lock_timeout = {int(self.lock_timeout * 1000)}")
            except self.psycopg.Error as exc:
                raise StoreError(f"cannot connect to {self.url!r}: {_first_line(exc)}") from None
        try:
            yield conn
        except BaseException:
            if conn.closed or conn.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE:
                conn.close()
                raise
            self._release(conn)
            raise
        self._release(conn)

    def _release(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < self.pool_size and not conn.closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:
                pass

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        pg = self.psycopg
        try:
            yield
        except pg.errors.LockNotAvailable:
            raise StoreBusy(
                f"database {self.url!r}: another writer held the lock over {self.lock_timeout:.0f} s; "
                "nothing was stored, retry with the same batch id"
            ) from None
        except pg.Error as exc:
            raise StoreError(f"database {self.url!r}: {what} failed: {_first_line(exc)}") from None

    # -- writes --------------------------------------------------------------------------------

    def write(self, batch: BatchWrite) -> str | None:
        return self._group.write(batch)

    def _write_group(self, group: Sequence[BatchWrite]) -> list[str | None]:
        """Write ``group`` in one transaction (called by the group-commit writer)."""
        with (
            self._errors(f"write (nothing of {len(group)} batch(es) stored)"),
            self._connection() as conn,
            conn.transaction(),
        ):
            # One statement per step, not per batch: a group of 16 batches from 4 topics is
            # about 6 round trips instead of 26. Topic row locks in name order (the database's
            # collation): two instances locking overlapping topics cannot deadlock, and writers
            # of one topic take turns (record ids in commit order).
            topic_ids: dict[str, int] = dict(
                conn.execute(
                    "INSERT INTO ingest_topics (name) SELECT unnest(%s::text[]) ORDER BY 1 "
                    "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING name, id",
                    (sorted({b.topic for b in group}),),
                ).fetchall()
            )
            results: list[str | None] = [None] * len(group)
            first: dict[str, int] = {}  # batch id -> index of its first batch in the group
            for index, batch in enumerate(group):
                if batch.batch_id in first:
                    results[index] = group[first[batch.batch_id]].receipt
                else:
                    first[batch.batch_id] = index
            # Batch rows in id order: instances inserting the same ids wait on each other in
            # one order, never in a cycle.
            ids = sorted(first)
            firsts = [group[first[batch_id]] for batch_id in ids]
            inserted = {
                row[0]
                for row in conn.execute(
                    "INSERT INTO ingest_batches (batch_id, topic_id, records, created, receipt) "
                    "SELECT b, t, n, %s, r FROM unnest(%s::text[], %s::bigint[], %s::int[], %s::text[]) "
                    "WITH ORDINALITY AS u(b, t, n, r, o) ORDER BY o "
                    "ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id",
                    (
                        time.time(),
                        ids,
                        [topic_ids[b.topic] for b in firsts],
                        [len(b.rows) for b in firsts],
                        [b.receipt for b in firsts],
                    ),
                ).fetchall()
            }
            if len(inserted) < len(ids):  # stored before, maybe by another instance a moment ago
                stored = dict(
                    conn.execute(
                        "SELECT batch_id, receipt FROM ingest_batches WHERE batch_id = ANY(%s)",
                        ([i for i in ids if i not in inserted],),
                    ).fetchall()
                )
                for index, other in enumerate(group):
                    if other.batch_id in stored:
                        results[index] = str(stored[other.batch_id])
            duplicates = sum(r is not None for r in results)
            totals: dict[int, list[int]] = {}
            with conn.cursor().copy("COPY ingest_records (topic_id, data) FROM STDIN") as copy:
                for index, batch in enumerate(group):
                    if results[index] is not None:
                        continue
                    topic_id = topic_ids[batch.topic]
                    if batch.rows:
                        _copy_rows(copy, topic_id, batch.rows)
                    t = totals.setdefault(topic_id, [0, 0, 0, 0, 0])
                    t[0] += len(batch.rows)
                    t[1] += 1
                    t[2] += batch.rejected
                    t[3] += batch.dropped
                    t[4] += batch.nbytes
            if totals:
                columns = list(zip(*([topic_id, *t] for topic_id, t in sorted(totals.items())), strict=True))
                conn.execute(
                    "UPDATE ingest_topics t SET records = t.records + v.records, "
                    "batches = t.batches + v.batches, rejects = t.rejects + v.rejects, "
                    "dropped = t.dropped + v.dropped, bytes = t.bytes + v.bytes "
                    "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], "
                    "%s::bigint[]) AS v(id, records, batches, rejects, dropped, bytes) WHERE t.id = v.id",
                    [list(c) for c in columns],
                )
            if duplicates:
                conn.execute("UPDATE ingest_duplicates SET n = n + %s", (duplicates,))
        return results

    def duplicate(self, batch_id: str) -> str | None:
        with self._errors("lookup"), self._connection() as conn:
            row = conn.execute(
                "SELECT receipt FROM ingest_batches WHERE batch_id = %s", (batch_id,)
            ).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE ingest_duplicates SET n = n + 1")
            return str(row[0])

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._errors("read"), self._connection() as conn:
            return list(conn.execute(sql, args).fetchall())

    def count(self, topic: str | None = None) -> int:
        if topic is None:
            rows = self._read("SELECT coalesce(sum(records), 0) FROM ingest_topics")
        else:
            rows = self._read("SELECT records FROM ingest_topics WHERE name = %s", (topic,))
        return int(rows[0][0]) if rows else 0

    def topics(self) -> tuple[str, ...]:
        rows = self._read("SELECT name FROM ingest_topics WHERE records > 0 ORDER BY name")
        return tuple(str(r[0]) for r in rows)

    def query(self, topic: str, after_id: int, limit: int) -> tuple[tuple[int, str], ...]:
        rows = self._read(
            "SELECT r.id, r.data FROM ingest_records r JOIN ingest_topics t ON t.id = r.topic_id "
            "WHERE t.name = %s AND r.id > %s ORDER BY r.id LIMIT %s",
            (topic, after_id, limit),
        )
        return tuple((int(i), str(d)) for i, d in rows)

    def stats(self) -> Stats:
        rows = self._read(
            "SELECT coalesce(sum(records), 0), coalesce(sum(batches), 0), coalesce(sum(rejects), 0), "
            "coalesce(sum(dropped), 0), (SELECT n FROM ingest_duplicates), coalesce(sum(bytes), 0) "
            "FROM ingest_topics"
        )
        return Stats(*(int(v) for v in rows[0]))


def _copy_rows(copy: Any, topic_id: int, rows: Sequence[str]) -> None:
    """Write ``(topic_id, row)`` lines to a COPY in its text format, one block for the batch:
    the escaping runs in C over the whole text instead of ``write_row`` in Python per row."""
    if type(rows) is JsonLines:  # no tab, CR or newline in a row: only backslashes to escape
        block = rows.block.replace(b"\\", b"\\\\") if b"\\" in rows.block else rows.block
        head = b"%d\t" % topic_id
        copy.write(head + block[:-1].replace(b"\n", b"\n" + head) + b"\n")
        return
    text = "\n".join(rows)
    if text.count("\n") != len(rows) - 1:  # a row with a newline in it (never JSON lines')
        for row in rows:
            copy.write_row((topic_id, row))
        return
    # COPY text format: a backslash, tab or carriage return in a value is escaped (a row may
    # hold tabs and CRs as whitespace between JSON tokens when stored as received).
    for char, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\r", "\\r")):
        if char in text:
            text = text.replace(char, escaped)
    prefix = f"{topic_id}\t"
    copy.write(prefix + text.replace("\n", "\n" + prefix) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

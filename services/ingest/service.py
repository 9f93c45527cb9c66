"""The data-ingest service: collectors submit batches, the service validates, processes and
stores them durably and exactly once.

A batch travels as one payload: JSON lines (one JSON object per line) as ``bytes`` or ``str``.
Lists and dicts would cross rpyc by reference, one round trip per element, so they are refused.

Receipt (plain values)::

    (batch_id, accepted, dropped, ((index, reason), ...), duplicate)

``accepted`` records were stored; ``dropped`` ones were removed by the processor (it returned
None); each rejected record is listed by its 0-based line index with the reason. Good records
are stored even when others in the batch are rejected. A receipt is returned only after the
batch is committed; submitting a ``batch_id`` again stores nothing and returns the first
receipt with ``duplicate=True`` (also after a restart: ids are kept in the database).
Batches that arrive together (from several collectors) are committed in one transaction, and
each receipt is returned after that commit; a batch is validated and processed before it
joins a group, so a bad batch never fails the others.

Problems with the batch as a whole (wrong argument types, an empty or oversize batch) raise
``TypeError`` or ``ValueError`` and store nothing. Storage trouble raises ``TimeoutError``
(database busy) or ``OSError``: nothing was stored, and retrying the same batch id is safe.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import rpyc

from rpyc_host.errors import did_you_mean

from . import fastpath
from .storage import BACKENDS, BatchWrite, Store, StoreBusy, StoreError, open_store
from .storage.group import GroupLimits
from .storage.sqlite import QUERY_KEYS as SQLITE_QUERY_KEYS

log = logging.getLogger("services.ingest")

DEFAULT_DATABASE = "sqlite:///var/ingest.db"
MAX_QUERY_LIMIT = 10_000
TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,199}")
BATCH_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces

Processor = Callable[[dict[str, Any]], "dict[str, Any] | None"]
Receipt = tuple[str, int, int, tuple[tuple[int, str], ...], bool]
FieldCheck = tuple[str, str, "frozenset[type] | None"]


FIELD_TYPES: dict[str, frozenset[type] | None] = {
    "any": None,
    "bool": frozenset({bool}),
    "float": frozenset({int, float}),  # JSON does not tell 1 from 1.0
    "int": frozenset({int}),
    "list": frozenset({list}),
    "number": frozenset({int, float}),
    "object": frozenset({dict}),
    "str": frozenset({str}),
}
"""Schema type name -> the exact Python types a decoded JSON value may have (None: any)."""


def parse_schema(schema: object) -> tuple[FieldCheck, ...]:
    """``{"field": "type", ...}`` -> checks; every listed field is required.

    Example: ``schema: {host: str, load1: float, seq: int}``.
    """
    if schema is None:
        return ()
    if not isinstance(schema, Mapping):
        raise TypeError(
            f"schema must be a mapping of field name to type, such as {{seq: int}}, got {schema!r}"
        )
    checks = []
    for field, type_name in schema.items():
        if not isinstance(field, str) or not field:
            raise ValueError(f"schema: field names must be non-empty strings, got {field!r}")
        if not isinstance(type_name, str) or type_name not in FIELD_TYPES:
            raise ValueError(
                f"schema.{field}: unknown type {type_name!r}; known types: {', '.join(sorted(FIELD_TYPES))}"
            )
        checks.append((field, str(type_name), FIELD_TYPES[type_name]))
    return tuple(checks)


def load_processor(spec: object) -> Processor | None:
    """Import ``module:function``; ValueError naming what is wrong."""
    if spec is None:
        return None
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(
            f"processor must be 'module:function' (for example 'mypkg.clean:record'), got {spec!r}"
        )
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"processor {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"processor {spec!r}: {module_name!r} has no function {func_name!r}")
    return func


def check_database_url(url: object) -> None:
    """The checks of ``open_store`` that need no database: type, scheme, SQLite path and options."""
    if not isinstance(url, str):
        raise TypeError(f"database must be a URL string such as 'sqlite:///var/ingest.db', got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in BACKENDS:
        what = f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(
            f"database {url!r}: {what}{did_you_mean(parts.scheme, BACKENDS)}; known schemes: "
            f"{', '.join(sorted(BACKENDS))} (for example 'sqlite:///var/ingest.db')"
        )
    if parts.scheme != "sqlite":
        return
    if parts.netloc:
        raise ValueError(
            f"database {url!r}: a SQLite URL has no host; use 'sqlite:///relative/path.db' or "
            "'sqlite:////absolute/path.db'"
        )
    if parts.path in ("", "/", "/:memory:"):
        raise ValueError(f"database {url!r}: needs a file path (an in-memory database is not durable)")
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if key not in SQLITE_QUERY_KEYS:
            raise ValueError(
                f"database {url!r}: unknown option {key!r}; known: {', '.join(SQLITE_QUERY_KEYS)}"
            )


def _positive_int(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON-compatible")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@rpyc.service
class IngestService(rpyc.Service):
    """Validate, process and durably store batches of JSON records, exactly once per batch id.

    Options (``services.ingest.options`` in the config)::

        database: sqlite:///var/ingest.db   # a storage URL; sqlite:/// paths are relative to the cwd
        processor: mypkg.clean:record       # f(record) -> dict to store, None to drop, or raises
        schema: {seq: int, host: str}       # required fields: any bool float int list number object str
        max_batch_records: 10000            # bigger batches are refused whole (ValueError)
        max_batch_bytes: 16777216
        group_max_batches: 64               # batches submitted together share one transaction,
        group_max_records: 100000           # at most this many batches, records and bytes of
        group_max_bytes: 33554432           # record text in one
    """

    def __init__(
        self,
        database: str = DEFAULT_DATABASE,
        processor: str | None = None,
        schema: Mapping[str, str] | None = None,
        max_batch_records: int = 10_000,
        max_batch_bytes: int = 16 * 1024 * 1024,
        group_max_batches: int = GroupLimits.max_batches,
        group_max_records: int = GroupLimits.max_records,
        group_max_bytes: int = GroupLimits.max_bytes,
    ) -> None:
        self.check_options(
            database,
            processor,
            schema,
            max_batch_records,
            max_batch_bytes,
            group_max_batches,
            group_max_records,
            group_max_bytes,
        )
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.group = GroupLimits(group_max_batches, group_max_records, group_max_bytes)
        self.schema = parse_schema(schema)
        self.fast = fastpath.FastPath(self.schema)
        self.processor_name = processor
        self.processor = load_processor(processor)
        try:
            self.store: Store = open_store(database, self.group)
        except StoreError as exc:
            raise ValueError(str(exc)) from None
        self._peer = "?"

    @staticmethod
    def check_options(
        database: str = DEFAULT_DATABASE,
        processor: str | None = None,
        schema: Mapping[str, str] | None = None,
        max_batch_records: int = 10_000,
        max_batch_bytes: int = 16 * 1024 * 1024,
        group_max_batches: int = GroupLimits.max_batches,
        group_max_records: int = GroupLimits.max_records,
        group_max_bytes: int = GroupLimits.max_bytes,
    ) -> None:
        """Validate the options without opening the database (``--check``): the limits, the
        schema, that the processor imports, and the database URL's form.

        Raises:
            TypeError, ValueError: naming the option and the value given.
        """
        _positive_int("max_batch_records", max_batch_records)
        _positive_int("max_batch_bytes", max_batch_bytes)
        _positive_int("group_max_batches", group_max_batches)
        _positive_int("group_max_records", group_max_records)
        _positive_int("group_max_bytes", group_max_bytes)
        parse_schema(schema)
        load_processor(processor)
        check_database_url(database)

    def on_connect(self, conn: Any) -> None:
        endpoints = conn._config.get("endpoints") or (None, ("?", 0))
        self._peer = f"{endpoints[1][0]}:{endpoints[1][1]}"

    def close(self) -> None:
        """Called by the host at shutdown."""
        self.store.close()

    # -- writing -------------------------------------------------------------------------------

    @rpyc.exposed
    def submit(self, topic: str, records: bytes | str, batch_id: str | None = None) -> Receipt:
        """Store a batch of JSON lines; return (batch_id, accepted, dropped, rejected, duplicate)."""
        _check_topic("submit", topic)
        if batch_id is None:
            batch_id = uuid.uuid4().hex  # no id, no retry safety: the caller cannot resend it
        elif type(batch_id) is not str or not BATCH_ID.fullmatch(batch_id):
            raise ValueError(
                f"submit(topic, records, batch_id): batch_id must be 1-128 printable ASCII characters "
                f"without spaces, or None, got {batch_id!r}"
            )
        lines, nbytes = self._lines(records)
        with _store_errors():
            stored = self.store.duplicate(batch_id)
        if stored is not None:
            return _receipt(batch_id, stored, duplicate=True)
        rows, dropped, rejected = self._process(lines)
        receipt_text = json.dumps([len(rows), dropped, rejected])
        batch = BatchWrite(topic, batch_id, rows, receipt_text, len(rejected), dropped, nbytes)
        with _store_errors():
            stored = self.store.write(batch)
        if stored is not None:  # a concurrent submit of the same id committed first
            return _receipt(batch_id, stored, duplicate=True)
        log.debug(
            "%s: batch %s to %r: %d stored, %d rejected",
            self._peer,
            batch_id,
            topic,
            len(rows),
            len(rejected),
        )
        return batch_id, len(rows), dropped, tuple((i, r) for i, r in rejected), False

    def _lines(self, records: object) -> tuple[list[str | bytes], int]:
        """Split the payload into lines, enforcing the batch limits; lines that are not
        UTF-8 stay bytes and are rejected one by one."""
        surrogates = False
        if type(records) is bytes or type(records) is bytearray:
            nbytes = len(records)
        elif type(records) is str:
            try:
                nbytes = len(records.encode("utf-8"))
            except UnicodeEncodeError:  # lone surrogates: only an in-process caller can send them
                nbytes = len(records.encode("utf-8", "surrogatepass"))
                surrogates = True
        else:
            # type(), not isinstance(): a NetRef must not be asked anything (each ask is a round trip).
            raise TypeError(
                f"submit(topic, records): records must be one payload of JSON lines (bytes or str), "
                f"got {type(records).__name__}; serialize the batch, e.g. "
                f"b'\\n'.join(json.dumps(r).encode() for r in batch), or use client.ingest.Collector"
            )
        if nbytes > self.max_batch_bytes:
            raise ValueError(
                f"submit: batch is {nbytes} bytes, over max_batch_bytes={self.max_batch_bytes}; split it"
            )
        if isinstance(records, bytes | bytearray):
            try:
                text = bytes(records).decode("utf-8")
            except UnicodeDecodeError:
                raw = bytes(records).split(b"\n")
                lines: list[str | bytes] = [_utf8_or_bytes(line) for line in raw]
            else:
                lines = list(text.split("\n"))
        elif surrogates:
            # Such a line cannot be stored as UTF-8: rejected on its own, as bytes are, instead
            # of failing the whole group of batches it would be written with.
            lines = [_utf8_or_bytes(line.encode("utf-8", "surrogatepass")) for line in records.split("\n")]
        else:
            lines = list(records.split("\n"))
        if lines and not lines[-1]:
            lines.pop()  # the newline after the last record
        if not lines or (len(lines) == 1 and not lines[0].strip()):
            raise ValueError("submit: the batch is empty; send at least one JSON record")
        if len(lines) > self.max_batch_records:
            raise ValueError(
                f"submit: batch has {len(lines)} records, over "
                f"max_batch_records={self.max_batch_records}; split it"
            )
        return lines, nbytes

    def _process(self, lines: list[str | bytes]) -> tuple[Sequence[str], int, list[tuple[int, str]]]:
        """Decode, check, process and re-encode each line: (rows to store, dropped, rejected).

        A batch whose every record decodes and passes the schema goes through msgspec in C
        (:mod:`.fastpath`); any other batch takes the per-record path, for each bad record's reason.
        """
        if self.processor is None:
            if self.fast.check(lines):
                return list(lines), 0, []  # type: ignore[arg-type]  # checked: every line is text
        else:
            records = self.fast.decode(lines)
            if records is not None:
                rejected: list[tuple[int, str]] = []
                rows, dropped = self._run_processor(range(len(records)), records, rejected)
                return rows, dropped, rejected
        return self._process_slowly(lines)

    def _process_slowly(self, lines: list[str | bytes]) -> tuple[Sequence[str], int, list[tuple[int, str]]]:
        """The per-record path: each line decoded and checked alone, with a reason for each reject."""
        rows: list[str] = []
        rejected: list[tuple[int, str]] = []
        indexes: list[int] = []
        checked: list[dict[str, Any]] = []
        scan = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner: no whitespace skipping
        schema = self.schema
        for index, line in enumerate(lines):
            if type(line) is not str:
                rejected.append((index, "not UTF-8 text"))
                continue
            try:
                record, end = scan(line, 0)
                if end != len(line) and line[end:].strip():
                    raise ValueError("extra data after the JSON value")
            except (StopIteration, ValueError, RecursionError):
                try:  # the slow path, for the precise message (and leading whitespace)
                    record = _DECODER.decode(line)
                except (ValueError, RecursionError) as exc:
                    rejected.append((index, f"not valid JSON: {exc}" if line.strip() else "blank line"))
                    continue
            if type(record) is not dict:
                rejected.append((index, f"a record must be a JSON object, got {_json_type(record)}"))
                continue
            if schema:
                reason = _schema_problem(schema, record)
                if reason:
                    rejected.append((index, reason))
                    continue
            if self.processor is None:
                rows.append(line)  # unchanged: store the text as received
            else:
                indexes.append(index)
                checked.append(record)
        if not checked:
            return rows, 0, rejected
        processed, dropped = self._run_processor(indexes, checked, rejected)
        rejected.sort()  # the processor's rejects come after the decoder's: by line again
        return processed, dropped, rejected

    def _run_processor(
        self,
        indexes: Sequence[int],
        records: list[dict[str, Any]],
        rejected: list[tuple[int, str]],
    ) -> tuple[Sequence[str], int]:
        """Run the processor on checked records (line ``indexes[i]`` is ``records[i]``), appending
        the reasons to ``rejected``: (rows to store, the number dropped)."""
        assert self.processor is not None
        results = fastpath.run(self.processor, records)
        block = fastpath.encode_all(results)
        if block is not None:  # every result a dict msgspec encodes as json would
            return block, 0
        rows: list[str] = []
        encode = fastpath.encode
        dropped = 0
        for index, result in zip(indexes, results, strict=True):
            if type(result) is fastpath.Raised:
                exc = result.error
                rejected.append(
                    (index, f"processor {self.processor_name} rejected it: {type(exc).__name__}: {exc}")
                )
                continue
            if result is None:
                dropped += 1
                continue
            if type(result) is not dict:
                rejected.append(
                    (index, f"processor returned {type(result).__name__}, expected a dict or None")
                )
                continue
            try:
                rows.append(encode(result))
            except (TypeError, ValueError) as exc:
                rejected.append((index, f"processor output is not JSON-compatible: {exc}"))
            except RecursionError:
                rejected.append(
                    (index, "processor output is not JSON-compatible: nested too deeply or circular")
                )
        return rows, dropped

    # -- reading -------------------------------------------------------------------------------

    @rpyc.exposed
    def count(self, topic: str | None = None) -> int:
        """Records stored under ``topic``, or in every topic when None."""
        if topic is not None:
            _check_topic("count", topic)
        with _store_errors():
            return self.store.count(topic)

    @rpyc.exposed
    def topics(self) -> tuple[str, ...]:
        """Every topic with stored records, sorted."""
        with _store_errors():
            return self.store.topics()

    @rpyc.exposed
    def query(self, topic: str, after_id: int = 0, limit: int = 1000) -> tuple[tuple[int, str], ...]:
        """Up to ``limit`` (at most 10,000) ``(id, record JSON)`` of ``topic`` with id > ``after_id``."""
        _check_topic("query", topic)
        if type(after_id) is not int or after_id < 0:
            raise ValueError(f"query: after_id must be an integer >= 0, got {after_id!r}")
        if type(limit) is not int or not 1 <= limit <= MAX_QUERY_LIMIT:
            raise ValueError(f"query: limit must be an integer from 1 to {MAX_QUERY_LIMIT}, got {limit!r}")
        with _store_errors():
            return self.store.query(topic, after_id, limit)

    def metrics(self) -> dict[str, int]:
        """For the host's /metrics (not exposed): the same totals as stats()."""
        return {f"ingest_{name}": value for name, value in self.stats()}

    @rpyc.exposed
    def stats(self) -> tuple[tuple[str, int], ...]:
        """Totals as ``(name, value)`` pairs: records, batches, rejects, dropped, duplicates, bytes."""
        with _store_errors():
            s = self.store.stats()
        return (
            ("records", s.records),
            ("batches", s.batches),
            ("rejects", s.rejects),
            ("dropped", s.dropped),
            ("duplicates", s.duplicates),
            ("bytes", s.bytes),
        )


def _check_topic(method: str, topic: object) -> None:
    if type(topic) is not str or not TOPIC.fullmatch(topic):
        raise ValueError(
            f"{method}: topic must be 1-200 characters (letters, digits, '_.:/@-'; starting with a "
            f"letter or digit), got {topic!r}"
        )


def _utf8_or_bytes(line: bytes) -> str | bytes:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    names[bool] = "a boolean"
    return names.get(type(value), "null")


def _schema_problem(schema: tuple[FieldCheck, ...], record: dict[str, Any]) -> str:
    for field, type_name, allowed in schema:
        if field not in record:
            return f"missing required field {field!r}"
        value = record[field]
        if allowed is not None and type(value) not in allowed:
            return f"field {field!r} must be {type_name}, got {_json_type(value)} {value!r:.40}"
    return ""


def _receipt(batch_id: str, stored: str, duplicate: bool) -> Receipt:
    accepted, dropped, rejected = json.loads(stored)
    return batch_id, accepted, dropped, tuple((int(i), str(r)) for i, r in rejected), duplicate


@contextmanager
def _store_errors() -> Iterator[None]:
    """Relay storage failures as standard exceptions a client can act on (retry the same id)."""
    try:
        yield
    # (errno, message): rpyc rebuilds an OSError from its attributes, and one made from a bare
    # message would reach the client as "[Errno None] None: None -> None".
    except StoreBusy as exc:
        raise TimeoutError(errno.ETIMEDOUT, str(exc)) from None
    except StoreError as exc:
        raise OSError(errno.EIO, str(exc)) from None

"""Send records to the ingest service: batching, retries, reconnects and a local spool.

Usage::

    from client.ingest import Collector

    with Collector("ingest", topic="load", spool="var/load.spool") as collector:
        for sample in samples():
            collector.add(sample)          # a JSON-compatible dict
    # leaving the block flushes: every record is stored, or kept in the spool for next time

How nothing is lost and nothing is stored twice:

- records are sent in batches (``batch_records`` / ``batch_bytes``), each as one JSON-lines
  payload under a batch id unique to this collector; up to ``window`` batches are in flight
  (each on its own connection, so the service decodes one while it commits another) while the
  next is being filled, and each receipt still comes only after that batch's commit;
- after a connection error, timeout or storage error the *same* batch id is resent with
  exponential backoff over a new connection; the service stores a batch id once, so a batch
  whose receipt was lost is answered "duplicate" instead of being stored again;
- when the retries run out the batch is appended (fsynced) to the ``spool`` file and the
  service is left alone for ``down_interval`` seconds; later batches go to the spool until a
  connection works again, then the spool is replayed in order (same ids) and emptied. A spool
  left by an earlier run is replayed too.

A batch the service refuses as a whole (``ValueError``/``TypeError``: it is malformed, too big)
is not retried: it is appended to ``<spool>.rejected`` and :class:`BatchRejected` is raised.
Rejected *records* inside an accepted batch are counted in :attr:`Collector.stats` and passed to
``on_receipt``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import rpyc

from rpyc_host.wire.jsonlines import fast_json_encoder

from .connection import connect
from .errors import BatchRejected, DeliveryError, IngestError, describe_error
from .pool import ServicePool

log = logging.getLogger("client.ingest")

__all__ = [
    "BatchRejected",
    "Collector",
    "CollectorStats",
    "DeliveryError",
    "IngestError",
    "PooledCollector",
    "Receipt",
    "encode_record",
]


_ENCODE = fast_json_encoder()
# Worth retrying with the same batch id: the batch may or may not have been stored.
TRANSIENT = (EOFError, ConnectionError, TimeoutError, OSError)
MAX_WINDOW = 16


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One record as a JSON line (no newline); TypeError/ValueError if it is not JSON-compatible."""
    if type(record) is not dict and not isinstance(record, Mapping):
        raise TypeError(f"a record must be a dict, got {type(record).__name__}: {record!r:.80}")
    try:
        return _ENCODE(record).encode()
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"record is not JSON-compatible: {exc}: {record!r:.80}") from None
    except RecursionError:
        raise ValueError(
            f"record is not JSON-compatible: nested too deeply or circular: {record!r:.80}"
        ) from None


def encode_batch(records: Iterable[Mapping[str, Any]]) -> bytes:
    """Records as one JSON-lines payload, what ``submit`` takes."""
    return b"\n".join(encode_record(r) for r in records) + b"\n"


@dataclass(frozen=True)
class Receipt:
    """What the service returned for one batch."""

    batch_id: str
    accepted: int
    dropped: int
    rejected: tuple[tuple[int, str], ...]
    duplicate: bool

    @classmethod
    def from_wire(cls, value: Any) -> Receipt:
        batch_id, accepted, dropped, rejected, duplicate = value
        return cls(str(batch_id), int(accepted), int(dropped), tuple(rejected), bool(duplicate))


def submit(
    conn: Any, topic: str, records: Iterable[Mapping[str, Any]], batch_id: str | None = None
) -> Receipt:
    """Submit one batch over an open connection (no retries): the receipt."""
    return Receipt.from_wire(conn.root.submit(topic, encode_batch(records), batch_id))


@dataclass
class CollectorStats:
    """Running totals of one collector."""

    batches: int = 0
    accepted: int = 0
    dropped: int = 0
    rejected: int = 0
    duplicates: int = 0
    retries: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected_batches: int = 0


@dataclass
class _Batch:
    batch_id: str
    topic: str
    payload: bytes
    records: int
    started: float = field(default_factory=time.monotonic)


class Collector:
    """Batch records and deliver each batch exactly once (see the module docstring).

    Args:
        service: configured service name (address read from ``config`` at every reconnect), or
            use ``host`` and ``port``.
        topic: where the records go.
        batch_records, batch_bytes: a batch is sent when either is reached (keep them under
            the service's max_batch_records / max_batch_bytes).
        spool: file that keeps batches while the service is down; None means a batch that
            cannot be delivered raises DeliveryError.
        timeout: seconds for connecting and for each submit.
        retries: resends of a failed batch before it is spooled, ``backoff * 2**n`` apart
            (at most ``max_backoff``).
        down_interval: after spooling, seconds before the service is tried again.
        on_receipt: called with each batch's receipt and its latency in seconds.
        window: batches in flight at once, each over its own connection (1: one batch is
            stored while the next is filled). A window over 1 lets the service overlap one
            batch's decoding with another's commit; batches in flight together may then be
            stored in a different order than they were sent (each exactly once).

    Not thread-safe: use one collector per thread.
    """

    def __init__(
        self,
        service: str | None = "ingest",
        *,
        topic: str,
        host: str | None = None,
        port: int | None = None,
        config: str | os.PathLike[str] | None = None,
        batch_records: int = 1000,
        batch_bytes: int = 1 << 20,
        spool: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        down_interval: float = 1.0,
        on_receipt: Callable[[Receipt, float], None] | None = None,
        window: int = 1,
    ) -> None:
        if batch_records < 1 or batch_bytes < 1:
            raise ValueError(
                f"batch_records and batch_bytes must be >= 1, got {batch_records}, {batch_bytes}"
            )
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be an integer from 1 to {MAX_WINDOW}, got {window!r}")
        self.service, self.topic, self.host, self.port, self.config = service, topic, host, port, config
        self.batch_records, self.batch_bytes = batch_records, batch_bytes
        self.spool = Path(spool) if spool is not None else None
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.down_interval = down_interval
        self.on_receipt = on_receipt
        self.window = window
        self.stats = CollectorStats()
        self._prefix = uuid.uuid4().hex[:16]
        self._seq = 0
        self._lines: list[str] = []  # ASCII: the encoder escapes everything else
        self._size = 0
        # One connection per window slot; slot 0 also carries the resends and replays.
        self._conns: list[Any] = [None] * window
        self._submits: list[Any] = [None] * window
        self._inflight: deque[tuple[_Batch, Any, int]] = deque()  # oldest first
        self._down_until = 0.0
        # Spooled batches already acknowledged during a replay that was cut short.
        self._replayed_ids: set[str] = set()

    def __repr__(self) -> str:
        target = f"{self.host}:{self.port}" if self.host else repr(self.service)
        return (
            f"Collector({target}, topic={self.topic!r}, batch_records={self.batch_records}, "
            f"window={self.window}, spool={self.spool})"
        )

    @property
    def _conn(self) -> Any:
        """The connection of the window's first slot (None when not connected)."""
        return self._conns[0]

    # -- public --------------------------------------------------------------------------------

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record (TypeError/ValueError at once if it is not JSON-compatible)."""
        try:
            # The common case without encode_record's checks and per-record bytes copy: the
            # batch is encoded to bytes once, when it is sealed.
            line = _ENCODE(record) if type(record) is dict else encode_record(record).decode()
        except (TypeError, ValueError, RecursionError):
            encode_record(record)  # raises with the record in the message
            raise
        self._lines.append(line)
        self._size += len(line) + 1
        if len(self._lines) >= self.batch_records or self._size >= self.batch_bytes:
            self._seal()

    def flush(self) -> None:
        """Send what is queued and wait for it; replay the spool if the service is back.

        Returns once every record is stored or spooled (DeliveryError without a spool).
        """
        if self._lines:
            self._seal()
        self._settle()
        if self._spooled() and time.monotonic() >= self._down_until:
            self._replay()

    def close(self) -> None:
        """Flush, then disconnect. A spool the flush left because the service had just failed
        is given one more try once ``down_interval`` has passed (at most that long a wait), so a
        service that is back by then gets everything; what still fails stays in the spool."""
        try:
            self.flush()
            if self._spooled():
                time.sleep(max(0.0, min(self.down_interval, self._down_until - time.monotonic())))
                self._replay()
        finally:
            self._disconnect()

    def __enter__(self) -> Collector:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if typ is None:
            self.close()
        else:  # keep what can be kept without hiding the original error
            try:
                self.close()
            except Exception:
                log.exception("closing the collector after an error failed")

    # -- batches -------------------------------------------------------------------------------

    def _seal(self) -> None:
        # Make room in the window first: if that raises (BatchRejected, DeliveryError), the
        # queued records stay queued instead of being lost in a batch that was never sent.
        self._settle(keep=self.window - 1)
        if self._inflight and (time.monotonic() < self._down_until or self._spooled()):
            self._settle()  # the spool keeps order: older batches reach it first
        self._seq += 1
        batch = _Batch(
            f"{self._prefix}-{self._seq}",
            self.topic,
            ("\n".join(self._lines) + "\n").encode(),
            len(self._lines),
        )
        self._lines, self._size = [], 0
        # Keep order: nothing new goes out before the spool is replayed.
        down = time.monotonic() < self._down_until
        if (down or self._spooled()) and (down or not self._replay()):
            self._to_spool(batch)
            return
        self._start(batch)

    def _start(self, batch: _Batch) -> None:
        """Send ``batch`` without waiting, on a free slot of the window; the next batch is
        built while this one is stored."""
        busy = {slot for _, _, slot in self._inflight}
        slot = next(s for s in range(self.window) if s not in busy)
        batch.started = time.monotonic()
        try:
            submit_async = self._connection(slot)
            result = submit_async(batch.topic, batch.payload, batch.batch_id)
            result.set_expiry(self.timeout)
        except TRANSIENT as exc:
            self._disconnect(slot)
            log.info("sending batch %s failed (%s); retrying", batch.batch_id, exc)
            self._settle()  # older batches first, so a spool keeps their order
            self._deliver_or_spool(batch)
            return
        self._inflight.append((batch, result, slot))

    def _settle(self, keep: int = 0) -> None:
        """Wait for the oldest batches in flight until ``keep`` are left; resend or spool
        each one that failed."""
        while len(self._inflight) > keep:
            batch, result, slot = self._inflight.popleft()
            try:
                result.wait()
                receipt = Receipt.from_wire(result.value)
            except TRANSIENT as exc:
                self._disconnect(slot)
                if time.monotonic() < self._down_until:
                    # An older batch of the window just ran out of retries: the service is
                    # down, so this one goes after it into the spool (same id, replayed later).
                    self._to_spool(batch)
                    continue
                log.info(
                    "batch %s failed (%s); retrying with the same id", batch.batch_id, describe_error(exc)
                )
                self._deliver_or_spool(batch)
                continue
            except (ValueError, TypeError) as exc:
                self._reject(batch, exc)
            self._received(batch, receipt)

    def _deliver(self, batch: _Batch) -> Receipt:
        """Send ``batch`` and wait, resending the same id after transient errors."""
        attempt = 0
        while True:
            try:
                value = self._connection(0)(batch.topic, batch.payload, batch.batch_id)
                value.set_expiry(self.timeout)
                value.wait()
                return Receipt.from_wire(value.value)
            except TRANSIENT as exc:
                self._disconnect(0)
                if attempt >= self.retries:
                    raise
                delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.75, 1.25)
                log.debug(
                    "batch %s: %s; attempt %d in %.2f s",
                    batch.batch_id,
                    describe_error(exc),
                    attempt + 2,
                    delay,
                )
                self.stats.retries += 1
                time.sleep(delay)
                attempt += 1
            except (ValueError, TypeError) as exc:
                self._reject(batch, exc)

    def _deliver_or_spool(self, batch: _Batch) -> None:
        try:
            receipt = self._deliver(batch)
        except TRANSIENT as exc:
            self._down_until = time.monotonic() + self.down_interval
            if self.spool is None:
                raise DeliveryError(
                    f"batch {batch.batch_id} ({batch.records} records) not delivered after "
                    f"{self.retries + 1} attempts: {describe_error(exc)}; configure spool= to keep it"
                ) from None
            log.warning("ingest service unavailable (%s); spooling to %s", describe_error(exc), self.spool)
            self._to_spool(batch)
            return
        self._received(batch, receipt)

    def _received(self, batch: _Batch, receipt: Receipt) -> None:
        s = self.stats
        if receipt.duplicate and batch.batch_id in self._replayed_ids:
            s.duplicates += 1  # acknowledged by an earlier, interrupted replay: counted then
            return
        s.batches += 1
        s.accepted += receipt.accepted
        s.dropped += receipt.dropped
        s.rejected += len(receipt.rejected)
        s.duplicates += receipt.duplicate
        if receipt.rejected:
            index, reason = receipt.rejected[0]
            log.warning(
                "batch %s: %d record(s) rejected; first: #%d: %s",
                batch.batch_id,
                len(receipt.rejected),
                index,
                reason,
            )
        if self.on_receipt is not None:
            self.on_receipt(receipt, time.monotonic() - batch.started)

    def _reject(self, batch: _Batch, exc: BaseException) -> NoReturn:
        self.stats.rejected_batches += 1
        if self.spool is not None:
            _append(self.spool.with_name(self.spool.name + ".rejected"), batch)
        raise BatchRejected(f"the service refused batch {batch.batch_id}: {describe_error(exc)}") from None

    # -- connection ----------------------------------------------------------------------------

    def _connection(self, slot: int = 0) -> Any:
        """``rpyc.async_(root.submit)`` on the live connection of window ``slot`` (connecting
        if needed)."""
        submit_async = self._submits[slot]
        if submit_async is None:
            conn = self._conns[slot] = self._open()
            submit_async = self._submits[slot] = rpyc.async_(conn.root.submit)
        return submit_async

    def _open(self) -> Any:
        # ConnectError is a ConnectionError: transient. The address is resolved again each
        # time, so a service moved in the config is found after a restart.
        return connect(
            self.service if self.host is None else None,
            host=self.host,
            port=self.port,
            config=self.config,
            timeout=self.timeout,
            retries=0,
        )

    def _disconnect(self, slot: int | None = None) -> None:
        """Close the connection of ``slot``, or every one when None."""
        for s in range(self.window) if slot is None else (slot,):
            conn, self._conns[s], self._submits[s] = self._conns[s], None, None
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

    # -- spool ---------------------------------------------------------------------------------

    def _spooled(self) -> bool:
        return self.spool is not None and self.spool.exists() and self.spool.stat().st_size > 0

    def _to_spool(self, batch: _Batch) -> None:
        if self.spool is None:
            raise DeliveryError(f"batch {batch.batch_id}: the service is unavailable and there is no spool")
        _append(self.spool, batch)
        self.stats.spooled += 1

    def _replay(self) -> bool:
        """Deliver every spooled batch in order (same ids), then empty the spool.

        Returns False, leaving the spool as it is, if the service is still unavailable.
        Batches delivered before the failure are answered "duplicate" on the next replay.
        """
        assert self.spool is not None
        batches = list(_read_spool(self.spool))
        for batch in batches:
            batch.started = time.monotonic()
            try:
                receipt = self._deliver(batch)
            except TRANSIENT as exc:
                self._down_until = time.monotonic() + self.down_interval
                log.info("replaying %s: service still unavailable (%s)", self.spool, describe_error(exc))
                return False
            except BatchRejected:
                log.error("spooled batch %s refused; kept in %s.rejected", batch.batch_id, self.spool.name)
                continue
            self.stats.replayed += 1
            self._received(batch, receipt)
            self._replayed_ids.add(batch.batch_id)
        self.spool.unlink()
        self._replayed_ids.clear()
        log.info("replayed %d spooled batch(es) from %s", len(batches), self.spool)
        return True


def _append(path: Path, batch: _Batch) -> None:
    """One spool entry: a JSON header line, then the payload; fsynced before returning."""
    header = json.dumps(
        {
            "batch_id": batch.batch_id,
            "topic": batch.topic,
            "records": batch.records,
            "bytes": len(batch.payload),
        }
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(header + b"\n" + batch.payload)
        f.flush()
        os.fsync(f.fileno())


def _read_spool(path: Path) -> Iterable[_Batch]:
    with open(path, "rb") as f:
        while True:
            header = f.readline()
            if not header:
                return
            try:
                meta = json.loads(header)
                payload = f.read(int(meta["bytes"]))
                complete = len(payload) == int(meta["bytes"])
            except (ValueError, KeyError, TypeError):
                complete = False
            if not complete:  # a write cut short by a crash: it was never acknowledged
                log.warning("%s: ignoring a truncated entry at the end", path)
                return
            yield _Batch(str(meta["batch_id"]), str(meta["topic"]), payload, int(meta["records"]))


class PooledCollector(Collector):
    """A :class:`client.ingest.Collector` whose connections come from a pool: when an ingest
    instance dies, the batch in flight is resent (same batch id) to another one.

    Usage::

        pool = client.connect_service("INGEST", registry="10.0.0.1:18811")
        with PooledCollector(pool, topic="load", spool="var/load.spool") as collector:
            collector.add({"load1": 0.4})

    Exactly once holds across instances when they share one store (PostgreSQL).
    """

    def __init__(self, pool: ServicePool, *, topic: str, **options: Any) -> None:
        super().__init__(pool.service, topic=topic, **options)
        self.pool = pool

    def _open(self) -> Any:
        # Collector drops a slot's connection after any failure; a new one comes from the
        # pool, which skips instances that refuse.
        return self.pool.connect()

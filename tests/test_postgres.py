"""The PostgreSQL store, on a real server: started here (initdb + pg_ctl on 127.0.0.1) unless
``RPYC_HOST_TEST_POSTGRES`` names one the tests may create databases on.

Never skipped: missing server binaries or psycopg fail with what to do (``bash scripts/test.sh``
installs both).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import client
from client.ingest import Collector, PooledCollector
from rpyc_host.testing import RegistryProcess, ServerProcess, wait_until
from services.ingest.fastpath import encode_all
from services.ingest.storage import BatchWrite, StoreBusy, StoreError, open_store
from tests.ingest_support import first_stored_ids, named_record, submit_from_threads
from tests.test_ingest_service import SHOUT

HOW_TO = (
    "run bash scripts/test.sh (it installs Debian's postgresql and psycopg), or set RPYC_HOST_TEST_POSTGRES"
)


def _bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed: {HOW_TO}", pytrace=False)
    return found


class PostgresServer:
    """A throwaway cluster in a temp dir, on 127.0.0.1 only (trust auth), stopped by PID."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        self.data = Path(tempfile.mkdtemp(prefix="rpyc-host-pg-"))
        self.user: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(f"running as root and there is no 'postgres' user: {HOW_TO}", pytrace=False)
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
            self.user = ["runuser", "-u", "postgres", "--"]
        self.port = 0
        self.pid: int | None = None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.user, *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> PostgresServer:
        result = self._run(
            self.initdb, "-D", str(self.data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        assert result.returncode == 0, f"initdb failed:\n{result.stdout}\n{result.stderr}"
        for _ in range(5):  # postgres cannot bind port 0: take a free port and retry on a collision
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c max_connections=200"
            result = self._run(
                self.pg_ctl,
                "-D",
                str(self.data / "db"),
                "-l",
                str(self.data / "log"),
                "-w",
                "-t",
                "30",
                "-o",
                options,
                "start",
            )
            if result.returncode == 0:
                self.pid = int((self.data / "db" / "postmaster.pid").read_text().split()[0])
                return self
        raise AssertionError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{self.log()}")

    def log(self) -> str:
        path = self.data / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.pid is not None:
            self._run(self.pg_ctl, "-D", str(self.data / "db"), "-m", "fast", "-w", "-t", "30", "stop")
            try:
                os.kill(self.pid, 0)
                os.kill(self.pid, signal.SIGKILL)  # only if pg_ctl could not stop it
            except ProcessLookupError:
                pass
        shutil.rmtree(self.data, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The admin URL of a PostgreSQL server for the session."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail(f"psycopg is not installed: {HOW_TO}", pytrace=False)
    given = os.environ.get("RPYC_HOST_TEST_POSTGRES")
    if given:
        yield given
        return
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    import psycopg

    name = f"ingest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_url.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def batch(batch_id: str, rows: list[str], topic: str = "load") -> BatchWrite:
    return BatchWrite(topic, batch_id, tuple(rows), receipt=f"receipt-{batch_id}", nbytes=10)


def test_store_round_trip_and_duplicates(database: str) -> None:
    store = open_store(database + "?pool_size=2&lock_timeout=5")
    try:
        assert store.write(batch("b1", ['{"a": 1}', '{"a": 2}'])) is None
        assert store.write(batch("b1", ['{"a": 9}'])) == "receipt-b1"
        assert store.duplicate("b1") == "receipt-b1" and store.duplicate("nope") is None
        assert store.write(batch("b2", ['{"b": 1}'], topic="other")) is None
        assert store.count() == 3 and store.count("load") == 2 and store.topics() == ("load", "other")
        rows = store.query("load", 0, 10)
        assert [d for _, d in rows] == ['{"a": 1}', '{"a": 2}']
        assert store.query("load", rows[0][0], 10) == rows[1:]
        stats = store.stats()
        assert (stats.records, stats.batches, stats.duplicates, stats.bytes) == (3, 2, 2, 20)
    finally:
        store.close()
    again = open_store(database)  # the tables are kept: a second instance sees everything
    try:
        assert again.count() == 3 and again.duplicate("b2") == "receipt-b2"
        # What COPY's text format escapes: backslashes, and tabs and CRs between JSON tokens.
        odd = ['{"p": "C:\\\\dir\\n\\t\\\\."}', '{"a":\t1}\r', "\\.", '{"é": "☃ \\u0000"}']
        assert again.write(batch("b3", odd, topic="odd")) is None
        assert [d for _, d in again.query("odd", 0, 10)] == odd
    finally:
        again.close()


def test_same_batch_from_many_threads_and_two_stores_is_stored_once(database: str) -> None:
    stores = [open_store(database), open_store(database)]
    answers: list[str | None] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        for n in range(20):
            result = stores[i % 2].write(batch(f"same-{n}", [f'{{"n": {n}}}'] * 50))
            with lock:
                answers.append(result)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert answers.count(None) == 20 and len(answers) == 120
        assert stores[0].count("load") == 20 * 50
        ids = [i for i, _ in stores[1].query("load", 0, 10_000)]
        assert ids == sorted(ids) and len(ids) == 1000
    finally:
        for store in stores:
            store.close()


def test_bad_urls_say_what_is_wrong(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="name the database"):
        open_store("postgresql://postgres@127.0.0.1:1")
    with pytest.raises(ValueError, match="pool_size must be an integer"):
        open_store(postgres_url + "?pool_size=many")
    with pytest.raises(StoreError, match=r"cannot connect to 'postgresql://u:\*\*\*@127\.0\.0\.1:1/x"):
        open_store("postgresql://u:secret@127.0.0.1:1/x?connect_timeout=2")


def _ingest_config(write: Callable[[str], Path], database: str, registry: tuple[str, int]) -> Path:
    return write(
        f"""
        server: {{grace_period: 0}}
        services:
          ingest:
            class: services.ingest:IngestService
            port: 0
            options: {{database: "{database}"}}
        registry: {{enabled: true, host: {registry[0]}, port: {registry[1]}, interval: 0.5, timeout: 1}}
        """
    )


@pytest.mark.slow
def test_two_instances_one_killed_mid_stream_every_record_once(
    database: str,
    start_server: Callable[..., ServerProcess],
    write_config: Callable[[str], Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="client.ingest")
    with RegistryProcess() as registry:
        instances = [start_server(_ingest_config(write_config, database, registry.address)) for _ in range(2)]
        want = {p.address("ingest") for p in instances}
        wait_until(lambda: want <= set(registry.discover("INGEST")), 10, "both ingest instances registered")

        per_collector, errors = 4000, []
        sent = [0, 0]
        collectors: list[PooledCollector] = []

        def collect(index: int) -> None:
            pool = client.connect_service("INGEST", registry=registry.spec, connect_timeout=1, timeout=10)
            try:
                with PooledCollector(
                    pool,
                    topic="t",
                    batch_records=100,
                    spool=tmp_path / f"c{index}.spool",
                    retries=6,
                    timeout=10,
                ) as collector:
                    collectors.append(collector)
                    for seq in range(per_collector):
                        collector.add({"c": index, "seq": seq})
                        sent[index] += 1
                        if seq % 100 == 0:
                            time.sleep(0.02)  # a stream, not one burst: the kill lands mid-way
            except Exception as exc:  # reported below, in the test's thread
                errors.append(exc)
            finally:
                pool.close()

        threads = [threading.Thread(target=collect, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: min(sent) > 1000 and collectors[0]._conn is not None, 30, "collectors under way")
        # Kill the instance the first collector is talking to, while both are mid-stream.
        peer = collectors[0]._conn._channel.stream.sock.getpeername()[:2]
        victim = next(p for p in instances if p.address("ingest") == peer)
        os.kill(victim.pid, signal.SIGKILL)
        assert max(sent) < per_collector, "the kill came after the stream ended"
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        resent = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
        assert resent, "no collector had to resend a batch: the kill did not land mid-stream"

        store: Any = open_store(database)
        try:
            seen: dict[tuple[int, int], int] = {}
            after = 0
            while True:
                rows = store.query("t", after, 10_000)
                if not rows:
                    break
                for _, data in rows:
                    record = __import__("json").loads(data)
                    key = (record["c"], record["seq"])
                    seen[key] = seen.get(key, 0) + 1
                after = rows[-1][0]
            assert len(seen) == 2 * per_collector, "records lost"
            assert set(seen.values()) == {1}, "records stored twice"
            assert store.count("t") == 2 * per_collector
        finally:
            store.close()


def test_plain_collector_to_the_surviving_instance_sees_a_shared_store(
    database: str, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    with RegistryProcess() as registry:
        first, second = (
            start_server(_ingest_config(write_config, database, registry.address)) for _ in range(2)
        )
        with Collector(None, host="127.0.0.1", port=first.address("ingest")[1], topic="shared") as c:
            c.add({"x": 1})
        with client.connect(host="127.0.0.1", port=second.address("ingest")[1]) as conn:
            assert conn.root.count("shared") == 1


# -- group commit ------------------------------------------------------------------------------


def _queued(store: Any) -> int:
    """Batches waiting behind the store's writer in this process (-1: no write in progress)."""
    state = store._group._here()
    with state.cond:
        return len(state.queue) if state.writing else -1


class _TopicLock:
    """Another session holding a topic's row lock: the group writer waits on it, and the
    submits behind it queue into one group."""

    def __init__(self, url: str, topic: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url)
        self.conn.execute("SELECT 1 FROM ingest_topics WHERE name = %s FOR UPDATE", (topic,))

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


class _HeldGroup:
    """Another session holds topic ``load``'s row lock while a lead write waits on it as the
    writer: batches written meanwhile queue behind it into one group. Leaving the block
    releases the lock and joins every write."""

    def __init__(self, database: str, store: Any) -> None:
        self.store = store
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []
        self.lock = _TopicLock(database, "load")
        self._start("lead", batch("lead", ['{"v": "lead"}']))
        wait_until(lambda: _queued(store) == 0, 10, "the first write to become the writer")

    def _start(self, name: str, item: BatchWrite) -> None:
        def run() -> None:
            try:
                self.results[name] = self.store.write(item)
            except BaseException as exc:
                self.results[name] = exc

        self.threads.append(threading.Thread(target=run, name=name))
        self.threads[-1].start()

    def queue(self, items: list[BatchWrite]) -> None:
        """Write each of ``items`` from its own thread (result under its index), in order."""
        for i, item in enumerate(items):
            self._start(str(i), item)
            wait_until(lambda n=i + 1: _queued(self.store) == n, 10, "batches queued")  # type: ignore[misc]

    def join(self) -> list[Any]:
        """Wait for every write; the results of the queued ones, in order."""
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads)
        return [self.results[str(i)] for i in range(len(self.threads) - 1)]

    def __enter__(self) -> _HeldGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        for t in self.threads:
            t.join(timeout=60)


def test_batches_queued_together_are_one_transaction_with_duplicates_first_wins(database: str) -> None:
    store: Any = open_store(database + "?lock_timeout=30")
    try:
        assert store.write(batch("old", ['{"v": "old"}'])) is None
        with _HeldGroup(database, store) as group:
            order = [
                batch("z", ['{"v": "z1"}', '{"v": "z1b"}']),
                batch("b", ['{"v": "b"}'], topic="other"),
                BatchWrite("load", "z", ('{"v": "z2"}',), receipt="receipt-z-second"),  # same id, same group
                batch("lead", ['{"v": "lead2"}']),  # an id of the previous group
                batch("old", ['{"v": "old2"}']),  # an id stored long before
            ]
            group.queue(order)
            group.lock.release()
            assert group.join() == [None, None, "receipt-z", "receipt-lead", "receipt-old"]
            assert group.results["lead"] is None
        assert store._group.stats.largest == len(order)
        assert [d for _, d in store.query("load", 0, 100)] == [
            '{"v": "old"}',
            '{"v": "lead"}',
            '{"v": "z1"}',
            '{"v": "z1b"}',
        ]
        assert [d for _, d in store.query("other", 0, 100)] == ['{"v": "b"}']
        stats = store.stats()
        assert (stats.records, stats.batches, stats.duplicates) == (5, 4, 3)
    finally:
        store.close()


def test_a_lock_timeout_fails_every_batch_of_the_group_and_stores_none(database: str) -> None:
    store: Any = open_store(database + "?lock_timeout=2")
    try:
        assert store.write(batch("first", ['{"v": 0}'])) is None
        with _HeldGroup(database, store) as group:
            group.queue([batch(f"b{i}", [f'{{"v": {i}}}']) for i in range(4)])
            errors = group.join()
            assert all(type(e) is StoreBusy for e in errors), errors
            assert all("retry with the same batch id" in str(e) for e in errors)
            assert store._group.stats.largest == 4
        assert store.count("load") == 1
        assert [store.write(batch(f"b{i}", [f'{{"v": {i}}}'])) for i in range(4)] == [None] * 4
        assert store.count("load") == 5
    finally:
        store.close()


def _write_shared(url: str, worker: int, out: Any) -> None:
    """A forked writer process with its own store and writer: shared and own batch ids."""
    store = open_store(url)
    answers = []
    try:
        for n in range(20):
            batch_id = f"shared-{n}" if n % 2 else f"p{worker}-{n}"
            answers.append(store.write(batch(batch_id, [f'{{"p": {worker}, "n": {n}}}'] * 20)))
    finally:
        store.close()
    out.put((worker, answers))


def test_threads_and_processes_on_two_instances_store_every_batch_once(database: str) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_write_shared, args=(database, w, out)) for w in range(2)]
    stores: list[Any] = [open_store(database), open_store(database)]
    answers: list[str | None] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def write(i: int) -> None:
        try:
            for n in range(20):
                batch_id = f"shared-{n}" if n % 2 else f"t{i}-{n}"
                result = stores[i % 2].write(batch(batch_id, [f'{{"t": {i}, "n": {n}}}'] * 20))
                with guard:
                    answers.append(result)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    try:
        for p in procs:
            p.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        from_procs = [out.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert not any(t.is_alive() for t in threads) and errors == []
        assert [p.exitcode for p in procs] == [0, 0]
        for _, got in from_procs:
            answers += got
        # 10 shared ids stored once among 8 writers; every writer's 10 own ids stored.
        assert len(answers) == 8 * 20 and answers.count(None) == 10 + 8 * 10
        assert {a for a in answers if a is not None} == {f"receipt-shared-{n}" for n in range(1, 20, 2)}
        assert stores[0].count("load") == (10 + 8 * 10) * 20
        assert stores[0].stats().duplicates == 7 * 10
        assert sum(s._group.stats.batches for s in stores) == 6 * 20
        assert sum(s._group.stats.groups for s in stores) < 6 * 20  # threads' writes overlapped
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        for store in stores:
            store.close()


def _block(*records: dict[str, Any]) -> Any:
    """Rows as the service's fast path hands them over: one JsonLines block."""
    block = encode_all(list(records))
    assert block is not None
    return block


def test_json_lines_blocks_and_plain_rows_in_one_group_are_stored_exactly(database: str) -> None:
    store: Any = open_store(database + "?lock_timeout=30")
    # What COPY's text format must escape, as msgspec writes it: backslashes of escapes
    # (quotes, control characters, a literal backslash), and text that looks like COPY's own.
    odd = {"p": 'C:\\dir\\n "q"', "c": "\t\r\n\x00\x1f", "u": "é ☃ \u2028", "end": "\\.", "n": -0.0}
    try:
        assert store.write(BatchWrite("load", "old", _block({"v": "old"}), "receipt-old")) is None
        with _HeldGroup(database, store) as group:
            order = [
                BatchWrite("load", "j", _block(odd, {"v": 2}), "receipt-j", rejected=1, dropped=2, nbytes=7),
                batch("p", ['{"a":\t1}\r', '{"b": "\\\\"}'], topic="other"),
                BatchWrite("load", "j", _block({"v": "again"}), "receipt-j-second"),  # same id, same group
                BatchWrite("load", "old", _block({"v": "old2"}), "receipt-old-second"),  # stored before
                BatchWrite("other", "none", _block(), "receipt-none", rejected=3),  # every record refused
            ]
            group.queue(order)
            group.lock.release()
            assert group.join() == [None, None, "receipt-j", "receipt-old", None]
            assert group.results["lead"] is None
        assert store._group.stats.largest == len(order)
        stored = [d for _, d in store.query("load", 0, 100)]
        assert stored == ['{"v":"old"}', '{"v": "lead"}', *list(_block(odd, {"v": 2}))]
        assert json.loads(stored[2]) == odd
        assert [d for _, d in store.query("other", 0, 100)] == ['{"a":\t1}\r', '{"b": "\\\\"}']
        stats = store.stats()
        assert (stats.records, stats.batches, stats.rejects, stats.dropped) == (6, 5, 4, 2)
        assert (stats.duplicates, stats.bytes) == (2, 0 + 10 + 7 + 10 + 0)
        assert store.count("load") == 4 and store.count("other") == 2
    finally:
        store.close()


def _shout_config(write: Callable[[str], Path], database: str, name: str) -> Path:
    options = {"database": database, "processor": SHOUT, "schema": {"w": "int", "name": "str"}}
    return write(
        f"""
server: {{type: threaded, host: 127.0.0.1}}
services:
  ingest:
    class: services.ingest:IngestService
    port: 0
    options: {json.dumps(options)}
"""
    )


def test_processed_batches_from_threads_on_two_instances_are_stored_once(
    database: str, write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    """Batches through the processor (the JsonLines path) from many connections to two
    instances, some ids sent by every writer: each id stored once, every receipt after its
    commit says what was stored, and the records are the processor's output."""
    servers = [start_server(_shout_config(write_config, database, str(i))) for i in range(2)]
    writers, batches, size, shared = 6, 10, 40, 4
    addresses = [server.address("ingest") for server in servers]
    receipts = submit_from_threads(addresses, writers, batches, size, shared, named_record)
    assert all(r[1:4] == (size, 0, ()) for r in receipts)
    assert sorted(r[0] for r in receipts if not r[4]) == first_stored_ids(writers, batches, shared)
    store = open_store(database)
    try:
        rows = [json.loads(d) for _, d in store.query("load", 0, 10_000)]
        assert len(rows) == (shared + writers * (batches - shared)) * size
        assert len({(r["w"], r["b"], r["i"]) for r in rows}) == len(rows)
        assert all(r["name"] == f"N\\{r['i']}É" for r in rows)
        # A shared id stores the records of exactly one writer.
        owners: dict[int, set[int]] = {}
        for r in rows:
            if r["b"] < shared:
                owners.setdefault(r["b"], set()).add(r["w"])
        assert all(len(ws) == 1 for ws in owners.values()) and len(owners) == shared
        assert store.stats().duplicates == (writers - 1) * shared
    finally:
        store.close()

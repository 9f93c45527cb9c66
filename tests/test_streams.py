"""Streamed results: an exposed method returning an iterator reaches clients in chunks, closes its
generator however the client stops, stays within its caps, and still iterates item by item
for plain rpyc clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rpyc

import client
from rpyc_host.host import Host
from rpyc_host.testing import ServerProcess, run_cli, running_host, wait_until
from rpyc_host.wire import DeadlineExceeded, context
from rpyc_host.wire.stream_reader import StreamReader
from rpyc_host.wire.streams import CHUNK_BYTES, Stream
from tests.helpers import demo_config, get, metric, metrics_url

SERVER_TYPES = ["threaded", "threadpool", "forking"]
CONFIG = """
server: {{type: {type}, pool_size: 4}}
metrics: {{enabled: true, port: 0}}
limits: {{max_open_streams: {service_cap}, max_open_streams_per_connection: {per_connection}}}
services:
  streams:
    class: tests.sample_services:StreamService
    port: 0
    options: {{events: "{events}"}}
"""


def _host(
    tmp_path: Path, server_type: str, per_connection: int = 16, service_cap: int = 256
) -> Iterator[tuple[Host, Path]]:
    events = tmp_path / "events"
    events.touch()
    text = CONFIG.format(
        type=server_type, per_connection=per_connection, service_cap=service_cap, events=events
    )
    with running_host(text) as host:
        yield host, events


@pytest.fixture(params=SERVER_TYPES)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Host, Path]]:
    """The stream service on each server type, and the file its generators note closing in."""
    yield from _host(tmp_path, request.param)


@pytest.fixture
def threaded(tmp_path: Path) -> Iterator[tuple[Host, Path]]:
    """The stream service on a threaded server: at most 2 open streams per connection, 3 in all."""
    yield from _host(tmp_path, "threaded", per_connection=2, service_cap=3)


def _connect(host: Host, **kwargs: object) -> object:
    return client.connect(host="127.0.0.1", port=host.address("streams")[1], **kwargs)  # type: ignore[arg-type]


def _closed(events: Path, name: str, times: int = 1) -> None:
    wait_until(lambda: events.read_text().count(f"{name}-closed") >= times, 10, f"{name}'s finally to run")


def test_streamed_results_equal_the_generators(served: tuple[Host, Path]) -> None:
    host, events = served
    with _connect(host) as conn:
        root = conn.root  # type: ignore[attr-defined]
        stream = root.count(5000)
        assert isinstance(stream, StreamReader)
        assert list(stream) == list(range(5000))
        assert list(root.count(1000).chunked(7)) == list(range(1000))  # chunks of 7, one ahead
        assert list(root.count(0)) == []
        blobs = list(root.blobs(12, 300_000))  # each chunk stops at about 1 MiB of items
        assert blobs == [bytes([i]) * 300_000 for i in range(12)]
        assert root.held() == (0, 0)
    _closed(events, "count", 3)


def test_chunk_size_comes_from_the_connection(served: tuple[Host, Path]) -> None:
    host, _ = served
    with _connect(host, stream_chunk=3) as conn:
        stream = conn.root.count(10)  # type: ignore[attr-defined]
        assert next(stream) == 0
        assert list(stream._items) == [1, 2]  # the first chunk held 3 items
        assert list(stream) == list(range(3, 10))


def test_early_break_and_close_close_the_server_generator(served: tuple[Host, Path]) -> None:
    host, events = served
    with _connect(host) as conn:
        root = conn.root  # type: ignore[attr-defined]
        for i in root.endless():
            if i == 2500:
                break
        _closed(events, "endless")
        with root.endless() as numbers:
            assert next(numbers) == 0
        _closed(events, "endless", 2)
        numbers = root.endless()
        next(numbers)
        numbers.close()
        numbers.close()  # idempotent
        assert list(numbers) == []
        _closed(events, "endless", 3)
        wait_until(lambda: root.held() == (0, 0), 10, "every stream given back")


def test_disconnect_closes_the_server_generator(served: tuple[Host, Path]) -> None:
    host, events = served
    conn = _connect(host)
    numbers = conn.root.endless()  # type: ignore[attr-defined]
    assert [next(numbers) for _ in range(10)] == list(range(10))
    assert conn.root.held() == (1, 1)  # type: ignore[attr-defined]
    conn.close()  # type: ignore[attr-defined]
    _closed(events, "endless")
    if host.hosted[0].config.type != "forking":  # a forked child's ledger went with it
        ledger = host.hosted[0].server.ledger
        wait_until(lambda: ledger.held("open_streams") == 0, 10, "the stream given back")


def test_an_endless_generator_stays_bounded(served: tuple[Host, Path]) -> None:
    host, events = served
    with _connect(host) as conn:
        root = conn.root  # type: ignore[attr-defined]
        before = root.rss_kib()
        numbers = root.endless()
        for expected, got in zip(range(10_000), numbers, strict=False):
            assert got == expected
        assert len(list(numbers._items)) < 1024  # at most the chunk at hand is buffered here
        assert root.held() == (1, 1)
        grew = root.rss_kib() - before
        assert grew < 32 * 1024, f"server RSS grew by {grew} KiB while streaming 10,000 items"
        del numbers
        _closed(events, "endless")
        wait_until(lambda: root.held() == (0, 0), 10, "the stream given back")


def test_errors_mid_stream_arrive_as_their_type_after_the_items_before(served: tuple[Host, Path]) -> None:
    host, _ = served
    with _connect(host) as conn:
        root = conn.root  # type: ignore[attr-defined]
        got: list[int] = []
        with pytest.raises(ValueError) as caught:
            for item in root.failing(10):
                got.append(item)
        assert got == list(range(10))
        assert str(caught.value) == "item 10 is broken"
        got = []
        with pytest.raises(TypeError) as not_plain:
            for item in root.not_plain():
                got.append(item)
        assert got == [1]
        assert "stream item 2 is a list" in str(not_plain.value)
        assert "Traceback" not in str(not_plain.value)
        assert root.held() == (0, 0)  # a failed stream is closed and given back


def test_a_stream_open_past_its_deadline_is_ended(served: tuple[Host, Path]) -> None:
    host, events = served
    with _connect(host) as conn:
        root = conn.root  # type: ignore[attr-defined]
        with context.deadline(2.0) as ctx:
            numbers = root.endless().chunked(10)
        assert next(numbers) == 0
        wait_until(ctx.expired, 10, "the deadline to pass")
        with pytest.raises(DeadlineExceeded, match="outlived its call's deadline"):
            for _ in numbers:
                pass
        _closed(events, "endless")
        assert root.held() == (0, 0)


def test_a_stream_without_a_deadline_outlives_one_call_timeout(served: tuple[Host, Path]) -> None:
    """The connection's timeout bounds each chunk request, not the whole stream."""
    host, _ = served
    with _connect(host, timeout=1.0) as conn:
        root = conn.root  # type: ignore[attr-defined]
        assert root.held() == (0, 0)  # the host now knows the connection's timeout
        numbers = root.endless().chunked(10)
        assert next(numbers) == 0
        past = time.monotonic() + 1.5
        wait_until(lambda: time.monotonic() > past, 10, "one call timeout to pass")
        assert [next(numbers) for _ in range(30)] == list(range(1, 31))
        numbers.close()
        wait_until(lambda: root.held() == (0, 0), 10, "the stream to be given back")


def test_the_cap_refuses_naming_the_limit(threaded: tuple[Host, Path]) -> None:
    host, _ = threaded
    with _connect(host) as conn:
        root = conn.root  # type: ignore[attr-defined]
        assert root.held() == (0, 0)
        threads = threading.active_count()
        first, second = root.endless(), root.endless()  # opened, never read
        with pytest.raises(OSError) as caught:
            root.endless()
        assert "limits.max_open_streams_per_connection: 2" in str(caught.value)
        assert threading.active_count() == threads  # no thread per stream
        assert root.held() == (2, 2)
        first.close()
        third = root.endless()
        assert next(third) == 0 and next(second) == 0
        with _connect(host) as other:
            kept = other.root.endless()  # type: ignore[attr-defined]  # the service's third
            with pytest.raises(OSError, match=r"limits\.max_open_streams: 3"):
                other.root.endless()  # type: ignore[attr-defined]
            assert next(kept) == 0
    ledger = host.hosted[0].server.ledger
    assert ledger.refusal_counts() == {"max_open_streams_per_connection": 1, "max_open_streams": 1}
    _, text = get(metrics_url(host) + "/metrics")
    for limit in ("max_open_streams_per_connection", "max_open_streams"):
        assert metric(text, "rpyc_host_limit_refusals_total", service="streams", limit=limit) == 1
    wait_until(lambda: ledger.held("open_streams") == 0, 10, "the streams given back on disconnect")


def test_a_plain_rpyc_client_iterates_item_by_item(served: tuple[Host, Path]) -> None:
    host, events = served
    conn = rpyc.connect("127.0.0.1", host.address("streams")[1])
    try:
        stream = conn.root.count(50)
        assert not isinstance(stream, StreamReader)  # a netref, iterated by rpyc itself
        assert list(stream) == list(range(50))
        assert [next(stream) for _ in range(0)] == []
        chunk, done = conn.root.count(5).next_chunk(10)  # the chunked call works for it too
        assert (chunk, done) == ((0, 1, 2, 3, 4), True)
        numbers = iter(conn.root.endless())
        assert [next(numbers) for _ in range(5)] == list(range(5))
        del numbers  # dropped: rpyc releases it, and the server closes the generator
        _closed(events, "endless")
        with pytest.raises(ValueError, match="item 3 is broken"):
            list(conn.root.failing(3))
    finally:
        conn.close()


def test_a_chunk_is_bounded_by_count_and_by_bytes() -> None:
    stream = Stream(iter([b"x" * 300_000] * 20))
    chunk, done = stream.exposed_next_chunk(1000)
    assert not done and 1 <= len(chunk) <= CHUNK_BYTES // 300_000 + 1
    assert stream.exposed_next_chunk(2)[0] == (b"x" * 300_000,) * 2
    with pytest.raises(ValueError, match="max_items"):
        stream.exposed_next_chunk(0)
    stream.close()
    assert stream.exposed_next_chunk(5) == ((), True)


def test_the_demo_service_streams_count(
    start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    proc = start_server(write_config(demo_config("threaded")))
    host, port = proc.address("demo")
    with client.connect(host=host, port=port) as conn:
        assert list(conn.root.count(100_000, start=5)) == list(range(5, 100_005))
        with pytest.raises(ValueError, match="n must be >= 0"):
            conn.root.count(-1)
    with rpyc.connect(host, port) as plain:
        assert list(plain.root.count(3)) == [0, 1, 2]
    shown = run_cli("-m", "client", "call", "demo", "count", "3", "--host", host, "--port", str(port))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["0", "1", "2"]  # one item a line


def test_the_file_service_scans_a_large_folder_as_a_stream(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "big").mkdir(parents=True)
    names = {f"f{i:05d}" for i in range(3000)}
    for name in names:
        (root / "big" / name).write_bytes(b"x")
    config = (
        f"services:\n  files: {{class: services.files:FileService, port: 0, options: {{root: '{root}'}}}}\n"
    )
    with running_host(config) as host:
        fds = Path("/proc/self/fd")
        with client.connect(host="127.0.0.1", port=host.address("files")[1]) as conn:
            fs = conn.root
            assert set(fs.scan("big")) == names
            entries = list(fs.scan("big", True).chunked(100))
            assert len(entries) == 3000 and all(e[1] == "file" and e[2] == 1 for e in entries)
            with pytest.raises(FileNotFoundError, match="'nowhere'"):
                fs.scan("nowhere")  # refused at the call, not at the first chunk
            before = len(list(fds.iterdir()))
            with fs.scan("big") as listing:
                next(listing)
                assert len(list(fds.iterdir())) > before  # the directory, open meanwhile
            wait_until(lambda: len(list(fds.iterdir())) == before, 10, "the directory closed")

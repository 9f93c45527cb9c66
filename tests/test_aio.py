"""The asyncio client against a real host: many tasks on one connection, a loop that stays
responsive, deadlines the server sees, cancellation, errors, and the async pool and collector."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import client
import client.aio
from rpyc_host.host import Host
from rpyc_host.testing import running_host

CONFIG = """
server: {{type: threaded}}
services:
  demo: {{class: services.demo:DemoService, port: 0}}
  demo2: {{class: services.demo:DemoService, port: 0}}
  slow: {{class: tests.sample_services:SlowService, port: 0, options: {{events: "{events}"}}}}
  probe: {{class: tests.sample_services:ContextProbeService, port: 0}}
  inspect: {{class: tests.sample_services:InspectService, port: 0}}
  ingest: {{class: services.ingest:IngestService, port: 0, options: {{database: "sqlite:///{db}"}}}}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    folder = tmp_path_factory.mktemp("aio")
    with running_host(CONFIG.format(events=folder / "events", db=folder / "ingest.db")) as running:
        yield running


def port(host: Host, name: str) -> int:
    return int(host.address(name)[1])


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Await until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)  # the poll interval of a wait with a deadline, off the loop


class Heartbeat:
    """A task ticking every 10 ms; ``max_gap`` is the longest the loop kept it waiting."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)  # the heartbeat's tick: its lateness is what is measured
            now = time.monotonic()
            self.max_gap, self.ticks, last = max(self.max_gap, now - last), self.ticks + 1, now

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


def test_100_tasks_share_one_connection_while_the_loop_stays_responsive(host: Host) -> None:
    async def main() -> tuple[list[int], float, float, int]:
        async with await client.aio.connect(host="127.0.0.1", port=port(host, "demo")) as conn:
            slow = await client.aio.connect(host="127.0.0.1", port=port(host, "slow"))
            async with slow, Heartbeat() as beat:
                started = time.monotonic()
                sleeping = asyncio.create_task(slow.root.sleep(2.0))
                results = await asyncio.gather(*(conn.root.add(i, i) for i in range(100)))
                more = await asyncio.gather(*(conn.call("add", i, 1) for i in range(100)))
                assert more == [i + 1 for i in range(100)]
                # Large frames (written at once) and small ones (gathered per loop turn) mixed.
                mixed = await asyncio.gather(
                    *(conn.root.echo(f"{i}:" + "x" * 40_000 * (i % 2)) for i in range(20))
                )
                assert mixed == [f"{i}:" + "x" * 40_000 * (i % 2) for i in range(20)]
                assert await sleeping == 2.0
                took = time.monotonic() - started
            return results, beat.max_gap, took, beat.ticks

    results, max_gap, took, ticks = asyncio.run(main())
    assert results == [2 * i for i in range(100)]
    # A loop blocked by the 2 s call would show a gap of 2 s; a loaded machine may delay a tick.
    assert max_gap < 1.0, f"the event loop was blocked for {max_gap:.3f} s"
    assert ticks >= 10 and took >= 2.0


def test_tasks_calling_a_method_first_at_once_share_one_lookup(host: Host) -> None:
    server = next(h.server for h in host.hosted if h.config.name == "demo2")

    async def main() -> int:
        earlier = set(server.connections)  # other tests' connections may still be closing
        async with await client.aio.connect(host="127.0.0.1", port=port(host, "demo2")) as conn:
            (served,) = set(server.connections) - earlier
            before = served._config["host_traffic"].requests
            assert await asyncio.gather(*(conn.root.echo(str(i)) for i in range(100))) == [
                str(i) for i in range(100)
            ]
            return int(served._config["host_traffic"].requests - before)

    # 100 calls and one attribute lookup (each extra lookup would also cost a delete later).
    assert asyncio.run(main()) <= 102


def test_the_service_calls_back_into_the_client_while_tasks_wait(host: Host) -> None:
    async def main() -> None:
        async with await client.aio.connect(host="127.0.0.1", port=port(host, "demo")) as conn:
            seen: list[int] = []
            counted, added = await asyncio.gather(conn.root.countdown(50, seen.append), conn.root.add(1, 2))
            assert (counted, added) == (50, 3)
            assert seen == list(range(50, 0, -1))  # run by the reader thread, in order

    asyncio.run(main())


def test_deadlines_reach_the_server_and_expire_as_deadline_exceeded(host: Host) -> None:
    async def main() -> None:
        async with await client.aio.connect(host="127.0.0.1", port=port(host, "probe"), timeout=30) as conn:
            request_id, left = await conn.root.context_seen()
            assert request_id and 20 < left <= 30  # the connection's timeout
            _, left = await conn.call("context_seen", timeout=3)
            assert 0 < left <= 3
            async with asyncio.timeout(4):
                _, left = await conn.root.context_seen()
            assert 0 < left <= 4
            _, left = await asyncio.wait_for(conn.root.context_seen(), 5)
            assert 0 < left <= 5
            with client.deadline(2, request_id="aio-7"):
                request_id, left = await conn.root.context_seen()
            assert request_id == "aio-7" and 0 < left <= 2

        async with await client.aio.connect(host="127.0.0.1", port=port(host, "slow")) as slow:
            started = time.monotonic()
            with pytest.raises(client.DeadlineExceeded, match="deadline"):
                await slow.call("sleep", 2.0, timeout=0.2)
            assert time.monotonic() - started < 1.5
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await slow.root.sleep(2.0)
            assert time.monotonic() - started < 1.5
            assert slow.pending == 0

    asyncio.run(main())


def test_a_cancelled_call_drops_its_late_reply(host: Host) -> None:
    async def main() -> None:
        async with await client.aio.connect(host="127.0.0.1", port=port(host, "slow")) as conn:
            task = asyncio.create_task(conn.root.sleep(0.5))
            await eventually(lambda: conn.pending == 1, 10, "the call to be sent")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert conn.pending == 0
            # The reply arrives later and is dropped: rpyc forgets the request, and the next
            # call gets its own answer, not the old one.
            await eventually(lambda: not conn.sync._request_callbacks, 10, "the late reply")
            assert await conn.root.add(2, 3) == 5
            assert conn.pending == 0 and not conn.sync._request_callbacks
            # Answered calls' deadlines (30 s each) are not kept until they would have passed.
            for _ in range(30):
                await asyncio.gather(*(conn.root.add(i, 1) for i in range(100)))
            assert len(conn._deadlines._heap) <= 2048

    asyncio.run(main())


def test_errors_arrive_as_their_own_type_with_clean_messages(host: Host) -> None:
    async def main() -> None:
        async with await client.aio.connect(host="127.0.0.1", port=port(host, "inspect")) as conn:
            with pytest.raises(ZeroDivisionError) as caught:
                await conn.root.boom()
            assert str(caught.value) == "division by zero" and client.is_remote(caught.value)
            with pytest.raises(AttributeError, match="'nosuch'"):
                await conn.call("nosuch")
            assert await conn.root.echo("still fine") == "still fine"
        with pytest.raises(EOFError, match="closed"):
            await conn.root.echo("after close")
        with pytest.raises(client.ConnectError, match="cannot connect"):
            await client.aio.connect(host="127.0.0.1", port=1, retries=0)

    asyncio.run(main())


def test_pending_calls_fail_when_the_server_goes_away(tmp_path: Path) -> None:
    events = tmp_path / "events"
    config = (
        "services:\n  slow: {class: tests.sample_services:SlowService, port: 0, "
        f"options: {{events: '{events}'}}}}\n"
    )

    async def main(h: Host) -> BaseException:
        conn = await client.aio.connect(host="127.0.0.1", port=port(h, "slow"))
        task = asyncio.create_task(conn.root.sleep(30))
        await eventually(lambda: conn.pending == 1, 10, "the call to be sent")
        await asyncio.get_running_loop().run_in_executor(None, h.stop, 0)
        try:
            async with asyncio.timeout(20):
                await task
        except Exception as exc:  # what the server's going away raised in the waiting task
            return exc
        finally:
            await conn.close()
        raise AssertionError("the call returned although the server stopped")

    with running_host(config) as h:
        error = asyncio.run(main(h))
    assert isinstance(error, EOFError | OSError), repr(error)  # closed, reset or refused


def test_async_pool_spreads_calls_over_two_instances(host: Host) -> None:
    target = f"static:127.0.0.1:{port(host, 'demo')},127.0.0.1:{port(host, 'demo2')}"

    async def main() -> tuple[list[Any], dict[Any, int], float]:
        slow_target = f"static:127.0.0.1:{port(host, 'slow')}"
        async with Heartbeat() as beat, await client.aio.connect_service(slow_target) as slow:
            sleeping = asyncio.create_task(slow.root.sleep(2.0))  # holds a worker, not the loop
            pool = await client.aio.connect_service(target, max_workers=4)
            async with pool:
                results = await asyncio.gather(*(pool.root.add(i, 1) for i in range(40)))
                assert await sleeping == 2.0
                assert await pool.call("echo", "hi") == "hi"
                with pytest.raises(TypeError):
                    await pool.root.add(1)  # the service's own error, not retried
                stats = dict(pool.stats())
        return results, stats, beat.max_gap

    results, stats, max_gap = asyncio.run(main())
    assert results == [i + 1 for i in range(40)]
    assert len(stats) == 2 and all(calls >= 10 for calls in stats.values()), stats
    assert max_gap < 1.0, f"the event loop was blocked for {max_gap:.3f} s"


def test_async_pool_calls_carry_the_tasks_deadline(host: Host) -> None:
    async def main() -> tuple[float, float]:
        async with await client.aio.connect_service(f"static:127.0.0.1:{port(host, 'probe')}") as pool:
            async with asyncio.timeout(4):
                _, in_timeout = await pool.root.context_seen()
            with client.deadline(2):
                _, in_deadline = await pool.call("context_seen")
        return in_timeout, in_deadline

    in_timeout, in_deadline = asyncio.run(main())
    assert 0 < in_timeout <= 4 and 0 < in_deadline <= 2


def test_async_collector_stores_exactly_the_records_added(host: Host) -> None:
    target = f"static:127.0.0.1:{port(host, 'ingest')}"

    async def main() -> int:
        async with await client.aio.connect_service(target) as pool:
            async with client.aio.AsyncPooledCollector(pool, topic="aio", batch_records=40) as collector:
                for i in range(250):
                    await collector.add({"i": i})
                await collector.flush()
                assert collector.stats.accepted == 250
            return int(await pool.call("count", "aio"))

    assert asyncio.run(main()) == 250
    with client.connect(host="127.0.0.1", port=port(host, "ingest")) as conn:
        assert conn.root.count("aio") == 250

"""The thread pool polls with about one worker per CPU and lets parked ones in for slow calls."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import rpyc

from rpyc_host.servers.pool_watch import polling_workers
from rpyc_host.testing import ServerProcess, running_host, wait_until
from tests.sample_services import WorkerNameService


def config(pool_size: int) -> str:
    return f"""
server: {{type: threadpool, pool_size: {pool_size}}}
services:
  names: {{class: tests.sample_services:WorkerNameService, port: 0}}
"""


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("names-worker-")]


def test_pool_size_calls_block_at_once_and_a_ping_beside_them_is_prompt() -> None:
    pool_size = 4
    with running_host(config(pool_size)) as host, ExitStack() as stack:
        address = host.address("names")
        conns = [rpyc.connect(*address, config={"sync_request_timeout": 30}) for _ in range(pool_size)]
        for conn in conns:
            stack.callback(conn.close)
        sleep = [rpyc.async_(conn.root.sleep) for conn in conns]
        # pool_size - 1 blocking calls: more than the workers that poll while nothing is slow.
        pending = [sleep[i](6) for i in range(pool_size - 1)]
        wait_until(lambda: WorkerNameService.sleeping == pool_size - 1, 4, f"{pool_size - 1} calls asleep")
        who = conns[-1].root.who
        ends = time.monotonic() + 2
        for _ in range(20):  # bounded in count and time
            if time.monotonic() > ends:
                break
            started = time.monotonic()
            assert who().startswith("names-worker-")
            assert time.monotonic() - started < 1.0, "a ping waited behind the blocking calls"
        # The last worker blocks too: pool_size calls asleep at once, long before the first ends.
        pending.append(sleep[-1](1))
        wait_until(lambda: WorkerNameService.sleeping == pool_size, 4, f"{pool_size} calls asleep")
        names = {p.value for p in pending}
        assert len(names) == pool_size, names


def in_epoll_wait(pid: int) -> int:
    """Threads of process ``pid`` blocked in epoll_wait (its kernel wait channel): polling workers."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                count += "epoll" in f.read()
        except OSError:  # the thread ended meanwhile
            pass
    return count


def test_about_one_worker_per_cpu_polls_idle_and_under_load(
    start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    # The server in its own process, so its threads' kernel state is its own.
    pool_size = max(16, 4 * polling_workers(1000))
    polling = polling_workers(pool_size)
    server = start_server(write_config(config(pool_size)))
    assert server.proc is not None
    pid = server.proc.pid
    wait_until(lambda: in_epoll_wait(pid) == polling, 10, f"{polling} of {pool_size} workers polling")
    address = server.address("names")
    stop = threading.Event()

    def client() -> None:
        with rpyc.connect(*address) as conn:
            who = conn.root.who
            ends = time.monotonic() + 10
            for _ in range(5000):  # bounded in count and time
                if stop.is_set() or time.monotonic() > ends:
                    break
                assert who().startswith("names-worker-")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    with ExitStack() as stack:
        stack.callback(lambda: [t.join(30) for t in threads])
        stack.callback(stop.set)
        for t in threads:
            t.start()
        samples = []
        for _ in range(40):  # while 8 clients call as fast as they can
            samples.append(in_epoll_wait(pid))
            stop.wait(0.02)  # paces the sampling
    assert not any(t.is_alive() for t in threads)
    # A parked worker is let in only while a polling one is held past 2 ms (preempted mid-call on
    # a loaded machine), so now and then a sample sees one or two more.
    assert statistics.median(samples) <= polling, samples
    assert max(samples) <= pool_size // 2, samples
    wait_until(lambda: in_epoll_wait(pid) == polling, 10, f"back to {polling} workers polling")


def test_parked_workers_leave_when_the_host_stops() -> None:
    with running_host(config(12)) as host, rpyc.connect(*host.address("names")) as conn:
        assert conn.root.who().startswith("names-worker-")
        assert len(workers()) == 12
    wait_until(lambda: not workers(), 10, "every worker gone after stop")

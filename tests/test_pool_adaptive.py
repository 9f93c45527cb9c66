"""The thread pool polls with about one worker per CPU and lets parked ones in for slow calls."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import rpyc

from rpyc_host.servers.pool_watch import polling_workers
from rpyc_host.testing import running_host, wait_until
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


def test_short_calls_are_served_by_about_one_worker_per_cpu() -> None:
    pool_size = max(16, 4 * polling_workers(1000))
    with running_host(config(pool_size)) as host, ExitStack() as stack:
        address = host.address("names")
        seen: set[str] = set()
        lock = threading.Lock()
        ready = threading.Barrier(8)

        def client() -> None:
            with rpyc.connect(*address) as conn:
                who = conn.root.who
                ready.wait(10)
                ends = time.monotonic() + 10
                names = set()
                for _ in range(300):  # bounded in count and time
                    names.add(who())
                    if time.monotonic() > ends:
                        break
            with lock:
                seen.update(names)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
            stack.callback(t.join, 30)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert len(workers()) == pool_size, "every worker exists (parked), ready for slow calls"
        # Polling workers, plus a few let in while one was preempted mid-call on a loaded machine.
        assert len(seen) <= pool_size // 2, f"{len(seen)} of {pool_size} workers served short calls"


def test_parked_workers_leave_when_the_host_stops() -> None:
    with running_host(config(12)) as host, rpyc.connect(*host.address("names")) as conn:
        assert conn.root.who().startswith("names-worker-")
        assert len(workers()) == 12
    wait_until(lambda: not workers(), 10, "every worker gone after stop")

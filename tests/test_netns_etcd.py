"""etcd discovery across real hosts: network namespaces joined by veth pairs to a bridge.

Layout (names unique per run; 10.232.<n>.0/24 exists only inside these namespaces)::

    <id>-sw  (bridge br0)
      ├── <id>-e1 .. e3   10.232.n.1-3    etcd members: one three-member cluster
      ├── <id>-s1 .. s4   10.232.n.11-14  server.py: demo, registered in etcd (ttl 3 s)
      └── <id>-cli        10.232.n.20     the pool (etcd:// target), driven over stdin/stdout

The client never polls (``rediscover=60``): joins and leaves reach it through etcd's watch.
Needs root and ``ip``; not skipped: without them the test fails and says why.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rpyc_host.testing import ServerProcess, wait_until
from rpyc_host.testing_engines import EtcdCluster, demo_etcd_config, need
from tests.helpers import LineDriver, Network, namespaces

TTL = 3
TOKEN = "netns-etcd-test-token-0123456789"
HOSTS = {"e1": 1, "e2": 2, "e3": 3, "s1": 11, "s2": 12, "s3": 13, "s4": 14, "cli": 20}

DRIVER = textwrap.dedent(
    """
    import collections, json, sys, time
    import client, etcd3gw
    target, endpoints, token = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    pool = client.connect_service(target, rediscover=60, connect_timeout=1, timeout=3, quarantine=1,
                                  idempotent={"ping"}, token=token)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "keys":
            keys = None
            for endpoint in endpoints:
                host, _, port = endpoint.rpartition(":")
                etcd = etcd3gw.client(host=host, port=int(port), api_path="/v3/", timeout=1)
                try:
                    found = etcd.get_prefix(args[0])
                except Exception:
                    continue
                keys = sorted(meta["key"].decode() for _, meta in found)
                break
            print(json.dumps({"keys": keys}), flush=True)
            continue
        calls, limit, until = int(args[0]), float(args[1]), (args[2] if len(args) > 2 else "")
        seen, failed, first, started = collections.Counter(), [], None, time.monotonic()
        for n in range(calls):
            if time.monotonic() - started > limit:
                break
            try:  # every other call is not idempotent: only a call never sent may move on
                answer = pool.call("ping", idempotent=bool(n % 2))
            except Exception as exc:
                failed.append(repr(exc))
                continue
            seen[answer] += 1
            if until:
                if answer == until:
                    first = time.monotonic() - started
                    break
                time.sleep(0.005)  # a steady stream of calls, not one burst
        print(json.dumps({"seen": seen, "failed": failed, "first": first}), flush=True)
    """
)


@pytest.fixture
def network() -> Iterator[Network]:
    need("etcd", "etcd-server")
    with namespaces(HOSTS, "re", "10.232") as net:
        yield net


@pytest.fixture
def etcd(network: Network, tmp_path: Path) -> Iterator[EtcdCluster]:
    members = [(network.addr(n), network.exec(n)) for n in ("e1", "e2", "e3")]
    with EtcdCluster.spread(tmp_path, members) as cluster:
        yield cluster


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Server processes started in namespaces; each is stopped (by PID) at the end."""
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        proc.stop(timeout=20)
        assert proc.proc is not None and proc.proc.poll() is not None, "server still running"


class Driver(LineDriver):
    """The pool, running in the client namespace."""

    def __init__(self, net: Network, target: str, endpoints: list[str]) -> None:
        super().__init__(net.exec("cli"), DRIVER, target, ",".join(endpoints), TOKEN)

    def calls(self, n: int, limit: float = 20.0, until: str = "") -> dict[str, object]:
        """Up to ``n`` calls within ``limit`` seconds (stopping at the first from ``until``)."""
        return self.ask(f"calls {n} {limit} {until}")

    def keys(self, prefix: str) -> list[str]:
        keys = self.ask(f"keys {prefix}")["keys"]
        assert isinstance(keys, list), "no etcd member answered the driver"
        return [str(k) for k in keys]


@pytest.mark.slow
def test_etcd_cluster_across_namespaces_survives_a_killed_host_and_a_stopped_member(
    network: Network, etcd: EtcdCluster, write_config: Callable[[str], Path], servers: list[ServerProcess]
) -> None:
    net = network
    started = time.monotonic()

    def server(name: str) -> ServerProcess:
        extra = f"security: {{tokens: [{TOKEN}]}}\n"
        path = demo_etcd_config(write_config, etcd.endpoints, name, host=net.addr(name), ttl=TTL, extra=extra)
        proc = ServerProcess(path)
        proc.args = [*net.exec(name), *proc.args]  # ip netns exec execs python: same PID
        servers.append(proc)
        return proc.start()

    def registered(proc: ServerProcess, name: str) -> float:
        proc.wait_for(f"registered demo at {net.addr(name)}:{proc.address('demo')[1]} with etcd", 15)
        return time.monotonic()

    hosts = {name: server(name) for name in ("s1", "s2", "s3")}
    for name, proc in hosts.items():
        registered(proc, name)

    driver = Driver(net, f"etcd://{','.join(etcd.endpoints)}/rpyc-host/DEMO", etcd.endpoints)
    try:
        spread = driver.calls(300)
        seen = spread["seen"]
        assert spread["failed"] == [] and set(seen) == {"s1", "s2", "s3"}, spread  # type: ignore[arg-type]
        assert min(seen.values()) >= 60, spread  # type: ignore[attr-defined]

        # s1 SIGKILLed between calls: nothing was sent on its stale connection, so no call fails,
        # idempotent or not; its key is gone within the lease's TTL.
        victim = hosts["s1"]
        key = f"/rpyc-host/DEMO/{net.addr('s1')}:{victim.address('demo')[1]}"
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.proc is not None
        victim.proc.wait(timeout=10)
        killed = time.monotonic()
        after = driver.calls(100)
        assert after["failed"] == [] and set(after["seen"]) == {"s2", "s3"}, after  # type: ignore[arg-type]
        wait_until(
            lambda: key not in driver.keys("/rpyc-host/DEMO/"), TTL + 5, "the killed host's key expiring"
        )
        assert time.monotonic() - killed <= TTL + 2

        # One etcd member stops: registration and discovery go on. A fourth host joins (its
        # config lists the stopped member first) and receives calls within 2 s, through the watch.
        etcd.members[0].stop()
        s4 = server("s4")
        joined_at = registered(s4, "s4")
        joined = driver.calls(2000, limit=10, until="s4")
        assert joined["failed"] == [] and joined["first"] is not None, joined
        assert time.monotonic() - joined_at < 2.0 + 1.0, joined  # 1 s for the driver's round trip
        assert float(joined["first"]) < 2.0, joined  # type: ignore[arg-type]
        last = driver.calls(200)
        assert last["failed"] == [] and set(last["seen"]) == {"s2", "s3", "s4"}, last  # type: ignore[arg-type]
    finally:
        driver.stop()
    assert time.monotonic() - started < 60

"""Real hosts: network namespaces joined by veth pairs to a bridge, all made by this test.

Layout (names unique per run; 10.231.<n>.0/24 exists only inside these namespaces, and the
bridge lives in a namespace of its own, so nothing is added to the machine's own network)::

    <id>-sw  (bridge br0)
      ├── veth ── <id>-reg   10.231.n.1   python -m rpyc_host.registry
      ├── veth ── <id>-s1    10.231.n.2   server.py: demo, token auth
      ├── veth ── <id>-s2    10.231.n.3   server.py: demo, token auth (binds 0.0.0.0 + advertise_host)
      └── veth ── <id>-cli   10.231.n.9   the pool, driven over stdin/stdout

Needs root and ``ip`` (CI has both; scripts/test.sh installs iproute2). Not skipped: without
them the test fails and says why.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rpyc_host.testing import RegistryProcess, ServerProcess
from tests.helpers import LineDriver, Network, namespaces, registered_demo_config

TOKEN = "netns-test-token-0123456789"
HOSTS = {"reg": 1, "s1": 2, "s2": 3, "s3": 4, "cli": 9}

DRIVER = textwrap.dedent(
    """
    import collections, json, sys, time
    import client
    pool = client.connect_service("DEMO", registry=sys.argv[1], token=sys.argv[2], idempotent={"ping"},
                                  rediscover=0.5, connect_timeout=1, timeout=2, quarantine=5)
    for line in sys.stdin:
        n, limit, pace = (float(x) for x in line.split())
        seen, failed, started = collections.Counter(), 0, time.monotonic()
        for _ in range(int(n)):
            if time.monotonic() - started > limit:
                break
            time.sleep(pace)  # paces the calls of a bounded load loop; nothing is awaited
            try:
                seen[pool.root.ping()] += 1
            except Exception as exc:
                failed += 1
                print("# " + repr(exc), file=sys.stderr, flush=True)
        print(json.dumps({"seen": seen, "failed": failed, "live": pool.instances()}), flush=True)
    """
)


@pytest.fixture
def network() -> Iterator[Network]:
    with namespaces(HOSTS, "rh", "10.231") as net:
        yield net


class Driver(LineDriver):
    """The pool, running in the client namespace; each ``run`` makes up to n calls."""

    def __init__(self, net: Network, registry: str) -> None:
        super().__init__(net.exec("cli"), DRIVER, registry, TOKEN)

    def run(self, calls: int, limit: float = 30.0, pace: float = 0.0) -> dict[str, object]:
        """Up to ``calls`` calls within ``limit`` seconds, ``pace`` seconds apart."""
        return self.ask(f"{calls} {limit} {pace}")


@pytest.mark.slow
def test_pool_across_namespaces_survives_a_kill_and_a_cut_link(
    network: Network, write_config: Callable[[str], Path], servers: list[ServerProcess]
) -> None:
    net = network
    with RegistryProcess(host=net.addr("reg"), prefix=net.exec("reg")) as registry:
        extra = f"""
            security: {{tokens: ["{TOKEN}"]}}
            """

        def server(name: str, bind: str, advertise: str = "") -> ServerProcess:
            path = registered_demo_config(write_config, registry.address, name, host=bind, extra=extra)
            if advertise:
                path.write_text(
                    path.read_text().replace("timeout: 1}", f"timeout: 1, advertise_host: {advertise}}}")
                )
            proc = ServerProcess(path)
            proc.args = [*net.exec(name), *proc.args]  # ip netns exec execs python: same PID
            servers.append(proc)
            return proc.start()

        s1 = server("s1", net.addr("s1"))
        s2 = server("s2", "0.0.0.0", advertise=net.addr("s2"))
        # The registry is only reachable inside the namespaces: the servers' logs say it answered.
        s1.wait_for(f"at {net.addr('s1')}:{s1.address('demo')[1]} with registry", 10)
        s2.wait_for(f"at {net.addr('s2')}:{s2.address('demo')[1]} with registry", 10)

        driver = Driver(net, registry.spec)
        try:
            first = driver.run(200)
            assert first["failed"] == 0 and set(first["seen"]) == {"s1", "s2"}, first  # type: ignore[arg-type]
            assert min(first["seen"].values()) >= 60, first  # type: ignore[attr-defined]

            # s1 killed: no failed call, only s2 answers.
            os.kill(s1.pid, signal.SIGKILL)
            after_kill = driver.run(100)
            assert after_kill["failed"] == 0 and set(after_kill["seen"]) == {"s2"}, after_kill  # type: ignore[arg-type]

            # A third host joins and is found by re-discovery.
            s3 = server("s3", net.addr("s3"))
            s3.wait_for(f"at {net.addr('s3')}:{s3.address('demo')[1]} with registry", 10)
            joined = driver.run(200, pace=0.01)  # spans several re-discovery intervals
            assert joined["failed"] == 0 and "s3" in joined["seen"], joined  # type: ignore[operator]

            # s2's cable is cut: calls in flight time out and move on; the client carries on with s3.
            net.cut("s2")
            cut = driver.run(100, limit=30)
            assert cut["failed"] == 0 and cut["seen"] == {"s3": 100}, cut
            assert [net.addr("s3"), s3.address("demo")[1]] in cut["live"], cut  # type: ignore[operator]
        finally:
            driver.stop()

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

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rpyc_host.testing import RegistryProcess, ServerProcess
from tests.helpers import ROOT, registered_demo_config

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
            time.sleep(pace)
            try:
                seen[pool.root.ping()] += 1
            except Exception as exc:
                failed += 1
                print("# " + repr(exc), file=sys.stderr, flush=True)
        print(json.dumps({"seen": seen, "failed": failed, "live": pool.instances()}), flush=True)
    """
)


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode:
        raise AssertionError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class Network:
    """The namespaces, veths and bridge above; ``close()`` deletes every namespace it made."""

    def __init__(self) -> None:
        self.id = f"rh{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
        self.subnet = f"10.231.{random.randrange(1, 255)}"
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.id}-{name}"

    def addr(self, name: str) -> str:
        return f"{self.subnet}.{HOSTS[name]}"

    def exec(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def create(self) -> Network:
        switch = self.ns("sw")
        for name in ["sw", *HOSTS]:
            ip("netns", "add", self.ns(name))
            self.made.append(self.ns(name))
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for name in HOSTS:
            ns = self.ns(name)
            ip("-n", switch, "link", "add", f"p-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", switch, "link", "set", f"p-{name}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def cut(self, name: str) -> None:
        """Unplug a host: its end of the cable goes down on the switch."""
        ip("-n", self.ns("sw"), "link", "set", f"p-{name}", "down")

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
        assert self.id not in left, f"namespaces left behind: {left}"


@pytest.fixture
def network() -> Iterator[Network]:
    if shutil.which("ip") is None:
        pytest.fail("the 'ip' command (iproute2) is missing: run bash scripts/test.sh", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (CI runs as root)", pytrace=False)
    net = Network()
    try:
        net.create()
    except AssertionError as exc:
        net.close()
        pytest.fail(f"cannot build network namespaces here: {exc}", pytrace=False)
    try:
        yield net
    finally:
        net.close()


class Driver:
    """The pool, running in the client namespace; each ``run`` makes up to n calls."""

    def __init__(self, net: Network, registry: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [*net.exec("cli"), sys.executable, "-c", DRIVER, registry, TOKEN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def run(self, calls: int, limit: float = 30.0, pace: float = 0.0) -> dict[str, object]:
        """Up to ``calls`` calls within ``limit`` seconds, ``pace`` seconds apart."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{calls} {limit} {pace}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the client driver exited"
        return dict(json.loads(line))

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


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

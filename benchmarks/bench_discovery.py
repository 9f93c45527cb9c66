"""Discovery backends side by side: how fast the pool forgets a killed host and finds a new one,
and what the pool costs per call beside a direct connection.

    python benchmarks/bench_discovery.py [--seconds 2] [--ttl 3] [--rediscover 2]

For each backend (rpyc's registry, etcd, DNS) in one run, three demo hosts (``python server.py``)
bind 127.0.0.2-4 on one port and a pool in this process finds them:

- ``registry``: ``python -m rpyc_host.registry --prune TTL``, hosts re-register every 0.5 s, the
  pool asks every ``--rediscover`` seconds;
- ``etcd``: one etcd member, hosts register with ``backend: etcd, ttl: TTL``, the pool watches;
- ``dns``: dnsmasq with ``--local-ttl 1`` serving A records; the benchmark plays Kubernetes'
  endpoints controller: it rewrites the record set (and SIGHUPs dnsmasq) when a host dies or is
  ready.

Figures per backend:

- ``kill -> unlisted``: SIGKILL of one host until the pool's source stops listing it (registry
  prune, etcd lease expiry, DNS record removed + TTL); ``failed`` counts calls that failed
  meanwhile (calls keep going, not idempotent);
- ``start -> first call``: a fourth host's process start until the pool's first answer from it;
- ``calls/s``: sequential ``add(1, 2)`` through the pool, and the ratio to one direct
  connection measured in the same run (three interleaved rounds, medians).

Every loop is bounded in count and time; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import client
from benchmarks.harness import fmt, machine, save, table
from rpyc_host.testing import RegistryProcess, ServerProcess, wait_until
from rpyc_host.testing_engines import Dnsmasq, EtcdCluster, free_port_on_all

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
NAME = "demo.default.svc.cluster.local"
MAX_CALLS = 200_000


def host_config(directory: Path, address: str, port: int, registry: str) -> Path:
    path = directory / f"host-{address}.yaml"
    path.write_text(
        f"server: {{host: {address}, grace_period: 0}}\n"
        "services:\n"
        f"  demo: {{class: services.demo:DemoService, port: {port}, options: {{greeting: {address}}}}}\n"
        f"{registry}\n"
    )
    return path


def calls_per_second(call: Callable[[], Any], seconds: float) -> float:
    for _ in range(200):
        call()
    calls, started = 0, time.perf_counter()
    deadline = started + seconds
    while calls < MAX_CALLS and time.perf_counter() < deadline:
        call()
        calls += 1
    return calls / (time.perf_counter() - started)


class Backend:
    """One discovery source: the registry line for hosts, the pool's target, record hooks."""

    name = ""

    def __init__(self, directory: Path, port: int, args: argparse.Namespace) -> None:
        self.directory, self.port, self.args = directory, port, args

    def start(self, stack: ExitStack) -> None: ...

    def registry(self) -> str:
        return ""

    def target(self) -> str:
        raise NotImplementedError

    def pool_options(self) -> dict[str, Any]:
        return {}

    def listed(self, addresses: list[str]) -> None:
        """The hosts that are up and ready now (DNS records follow them; others need nothing)."""


class RegistryBackend(Backend):
    name = "rpyc registry"

    def start(self, stack: ExitStack) -> None:
        self.reg = stack.enter_context(RegistryProcess(args=["--prune", str(self.args.ttl)]))

    def registry(self) -> str:
        return (
            f"registry: {{enabled: true, host: 127.0.0.1, port: {self.reg.port}, interval: 0.5, timeout: 1}}"
        )

    def target(self) -> str:
        return f"registry://{self.reg.spec}/DEMO"

    def pool_options(self) -> dict[str, Any]:
        return {"rediscover": self.args.rediscover}


class EtcdBackend(Backend):
    name = "etcd"

    def start(self, stack: ExitStack) -> None:
        self.etcd = stack.enter_context(EtcdCluster.local(self.directory))

    def registry(self) -> str:
        endpoints = ", ".join(self.etcd.endpoints)
        return (
            f"registry: {{enabled: true, backend: etcd, endpoints: [{endpoints}], ttl: {self.args.ttl}, "
            "timeout: 1}"
        )

    def target(self) -> str:
        return f"etcd://{','.join(self.etcd.endpoints)}/rpyc-host/DEMO"

    def pool_options(self) -> dict[str, Any]:
        return {"rediscover": 60.0}  # the watch, not polling


class DnsBackend(Backend):
    name = "dns (A, ttl 1)"

    def start(self, stack: ExitStack) -> None:
        self.dns = stack.enter_context(Dnsmasq(self.directory, {}, ttl=1))

    def target(self) -> str:
        return f"dns://{self.dns.server}/{NAME}:{self.port}"

    def listed(self, addresses: list[str]) -> None:
        self.dns.set_hosts({NAME: addresses})
        self.dns.reload()


@contextmanager
def hosts(backend: Backend, addresses: list[str]) -> Iterator[dict[str, ServerProcess]]:
    procs: dict[str, ServerProcess] = {}
    try:
        for address in addresses:
            procs[address] = ServerProcess(
                host_config(backend.directory, address, backend.port, backend.registry())
            ).start()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def measure(backend: Backend, seconds: float) -> dict[str, float]:
    first3 = ADDRESSES[:3]
    result: dict[str, float] = {}
    with ExitStack() as stack:
        backend.start(stack)
        procs = stack.enter_context(hosts(backend, first3))
        backend.listed(first3)
        pool = stack.enter_context(
            client.connect_service(backend.target(), timeout=10, **backend.pool_options())
        )
        wait_until(lambda: {pool.call("ping") for _ in range(30)} == set(first3), 20, "three hosts answering")

        direct = client.connect(host=first3[0], port=backend.port, timeout=10)
        add = direct.root.add
        runs: dict[str, list[float]] = {"direct": [], "pool": []}
        for _ in range(3):  # interleaved, so a noisy machine hurts both alike
            runs["direct"].append(calls_per_second(lambda: add(1, 2), seconds / 3))
            runs["pool"].append(
                calls_per_second(lambda: pool.call("add", 1, 2, idempotent=False), seconds / 3)
            )
        direct.close()
        result.update({k: statistics.median(v) for k, v in runs.items()})

        victim = first3[2]
        procs[victim].stop(sig=9)
        killed = time.monotonic()
        backend.listed(first3[:2])  # DNS: the record goes, as a headless Service's would
        failed = calls = 0
        deadline = killed + 4 * backend.args.ttl + 20
        while (victim, backend.port) in pool.stats():  # known to the pool (dropped when unlisted)
            if time.monotonic() > deadline or calls > MAX_CALLS:
                raise AssertionError(f"{backend.name}: {victim} still listed after {deadline - killed:.0f} s")
            try:
                pool.call("ping", idempotent=False)
            except (EOFError, OSError):
                failed += 1
            calls += 1
        result["kill"] = time.monotonic() - killed
        result["failed"] = failed

        newcomer = ADDRESSES[3]
        started = time.monotonic()
        proc = ServerProcess(host_config(backend.directory, newcomer, backend.port, backend.registry()))
        procs[newcomer] = proc.start(wait=False)
        if isinstance(backend, DnsBackend):
            proc.wait_for("host ready", 20)  # a pod's address is published once it is ready
            backend.listed([*first3[:2], newcomer])
        deadline = started + 4 * backend.args.rediscover + 30
        while pool.call("ping") != newcomer:
            if time.monotonic() > deadline:
                raise AssertionError(f"{backend.name}: {newcomer} got no call")
            time.sleep(0.002)
        result["join"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per calls/s figure")
    parser.add_argument("--ttl", type=int, default=3, help="registry prune / etcd lease seconds")
    parser.add_argument("--rediscover", type=float, default=2.0, help="pool's polling interval (registry)")
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, float]] = {}
    for cls in (RegistryBackend, EtcdBackend, DnsBackend):
        with tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp:
            backend = cls(Path(tmp), free_port_on_all(ADDRESSES), args)
            rows[backend.name] = measure(backend, args.seconds)
    print(
        f"3 hosts + 1 joining on 127.0.0.2-5, ttl/prune {args.ttl} s, "
        f"registry polled every {args.rediscover} s\n"
    )
    print(
        table(
            [
                [
                    "backend",
                    "kill -> unlisted",
                    "failed",
                    "start -> first call",
                    "pool calls/s",
                    "direct calls/s",
                    "pool/direct",
                ]
            ]
            + [
                [
                    name,
                    f"{r['kill']:.2f} s",
                    f"{r['failed']:.0f}",
                    f"{r['join']:.2f} s",
                    fmt(r["pool"]),
                    fmt(r["direct"]),
                    f"{r['pool'] / r['direct']:.2f}x",
                ]
                for name, r in rows.items()
            ]
        )
    )
    save("discovery", {"machine": machine(), "ttl": args.ttl, "rediscover": args.rediscover, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

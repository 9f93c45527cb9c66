"""Discovery on loopback: real dnsmasq and etcd processes, real hosts, real sockets.

Every 127.x.y.z address is loopback on Linux, so hosts bind 127.0.0.2, 127.0.0.3 ... and DNS
lists them as distinct A records (a Kubernetes headless Service's A records carry no port: the
instances share one).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

import client
from client.discovery import Endpoint, StaticResolver, resolver_for
from client.errors import ConfigError
from rpyc_host.config import parse_config
from rpyc_host.errors import ConfigError as HostConfigError
from rpyc_host.testing import ServerProcess, run_cli, running_host, wait_until
from rpyc_host.testing_engines import Dnsmasq, EtcdCluster, demo_etcd_config, free_port_on_all

NAME = "demo.default.svc.cluster.local"
SRV = f"_rpyc._tcp.{NAME}"


def demo_host(host: str, port: int, greeting: str) -> str:
    return f"""
        server: {{host: {host}, grace_period: 0}}
        services:
          demo: {{class: services.demo:DemoService, port: {port}, options: {{greeting: {greeting}}}}}
        """


def count(pool: client.ServicePool, calls: int) -> collections.Counter[str]:
    return collections.Counter(pool.call("ping", idempotent=False) for _ in range(calls))


def calls_reach(pool: client.ServicePool, want: set[str], timeout: float, what: str) -> None:
    """Within ``timeout`` seconds, 20 calls in a row answer only from ``want`` (bounded loop)."""

    def only_wanted() -> bool:
        return set(count(pool, 20)) == want

    wait_until(only_wanted, timeout, what)


# -- targets -------------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_known_ones_with_a_guess() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown scheme 'dsn' \(did you mean 'dns'\?\); known: dns, etcd, "
    ):
        resolver_for("dsn://127.0.0.1:53/demo")
    with pytest.raises(ConfigError, match=r"expected etcd://HOST:PORT\[,HOST:PORT...\]/PREFIX/SERVICE"):
        resolver_for("etcd:///rpyc-host/DEMO")
    with pytest.raises(ConfigError, match=r"target 'static:127.0.0.1': '127.0.0.1' is not host:port"):
        resolver_for("static:127.0.0.1")


def test_static_target_spreads_calls_and_the_cli_lists_it() -> None:
    port = free_port_on_all(["127.0.0.2", "127.0.0.3"])
    with running_host(demo_host("127.0.0.2", port, "a")), running_host(demo_host("127.0.0.3", port, "b")):
        target = f"static:127.0.0.2:{port},127.0.0.3:{port}"
        with client.connect_service(target) as pool:
            seen = count(pool, 100)
        assert set(seen) == {"a", "b"} and min(seen.values()) >= 30, seen
        result = run_cli("-m", "client", "services", target)
        assert result.returncode == 0, result.stderr
        assert f"127.0.0.2:{port}" in result.stdout and f"127.0.0.3:{port}" in result.stdout


# -- a call that never left the client -----------------------------------------------------------


@pytest.mark.slow
def test_instance_killed_between_calls_costs_no_call_that_was_not_sent(
    start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = free_port_on_all(hosts)
    configs = [write_config(demo_host(h, port, h)) for h in hosts]
    procs = [start_server(c) for c in configs]
    target = "static:" + ",".join(f"{h}:{port}" for h in hosts)
    failed: list[str] = []
    with client.connect_service(target, connect_timeout=2, timeout=5, quarantine=0.2) as pool:
        for round_ in range(6):
            seen = count(pool, 30)  # every instance now has a cached connection
            assert set(seen) == set(hosts), seen
            victim = round_ % 3
            os.kill(procs[victim].pid, signal.SIGKILL)
            assert procs[victim].proc is not None
            procs[victim].proc.wait(timeout=10)
            for _ in range(30):  # not idempotent: only a call never sent may go elsewhere
                try:
                    pool.call("ping", idempotent=False)
                except (EOFError, OSError) as exc:
                    failed.append(f"round {round_}: {exc!r}")
            procs[victim] = start_server(configs[victim])  # back on the same address and port
            wait_until(lambda v=hosts[victim]: v in count(pool, 10), 10, f"{hosts[victim]} answering again")
    assert failed == []


# -- DNS -----------------------------------------------------------------------------------------


@pytest.fixture
def addresses() -> list[str]:
    return [f"127.0.0.{n}" for n in range(2, 6)]


@pytest.mark.slow
def test_dns_a_records_are_followed_within_the_ttl(tmp_path: Path, addresses: list[str]) -> None:
    port = free_port_on_all(addresses)
    with ExitStack() as stack:
        for addr in addresses:
            stack.enter_context(running_host(demo_host(addr, port, addr)))
        dns = stack.enter_context(Dnsmasq(tmp_path, {NAME: addresses[:2]}, ttl=1))
        target = f"dns://{dns.server}/{NAME}:{port}"
        pool = stack.enter_context(client.connect_service(target, timeout=5))
        seen = count(pool, 100)
        assert set(seen) == set(addresses[:2]) and min(seen.values()) >= 30, seen

        # A pod replaced: the record set changes, dnsmasq re-reads it; the pool follows within
        # the 1 s TTL (and a generous margin for a loaded machine).
        dns.set_hosts({NAME: addresses[1:4]})
        dns.reload()
        changed = time.monotonic()
        calls_reach(pool, set(addresses[1:4]), 10, "calls on the new record set")
        assert time.monotonic() - changed < 5
        assert set(pool.instances()) == {(a, port) for a in addresses[1:4]}

        result = run_cli("-m", "client", "services", target)
        assert result.returncode == 0 and result.stdout.count(f":{port}") == 3, result


@pytest.mark.slow
def test_dns_srv_priority_and_weight_are_honoured_and_followed(tmp_path: Path, addresses: list[str]) -> None:
    ports = [free_port_on_all([a]) for a in addresses]
    names = [f"pod{n}.{NAME}" for n in range(4)]
    with ExitStack() as stack:
        hosts = [
            stack.enter_context(running_host(demo_host(a, p, f"pod{n}")))
            for n, (a, p) in enumerate(zip(addresses, ports, strict=True))
        ]
        records = {names[n]: [addresses[n]] for n in range(4)}
        # pod0 weighs 3, pod1 weighs 1 (priority 10); pod2 is the fallback (priority 20).
        srv = [
            (SRV, names[0], ports[0], 10, 3),
            (SRV, names[1], ports[1], 10, 1),
            (SRV, names[2], ports[2], 20, 1),
        ]
        dns = stack.enter_context(Dnsmasq(tmp_path, records, srv=srv, ttl=1))
        pool = stack.enter_context(
            client.connect_service(f"dns://{dns.server}/{NAME}", timeout=5, quarantine=5)
        )
        seen = count(pool, 400)
        assert set(seen) == {"pod0", "pod1"}, seen  # priority 20 only while 10 has no live instance
        assert 2.0 <= seen["pod0"] / seen["pod1"] <= 4.5, seen  # weights 3:1

        # Both priority-10 instances stop: calls go to the fallback, none fail.
        hosts[0].stop(grace=0)
        hosts[1].stop(grace=0)
        assert set(count(pool, 50)) == {"pod2"}

        # The SRV set is replaced (dnsmasq restarted with pod3 only): followed within the TTL.
        dns.set_srv([(SRV, names[3], ports[3], 10, 1)])
        dns.restart()
        calls_reach(pool, {"pod3"}, 10, "calls on the new SRV record")


def test_dns_server_down_keeps_known_instances_and_says_so(tmp_path: Path) -> None:
    port = free_port_on_all(["127.0.0.2"])
    with running_host(demo_host("127.0.0.2", port, "a")):
        dns = Dnsmasq(tmp_path, {NAME: ["127.0.0.2"]}, ttl=1).start()
        try:
            pool = client.connect_service(f"dns://{dns.server}/{NAME}:{port}", registry_timeout=0.5)
            assert count(pool, 5) == {"a": 5}
        finally:
            dns.stop()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # past several TTLs: re-resolving fails, calls go on
            assert pool.call("ping", idempotent=False) == "a"
        pool.close()
        result = run_cli("-m", "client", "services", f"dns://{dns.server}/{NAME}:{port}", "--timeout", "0.5")
        assert result.returncode == 1 and "DNS 127.0.0.1:" in result.stderr, result


# -- etcd ----------------------------------------------------------------------------------------


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster.local(tmp_path) as cluster:
        yield cluster


def test_etcd_registry_config_is_checked() -> None:
    with pytest.raises(HostConfigError, match=r"registry.backend: 'zookeeper' is not one of"):
        parse_config("registry: {enabled: true, backend: zookeeper}")
    with pytest.raises(HostConfigError, match=r"registry.endpoints: etcd endpoint 'nohost:x'"):
        parse_config("registry: {enabled: true, backend: etcd, endpoints: ['nohost:x']}")
    with pytest.raises(HostConfigError, match=r"registry.prefix: 'rpyc' must start with '/'"):
        parse_config("registry: {enabled: true, backend: etcd, prefix: rpyc}")
    with pytest.raises(HostConfigError, match=r"registry.ttl: 1 is too small \(the minimum is 2\)"):
        parse_config("registry: {enabled: true, backend: etcd, ttl: 1}")
    with pytest.raises(HostConfigError, match=r"registry.user: a password needs a user"):
        parse_config("registry: {enabled: true, backend: etcd, password: pw}")
    checked = parse_config("registry: {enabled: true, backend: etcd, user: u, password: etcd-secret}")
    assert checked.to_dict()["registry"]["password"] == "***"


@pytest.mark.slow
def test_etcd_registration_watch_graceful_stop_and_kill(
    etcd: EtcdCluster, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    ttl = 3
    first = start_server(demo_etcd_config(write_config, etcd.endpoints, "e1", ttl=ttl))
    second = start_server(demo_etcd_config(write_config, etcd.endpoints, "e2", ttl=ttl))
    addr1, addr2 = first.address("demo"), second.address("demo")
    key1 = f"/rpyc-host/DEMO/{addr1[0]}:{addr1[1]}"
    wait_until(lambda: key1 in etcd.keys("/rpyc-host/DEMO/"), 10, "the first host's key")

    import etcd3gw

    member = etcd.members[0]
    raw = etcd3gw.client(host=member.host, port=member.client_port, api_path="/v3/").get(key1)
    value = json.loads(raw[0])
    assert value == {
        "host": addr1[0],
        "port": addr1[1],
        "service": "demo",
        "server": "threaded",
        "names": ["DEMO"],
    }

    target = f"etcd://{','.join(etcd.endpoints)}/rpyc-host/DEMO"
    with client.connect_service(target, rediscover=60, timeout=5) as pool:
        wait_until(lambda: set(count(pool, 20)) == {"e1", "e2"}, 10, "both instances answering")

        # A third host joins: the watch brings it in (rediscover is 60 s: no polling does it).
        joined = time.monotonic()
        third = start_server(demo_etcd_config(write_config, etcd.endpoints, "e3", ttl=ttl))
        wait_until(lambda: "e3" in count(pool, 10), 10, "the third instance receiving calls")
        assert time.monotonic() - joined < 8

        # A graceful stop deletes the key before the host drains: gone at once, no call fails.
        second.stop()
        assert f"/rpyc-host/DEMO/{addr2[0]}:{addr2[1]}" not in etcd.keys("/rpyc-host/DEMO/")
        assert set(count(pool, 30)) == {"e1", "e3"}

        # SIGKILL: nothing deregisters; the lease expires within ttl; no call was lost meanwhile.
        os.kill(third.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert third.proc is not None
        third.proc.wait(timeout=10)  # dead: its sockets are closed, its key is still there
        assert set(count(pool, 30)) == {"e1"}
        addr3 = third.address("demo")
        wait_until(
            lambda: f"/rpyc-host/DEMO/{addr3[0]}:{addr3[1]}" not in etcd.keys("/rpyc-host/DEMO/"),
            ttl + 5,
            "the killed host's key expiring",
        )
        assert time.monotonic() - killed <= ttl + 2
        wait_until(lambda: addr3 not in pool.discover(), 5, "the pool dropping the killed host")

        result = run_cli("-m", "client", "services", target)
        assert result.returncode == 0 and f"{addr1[0]}:{addr1[1]}" in result.stdout, result

    # A bare name with an etcd base (registry= or $RPYC_HOST_REGISTRY) is the same target.
    with client.connect_service("demo", registry=f"etcd://{etcd.endpoints[0]}/rpyc-host") as by_name:
        assert by_name.resolver.describe().endswith("/rpyc-host/DEMO/")
        assert count(by_name, 5) == {"e1": 5}


def test_static_resolver_answers_its_list() -> None:
    resolver = StaticResolver.parse("static:10.0.0.5:18861,[::1]:18862")
    assert resolver.resolve() == (Endpoint("10.0.0.5", 18861), Endpoint("::1", 18862))


@pytest.mark.slow
def test_etcd_with_authentication_on_takes_the_user_and_names_a_wrong_password(
    etcd: EtcdCluster, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    import etcd3gw

    member = etcd.members[0]
    admin = etcd3gw.client(host=member.host, port=member.client_port, api_path="/v3/", timeout=2)
    for path, body in [
        ("/auth/user/add", {"name": "root", "password": "root-secret"}),
        ("/auth/user/grant", {"user": "root", "role": "root"}),
        ("/auth/enable", {}),
    ]:
        admin.post(admin.get_url(path), json=body)

    auth = "  user: root\n  password: root-secret\n"
    config = demo_etcd_config(write_config, etcd.endpoints, "authed")
    config.write_text(config.read_text().replace("  timeout: 1\n", "  timeout: 1\n" + auth))
    proc = start_server(config)
    proc.wait_for("registered demo at", 10)

    target = f"etcd://{etcd.endpoints[0]}/rpyc-host/DEMO"
    options = {"user": "root", "password": "root-secret"}
    with client.connect_service(target, discovery_options=options) as pool:
        assert count(pool, 5) == {"authed": 5}

    wrong = client.connect_service(target, discovery_options={"user": "root", "password": "nope"})
    with pytest.raises(
        client.NoInstanceError, match=r"known: no etcd member answered: .*authentication failed"
    ):
        wrong.call("ping")
    wrong.close()


def test_srv_name_in_rfc2782_form_is_asked_as_given(tmp_path: Path) -> None:
    port = free_port_on_all(["127.0.0.2"])
    consul_like = "_demo._tcp.service.consul"
    with running_host(demo_host("127.0.0.2", port, "c1")):
        srv = [(consul_like, "node1.node.consul", port, 1, 1)]
        with (
            Dnsmasq(tmp_path, {"node1.node.consul": ["127.0.0.2"]}, srv=srv) as dns,
            client.connect_service(f"dns://{dns.server}/{consul_like}") as pool,
        ):
            assert count(pool, 5) == {"c1": 5}


def test_pooled_collector_delivers_through_a_dns_target(tmp_path: Path) -> None:
    from client.ingest import PooledCollector

    port = free_port_on_all(["127.0.0.2"])
    db = tmp_path / "ingest.db"
    ingest = f"""
        server: {{host: 127.0.0.2}}
        services:
          ingest: {{class: services.ingest:IngestService, port: {port}, options: {{database: "sqlite:///{db}"}}}}
        """
    with (
        running_host(ingest) as host,
        Dnsmasq(tmp_path, {NAME: ["127.0.0.2"]}) as dns,
        client.connect_service(f"dns://{dns.server}/{NAME}:{port}") as pool,
    ):
        with PooledCollector(pool, topic="load", batch_records=10, spool=tmp_path / "spool") as collector:
            for seq in range(25):
                collector.add({"seq": seq})
        with client.connect(host="127.0.0.2", port=host.address("ingest")[1]) as conn:
            assert conn.root.count("load") == 25


@pytest.mark.slow
def test_etcd_key_is_deleted_before_the_host_drains_a_call_in_flight(
    etcd: EtcdCluster, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    import threading

    path = demo_etcd_config(write_config, etcd.endpoints, "draining", ttl=10)  # expiry cannot pass it
    path.write_text(path.read_text().replace("grace_period: 0", "grace_period: 20"))
    proc = start_server(path)
    host, port = proc.address("demo")
    key = f"/rpyc-host/DEMO/{host}:{port}"
    wait_until(lambda: key in etcd.keys("/rpyc-host/DEMO/"), 10, "the host's key")

    entered, release = threading.Event(), threading.Event()

    def callback(n: int) -> None:  # runs on this side while the server's call is in flight
        entered.set()
        release.wait(30)

    results: list[int] = []
    conn = client.connect(host=host, port=port, timeout=30)
    caller = threading.Thread(target=lambda: results.append(conn.root.countdown(1, callback)))
    caller.start()
    try:
        assert entered.wait(10), "the call never reached its callback"
        proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        wait_until(lambda: key not in etcd.keys("/rpyc-host/DEMO/"), 5, "the key deleted on SIGTERM")
        assert proc.proc is not None and proc.proc.poll() is None, "the host must still be draining"
    finally:
        release.set()
        caller.join(timeout=30)
        conn.close()
    assert results == [1]
    assert proc.wait_exit(20) == 0

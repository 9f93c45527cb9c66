"""The client pool on loopback: a real registry process and demo instances as server.py processes."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import client
from client.pool import NoInstanceError, ServicePool
from rpyc_host.testing import RegistryProcess, ServerProcess, make_certificates, run_cli, wait_until
from tests.helpers import registered_demo_config

TOKEN = "pool-test-token-0123456789"


def start_instances(
    start_server: Callable[..., ServerProcess],
    write_config: Callable[[str], Path],
    registry: RegistryProcess,
    names: list[str],
    extra: str = "",
) -> list[ServerProcess]:
    configs = [registered_demo_config(write_config, registry.address, n, extra=extra) for n in names]
    procs = [start_server(path) for path in configs]
    want = {p.address("demo") for p in procs}
    wait_until(lambda: want <= set(registry.discover("DEMO")), 10, f"{sorted(want)} in the registry")
    return procs


def test_three_instances_share_calls_survive_a_kill_and_pick_up_a_fourth(
    registry: RegistryProcess, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    procs = start_instances(start_server, write_config, registry, ["i1", "i2", "i3"])
    with client.connect_service(
        "demo", registry=registry.spec, idempotent={"ping"}, rediscover=0.5, connect_timeout=1, timeout=5
    ) as pool:
        seen = collections.Counter(pool.root.ping() for _ in range(300))
        assert set(seen) == {"i1", "i2", "i3"}
        assert all(n >= 60 for n in seen.values()), seen  # each >= 20 %

        # Killed mid-run (no unregistration): not one idempotent call fails, the dead one is dropped.
        dead = procs[0].address("demo")
        after: collections.Counter[str] = collections.Counter()
        for i in range(300):
            if i == 100:
                os.kill(procs[0].pid, signal.SIGKILL)
                procs[0].proc.wait(timeout=10)  # type: ignore[union-attr]
            answer = pool.root.ping()
            if i > 110:
                after[answer] += 1
        assert set(after) == {"i2", "i3"}, after
        assert dead not in pool.instances()

        # A fourth instance is found by re-discovery and gets calls (bounded in calls and time).
        fourth = start_instances(start_server, write_config, registry, ["i4"])[0]
        deadline, calls, got = time.monotonic() + 10, 0, 0
        while got < 10 and calls < 5000 and time.monotonic() < deadline:
            got += pool.root.ping() == "i4"
            calls += 1
        assert got >= 10, f"the fourth instance got {got} of {calls} calls"
        assert fourth.address("demo") in pool.instances()


def test_non_idempotent_call_is_not_resent_and_service_errors_pass_through(
    registry: RegistryProcess, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    procs = start_instances(start_server, write_config, registry, ["a", "b"])
    with client.connect_service(
        "DEMO", registry=registry.spec, connect_timeout=1, timeout=1, quarantine=30
    ) as pool:
        assert pool.root.add(2, 3) == 5
        with pytest.raises(TypeError):  # the service's own error: the instance stays in the pool
            pool.root.echo(1)
        assert len(pool.instances()) == 2
        # Sleeping server-side past the call timeout: a timeout after sending, not idempotent.
        with pytest.raises(TimeoutError):
            pool.call("countdown", 3, lambda n: time.sleep(0.6))  # a callback slower than the timeout
        assert len(pool.instances()) == 1  # the instance that timed out is quarantined
        # The same call marked idempotent moves on... and times out again on the other one.
        with pytest.raises(TimeoutError):
            pool.call("countdown", 3, lambda n: time.sleep(0.6), idempotent=True)  # slow again
        assert pool.instances() == ()
        # Everything quarantined: the pool still tries quarantined instances rather than fail.
        assert pool.root.add(1, 1) == 2
    for proc in procs:
        assert proc.proc is not None and proc.proc.poll() is None


def test_least_loaded_spreads_concurrent_callers(
    registry: RegistryProcess, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    start_instances(start_server, write_config, registry, ["x", "y", "z"])
    pool = ServicePool("demo", registry.spec, strategy="least_loaded", timeout=5)
    results: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(60):
            answer = pool.root.ping()
            with lock:
                results.append(answer)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    pool.close()
    counts = collections.Counter(results)
    assert len(results) == 240 and set(counts) == {"x", "y", "z"}, counts
    assert min(counts.values()) >= 240 * 0.15, counts


def test_nothing_registered_says_so(registry: RegistryProcess) -> None:
    pool = client.connect_service("NOPE", registry=registry.spec)
    with pytest.raises(NoInstanceError, match=r"no instance of 'NOPE' is registered with 127\.0\.0\.1:\d+"):
        pool.root.ping()


def test_registry_down_keeps_known_instances(
    registry: RegistryProcess, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    start_instances(start_server, write_config, registry, ["r1", "r2"])
    with client.connect_service("DEMO", registry=registry.spec, rediscover=0.1) as pool:
        assert {pool.root.ping() for _ in range(10)} == {"r1", "r2"}
        registry.stop()
        asked_at = time.monotonic()
        # Past the rediscovery interval: the next call asks the (dead) registry.
        wait_until(lambda: time.monotonic() - asked_at > 0.2, 5, "the rediscovery interval to pass")
        assert {pool.root.ping() for _ in range(10)} == {"r1", "r2"}


def test_token_and_tls_reach_every_instance(
    registry: RegistryProcess,
    start_server: Callable[..., ServerProcess],
    write_config: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    certs = make_certificates(tmp_path / "certs")
    extra = f"""
        security:
          tokens: ["{TOKEN}"]
          tls: {{cert: {certs.server_cert}, key: {certs.server_key}, ca: {certs.ca}}}
        """
    start_instances(start_server, write_config, registry, ["t1", "t2"], extra=extra)
    options = {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)}
    with client.connect_service("DEMO", registry=registry.spec, token=TOKEN, **options) as pool:
        assert {pool.root.ping() for _ in range(10)} == {"t1", "t2"}
    bad = client.connect_service("DEMO", registry=registry.spec, token="wrong-token-0123456789", **options)
    with bad, pytest.raises(NoInstanceError, match="token"):
        bad.root.ping()


def test_services_command_lists_the_registry(
    registry: RegistryProcess, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    procs = start_instances(start_server, write_config, registry, ["c1", "c2"])
    result = run_cli("-m", "client", "services", "--registry", registry.spec)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("DEMO"))
    for proc in procs:
        assert "{}:{}".format(*proc.address("demo")) in line
    one = run_cli("-m", "client", "services", "--registry", registry.spec, "nope")
    assert one.returncode == 1 and "no instance of 'NOPE'" in one.stderr
    registry.stop()
    down = run_cli("-m", "client", "services", "--registry", registry.spec, "--timeout", "0.5")
    assert down.returncode == 1 and down.stderr.startswith(f"Error: registry {registry.spec}: ")
    usage = run_cli("-m", "client", "services", "--registry", "host:port")
    assert usage.returncode == 2 and "expected 'host' or 'host:port'" in usage.stderr

"""Discovery engines for tests and benchmarks: etcd members and dnsmasq, each a child process
started here, awaited with a deadline and stopped by PID.

    with EtcdCluster.local(tmp_path) as etcd:            # one member on 127.0.0.1
        etcd.endpoints                                   # ["127.0.0.1:PORT"]

    with Dnsmasq(tmp_path, {"demo.default.svc.cluster.local": ["127.0.0.2"]}) as dns:
        dns.set_hosts({...}); dns.reload()               # SIGHUP: A records re-read
        dns.set_srv([...]); dns.restart()                # SRV records need a restart

Both binaries come from Debian (``etcd-server``, ``dnsmasq-base``); scripts/test.sh installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .testing import wait_until

READY = "ready to serve client requests"


def need(command: str, package: str) -> str:
    """The path of ``command``; AssertionError naming the Debian package when it is missing."""
    path = shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise AssertionError(
            f"'{command}' is missing: install the Debian package '{package}' (scripts/test.sh does)"
        )
    return path


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free on ``host`` now (for programs that cannot take port 0)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_and_tcp_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` (a DNS server listens on both)."""
    for _ in range(50):
        port = free_port(host, socket.SOCK_DGRAM)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no port free for UDP and TCP on {host}")


def free_port_on_all(hosts: Sequence[str]) -> int:
    """A port free on every one of ``hosts`` (A records carry no port: instances share one)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no common free port on {hosts}")


class _Child:
    """A child process whose output is collected by a thread; stopped by PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def _spawn(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc = self.proc
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
        except ValueError:
            pass

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class EtcdMember(_Child):
    """One etcd member: client and peer URLs on ``host``, data in ``data_dir``."""

    name: str = "m1"
    host: str = "127.0.0.1"
    client_port: int = 2379
    peer_port: int = 2380
    data_dir: Path = Path("/nonexistent")
    cluster: str = ""
    prefix: Sequence[str] = ()  # e.g. ("ip", "netns", "exec", NS): exec keeps the PID
    proc: Any = None
    lines: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, state: str = "new") -> EtcdMember:
        binary = need("etcd", "etcd-server")
        client, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        self._spawn(
            [
                *self.prefix,
                binary,
                f"--name={self.name}",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={self.cluster or f'{self.name}={peer}'}",
                f"--initial-cluster-state={state}",
                "--initial-cluster-token=rpyc-host-test",
                "--heartbeat-interval=100",
                "--election-timeout=1000",
            ]
        )
        return self

    def ready(self) -> bool:
        if not self.running():
            raise AssertionError(f"etcd {self.name} exited:\n{self.log()}")
        return any(READY in line for line in self.lines)


class EtcdCluster:
    """``members`` etcd members; started together (a cluster needs a quorum to be ready)."""

    def __init__(self, members: Sequence[EtcdMember]) -> None:
        self.members = list(members)

    @classmethod
    def local(cls, directory: Path, host: str = "127.0.0.1") -> EtcdCluster:
        """One member on ``host`` with free ports."""
        member = EtcdMember(
            name="m1",
            host=host,
            client_port=free_port(host),
            peer_port=free_port(host),
            data_dir=directory / "etcd-m1",
        )
        return cls([member])

    @classmethod
    def spread(
        cls, directory: Path, hosts: Sequence[tuple[str, Sequence[str]]], client_port: int = 2379
    ) -> EtcdCluster:
        """One member per ``(address, command prefix)``, e.g. each in a network namespace."""
        members = [
            EtcdMember(
                name=f"m{n}",
                host=address,
                client_port=client_port,
                peer_port=client_port + 1,
                data_dir=directory / f"etcd-m{n}",
                prefix=prefix,
            )
            for n, (address, prefix) in enumerate(hosts, 1)
        ]
        cluster = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in members)
        for member in members:
            member.cluster = cluster
        return cls(members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            member.start()
        try:
            wait_until(lambda: all(m.ready() for m in self.members), timeout, "etcd members ready")
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` now (through any member that answers)."""
        import etcd3gw

        errors = []
        for member in self.members:
            if not member.running():
                continue
            client = etcd3gw.client(host=member.host, port=member.client_port, api_path="/v3/", timeout=2)
            try:
                return sorted(meta["key"].decode() for _, meta in client.get_prefix(prefix))
            except Exception as exc:
                errors.append(repr(exc))
        raise AssertionError(f"no etcd member answered: {errors}")


class Dnsmasq(_Child):
    """dnsmasq answering for a hosts file (A records) and ``--srv-host`` records, on 127.0.0.1.

    ``ttl`` is the TTL of every answer (``--local-ttl``). SIGHUP (:meth:`reload`) re-reads the
    hosts file; SRV records are command-line options, so changing them takes :meth:`restart`.
    """

    def __init__(
        self,
        directory: Path,
        hosts: dict[str, Sequence[str]] | None = None,
        srv: Sequence[tuple[str, str, int, int, int]] = (),
        ttl: int = 1,
        address: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.directory, self.ttl, self.address, self.prefix = directory, ttl, address, list(prefix)
        self.hosts_file = directory / "dnsmasq.hosts"
        self.srv: list[tuple[str, str, int, int, int]] = list(srv)
        self.port = free_udp_and_tcp_port(address)
        self.set_hosts(hosts or {})

    @property
    def server(self) -> str:
        return f"{self.address}:{self.port}"

    def set_hosts(self, hosts: dict[str, Sequence[str]]) -> None:
        """Rewrite the hosts file: one line per (address, name): several lines give several A records."""
        lines = [f"{addr} {name}" for name, addrs in hosts.items() for addr in addrs]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.hosts_file)

    def set_srv(self, srv: Sequence[tuple[str, str, int, int, int]]) -> None:
        """``(name, target, port, priority, weight)`` records, in effect after :meth:`restart`."""
        self.srv = list(srv)

    def start(self) -> Dnsmasq:
        binary = need("dnsmasq", "dnsmasq-base")
        args = [
            *self.prefix,
            binary,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-daemon",
            "--log-facility=-",
            f"--listen-address={self.address}",
            "--bind-interfaces",
            f"--port={self.port}",
            "--conf-file=/dev/null",
            f"--addn-hosts={self.hosts_file}",
            f"--local-ttl={self.ttl}",
            "--user=root",
            "--pid-file=",
        ]
        args += [
            f"--srv-host={name},{target},{port},{prio},{weight}"
            for name, target, port, prio, weight in self.srv
        ]
        self._spawn(args)
        wait_until(self._answers, 10, f"dnsmasq answering on {self.server}")
        return self

    def _answers(self) -> bool:
        import dns.exception
        import dns.message
        import dns.query

        if not self.running():
            raise AssertionError(f"dnsmasq exited:\n{self.log()}")
        try:
            dns.query.udp(
                dns.message.make_query("probe.invalid", "A"), self.address, port=self.port, timeout=0.2
            )
        except (dns.exception.Timeout, OSError):
            return False
        return True

    def reload(self) -> None:
        """SIGHUP: dnsmasq clears its cache and re-reads the hosts file."""
        assert self.proc is not None
        lines = len(self.lines)
        self.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: any("read " in line for line in self.lines[lines:]), 10, "dnsmasq re-reading hosts"
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Dnsmasq:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def demo_etcd_config(
    write: Callable[[str], Path],
    endpoints: Sequence[str],
    greeting: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ttl: int = 3,
    extra: str = "",
) -> Path:
    """A config serving one demo instance (``ping()`` answers ``greeting``) registered in etcd."""
    base = f"""
        server: {{host: {host}, grace_period: 0}}
        services:
          demo:
            class: services.demo:DemoService
            port: {port}
            options: {{greeting: {greeting}}}
        registry:
          enabled: true
          backend: etcd
          endpoints: [{", ".join(endpoints)}]
          prefix: /rpyc-host
          ttl: {ttl}
          timeout: 1
        logging: {{level: INFO}}
        """
    return write(textwrap.dedent(base) + textwrap.dedent(extra))

"""Registration in etcd: one key per instance under a lease, kept alive while the host runs.

``registry: {enabled: true, backend: etcd, endpoints: [10.0.0.1:2379, ...], prefix: /rpyc-host,
ttl: 10}`` (plus ``ca``/``cert``/``key`` for etcd's TLS and ``user``/``password`` when etcd has
authentication on).

Each service is put at ``PREFIX/NAME/HOST:PORT`` for its rpyc name, its config key and its
aliases (upper-cased, as rpyc's registry spells them), with a JSON value ``{"host", "port",
"service", "server", "names"}``. All keys share one lease of ``ttl`` seconds, refreshed every
``ttl / 3`` seconds, so a host that dies without deregistering (SIGKILL, power loss, a cut
cable) is gone from etcd within ``ttl``. A lease that expired anyway (etcd unreachable for
longer than ``ttl``) is replaced and the keys are put again. On a graceful stop the keys are
deleted first and the lease revoked, so watching clients drop the host before it drains.

The address is the one clients should dial: the service's bound address, or
``registry.advertise_host`` when it binds a wildcard address. A loopback address is not
registered with a non-loopback etcd: other machines could not reach it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from etcd3gw.lease import Lease

from ..config import Config, is_loopback
from ..wire.etcd import EtcdMembers, EtcdOptions, EtcdUnavailable, parse_endpoint

log = logging.getLogger("rpyc_host.registry")

WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class EtcdEntry:
    """One instance of one service: its keys and the value stored under each."""

    service: str
    keys: tuple[str, ...]
    value: str
    address: str

    def describe(self) -> str:
        return f"{self.service} at {self.address}"


def instance_key(prefix: str, name: str, host: str, port: int) -> str:
    """``PREFIX/NAME/HOST:PORT`` (IPv6 hosts in brackets)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{prefix}/{name.upper()}/{where}"


class EtcdRegistrar:
    """Keeps every hosted service's key alive in etcd; see the module docstring."""

    def __init__(self, config: Config, host: Any) -> None:
        self.section = config.registry
        self.members = EtcdMembers(
            self.section.endpoints,
            EtcdOptions(
                ca=self.section.ca,
                cert=self.section.cert,
                key=self.section.key,
                user=self.section.user,
                password=self.section.password,
                timeout=self.section.timeout,
            ),
        )
        remote = not all(is_loopback(parse_endpoint(e)[1]) for e in self.section.endpoints)
        self.entries = tuple(e for e in (self._entry(h, remote) for h in host.hosted) if e is not None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease: int | None = None  # the lease's ID (any member can refresh it)
        self._reachable: bool | None = None

    @property
    def target(self) -> str:
        return f"etcd {self.members.describe()}"

    def _entry(self, hosted: Any, remote: bool) -> EtcdEntry | None:
        svc = hosted.config
        bound_host, port = hosted.address
        address = bound_host
        if bound_host in WILDCARDS:
            if not self.section.advertise_host:
                log.warning(
                    "registry: %s binds %s and registry.advertise_host is not set: not registered in "
                    "etcd (clients need an address they can reach)",
                    svc.name,
                    bound_host or "every interface",
                )
                return None
            address = self.section.advertise_host
        if remote and is_loopback(address):
            log.warning(
                "registry: %s binds %s, which other machines cannot reach: not registered with %s "
                "(bind a reachable address, or 0.0.0.0 with registry.advertise_host)",
                svc.name,
                address,
                self.target,
            )
            return None
        names: list[str] = []
        aliases = getattr(type(hosted.service), "get_service_aliases", None)
        for name in [*(aliases() if aliases else ()), svc.name, *svc.aliases]:
            if name.upper() not in names:
                names.append(name.upper())
        value = json.dumps(
            {"host": address, "port": port, "service": svc.name, "server": svc.type, "names": names}
        )
        keys = tuple(instance_key(self.section.prefix, n, address, port) for n in names)
        return EtcdEntry(svc.name, keys, value, f"{address}:{port}")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Register in a background thread; the lease is refreshed every ``ttl / 3`` seconds."""
        if not self.entries:
            log.warning("registry: nothing to register with %s", self.target)
        self._thread = threading.Thread(target=self._run, name="registrar-etcd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.section.ttl / 3
        while not self._stop.is_set():
            try:
                if self._lease is None:
                    self._register()
                elif self.members.call(partial(_refresh, self._lease)) <= 0:
                    log.warning("registry: the etcd lease expired; registering again")
                    self._lease = None
                    continue
                self._set_reachable(True)
            except (EtcdUnavailable, KeyError, ValueError) as exc:
                self._set_reachable(False, exc)
            self._stop.wait(period)

    def _register(self) -> None:
        lease_id = self.members.call(partial(_grant, self.section.ttl))
        for entry in self.entries:
            for key in entry.keys:
                self.members.call(partial(_put, key, entry.value, lease_id))
            log.info(
                "registered %s with %s (lease ttl %d s)", entry.describe(), self.target, self.section.ttl
            )
        self._lease = lease_id

    def _set_reachable(self, reachable: bool, exc: BaseException | None = None) -> None:
        if reachable == self._reachable:
            return
        if not reachable:
            log.warning("registry: %s: %s; retrying every %.1f s", self.target, exc, self.section.ttl / 3)
        elif self._reachable is False:
            log.info("registry: %s answers again", self.target)
        self._reachable = reachable

    def close(self) -> None:
        """Delete every key first, then revoke the lease (bounded by ``registry.timeout`` per step)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.section.timeout * 3 + 1)
        lease, self._lease = self._lease, None
        deadline = time.monotonic() + self.section.timeout * 2
        try:
            for entry in self.entries:
                if lease is None or time.monotonic() > deadline:
                    break
                for key in entry.keys:
                    self.members.call(partial(_delete, key))
                log.info("unregistered %s from %s", entry.describe(), self.target)
            if lease is not None:
                self.members.call(partial(_revoke, lease))
        except EtcdUnavailable as exc:
            log.warning("registry: %s: %s; the lease expires within %d s", self.target, exc, self.section.ttl)
        finally:
            self.members.close()


# etcd operations on one member's client, for EtcdMembers.call (a lease is cluster-wide: any
# member can refresh or revoke it by ID).


def _grant(ttl: int, client: Any) -> int:
    return int(client.lease(ttl=ttl).id)


def _refresh(lease_id: int, client: Any) -> int:
    return int(Lease(lease_id, client).refresh())


def _revoke(lease_id: int, client: Any) -> bool:
    return bool(Lease(lease_id, client).revoke())


def _put(key: str, value: str, lease_id: int, client: Any) -> bool:
    return bool(client.put(key, value, lease=Lease(lease_id, client)))


def _delete(key: str, client: Any) -> bool:
    return bool(client.delete(key))

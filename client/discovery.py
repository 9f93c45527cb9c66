"""Where a service's instances are: one resolver per target scheme, in gRPC's name syntax.

Targets::

    dns://[SERVER:PORT]/NAME:PORT     A/AAAA records of NAME (a Kubernetes headless Service:
                                      demo.default.svc.cluster.local:18861), re-resolved when
                                      their TTL runs out
    dns://[SERVER:PORT]/NAME          SRV records _rpyc._tcp.NAME (a headless Service's named
                                      port "rpyc"), or NAME itself when it starts with "_"
                                      (Consul: _demo._tcp.service.consul); priority and
                                      weight honoured
    etcd://HOST:PORT[,HOST:PORT...]/PREFIX/SERVICE
                                      keys a host registered with registry.backend: etcd,
                                      kept current by a watch (joins and leaves arrive at once)
    registry://HOST:PORT/SERVICE      rpyc's registry (TCP), asked every ``rediscover`` seconds
    static:HOST:PORT[,HOST:PORT...]   a fixed list

``dns:///NAME...`` (no server) asks the system's resolvers. :func:`resolver_for` maps a target
to its resolver through :data:`RESOLVERS`; a pool asks :meth:`Resolver.resolve` for
:class:`Endpoint` lists and re-asks when :meth:`Resolver.due` says so.

dnspython (``dns`` extra) and etcd3gw (``etcd`` extra) are imported only by the resolvers that
need them.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rpyc.utils.registry import REGISTRY_PORT, TCPRegistryClient

from rpyc_host.wire.errors import did_you_mean

from .errors import ConfigError, ConnectError

log = logging.getLogger("client.discovery")

__all__ = [
    "RESOLVERS",
    "DiscoveryError",
    "DnsResolver",
    "Endpoint",
    "EtcdResolver",
    "RegistryResolver",
    "Resolver",
    "StaticResolver",
    "is_target",
    "resolver_for",
]

SRV_PREFIX = "_rpyc._tcp."
MIN_TTL = 0.5  # seconds: a TTL of 0 must not turn every call into a DNS query


class DiscoveryError(ConnectError):
    """The discovery source (DNS server, etcd, registry) could not be asked; known instances stay."""


@dataclass(frozen=True)
class Endpoint:
    """One instance: where to dial it, and its SRV priority (lower first) and weight."""

    host: str
    port: int
    priority: int = 0
    weight: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


class Resolver:
    """Answers "where are the instances?" for one target; see the module docstring.

    ``authoritative``: an empty answer means there are no instances (DNS, etcd); rpyc's
    registry is empty after a restart until hosts re-register, so the pool keeps what it knew.
    """

    scheme: ClassVar[str] = ""
    authoritative: ClassVar[bool] = True

    def __init__(self, target: str, service: str) -> None:
        self.target = target
        self.service = service
        self._next = 0.0

    def resolve(self) -> tuple[Endpoint, ...]:
        """The instances now; DiscoveryError when the source cannot be asked."""
        raise NotImplementedError

    def due(self, now: float) -> bool:
        """True when the answer may have changed (a TTL ran out, a watch saw a change)."""
        return now >= self._next

    def answered(self, now: float, rediscover: float) -> None:
        """The pool took an answer: the next one is due after ``rediscover`` seconds."""
        self._next = now + rediscover

    def close(self) -> None:
        """Stop any watch; idempotent."""

    def describe(self) -> str:
        return self.target


# -- parsing -------------------------------------------------------------------------------------


def _host_port(text: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (or ``host`` when a default port is given)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, ""
    if not port_text and default_port is not None:
        port_text = str(default_port)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{what}: {text!r} is not host:port")
    return host, int(port_text)


def _split_authority(target: str, scheme: str) -> tuple[str, str]:
    """``scheme://authority/path`` -> (authority, path); ``scheme:path`` -> ("", path)."""
    rest = target[len(scheme) + 1 :]
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        return authority, path
    return "", rest


def is_target(text: str) -> bool:
    """True when ``text`` names a target with a scheme (``dns://...``), not a bare service name."""
    scheme, colon, _ = text.partition(":")
    return bool(colon) and scheme.isalpha()


def resolver_for(target: str, *, timeout: float = 2.0, **options: Any) -> Resolver:
    """The resolver for ``target``; ConfigError naming the known schemes for anything else."""
    scheme, colon, _ = target.partition(":")
    cls = RESOLVERS.get(scheme.lower()) if colon else None
    if cls is None:
        known = sorted(RESOLVERS)
        raise ConfigError(
            f"target {target!r}: unknown scheme {scheme!r}{did_you_mean(scheme.lower(), known)}; "
            f"known: {', '.join(known)} (e.g. dns://10.0.0.2:53/demo.default.svc.cluster.local, "
            "etcd://10.0.0.1:2379/rpyc-host/DEMO, registry://10.0.0.1:18811/DEMO, "
            "static:10.0.0.5:18861,10.0.0.6:18861)"
        )
    return cls.parse(target, timeout=timeout, **options)


# -- static --------------------------------------------------------------------------------------


class StaticResolver(Resolver):
    """``static:HOST:PORT[,HOST:PORT...]``: the same list every time."""

    scheme = "static"

    def __init__(self, target: str, endpoints: Sequence[Endpoint]) -> None:
        super().__init__(target, "static")
        self.endpoints = tuple(endpoints)

    @classmethod
    def parse(cls, target: str, **_options: Any) -> StaticResolver:
        authority, path = _split_authority(target, "static")
        text = authority or path
        parts = [p for p in text.split(",") if p]
        if not parts:
            raise ConfigError(f"target {target!r}: expected static:HOST:PORT[,HOST:PORT...]")
        return cls(target, [Endpoint(*_host_port(p, f"target {target!r}")) for p in parts])

    def resolve(self) -> tuple[Endpoint, ...]:
        return self.endpoints

    def due(self, now: float) -> bool:
        return self._next == 0.0

    def answered(self, now: float, rediscover: float) -> None:
        self._next = now


# -- rpyc's registry -----------------------------------------------------------------------------


class RegistryResolver(Resolver):
    """``registry://HOST:PORT/SERVICE``: rpyc's TCP registry (no authentication, IPv4 only)."""

    scheme = "registry"
    authoritative = False

    def __init__(self, registry: tuple[str, int], service: str, timeout: float = 2.0) -> None:
        super().__init__(f"registry://{registry[0]}:{registry[1]}/{service.upper()}", service.upper())
        self.registry = registry
        self._client = TCPRegistryClient(registry[0], port=registry[1], timeout=timeout)

    @classmethod
    def parse(cls, target: str, *, timeout: float = 2.0, **_options: Any) -> RegistryResolver:
        authority, path = _split_authority(target, "registry")
        if not authority or not path or "/" in path:
            raise ConfigError(f"target {target!r}: expected registry://HOST:PORT/SERVICE")
        return cls(_host_port(authority, f"target {target!r}", REGISTRY_PORT), path, timeout)

    def resolve(self) -> tuple[Endpoint, ...]:
        try:
            found = self._client.discover(self.service)
        except OSError as exc:
            raise DiscoveryError(f"registry {self.registry[0]}:{self.registry[1]}: {exc}") from None
        return tuple(Endpoint(str(h), int(p)) for h, p in found)

    def describe(self) -> str:
        return f"registry {self.registry[0]}:{self.registry[1]}"


# -- DNS -----------------------------------------------------------------------------------------


class DnsResolver(Resolver):
    """``dns://[SERVER:PORT]/NAME:PORT`` (A/AAAA) or ``dns://[SERVER:PORT]/NAME`` (SRV), through
    dnspython; the next query is due when the shortest TTL in the answer runs out."""

    scheme = "dns"

    def __init__(
        self, target: str, name: str, port: int | None, server: tuple[str, int] | None, timeout: float
    ) -> None:
        super().__init__(target, name)
        self.name, self.port, self.server, self.timeout = name, port, server, timeout
        self._ttl: float | None = None

    @classmethod
    def parse(cls, target: str, *, timeout: float = 2.0, **_options: Any) -> DnsResolver:
        authority, path = _split_authority(target, "dns")
        server = _host_port(authority, f"target {target!r}: DNS server", 53) if authority else None
        if not path:
            raise ConfigError(f"target {target!r}: expected dns://[SERVER:PORT]/NAME[:PORT]")
        name, port = path, None
        if ":" in path and not path.startswith("["):
            name, port = _host_port(path, f"target {target!r}")
        return cls(target, name.rstrip("."), port, server, timeout)

    def _resolver(self) -> Any:
        import dns.resolver  # lazy: the dns extra

        if self.server is None:
            resolver = dns.resolver.Resolver()
        else:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [_numeric(self.server[0])]
            resolver.port = self.server[1]
        resolver.lifetime = self.timeout
        return resolver

    def resolve(self) -> tuple[Endpoint, ...]:
        import dns.exception
        import dns.resolver

        resolver = self._resolver()
        ttls: list[float] = []
        try:
            if self.port is not None:
                hosts = self._addresses(resolver, self.name, ttls)
                found = tuple(Endpoint(h, self.port) for h in hosts)
            else:
                found = self._srv(resolver, ttls)
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.NoResolverConfiguration,
        ) as exc:
            self._ttl = None
            raise DiscoveryError(f"DNS {self._where()}: {exc}") from None
        self._ttl = max(MIN_TTL, min(ttls)) if ttls else None
        return found

    def _addresses(self, resolver: Any, name: str, ttls: list[float]) -> list[str]:
        import dns.resolver

        hosts: list[str] = []
        failure: Exception | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = resolver.resolve(name, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.resolver.NoNameservers as exc:
                # Some servers refuse the type they hold no record of (dnsmasq without upstream
                # servers refuses AAAA for an A-only name): fatal only if no type answered.
                failure = exc
                continue
            ttls.append(float(answer.rrset.ttl))
            hosts.extend(sorted(r.address for r in answer))
        if failure is not None and not hosts:
            raise failure
        return hosts

    def _srv(self, resolver: Any, ttls: list[float]) -> tuple[Endpoint, ...]:
        import dns.resolver

        try:
            answer = resolver.resolve(self.srv_name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return ()
        ttls.append(float(answer.rrset.ttl))
        found: list[Endpoint] = []
        for record in sorted(answer, key=lambda r: (r.priority, str(r.target), r.port)):
            target = str(record.target).rstrip(".")
            for host in self._addresses(resolver, target, ttls):
                found.append(Endpoint(host, int(record.port), int(record.priority), int(record.weight)))
        return tuple(found)

    @property
    def srv_name(self) -> str:
        """``_rpyc._tcp.NAME``; a name already in RFC 2782 form (``_demo._tcp.service.consul``)
        is asked as given."""
        return self.name if self.name.startswith("_") else SRV_PREFIX + self.name

    def answered(self, now: float, rediscover: float) -> None:
        # The records say how long they hold: re-resolve when the TTL runs out, not before.
        self._next = now + (self._ttl if self._ttl is not None else rediscover)

    def _where(self) -> str:
        return f"{self.server[0]}:{self.server[1]}" if self.server else "(system resolvers)"

    def describe(self) -> str:
        kind = f"A/AAAA {self.name}" if self.port is not None else f"SRV {self.srv_name}"
        return f"DNS {self._where()} {kind}"


def _numeric(host: str) -> str:
    """dnspython wants the DNS server as an IP address."""
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0])
    except socket.gaierror as exc:
        raise ConfigError(f"DNS server {host!r}: {exc.strerror}") from None


# -- etcd ----------------------------------------------------------------------------------------


class EtcdResolver(Resolver):
    """``etcd://HOST:PORT[,...]/PREFIX/SERVICE``: keys under ``PREFIX/SERVICE/``, listed once and
    then kept current by etcd3gw's ``watch_prefix`` in a daemon thread.

    The watch's member is checked every ``check`` seconds; when it stops answering, the watch
    moves to another member (listing again, then watching from the listed revision, so no change
    is missed). Until the first answer, :meth:`resolve` lists directly.
    """

    scheme = "etcd"
    check = 1.0

    def __init__(
        self, target: str, endpoints: Sequence[str], prefix: str, service: str, **options: Any
    ) -> None:
        super().__init__(target, service.upper())
        from rpyc_host.wire.etcd import EtcdMembers, EtcdOptions

        self.prefix = f"{prefix}/{self.service}/"
        self.members = EtcdMembers(endpoints, EtcdOptions(**options))
        self._known: dict[str, Endpoint] = {}
        self._synced = threading.Event()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cancel: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._watch, name=f"etcd-watch-{self.service}", daemon=True)
        self._thread.start()

    @classmethod
    def parse(cls, target: str, *, timeout: float = 2.0, **options: Any) -> EtcdResolver:
        authority, path = _split_authority(target, "etcd")
        parts = [p for p in path.split("/") if p]
        if not authority or len(parts) < 1:
            raise ConfigError(f"target {target!r}: expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX/SERVICE")
        endpoints = authority.split(",")
        for endpoint in endpoints:
            _host_port(endpoint, f"target {target!r}: etcd endpoint", 2379)
        prefix = "/" + "/".join(parts[:-1]) if len(parts) > 1 else ""
        allowed = {k: v for k, v in options.items() if k in ("ca", "cert", "key", "user", "password")}
        return cls(target, endpoints, prefix, parts[-1], timeout=timeout, **allowed)

    # -- the watch thread -------------------------------------------------------------------------

    def _watch(self) -> None:
        from rpyc_host.wire.etcd import EtcdUnavailable

        while not self._stop.is_set():
            try:
                index, revision = self.members.call(self._list)
                events, cancel = self.members.clients[index].watch_prefix(
                    self.prefix, start_revision=revision + 1
                )
            except (EtcdUnavailable, OSError, ValueError) as exc:
                log.debug("etcd watch of %s: %s", self.prefix, exc)
                self._stop.wait(self.check)
                continue
            with self._lock:
                self._cancel = cancel
            checker = threading.Thread(target=self._check_member, args=(index, cancel), daemon=True)
            checker.start()
            try:
                for event in events:
                    self._apply(event)
            except Exception as exc:  # the stream broke: list and watch again
                log.debug("etcd watch of %s ended: %s", self.prefix, exc)
            cancel()
            checker.join(timeout=self.check * 3)

    def _check_member(self, index: int, cancel: Callable[[], None]) -> None:
        """Ends the watch (its iterator) when its member stops answering or the resolver closes."""
        from etcd3gw.exceptions import Etcd3Exception

        client = self.members.clients[index]
        while not self._stop.wait(self.check):
            try:
                client.status()
            except (Etcd3Exception, OSError) as exc:
                log.info(
                    "etcd member %s stopped answering (%s); watching another",
                    self.members.endpoints[index],
                    exc,
                )
                self.members.skip(index)
                break
        cancel()

    def _list(self, client: Any) -> tuple[int, int]:
        """Every key under the prefix now; returns (member index, revision of the answer)."""
        answer = client.post(
            client.get_url("/kv/range"),
            json={"key": _b64(self.prefix), "range_end": _b64(_prefix_end(self.prefix))},
        )
        known: dict[str, Endpoint] = {}
        for kv in answer.get("kvs", ()):
            endpoint = _endpoint(base64.b64decode(kv.get("value", "")))
            if endpoint is not None:
                known[base64.b64decode(kv["key"]).decode()] = endpoint
        with self._lock:
            if known != self._known:
                self._changed.set()
            self._known = known
        self._synced.set()
        return self.members.clients.index(client), int(answer["header"]["revision"])

    def _apply(self, event: dict[str, Any]) -> None:
        kv = event.get("kv", {})
        key = kv.get("key", b"")
        key = key.decode() if isinstance(key, bytes) else str(key)
        with self._lock:
            if event.get("type") == "DELETE":
                if self._known.pop(key, None) is not None:
                    log.info("etcd: %s left", key)
            else:
                value = kv.get("value", b"")
                endpoint = _endpoint(value if isinstance(value, bytes) else str(value).encode())
                if endpoint is not None and self._known.get(key) != endpoint:
                    self._known[key] = endpoint
                    log.info("etcd: %s joined", key)
            self._changed.set()

    # -- the pool's side --------------------------------------------------------------------------

    def resolve(self) -> tuple[Endpoint, ...]:
        from rpyc_host.wire.etcd import EtcdUnavailable

        if not self._synced.is_set():
            try:
                self.members.call(self._list)
            except (EtcdUnavailable, OSError) as exc:
                raise DiscoveryError(str(exc)) from None
        with self._lock:
            self._changed.clear()
            return tuple(sorted(set(self._known.values()), key=lambda e: e.address))

    def due(self, now: float) -> bool:
        return self._changed.is_set() or now >= self._next

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()
        self._thread.join(timeout=self.check * 3)
        self.members.close()

    def describe(self) -> str:
        return f"etcd {self.members.describe()} {self.prefix}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range end for "every key starting with prefix": the prefix with its last byte + 1."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _endpoint(value: bytes) -> Endpoint | None:
    try:
        data = json.loads(value)
        return Endpoint(str(data["host"]), int(data["port"]))
    except (ValueError, KeyError, TypeError):
        log.warning("etcd: ignoring a value that is not an instance: %r", value[:100])
        return None


RESOLVERS: dict[str, Any] = {
    "dns": DnsResolver,
    "etcd": EtcdResolver,
    "registry": RegistryResolver,
    "static": StaticResolver,
}

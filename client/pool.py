"""Calls spread across every live instance of a service, found through DNS, etcd or rpyc's registry.

Usage::

    import client

    pool = client.connect_service("dns://10.96.0.10:53/demo.default.svc.cluster.local",
                                  token=token, ca="ca.crt", idempotent={"add", "echo", "ping"})
    pool = client.connect_service("etcd://10.0.0.1:2379,10.0.0.2:2379/rpyc-host/DEMO", token=token)
    pool = client.connect_service("DEMO", registry="10.0.0.1:18811", token=token)  # rpyc's registry
    with pool:
        print(pool.root.add(1, 2))          # one instance, chosen round-robin
        pool.call("echo", "hi")             # the same, by name
        pool.call("submit", batch, idempotent=False)
        print(pool.instances())             # live (host, port) pairs

Targets (:mod:`client.discovery`): ``dns://[SERVER:PORT]/NAME:PORT`` (A/AAAA),
``dns://[SERVER:PORT]/NAME`` (SRV ``_rpyc._tcp.NAME``), ``etcd://HOST:PORT[,...]/PREFIX/SERVICE``,
``registry://HOST:PORT/SERVICE`` and ``static:HOST:PORT[,HOST:PORT...]``. A bare name
(``"DEMO"``) is looked up in rpyc's registry: ``registry=``, else ``$RPYC_HOST_REGISTRY``, else
the config file's ``registry:`` section.

How instances are chosen and dropped:

- the resolver is asked at the first call, then when its answer may have changed: when the DNS
  TTL runs out, at once when etcd's watch reports a join or a leave, every ``rediscover``
  seconds for rpyc's registry, and after a failure. A source that cannot be asked keeps the
  instances already known; so does an empty answer from rpyc's registry (a restarted registry
  is empty until services re-register), while an empty DNS or etcd answer means none are left;
- each call goes to the next live instance (``round_robin``) or to the one with the fewest
  calls in flight from this pool (``least_loaded``), over one cached connection per instance;
  SRV records are honoured: the lowest priority with a live instance first, spread by weight;
- a cached connection the instance already closed (it was killed or restarted between calls)
  is noticed before anything is sent on it (a zero-timeout poll for the peer's hang-up), so
  the call goes to another instance whether or not it is idempotent: nothing was sent;
- an instance that refuses, times out or drops the connection is quarantined for
  ``quarantine`` seconds (doubling while it keeps failing, at most 60 s) and the call moves on:
  a failed *connect* is always retried elsewhere (nothing was sent); a call that failed after
  it was sent is retried on another instance only when its method is marked idempotent
  (``idempotent=`` here, or per call), up to ``retries`` times;
- errors the service raises (``ValueError`` ...) are the call's result: never retried.

Tokens and TLS go to every instance through :func:`client.connect` (``token=``, ``tls=``,
``ca=``, ``cert=``, ``key=``). Discovery says only where instances are; what a connection
trusts is still the token and certificates. etcd's own TLS and user go in
``discovery_options={"ca": ..., "cert": ..., "key": ..., "user": ..., "password": ...}``.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import select
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from rpyc.utils.registry import REGISTRY_PORT

from rpyc_host.wire import context, tracing

from .batch import Batch
from .byname import MethodsByName
from .connection import DEFAULT_TIMEOUT, connect
from .discovery import DiscoveryError, Endpoint, RegistryResolver, Resolver, is_target, resolver_for
from .errors import ConfigError, NoInstanceError, describe_error, is_remote
from .settings import ClientSettings, load_settings

log = logging.getLogger("client.pool")

__all__ = ["NoInstanceError", "ServicePool", "connect_service", "parse_registry"]

MAX_QUARANTINE = 60.0


def parse_registry(registry: str | tuple[str, int]) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``(host, port)`` -> ``(host, port)`` (port 18811 by default)."""
    if isinstance(registry, tuple):
        host, port = registry
        return str(host), int(port)
    host, sep, port_text = registry.rpartition(":")
    if not sep:
        return registry, REGISTRY_PORT
    try:
        return host, int(port_text)
    except ValueError:
        raise ConfigError(f"registry {registry!r}: expected 'host' or 'host:port'") from None


def default_registry(config: str | os.PathLike[str] | ClientSettings | None = None) -> tuple[str, int]:
    """``$RPYC_HOST_REGISTRY``, else the ``registry:`` section of the config file."""
    env = os.environ.get("RPYC_HOST_REGISTRY")
    if env:
        return parse_registry(env)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise ConfigError(
            f"no registry given: pass registry='host:port' or set RPYC_HOST_REGISTRY ({exc})"
        ) from None
    if settings.registry is None:
        raise ConfigError(
            f"no registry given: pass registry='host:port', set RPYC_HOST_REGISTRY, or add a "
            f"registry: section to {settings.source}"
        )
    if settings.registry_mode != "tcp":
        raise ConfigError(
            f"{settings.source}: registry.mode is {settings.registry_mode!r}; "
            "discovery uses TCP: pass registry="
        )
    return settings.registry


@dataclass(eq=False)
class _Instance:
    address: tuple[str, int]
    priority: int = 0
    weight: int = 0
    conn: Any = None
    methods: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0
    calls: int = 0
    failures: int = 0
    down_until: float = 0.0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.methods = {}
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


STRATEGIES = ("least_loaded", "round_robin")
# The peer hung up (FIN or RST) or the socket is gone: a poll reports one of these at once.
_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def peer_closed(conn: Any) -> bool:
    """True when the other end already closed ``conn``: sending a call on it cannot succeed.

    A zero-timeout poll of the socket, as HTTP clients check a pooled keep-alive connection
    before reuse; pending bytes alone do not count (the next call reads them).
    """
    if conn.closed:
        return True
    sock = getattr(getattr(getattr(conn, "_channel", None), "stream", None), "sock", None)
    if sock is None:
        return False
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLRDHUP)
    return any(events & _HANGUP for _, events in poller.poll(0))


def _weighted_order(instances: list[_Instance]) -> list[_Instance]:
    """RFC 2782's selection: each pick with probability weight / total (weight 0: rarely)."""
    left, order = list(instances), []
    while left:
        weights = [i.weight or 0.01 for i in left]
        pick = random.choices(range(len(left)), weights=weights)[0]
        order.append(left.pop(pick))
    return order


class ServicePool:
    """Instances of one service, from its resolver; see the module docstring.

    Args:
        service: a target (``dns://...``, ``etcd://...``, ``registry://...``, ``static:...``),
            or a name registered with rpyc's registry (case does not matter).
        registry: for a bare name: ``"host:port"`` or ``(host, port)`` of rpyc's registry, or
            a target the name is appended to (``"etcd://10.0.0.1:2379/rpyc-host"``); default
            ``$RPYC_HOST_REGISTRY`` (either form), then the config file's ``registry:`` section.
        resolver: a :class:`~client.discovery.Resolver` to use instead of parsing ``service``.
        strategy: ``"round_robin"`` or ``"least_loaded"`` (fewest calls in flight).
        idempotent: method names safe to run twice; they are retried on another instance
            after a failure once the call was sent.
        timeout: seconds per call; ``connect_timeout``: seconds to connect to an instance.
        retries: how many other instances an idempotent call may be retried on.
        rediscover: seconds between queries when the source gives no TTL and no watch.
        quarantine: seconds a failed instance is skipped (doubles while it keeps failing).
        token, tls, ca, cert, key: as for :func:`client.connect`, sent to every instance.

    Thread-safe: threads share one connection per instance.
    """

    def __init__(
        self,
        service: str,
        registry: str | tuple[str, int] | None = None,
        *,
        strategy: str = "round_robin",
        idempotent: Iterable[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 3.0,
        retries: int = 2,
        rediscover: float = 10.0,
        quarantine: float = 2.0,
        registry_timeout: float = 2.0,
        config: str | os.PathLike[str] | ClientSettings | None = None,
        resolver: Resolver | None = None,
        discovery_options: Mapping[str, Any] | None = None,
        token: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if resolver is None:
            base = registry if registry is not None else os.environ.get("RPYC_HOST_REGISTRY")
            if not is_target(service) and isinstance(base, str) and is_target(base):
                service = f"{base.rstrip('/')}/{service}"  # etcd://HOST:PORT/PREFIX + the name
            if is_target(service):
                resolver = resolver_for(service, timeout=registry_timeout, **dict(discovery_options or {}))
            else:
                where = parse_registry(registry) if registry is not None else default_registry(config)
                resolver = RegistryResolver(where, service, timeout=registry_timeout)
        self.resolver = resolver
        self.service = resolver.service
        self.registry = resolver.registry if isinstance(resolver, RegistryResolver) else None
        self.strategy = strategy
        self.idempotent = frozenset(idempotent)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.retries, self.rediscover_interval, self.quarantine = retries, rediscover, quarantine
        self._connect_args: dict[str, Any] = {"token": token, "tls": tls, "ca": ca, "cert": cert, "key": key}
        self._instances: dict[tuple[str, int], _Instance] = {}
        self._lock = threading.Lock()
        self._discover_lock = threading.Lock()
        self._failed_since_discovery = True  # ask the resolver at the first call
        self._discovery_error = ""
        # Each pool starts its rotation somewhere else, so many clients do not all begin on one.
        self._turn = itertools.count(random.randrange(1 << 16))
        self._closed = False
        self.root = MethodsByName(self.call)

    def __repr__(self) -> str:
        return (
            f"ServicePool({self.service!r}, {self.resolver.describe()}, strategy={self.strategy!r}, "
            f"instances={len(self._instances)})"
        )

    # -- discovery -----------------------------------------------------------------------------

    def discover(self) -> tuple[tuple[str, int], ...]:
        """Ask the resolver now; returns the addresses it listed (the pool keeps its instances
        when the source cannot be asked, or when rpyc's registry answers with none)."""
        with self._discover_lock:
            self._failed_since_discovery = False
            try:
                endpoints = self.resolver.resolve()
            except DiscoveryError as exc:
                log.warning("%s: %s; keeping known instances", self.service, exc)
                self._discovery_error = str(exc)
                self.resolver.answered(time.monotonic(), self.rediscover_interval)
                return ()
            self._discovery_error = ""
            self.resolver.answered(time.monotonic(), self.rediscover_interval)
            if not endpoints and not self.resolver.authoritative:
                log.debug("%s lists no %s; keeping known instances", self.resolver.describe(), self.service)
                return ()
            found = self._update(endpoints)
            return found

    def _update(self, endpoints: tuple[Endpoint, ...]) -> tuple[tuple[str, int], ...]:
        wanted: dict[tuple[str, int], Endpoint] = {}
        for endpoint in endpoints:
            wanted.setdefault(endpoint.address, endpoint)
        with self._lock:
            for address, endpoint in wanted.items():
                instance = self._instances.get(address)
                if instance is None:
                    instance = self._instances[address] = _Instance(address)
                    log.info("%s: instance %s:%d joined", self.service, *address)
                instance.priority, instance.weight = endpoint.priority, endpoint.weight
            gone = [a for a in self._instances if a not in wanted]
            dropped = [self._instances.pop(a) for a in gone]
        for instance in dropped:
            log.info("%s: instance %s:%d is no longer listed; dropped", self.service, *instance.address)
            instance.close()
        return tuple(wanted)

    def instances(self) -> tuple[tuple[str, int], ...]:
        """Known instances that are not quarantined."""
        now = time.monotonic()
        with self._lock:
            return tuple(a for a, i in self._instances.items() if i.down_until <= now)

    def stats(self) -> dict[tuple[str, int], int]:
        """Calls answered by each known instance."""
        with self._lock:
            return {a: i.calls for a, i in self._instances.items()}

    # -- choosing ------------------------------------------------------------------------------

    def _candidates(self, exclude: set[tuple[str, int]]) -> list[_Instance]:
        """Instances to try, best first: live ones in strategy order (lowest SRV priority first,
        spread by weight), then quarantined ones."""
        if self._failed_since_discovery or not self._instances or self.resolver.due(time.monotonic()):
            self.discover()
        now = time.monotonic()
        with self._lock:
            pool = [i for i in self._instances.values() if i.address not in exclude]
            live = [i for i in pool if i.down_until <= now]
            resting = sorted((i for i in pool if i.down_until > now), key=lambda i: i.down_until)
            if live:
                start = next(self._turn) % len(live)
                live = live[start:] + live[:start]
                if len({i.weight for i in live}) > 1:
                    live = _weighted_order(live)
                if self.strategy == "least_loaded":
                    live.sort(key=lambda i: i.inflight)  # stable: ties keep the order above
                live.sort(key=lambda i: i.priority)  # stable: SRV priority groups, lowest first
        return live + resting

    def _connection(self, instance: _Instance) -> Any:
        with instance.lock:
            if instance.conn is not None and peer_closed(instance.conn):
                # Killed or restarted since the last call: reconnect (nothing was sent on it).
                log.info(
                    "%s: instance %s:%d closed the connection; reconnecting", self.service, *instance.address
                )
                instance.close()
            if instance.conn is None:
                host, port = instance.address
                conn = connect(
                    host=host, port=port, timeout=self.connect_timeout, retries=0, **self._connect_args
                )
                conn._config["sync_request_timeout"] = self.timeout  # calls get the call timeout
                instance.conn = conn
            return instance.conn

    def _failed(self, instance: _Instance, exc: BaseException) -> None:
        instance.close()
        instance.failures += 1
        wait = min(MAX_QUARANTINE, self.quarantine * 2 ** (instance.failures - 1))
        instance.down_until = time.monotonic() + wait
        instance.last_error = describe_error(exc)
        log.warning(
            "%s: instance %s:%d failed (%s); skipped for %.1f s",
            self.service,
            *instance.address,
            instance.last_error,
            wait,
        )
        self._failed_since_discovery = True  # ask the resolver again at the next call

    def _no_instance(self, errors: list[str]) -> NoInstanceError:
        if not errors and self._discovery_error:
            return NoInstanceError(f"no instance of {self.service!r} known: {self._discovery_error}")
        if not errors:
            where = (
                f"registered with {self.registry[0]}:{self.registry[1]}"
                if self.registry
                else f"listed by {self.resolver.describe()}"
            )
            return NoInstanceError(
                f"no instance of {self.service!r} is {where} (is the service running with "
                "registry.enabled, and the name right?)"
            )
        return NoInstanceError(f"no instance of {self.service!r} answered: {'; '.join(errors[-3:])}")

    # -- calling -------------------------------------------------------------------------------

    def call(self, method: str, *args: Any, idempotent: bool | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on one instance; see the module docstring for retries.

        Raises:
            NoInstanceError: no instance could be connected to.
            ConnectionError, TimeoutError, EOFError: the instance failed after the call was sent
                and the method is not idempotent (or the retries ran out).
            whatever the service raised.
        """
        if self._closed:
            raise ConfigError("the pool is closed")
        retry = method in self.idempotent if idempotent is None else idempotent
        if not tracing.active():
            return self._call(method, args, kwargs, retry, None)
        # One CLIENT span for the pool's call, parent of the call sent to the instance chosen;
        # the instance tried and every retry are events on it.
        ctx = context.outgoing(self.timeout)
        with tracing.span("client", self.service, method, ctx.traceparent, ctx.tracestate) as span:
            parent, state = tracing.headers_of(span)
            with context.use(replace(ctx, traceparent=parent, tracestate=state)):
                return self._call(method, args, kwargs, retry, span)

    def _call(self, method: str, args: Any, kwargs: Any, retry: bool, span: Any) -> Any:
        tried: set[tuple[str, int]] = set()
        errors: list[str] = []
        sent_failures = 0
        last_sent: BaseException | None = None
        while True:
            candidates = self._candidates(tried)
            if not candidates:
                if last_sent is not None:  # the call was sent and failed everywhere it was tried
                    raise last_sent
                raise self._no_instance(errors)
            instance = candidates[0]
            tried.add(instance.address)
            if span is not None:
                span.add_event("instance", {"address": "{}:{}".format(*instance.address)})
            try:
                conn = self._connection(instance)
                bound = instance.methods.get(method)
                if bound is None:
                    bound = instance.methods[method] = getattr(conn.root, method)
            except (OSError, EOFError) as exc:  # ConnectError, AuthError, refused: nothing was sent
                if is_remote(exc):
                    raise
                errors.append(f"{instance.address[0]}:{instance.address[1]}: {describe_error(exc)}")
                self._failed(instance, exc)
                if span is not None:
                    span.add_event("retry", {"reason": "not connected", "error": describe_error(exc)[:200]})
                continue
            with self._lock:
                instance.inflight += 1
            try:
                result = bound(*args, **kwargs)
            except (OSError, EOFError) as exc:
                if is_remote(exc):
                    raise
                errors.append(f"{instance.address[0]}:{instance.address[1]}: {describe_error(exc)}")
                self._failed(instance, exc)
                sent_failures += 1
                if not retry or sent_failures > self.retries:
                    raise
                last_sent = exc
                if span is not None:
                    span.add_event(
                        "retry", {"reason": "failed after sending", "error": describe_error(exc)[:200]}
                    )
                continue
            finally:
                with self._lock:
                    instance.inflight -= 1
            with self._lock:
                instance.calls += 1
                instance.failures = 0
            return result

    def batch(self, idempotent: bool | None = None) -> Batch:
        """Calls recorded in a ``with`` block, sent together to one instance when it ends
        (:mod:`client.batch`); retried on another instance after a send failure only if every
        method in it is idempotent (or ``idempotent=True``)."""
        return Batch(self, idempotent)

    def connect(self) -> Any:
        """A new connection of its own to one live instance (for streams, callbacks, async
        calls); the caller closes it. Raises :class:`NoInstanceError`."""
        tried: set[tuple[str, int]] = set()
        errors: list[str] = []
        while True:
            candidates = self._candidates(tried)
            if not candidates:
                raise self._no_instance(errors)
            instance = candidates[0]
            tried.add(instance.address)
            host, port = instance.address
            try:
                conn = connect(
                    host=host, port=port, timeout=self.connect_timeout, retries=0, **self._connect_args
                )
            except (OSError, EOFError) as exc:
                errors.append(f"{host}:{port}: {describe_error(exc)}")
                self._failed(instance, exc)
                continue
            conn._config["sync_request_timeout"] = self.timeout
            with self._lock:
                instance.failures = 0
                instance.calls += 1
            return conn

    def close(self) -> None:
        """Close every connection this pool holds and stop the resolver's watch."""
        self._closed = True
        self.resolver.close()
        with self._lock:
            instances = list(self._instances.values())
        for instance in instances:
            instance.close()

    def __enter__(self) -> ServicePool:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_service(
    service: str, registry: str | tuple[str, int] | None = None, **options: Any
) -> ServicePool:
    """A :class:`ServicePool` for ``service`` (a target, or a name in rpyc's registry).

    ``options`` are :class:`ServicePool`'s (``strategy``, ``idempotent``, ``timeout``, ``token``,
    ``tls``, ``ca``, ``cert``, ``key``, ``discovery_options``, ...). Nothing is contacted until
    the first call, except that an ``etcd://`` target starts its watch at once.
    """
    return ServicePool(service, registry, **options)

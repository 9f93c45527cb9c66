"""The host's configuration: one YAML file validated into frozen dataclasses.

Usage::

    config = load_config("config.yaml")
    for service in config.services:
        print(service.name, service.host, service.port, service.type)

Defaults live here and nowhere else. ``${VAR}`` and ``${VAR:-default}`` in string values are
taken from the environment before validation (:mod:`rpyc_host.wire.configtext`, which the
client's light reader shares).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import schema
from .errors import ConfigError, did_you_mean
from .instances import MODES as INSTANCE_MODES
from .wire.configtext import ConfigTextError, read_text
from .wire.etcd import parse_endpoint

SERVER_TYPES = ("forking", "threaded", "threadpool")
LOG_LEVELS = ("CRITICAL", "DEBUG", "ERROR", "INFO", "WARNING")
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerSection:
    """``server:``: defaults for every service."""

    type: str = field(default="threaded", metadata={"check": schema.one_of(SERVER_TYPES)})
    host: str = DEFAULT_HOST
    pool_size: int = field(default=16, metadata={"check": schema.at_least(1)})
    backlog: int = field(default=128, metadata={"check": schema.at_least(1)})
    # rpyc zlib-compresses every frame over 3 kB, which caps bulk transfers near 30 MB/s on
    # incompressible data: off by default.
    compression: bool = False
    grace_period: float = field(default=10.0, metadata={"check": schema.at_least(0)})
    # Seconds between /readyz turning 503 and the listeners closing on SIGTERM, so a load
    # balancer stops routing here before connections are refused (0: close at once).
    drain_delay: float = field(default=0.0, metadata={"check": schema.at_least(0)})


MIB = 1024 * 1024


@dataclass(frozen=True)
class LimitsSection:
    """``limits:``: resource limits for every service (each may override any of them)."""

    max_connections: int = field(default=1000, metadata={"check": schema.at_least(1)})
    max_connections_per_ip: int = field(default=200, metadata={"check": schema.at_least(1)})
    # Seconds a connection may stay silent before it is closed; 0 turns the check off.
    idle_timeout: float = field(default=600.0, metadata={"check": schema.at_least(0)})
    # A frame header announcing more than this closes the connection before anything is buffered.
    max_frame_bytes: int = field(default=64 * MIB, metadata={"check": schema.at_least(1024)})
    # Seconds a client waits for one call (sent to clients as their sync_request_timeout) and
    # the server waits for a callback into the client.
    call_timeout: float = field(default=60.0, metadata={"check": schema.at_least(0.1)})
    # Seconds a new connection has to complete TLS and token authentication.
    handshake_timeout: float = field(default=10.0, metadata={"check": schema.at_least(0.1)})
    # Files and transfers a service keeps open for its clients (each holds a descriptor, and
    # every service in the process shares one descriptor limit); 0 turns a cap off.
    max_open_transfers: int = field(default=512, metadata={"check": schema.at_least(0)})
    max_open_transfers_per_connection: int = field(default=32, metadata={"check": schema.at_least(0)})
    # Side connections that have not yet presented their ticket's token.
    max_pending_side_connections: int = field(default=64, metadata={"check": schema.at_least(0)})
    max_pending_side_connections_per_connection: int = field(
        default=8, metadata={"check": schema.at_least(0)}
    )
    # Seconds one request may spend, from its start, on all its round trips to its own client
    # (pulling argument items, callbacks); each one is also bounded by call_timeout.
    request_timeout: float = field(default=60.0, metadata={"check": schema.at_least(0.1)})
    # threadpool: requests waiting on their client (a worker hands its place to a spare thread
    # meanwhile), for the service and nested on one connection.
    max_waiting_requests: int = field(default=64, metadata={"check": schema.at_least(1)})
    max_waiting_requests_per_connection: int = field(default=4, metadata={"check": schema.at_least(1)})
    # Calls in one batch (one request); a bigger batch is refused whole.
    max_batch_calls: int = field(default=10_000, metadata={"check": schema.at_least(1)})
    # One-way calls accepted but not yet run, for the service and for one connection.
    max_oneway_pending: int = field(default=1024, metadata={"check": schema.at_least(1)})
    max_oneway_pending_per_connection: int = field(default=256, metadata={"check": schema.at_least(1)})
    # Iterator results being streamed to clients (each keeps its generator alive between chunks).
    max_open_streams: int = field(default=256, metadata={"check": schema.at_least(0)})
    max_open_streams_per_connection: int = field(default=16, metadata={"check": schema.at_least(0)})


def _override_of(section: type) -> type:
    """A dataclass with every field of ``section`` made optional (None: not overridden), the
    same checks, and ``apply(base)``: so a new limit is written once, in LimitsSection."""
    hints = typing.get_type_hints(section)
    fields = [
        (f.name, hints[f.name] | None, field(default=None, metadata=f.metadata))
        for f in dataclasses.fields(section)
    ]

    def apply(self: Any, base: Any) -> Any:
        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(base, **changes)

    doc = "``services.<name>.limits:``: only the limits this service changes (any key of ``limits:``)."
    return dataclasses.make_dataclass(
        "LimitsOverride",
        fields,
        frozen=True,
        namespace={"apply": apply, "__doc__": doc, "__module__": __name__},
    )


if TYPE_CHECKING:

    class LimitsOverride:
        """``services.<name>.limits:``: only the limits this service changes."""

        def __init__(self, **changes: Any) -> None: ...
        def apply(self, base: LimitsSection) -> LimitsSection: ...

else:
    LimitsOverride = _override_of(LimitsSection)


@dataclass(frozen=True)
class TLSSection:
    """``security.tls:``: certificate and key (PEM); with ``ca``, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: str
    key: str
    ca: str | None = None


@dataclass(frozen=True)
class SecuritySection:
    """``security:``: who may connect."""

    tokens: tuple[str, ...] = ()
    token_file: str | None = None
    tls: TLSSection | None = None
    # Allows a non-loopback bind without tokens or TLS; logged as a warning at every start.
    insecure: bool = False


@dataclass(frozen=True)
class GatewaySection:
    """``gateway:``: XML-RPC and JSON-RPC over HTTP for the listed services."""

    enabled: bool = False
    host: str = DEFAULT_HOST
    port: int = field(default=8888, metadata={"check": schema.port_check})
    services: tuple[str, ...] = ()
    max_body_bytes: int = field(default=16 * MIB, metadata={"check": schema.at_least(1024)})
    # Seconds a keep-alive connection may stay silent between requests, and any one read may wait.
    timeout: float = field(default=60.0, metadata={"check": schema.at_least(0.1)})
    # Seconds for a whole request (headers and body) once its first byte arrives: 408 after.
    request_timeout: float = field(default=10.0, metadata={"check": schema.at_least(0.1)})
    # Open HTTP connections from one address; more are answered 503.
    max_connections_per_ip: int = field(default=32, metadata={"check": schema.at_least(1)})
    backlog: int = field(default=1024, metadata={"check": schema.at_least(128)})


REGISTRY_MODES = ("tcp", "udp")
# Where services register: rpyc's registry, or etcd (leases and watches on a replicated store).
REGISTRY_BACKENDS = ("etcd", "rpyc")


@dataclass(frozen=True)
class RegistrySection:
    """``registry:``: register every service with rpyc's registry (``backend: rpyc``, the
    default) or in etcd (``backend: etcd``: a key per instance under a lease)."""

    enabled: bool = False
    backend: str = field(default="rpyc", metadata={"check": schema.one_of(REGISTRY_BACKENDS)})
    mode: str = field(default="tcp", metadata={"check": schema.one_of(REGISTRY_MODES)})
    # The registry's address; UDP mode needs an explicit unicast host (never broadcast).
    host: str = DEFAULT_HOST
    port: int = field(default=18811, metadata={"check": schema.port_check})
    # The address other machines reach this host at, when services bind a wildcard address.
    advertise_host: str | None = None
    # Seconds between registrations (rpyc's registry prunes entries not refreshed in 240 s).
    interval: float = field(default=10.0, metadata={"check": schema.at_least(0.1)})
    timeout: float = field(default=2.0, metadata={"check": schema.at_least(0.1)})
    # etcd: members (host:port, or https://host:port), the key prefix, and the lease's TTL in
    # seconds (a host that dies without deregistering is gone from etcd after at most ttl).
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = field(default="/rpyc-host", metadata={"check": lambda v: _prefix_check(v)})
    ttl: int = field(default=10, metadata={"check": schema.at_least(2)})
    # etcd's TLS (the CA that signed the members' certificates; a client certificate) and user.
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None


def _prefix_check(value: str) -> str | None:
    if not value.startswith("/") or value.endswith("/") or "//" in value:
        return "must start with '/', not end with '/' and have no empty part (e.g. /rpyc-host)"
    return None


@dataclass(frozen=True)
class ServiceSection:
    """``services.<name>:``; unset server settings fall back to ``server:``."""

    class_path: str = field(metadata={"key": "class"})
    port: int = field(metadata={"check": schema.port_check})
    type: str | None = field(default=None, metadata={"check": schema.one_of(SERVER_TYPES)})
    host: str | None = None
    pool_size: int | None = field(default=None, metadata={"check": schema.at_least(1)})
    backlog: int | None = field(default=None, metadata={"check": schema.at_least(1)})
    compression: bool | None = None
    enabled: bool = True
    # Which instance serves a connection or a call (rpyc_host.instances): connection, shared, call.
    instance: str = field(default="connection", metadata={"check": schema.one_of(INSTANCE_MODES)})
    options: dict[str, Any] = field(default_factory=dict)
    limits: LimitsOverride = field(default_factory=LimitsOverride)
    # Extra names to register under in the registry (besides the class-derived rpyc name).
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassicSection:
    """``debug.classic:``: rpyc's classic (remote code execution) console, for debugging only."""

    enabled: bool = False
    host: str = DEFAULT_HOST
    port: int = field(default=18812, metadata={"check": schema.port_check})
    # A non-loopback host needs both: the explicit switch, and a CA of the console's own whose
    # client certificates alone open a console (rpyc_host.classic.check_console has the rule).
    allow_remote: bool = False
    ca: str | None = None


@dataclass(frozen=True)
class DebugSection:
    classic: ClassicSection = field(default_factory=ClassicSection)


LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class LoggingSection:
    """``logging:``: level and format; ``dict`` goes to logging.config.dictConfig as is."""

    level: str = field(default="INFO", metadata={"check": lambda v: _level_check(v)})
    format: str = field(default="text", metadata={"check": schema.one_of(LOG_FORMATS)})
    dict: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSection:
    """``metrics:``: Prometheus /metrics, /healthz and /readyz over HTTP."""

    enabled: bool = False
    host: str = DEFAULT_HOST
    port: int = field(default=9464, metadata={"check": schema.port_check})


def _level_check(value: str) -> str | None:
    return schema.one_of(LOG_LEVELS)(value.upper())


@dataclass(frozen=True)
class FileSections:
    """The whole file as written, before per-service values are resolved."""

    server: ServerSection = field(default_factory=ServerSection)
    services: dict[str, ServiceSection] = field(default_factory=dict)
    debug: DebugSection = field(default_factory=DebugSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)


@dataclass(frozen=True)
class SecurityConfig:
    """Resolved security: the tokens (from the list and the token file), TLS, insecure flag."""

    tokens: tuple[str, ...] = ()
    tls: TLSSection | None = None
    insecure: bool = False


@dataclass(frozen=True)
class ServiceConfig:
    """One service with every server setting resolved."""

    name: str
    class_path: str
    host: str
    port: int
    type: str
    pool_size: int
    backlog: int
    compression: bool
    options: Mapping[str, Any]
    limits: LimitsSection = field(default_factory=LimitsSection)
    aliases: tuple[str, ...] = ()
    instance: str = "connection"

    @property
    def key_path(self) -> str:
        return f"services.{self.name}"


@dataclass(frozen=True)
class Config:
    """The validated configuration the host runs from."""

    source: str
    services: tuple[ServiceConfig, ...]
    classic: ClassicSection
    grace_period: float
    security: SecurityConfig = field(default_factory=SecurityConfig)
    drain_delay: float = 0.0
    gateway: GatewaySection = field(default_factory=GatewaySection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    disabled: tuple[str, ...] = ()  # services listed with enabled: false, logged at start

    @property
    def log_level(self) -> str:
        """``logging.level``, upper-cased (the one place the level is kept is ``logging``)."""
        return self.logging.level.upper()

    def service(self, name: str) -> ServiceConfig:
        for svc in self.services:
            if svc.name == name:
                return svc
        names = [s.name for s in self.services]
        raise ConfigError(
            f"no service named {name!r}{did_you_mean(name, names)}; "
            f"configured: {', '.join(names) or '(none)'}",
            source=self.source,
        )

    def to_dict(self, mask_secrets: bool = True) -> dict[str, Any]:
        """A plain-data view for ``--check``, with secret-looking values masked."""
        data = {
            "source": self.source,
            "grace_period": self.grace_period,
            "drain_delay": self.drain_delay,
            "security": {
                "tokens": [f"*** ({len(t)} characters)" for t in self.security.tokens],
                "tls": dataclasses.asdict(self.security.tls) if self.security.tls else None,
                "insecure": self.security.insecure,
            },
            "gateway": dataclasses.asdict(self.gateway),
            "registry": dataclasses.asdict(self.registry),
            "logging": {"level": self.log_level, "format": self.logging.format, "dict": self.logging.dict},
            "metrics": dataclasses.asdict(self.metrics),
            "debug": {"classic": dataclasses.asdict(self.classic)},
            "services": {
                s.name: {k: v for k, v in dataclasses.asdict(s).items() if k != "name"} for s in self.services
            },
        }
        return _mask(data) if mask_secrets else data


_SECRET_WORDS = ("password", "secret", "token", "passphrase")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@]+:)[^@]+@", re.IGNORECASE)


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, key) for v in value]
    if isinstance(value, str):
        if any(word in key.lower() for word in _SECRET_WORDS):
            return "***"
        return _URL_PASSWORD.sub(r"\g<scheme>***@", value)
    return value


# ---------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate a configuration file.

    Raises:
        ConfigError: for a missing file, bad YAML or any invalid setting; the message names
            the file and key path.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found (pass --config with the path of a YAML file)", source=source
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=source) from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate configuration text; see :func:`load_config`."""
    try:
        raw = read_text(text)
    except ConfigTextError as exc:
        raise ConfigError(exc.message, path=exc.path, source=source) from None
    try:
        sections = schema.build(FileSections, raw, "")
        return _resolve(sections, source)
    except ConfigError as exc:
        raise exc.located(source) from None


def _resolve(sections: FileSections, source: str) -> Config:
    defaults = sections.server
    services = []
    for name, svc in sections.services.items():
        if not svc.enabled:
            continue
        services.append(
            ServiceConfig(
                name=name,
                class_path=svc.class_path,
                host=svc.host if svc.host is not None else defaults.host,
                port=svc.port,
                type=svc.type or defaults.type,
                pool_size=svc.pool_size or defaults.pool_size,
                backlog=svc.backlog or defaults.backlog,
                compression=defaults.compression if svc.compression is None else svc.compression,
                options=dict(svc.options),
                limits=svc.limits.apply(sections.limits),
                aliases=svc.aliases,
                instance=svc.instance,
            )
        )
    classic = sections.debug.classic
    _check_ports(services, classic, sections.gateway, sections.metrics)
    security = _resolve_security(sections.security)
    if classic.enabled:
        from .classic import check_console  # imports rpyc: only when the console is on

        check_console(classic, security.tls)
    _check_exposure(services, sections.gateway, security)
    _check_gateway(sections.gateway, [s.name for s in services])
    return Config(
        source=source,
        services=tuple(services),
        classic=classic,
        grace_period=defaults.grace_period,
        drain_delay=defaults.drain_delay,
        security=security,
        gateway=sections.gateway,
        registry=_check_registry(sections.registry),
        metrics=sections.metrics,
        logging=sections.logging,
        disabled=tuple(name for name, svc in sections.services.items() if not svc.enabled),
    )


def _check_registry(registry: RegistrySection) -> RegistrySection:
    if registry.enabled and registry.backend == "etcd":
        if not registry.endpoints:
            raise ConfigError(
                "backend etcd needs at least one endpoint (host:port)", path="registry.endpoints"
            )
        for endpoint in registry.endpoints:
            try:
                parse_endpoint(endpoint)
            except ValueError as exc:
                raise ConfigError(str(exc), path="registry.endpoints") from None
        if (registry.cert is None) != (registry.key is None):
            raise ConfigError("cert and key go together (etcd's client certificate)", path="registry.cert")
        if registry.password is not None and registry.user is None:
            raise ConfigError("a password needs a user", path="registry.user")
    if registry.enabled and registry.mode == "udp" and is_broadcast(registry.host):
        raise ConfigError(
            f"{registry.host!r}: UDP mode needs the registry's own unicast address; "
            "this host never broadcasts",
            path="registry.host",
        )
    return registry


def _resolve_security(section: SecuritySection) -> SecurityConfig:
    tokens = [t for t in section.tokens]
    for i, token in enumerate(tokens):
        if len(token) < 16:
            raise ConfigError(
                f"token #{i + 1} is too short ({len(token)} characters); use at least 16 "
                "random characters, e.g. from: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'",
                path=f"security.tokens[{i}]",
            )
    if section.token_file:
        path = section.token_file  # relative paths: from the server's working directory
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"cannot read token file {section.token_file!r}: {exc.strerror}", path="security.token_file"
            ) from None
        file_tokens = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not file_tokens:
            raise ConfigError(
                f"token file {section.token_file!r} holds no tokens (one per line)",
                path="security.token_file",
            )
        short = [t for t in file_tokens if len(t) < 16]
        if short:
            raise ConfigError(
                f"token file {section.token_file!r} has a token shorter than 16 characters",
                path="security.token_file",
            )
        tokens.extend(file_tokens)
    tls = section.tls
    if tls is not None:
        resolved = {}
        for key in ("cert", "key", "ca"):
            value = getattr(tls, key)
            if value is None:
                continue
            path = value
            if not Path(path).is_file():
                raise ConfigError(f"{value!r} is not a readable file", path=f"security.tls.{key}")
            resolved[key] = path
        tls = TLSSection(**resolved)
    return SecurityConfig(tokens=tuple(tokens), tls=tls, insecure=section.insecure)


def _check_exposure(services: list[ServiceConfig], gateway: GatewaySection, security: SecurityConfig) -> None:
    if security.tokens or security.tls or security.insecure:
        return
    binds = [(svc.host, f"{svc.key_path}.host") for svc in services]
    if gateway.enabled:
        binds.append((gateway.host, "gateway.host"))
    for host, path in binds:
        if not is_loopback(host):
            raise ConfigError(
                f"{host!r} is reachable from other machines, and no security.tokens or "
                "security.tls is configured; add one (see SECURITY.md), bind 127.0.0.1, or set "
                "security.insecure: true to accept the risk",
                path=path,
            )


def _check_gateway(gateway: GatewaySection, names: list[str]) -> None:
    if not gateway.enabled:
        return
    for i, name in enumerate(gateway.services):
        if name not in names:
            raise ConfigError(
                f"{name!r} is not a configured service{did_you_mean(name, names)}; "
                f"configured: {', '.join(names) or '(none)'}",
                path=f"gateway.services[{i}]",
            )


def _check_ports(
    services: list[ServiceConfig], classic: ClassicSection, gateway: GatewaySection, metrics: MetricsSection
) -> None:
    taken: dict[int, str] = {}
    if classic.enabled and classic.port:
        taken[classic.port] = "debug.classic.port"
    if gateway.enabled and gateway.port:
        taken.setdefault(gateway.port, "gateway.port")
    if metrics.enabled and metrics.port:
        taken.setdefault(metrics.port, "metrics.port")
    for svc in services:
        if not svc.port:
            continue
        if svc.port in taken:
            raise ConfigError(
                f"{svc.port} is already used by {taken[svc.port]}; give each service "
                "its own port (or 0 for any free port)",
                path=f"{svc.key_path}.port",
            )
        taken[svc.port] = f"{svc.key_path}.port"


def is_broadcast(host: str) -> bool:
    """True for a broadcast or multicast address (or rpyc's empty/``<broadcast>`` spellings)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host in ("", "<broadcast>")
    return address == ipaddress.IPv4Address(2**32 - 1) or address.is_multicast


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or address) resolves only to loopback addresses."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)

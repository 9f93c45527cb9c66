"""What a client reads from a host's config file, and nothing more.

Service names with their host and port, the client's side of security (a token to send, whether
to speak TLS) and where rpyc's registry is. The server's own settings are not validated here and
its files are never opened: a client machine needs neither the server's certificate and key nor
its token file to connect by name.

Usage::

    settings = load_settings()                  # $RPYC_HOST_CONFIG, else ./config.yaml
    host, port = settings.address("demo")
    settings = load_settings("/etc/rpyc-host/config.yaml")

A file is read once per :func:`load_settings`; pass the result around (``client.connect``
accepts it as ``config=``) instead of naming the file again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpyc_host.wire.configtext import ConfigTextError, read_text
from rpyc_host.wire.errors import did_you_mean

from .errors import ConfigError

DEFAULT_CONFIG = "config.yaml"
CONFIG_ENV = "RPYC_HOST_CONFIG"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_REGISTRY_PORT = 18811
# A service bound to every interface is reached through loopback from its own machine.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def config_path(config: str | os.PathLike[str] | None = None) -> str:
    """The config file a client reads: ``config``, else ``$RPYC_HOST_CONFIG``, else ./config.yaml."""
    return os.fspath(config) if config else os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)


@dataclass(frozen=True)
class ServiceEntry:
    """One configured service as a client sees it."""

    name: str
    host: str
    port: int
    enabled: bool = True


@dataclass(frozen=True)
class ClientSettings:
    """The client's view of one config file; see the module docstring."""

    source: str
    services: Mapping[str, ServiceEntry] = field(default_factory=dict)
    token: str | None = None
    tls: bool = False
    registry: tuple[str, int] | None = None
    registry_mode: str = "tcp"

    def entry(self, name: str) -> ServiceEntry:
        """The service called ``name``; ConfigError naming the choices if there is none."""
        entry = self.services.get(name)
        if entry is None:
            names = sorted(self.services)
            raise ConfigError(
                f"{self.source}: no service named {name!r}{did_you_mean(name, names)}; "
                f"configured: {', '.join(names) or '(none)'}"
            )
        return entry

    def address(self, name: str) -> tuple[str, int]:
        """``(host, port)`` to reach service ``name`` at; wildcard binds are reached on loopback."""
        entry = self.entry(name)
        if not entry.enabled:
            raise ConfigError(f"{self.source}: service {name!r} is disabled (enabled: false)")
        if not entry.port:
            raise ConfigError(
                f"service {name!r} is configured with port 0 (any free port) in {self.source}; "
                "pass host= and port= with the port the server logged"
            )
        return _WILDCARDS.get(entry.host, entry.host), entry.port


def load_settings(config: str | os.PathLike[str] | ClientSettings | None = None) -> ClientSettings:
    """Read the client's settings from ``config`` (see :func:`config_path`); a ClientSettings
    passes through.

    Raises:
        ConfigError: no such file, not YAML, an unset ``${VAR}``, or a section of the wrong shape;
            the message says what to pass instead.
    """
    if isinstance(config, ClientSettings):
        return config
    source = config_path(config)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: config file not found; connecting by service name reads addresses from a "
            f"host's config file: pass config='path/to/config.yaml' (--config on the command line), "
            f"set {CONFIG_ENV}, or pass host= and port="
        ) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
    try:
        raw = read_text(text)
    except ConfigTextError as exc:
        where = f"{exc.path}: " if exc.path else ""
        raise ConfigError(f"{source}: {where}{exc.message}") from None
    return _settings(raw, source)


def _section(raw: Any, key: str, source: str) -> dict[str, Any]:
    value = raw.get(key) if isinstance(raw, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping of settings, got {value!r}")
    return value


def _settings(raw: Any, source: str) -> ClientSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    default_host = str(_section(raw, "server", source).get("host") or DEFAULT_HOST)
    services = {}
    for name, svc in _section(raw, "services", source).items():
        if not isinstance(svc, dict):
            raise ConfigError(f"{source}: services.{name}: expected a mapping of settings")
        port = svc.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int):
            raise ConfigError(f"{source}: services.{name}.port: {port!r} is not a port number")
        host = svc.get("host") or default_host
        services[str(name)] = ServiceEntry(str(name), str(host), port, svc.get("enabled", True) is not False)
    security = _section(raw, "security", source)
    registry = _section(raw, "registry", source)
    return ClientSettings(
        source=source,
        services=services,
        token=_first_token(security),
        tls=bool(security.get("tls")),
        registry=(
            (str(registry.get("host") or DEFAULT_HOST), int(registry.get("port") or DEFAULT_REGISTRY_PORT))
            if registry
            else None
        ),
        registry_mode=str(registry.get("mode") or "tcp"),
    )


def _first_token(security: dict[str, Any]) -> str | None:
    """The first configured token; a token file is read only if this machine can read it."""
    tokens = security.get("tokens") or ()
    if isinstance(tokens, list | tuple) and tokens and isinstance(tokens[0], str):
        return tokens[0]
    token_file = security.get("token_file")
    if isinstance(token_file, str):
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError:
            return None  # a server-only file: the client passes token= or RPYC_HOST_TOKEN instead
        for line in lines:
            if line.strip() and not line.startswith("#"):
                return line.strip()
    return None

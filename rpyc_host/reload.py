"""Hot reload (SIGHUP): re-read the configuration file and apply what can change live.

Applied without dropping a connection: the log level and format, tokens and TLS certificates
(new connections use them; open ones stay), limits (admission at once; timeouts for new
connections), and a service's options when its class defines ``reload(**options)``.
Needing a restart, and so logged as ignored: ports, hosts, classes, server types, pool sizes,
instance modes, added or removed services, and the gateway, metrics, registry and debug sections.
An invalid new file changes nothing: the exact error is logged and the running config stays.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from . import logs
from .config import Config, ServiceConfig, load_config
from .errors import ConfigError
from .security import server_tls_context

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger("rpyc_host.reload")

_RESTART_FIELDS = ("class_path", "host", "port", "type", "pool_size", "backlog", "compression", "instance")
_RESTART_SECTIONS = ("gateway", "metrics", "registry", "classic", "grace_period", "drain_delay")


def reload(host: Host) -> bool:
    """Re-read ``host.config.source`` and apply it; False (and nothing changed) if it is invalid."""
    old = host.config
    try:
        new = load_config(old.source)
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return False
    ignored = _needs_restart(old, new)
    for what in ignored:
        log.warning("reload: %s changed; that needs a restart, ignored until then", what)

    if new.logging != old.logging:
        logs.configure(new.log_level, new.logging.format, new.logging.dict)
        log.info("reload: logging now %s, %s", new.log_level, new.logging.format)

    tls = server_tls_context(new.security) if new.security.tls else None
    applied_services = []
    for hosted in host.hosted:
        fresh = _find(new, hosted.config.name)
        if fresh is None:
            applied_services.append(hosted.config)
            continue
        hosted.server.reconfigure(fresh.limits, new.security, tls)
        options = dict(hosted.config.options)
        if dict(fresh.options) != options:
            options = _reload_options(hosted, fresh)
        applied_services.append(dataclasses.replace(hosted.config, limits=fresh.limits, options=options))
        hosted.config = applied_services[-1]

    host.config = dataclasses.replace(
        old,
        logging=new.logging,
        security=dataclasses.replace(
            new.security, tls=new.security.tls if old.security.tls is not None else old.security.tls
        ),
        services=tuple(applied_services),
    )
    host.reloads += 1
    log.info("reloaded %s (%d change(s) need a restart and were ignored)", old.source, len(ignored))
    return True


def _find(config: Config, name: str) -> ServiceConfig | None:
    return next((s for s in config.services if s.name == name), None)


def _needs_restart(old: Config, new: Config) -> list[str]:
    changes = []
    old_names, new_names = {s.name for s in old.services}, {s.name for s in new.services}
    changes += [f"services.{n} (added)" for n in sorted(new_names - old_names)]
    changes += [f"services.{n} (removed)" for n in sorted(old_names - new_names)]
    for svc in old.services:
        fresh = _find(new, svc.name)
        if fresh is None:
            continue
        changes += [f"{svc.key_path}.{f}" for f in _RESTART_FIELDS if getattr(svc, f) != getattr(fresh, f)]
    changes += [name for name in _RESTART_SECTIONS if getattr(old, name) != getattr(new, name)]
    if (old.security.tls is None) != (new.security.tls is None):
        changes.append("security.tls (turned on or off)")
    return changes


def _reload_options(hosted: Any, fresh: ServiceConfig) -> dict[str, Any]:
    reloader = getattr(hosted.service, "reload", None)
    current = dict(hosted.config.options)
    if not callable(reloader):
        log.warning(
            "reload: %s.options changed but %s has no reload(); restart to apply them",
            fresh.key_path,
            type(hosted.service).__name__,
        )
        return current
    try:
        reloader(**fresh.options)
    except (TypeError, ValueError) as exc:
        log.error("reload: %s.options rejected, keeping the old ones: %s", fresh.key_path, exc)
        return current
    log.info("reload: %s.options applied", fresh.key_path)
    return dict(fresh.options)

"""The host: builds every configured service's server, runs them, stops them gracefully.

Usage::

    host = Host(load_config("config.yaml"))
    host.start()          # binds every listener or raises; nothing is left running on failure
    ...
    host.stop()           # stop accepting, let calls finish (grace period), disconnect

``run()`` does ``start()``, waits for SIGINT/SIGTERM and then ``stop()``, telling systemd
each step when it runs under it (:mod:`rpyc_host.systemd`); listeners systemd passed in are
used instead of binding.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import rpyc

from . import classic, systemd
from .config import Config, ServiceConfig
from .errors import ConfigError, StartupError
from .exposure import check_options, import_class, instantiate, prepare_class
from .metrics import CallBook
from .protocol import harden_netrefs
from .reload import reload
from .security import AuthThrottle, Gatekeeper, RefusalCounts
from .servers import SERVER_TYPES, HostServerMixin, ServerSettings
from .wire import tracing

if TYPE_CHECKING:
    from .gateway import Gateway
    from .metrics import MetricsServer
    from .registration import Registrar

log = logging.getLogger("rpyc_host")


@dataclass
class Hosted:
    """One running service: its config, the configured instance and its server."""

    config: ServiceConfig
    service: rpyc.Service
    server: HostServerMixin
    thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port


def build_services(config: Config) -> list[tuple[ServiceConfig, rpyc.Service]]:
    """Import and instantiate every service; ConfigError for a bad class or rejected options."""
    built: list[tuple[ServiceConfig, rpyc.Service]] = []
    try:
        for svc in config.services:
            cls = prepare_class(import_class(svc.class_path, f"{svc.key_path}.class"))
            built.append((svc, instantiate(cls, svc.options, f"{svc.key_path}.options")))
    except ConfigError as exc:
        close_services(s for _, s in built)
        raise exc.located(config.source) from exc.__cause__  # the cause: a traceback at DEBUG
    return built


def check_services(config: Config) -> None:
    """What ``--check`` does: import every class and check its options without building it,
    so validating creates, opens and deletes nothing; ConfigError for the first mistake."""
    require_services(config)
    for svc in config.services:
        try:
            cls = prepare_class(import_class(svc.class_path, f"{svc.key_path}.class"))
            check_options(cls, svc.options, f"{svc.key_path}.options")
        except ConfigError as exc:
            raise exc.located(config.source) from None


def require_services(config: Config) -> None:
    """ConfigError for a configuration that would serve nothing, saying what to add."""
    if config.services:
        return
    disabled = config.disabled
    if disabled:
        names = ", ".join(f"services.{name}" for name in disabled)
        message = f"every service is disabled ({names}): set enabled: true on at least one"
    else:
        message = (
            "no services to serve: add one under services:, for example "
            "services: {demo: {class: services.demo:DemoService, port: 18861}}"
        )
    raise ConfigError(message, path="services", source=config.source)


def close_services(services: Any) -> None:
    """Call the optional ``close()`` of each configured service instance."""
    for service in services:
        closer = getattr(service, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception:
                log.exception("closing %s failed", type(service).__name__)


def ready_event(host: Host) -> dict[str, Any]:
    """What a started host listens on, for supervisors and scripts: the real ports, not the configured 0."""

    def address(component: Any) -> list[Any] | None:
        return None if component is None else list(component.address)

    return {
        "pid": os.getpid(),
        "services": {
            h.config.name: {"host": h.address[0], "port": h.address[1], "type": h.config.type}
            for h in host.hosted
        },
        "gateway": address(host.gateway),
        "metrics": address(host.metrics),
        "classic": address(host.classic),
    }


def write_ready_file(host: Host, path: str) -> None:
    """Write :func:`ready_event` as JSON to ``path`` atomically: a reader sees all of it or no file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(ready_event(host), out)
            out.write("\n")
        os.replace(temporary, path)  # same directory, so the rename is atomic
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class Host:
    """Runs the configured services; see the module docstring."""

    def __init__(self, config: Config, ready_file: str | None = None) -> None:
        self.config = config
        self.ready_file = ready_file  # written by start() once every listener accepts
        self.hosted: list[Hosted] = []
        self.classic: classic.ClassicConsole | None = None
        # The optional components, imported only when enabled (see _start_extra).
        self.gateway: Gateway | None = None
        self.registrar: Registrar | None = None
        self._stopped = threading.Event()
        self._draining = threading.Event()
        self.notifier = systemd.Notifier.from_environment()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._stop_lock = threading.Lock()
        self.refusals = RefusalCounts()
        self.calls = CallBook() if config.metrics.enabled else None
        self.metrics: MetricsServer | None = None
        self.throttle = AuthThrottle()
        self.reloads = 0  # configurations applied by SIGHUP

    def start(self) -> None:
        """Build and bind every service, then start accepting.

        Raises:
            ConfigError: a class cannot be imported or rejects its options.
            StartupError: a listener cannot bind; everything already built is closed.
        """
        harden_netrefs()
        tracing.configure()  # spans only when OpenTelemetry is installed and OTEL_* configured
        security = self.config.security
        if security.insecure:
            log.warning(
                "security.insecure is true: services may accept unauthenticated connections "
                "from other machines"
            )
        for name in self.config.disabled:
            log.info("not serving services.%s: enabled is false", name)
        built = build_services(self.config)
        inherited: dict[str, systemd.Inherited] = {}
        try:
            inherited = self._take_inherited()
            for svc, service in built:
                self.hosted.append(
                    Hosted(svc, service, self._bind(svc, service, inherited.pop(svc.name, None)))
                )
            if self.config.classic.enabled:
                self.classic = classic.ClassicConsole(self.config.classic, self.config.security.tls)
        except BaseException:
            for left in inherited.values():
                left.sock.close()
            if self.classic is not None:
                self.classic.close()
            for hosted in self.hosted:
                hosted.server.close()
            close_services(s for _, s in built)
            self.hosted.clear()
            raise
        for hosted in self.hosted:
            hosted.server.listen()
            hosted.thread = threading.Thread(
                target=hosted.server.start, name=f"{hosted.config.name}-accept", daemon=True
            )
            hosted.thread.start()
            host, port = hosted.address
            log.info(
                "serving %s (%s) on %s:%d [%s]",
                hosted.config.name,
                hosted.config.class_path,
                host,
                port,
                hosted.config.type,
            )
        if self.classic is not None:
            self.classic.start()
        if self.config.gateway.enabled:
            self._start_extra("gateway", "rpyc_host.gateway", "Gateway")
        if self.config.metrics.enabled:
            self._start_extra("metrics", "rpyc_host.metrics", "MetricsServer")
        if self.config.registry.enabled:
            self._start_extra("registrar", "rpyc_host.registration", "make_registrar")
        if self.ready_file is not None:
            try:
                write_ready_file(self, self.ready_file)
            except OSError as exc:
                self.stop(grace=0)
                raise StartupError(
                    f"--ready-file: cannot write {self.ready_file}: {exc.strerror or exc}"
                ) from None
        log.info("host ready: %d service(s)", len(self.hosted))

    def _start_extra(self, attr: str, module: str, cls: str) -> None:
        """Start an optional component ``module.cls(config, host)`` (``start()``/``close()``)."""
        component_class = getattr(importlib.import_module(module), cls)  # imported only when enabled
        try:
            component = component_class(self.config, self)
            component.start()
            setattr(self, attr, component)
        except BaseException:
            self.stop(grace=0)
            raise

    def _take_inherited(self) -> dict[str, systemd.Inherited]:
        """Listening sockets systemd passed in, by the service each belongs to."""
        try:
            found = systemd.inherited_listeners()
        except OSError as exc:
            raise StartupError(
                f"socket activation: a descriptor in LISTEN_FDS is not a socket: {exc.strerror or exc}"
            ) from None
        if not found:
            return {}
        return systemd.match_listeners([(s.name, s.port) for s in self.config.services], found)

    def _bind(
        self, svc: ServiceConfig, service: rpyc.Service, inherited: systemd.Inherited | None = None
    ) -> HostServerMixin:
        settings = ServerSettings(
            name=svc.name,
            limits=svc.limits,
            gatekeeper=Gatekeeper(self.config.security, svc.limits, self.refusals, self.throttle, svc.name),
            compression=svc.compression,
            pool_size=svc.pool_size,
            grace_period=self.config.grace_period,
            calls=self.calls,
            instance=svc.instance,
        )
        kwargs: dict[str, Any] = {
            "hostname": svc.host,
            "port": svc.port,
            "backlog": svc.backlog,
            "ipv6": ":" in svc.host,
            "logger": logging.getLogger(f"rpyc_host.{svc.name}"),
        }
        if inherited is not None:
            # rpyc binds a socket in __init__: a throwaway loopback one, replaced before listen().
            ipv6 = inherited.sock.family == socket.AF_INET6
            kwargs.update(hostname="::1" if ipv6 else "127.0.0.1", port=0, ipv6=ipv6)
        try:
            server = SERVER_TYPES[svc.type](service, settings, **kwargs)  # type: ignore[call-arg]
        except OSError as exc:
            raise StartupError(
                f"{svc.key_path}: cannot listen on {svc.host}:{svc.port}: {exc.strerror or exc}"
            ) from None
        if inherited is not None:
            server.adopt_listener(inherited.sock)
            log.info(
                "%s: using the listening socket systemd passed (fd %d, name %r, %s:%d)",
                svc.key_path,
                inherited.fd,
                inherited.name,
                server.host,
                server.port,
            )
        return server

    def address(self, name: str) -> tuple[str, int]:
        """The bound (host, port) of a service, with the real port when configured as 0."""
        for hosted in self.hosted:
            if hosted.config.name == name:
                return hosted.address
        raise KeyError(name)

    @property
    def draining(self) -> bool:
        """True from the start of :meth:`stop`: /readyz answers 503 from then on."""
        return self._draining.is_set()

    def stop(self, grace: float | None = None, drain_delay: float | None = None) -> bool:
        """Stop gracefully, in the order a load balancer needs: unregister, report not ready,
        keep serving for ``drain_delay`` seconds (``server.drain_delay``), stop accepting, wait
        up to ``grace`` seconds for calls in flight, then disconnect everyone (running
        ``on_disconnect``). True if nothing was cut short."""
        with self._stop_lock:
            if self._stopped.is_set():
                return True
            grace = self.config.grace_period if grace is None else grace
            drain_delay = self.config.drain_delay if drain_delay is None else drain_delay
            started = time.monotonic()
            if self.classic is not None:
                self.classic.close()
            if self.registrar is not None:
                self.registrar.close()  # unregister first: clients stop picking this host
                log.info("unregistered from the registry")
            self._draining.set()
            log.info("draining: /readyz answers 503; listeners close in %.1f s", drain_delay)
            if drain_delay > 0:
                # Connections keep being accepted and served while load balancers notice.
                time.sleep(drain_delay)
            if self.gateway is not None:
                self.gateway.close()
            for hosted in self.hosted:
                hosted.server.stop_accepting()
            log.info("stopped accepting connections; waiting up to %.1f s for calls in flight", grace)
            clean = True
            grace_started = time.monotonic()
            for hosted in self.hosted:
                left = max(0.0, grace - (time.monotonic() - grace_started))
                if not hosted.server.drain(left):
                    clean = False
                    log.warning(
                        "%s: calls still running after the %.1f s grace period; disconnecting them",
                        hosted.config.name,
                        grace,
                    )
            if clean:
                log.info("calls in flight finished; disconnecting clients")
            for hosted in self.hosted:
                hosted.server.close()
            for hosted in self.hosted:
                if not hosted.server.wait_closed(0.5 if not clean else 5.0):
                    hosted.server.force_close()
                if hosted.thread is not None:
                    hosted.thread.join(timeout=5.0)
            if self.metrics is not None:
                self.metrics.close()  # last: /healthz and /readyz answer until the end
            close_services(h.service for h in self.hosted)
            self._stopped.set()
            log.info("host stopped in %.2f s", time.monotonic() - started)
            return clean

    def request_stop(self) -> None:
        """Ask ``run()`` to stop (safe from signal handlers and other threads)."""
        self._stop_requested.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Ask ``run()`` to re-read the configuration file (what SIGHUP does)."""
        self._reload_requested.set()
        self._wake.set()

    def run(self) -> int:
        """Start, serve until SIGINT or SIGTERM (SIGHUP reloads), stop gracefully; returns the exit status."""
        handlers = {
            signal.SIGINT: self._on_stop_signal,
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGHUP: self._on_reload_signal,
        }
        # Installed before start(): "host ready" is logged there, and a signal right after it
        # must already stop gracefully instead of killing the process.
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        watchdog: threading.Thread | None = None
        try:
            self.start()
            self.notifier.ready(f"serving {len(self.hosted)} service(s)")
            if self.notifier.watchdog_interval:
                watchdog = threading.Thread(target=self._watchdog, name="systemd-watchdog", daemon=True)
                watchdog.start()
            while not self._stop_requested.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                if self._reload_requested.is_set() and not self._stop_requested.is_set():
                    self._reload_requested.clear()
                    self.notifier.reloading()
                    reload(self)  # here, not in the signal handler: it logs and takes locks
                    self.notifier.ready(f"serving {len(self.hosted)} service(s)")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.notifier.stopping()
        self.stop()
        if watchdog is not None:
            watchdog.join(timeout=5.0)
        return 0

    def _watchdog(self) -> None:
        """Ping systemd's watchdog while every accept loop is alive, through the whole stop too
        (a long grace period must not look like a hang); a dead accept loop stops the pings, so
        systemd restarts the host."""
        while not self._stopped.wait(self.notifier.watchdog_interval):
            if self._draining.is_set() or all(h.thread is None or h.thread.is_alive() for h in self.hosted):
                self.notifier.notify("WATCHDOG=1")
                continue
            dead = [h.config.name for h in self.hosted if h.thread is not None and not h.thread.is_alive()]
            log.error("accept loop of %s has died: no more systemd watchdog pings", ", ".join(dead))
            return

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        log.info(
            "received %s: stopping (grace period %.1f s)",
            signal.Signals(signum).name,
            self.config.grace_period,
        )
        self.request_stop()

    def _on_reload_signal(self, signum: int, frame: Any) -> None:
        log.info("received SIGHUP: reloading %s", self.config.source)
        self.request_reload()

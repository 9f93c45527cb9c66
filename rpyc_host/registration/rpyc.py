"""Registration with rpyc's own registry (``rpyc_registry``), so clients find every instance.

``registry.backend: rpyc`` (the default) picks this registrar.

Usage (the host does this when ``registry.enabled`` is true)::

    registrar = Registrar(config, host)   # checks addresses; never blocks on the network
    registrar.start()                     # registers now, then every ``registry.interval`` s
    ...
    registrar.close()                     # unregisters (before the listeners close)

Each running service is registered under its rpyc name (``DemoService`` -> ``DEMO``), its
config key and its configured ``aliases``, all upper-cased as the registry stores them.

How an address gets into the registry: rpyc's registry records the *source address* of the
registration message, not an address inside it. So the registrar sends each registration from
the address clients should use: the service's bound address, or ``registry.advertise_host``
when the service binds a wildcard address (0.0.0.0). Re-registering every ``interval``
seconds keeps entries fresh and puts them back after the registry restarts (it keeps no
state on disk). The registry never broadcasts here: TCP mode, or UDP to an explicit unicast
host (the config refuses broadcast addresses, and the UDP client is built with
``bcast=False``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from rpyc.core import brine
from rpyc.utils.registry import (
    TCPRegistryClient,
    UDPRegistryClient,
)

from ..config import Config, RegistrySection, is_broadcast, is_loopback
from ..errors import StartupError

log = logging.getLogger("rpyc_host.registry")  # the name operators already filter on

WILDCARDS = ("", "0.0.0.0", "::")


class _QuietLog(logging.LoggerAdapter[logging.Logger]):
    """rpyc's registry clients log every attempt (INFO, or WARNING while the registry is down);
    the registrar logs changes of state instead, so theirs go to DEBUG."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


class _TCPClient(TCPRegistryClient):
    def unregister(self, port: int, interface: str = "") -> None:
        # rpyc's unregister() cannot choose its source address, and the registry removes the
        # entries of the address the message comes from: send it from the registered one.
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind((interface, 0))
            sock.settimeout(self.timeout)
            sock.connect((self.ip, self.port))
            sock.sendall(brine.dump(("RPYC", "UNREGISTER", (port,))))
            try:
                sock.recv(64)  # the registry answers "OK" once it has handled it
            except OSError:
                pass


class _UDPClient(UDPRegistryClient):
    def unregister(self, port: int, interface: str = "") -> None:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
            sock.bind((interface, 0))
            sock.sendto(brine.dump(("RPYC", "UNREGISTER", (port,))), (self.ip, self.port))


def registry_client(section: RegistrySection) -> Any:
    """rpyc's registry client for ``section`` (TCP, or UDP to its unicast host, never broadcast)."""
    quiet = _QuietLog(logging.getLogger("rpyc_host.registry.rpyc"), {})
    if section.mode == "udp":
        if is_broadcast(section.host):
            raise StartupError(f"registry.host: {section.host!r} is a broadcast address; use a unicast one")
        return _UDPClient(
            ip=section.host, port=section.port, timeout=section.timeout, bcast=False, logger=quiet
        )
    return _TCPClient(section.host, port=section.port, timeout=section.timeout, logger=quiet)


@dataclass(frozen=True)
class Entry:
    """One registration: names, the port, and the source address it is sent from."""

    service: str
    names: tuple[str, ...]
    port: int
    source: str  # "" lets the kernel pick (the route's address)

    def describe(self) -> str:
        return f"{self.service} as {', '.join(self.names)} at {self.source or '<route address>'}:{self.port}"


class RpycRegistrar:
    """Keeps every hosted service registered with rpyc's registry; see the module docstring."""

    def __init__(self, config: Config, host: Any) -> None:
        self.section = config.registry
        self.client = registry_client(self.section)
        self.entries = tuple(e for e in (self._entry(h) for h in host.hosted) if e is not None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered: set[str] = set()
        self._reachable: bool | None = None

    @property
    def target(self) -> str:
        return f"{self.section.host}:{self.section.port} ({self.section.mode})"

    def _entry(self, hosted: Any) -> Entry | None:
        svc = hosted.config
        bound_host, port = hosted.address
        names: list[str] = []
        service_class = type(hosted.service)
        aliases = getattr(service_class, "get_service_aliases", None)
        for name in [*(aliases() if aliases else ()), svc.name, *svc.aliases]:
            if name.upper() not in names:
                names.append(name.upper())
        if ":" in bound_host:
            log.warning(
                "registry: %s binds IPv6 %s; rpyc's registry is IPv4 only: not registered",
                svc.name,
                bound_host,
            )
            return None
        if bound_host in WILDCARDS:
            source = self.section.advertise_host or ""
            if not source:
                log.warning(
                    "registry: %s binds %s and registry.advertise_host is not set: the registry will "
                    "record whichever address this machine uses to reach it",
                    svc.name,
                    bound_host or "every interface",
                )
        else:
            source = bound_host
        if is_loopback(source) and not is_loopback(self.section.host):
            log.warning(
                "registry: %s binds %s, which other machines cannot reach: not registered with %s "
                "(bind a reachable address, or 0.0.0.0 with registry.advertise_host)",
                svc.name,
                source,
                self.target,
            )
            return None
        if source:
            _check_local(source, svc.name)
        return Entry(svc.name, tuple(names), port, source)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Register in a background thread, now and every ``registry.interval`` seconds."""
        if not self.entries:
            log.warning("registry: nothing to register with %s", self.target)
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.register_all()
            self._stop.wait(self.section.interval)

    def register_all(self) -> int:
        """Register every entry once; returns how many the registry acknowledged."""
        acknowledged = 0
        for entry in self.entries:
            if self._stop.is_set():
                break
            try:
                ok = bool(self.client.register(entry.names, entry.port, interface=entry.source))
            except OSError as exc:
                ok = False
                log.debug("registry: registering %s failed: %s", entry.describe(), exc)
            if ok:
                acknowledged += 1
                if entry.service not in self._registered:
                    self._registered.add(entry.service)
                    log.info("registered %s with registry %s", entry.describe(), self.target)
            else:
                self._registered.discard(entry.service)
        reachable = acknowledged > 0 or not self.entries
        if reachable != self._reachable:
            if not reachable:
                log.warning(
                    "registry %s did not answer within %.1f s; retrying every %.1f s",
                    self.target,
                    self.section.timeout,
                    self.section.interval,
                )
            elif self._reachable is False:
                log.info("registry %s is back: %d service(s) registered again", self.target, acknowledged)
            self._reachable = reachable
        return acknowledged

    def close(self) -> None:
        """Stop refreshing and unregister every entry (bounded: one timeout in all)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.section.timeout * (len(self.entries) + 1) + 1)
        deadline = time.monotonic() + self.section.timeout
        for entry in self.entries:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("registry: no time left to unregister %s; it will be pruned", entry.service)
                continue
            self.client.timeout = left
            try:
                self.client.unregister(entry.port, interface=entry.source)
                log.info("unregistered %s from registry %s", entry.describe(), self.target)
            except OSError as exc:
                log.warning(
                    "registry %s: unregistering %s failed (%s); the registry prunes it later",
                    self.target,
                    entry.service,
                    exc,
                )
                break  # the registry is unreachable: do not wait again for every entry
        self._registered.clear()


def _check_local(address: str, service: str) -> None:
    """The registry records the source address, so it must be one of this machine's."""
    try:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        raise StartupError(
            f"registry: cannot advertise {service} at {address!r}: {exc.strerror or exc}. rpyc's registry "
            "records the address a registration comes from, so registry.advertise_host must be an "
            "address of this machine"
        ) from None

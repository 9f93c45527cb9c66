"""systemd integration without a dependency: socket activation and ``sd_notify``.

- **Socket activation.** systemd (or ``systemd-socket-activate``) opens the listening sockets and
  passes them as file descriptors 3, 4, ... with ``LISTEN_FDS``, ``LISTEN_PID`` and
  ``LISTEN_FDNAMES`` (from each socket unit's ``FileDescriptorName=``). :func:`inherited_listeners`
  takes them; :func:`match_listeners` gives each to the service whose config key is its name, or
  else whose configured port it is bound to.
- **Notifications.** :class:`Notifier` sends ``READY=1``, ``RELOADING=1``, ``STOPPING=1`` and
  ``WATCHDOG=1`` datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
  namespace); without that variable every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass

log = logging.getLogger("rpyc_host.systemd")

FIRST_FD = 3  # SD_LISTEN_FDS_START
_LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class InheritedListener(socket.socket):
    """A listening socket systemd passed in.

    The socket is shared with the socket unit: ``shutdown()`` would stop it listening for
    systemd too (so connections arriving while the service restarts would be refused instead
    of queued), and ``listen()`` would override the unit's ``Backlog=``. Both are no-ops here;
    ``close()`` drops only this process's descriptor.
    """

    def shutdown(self, how: int) -> None:
        pass

    def listen(self, backlog: int = 0) -> None:
        if not self.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            super().listen(backlog)


@dataclass
class Inherited:
    """One passed descriptor: its name (``unknown`` when the unit gave none) and socket."""

    fd: int
    name: str
    sock: InheritedListener

    @property
    def port(self) -> int:
        address = self.sock.getsockname()
        return int(address[1]) if isinstance(address, tuple) else 0


def listen_fds(environ: MutableMapping[str, str], pid: int) -> list[tuple[int, str]]:
    """``(fd, name)`` of the descriptors passed to process ``pid``, and the variables removed
    (so processes this one starts do not take them too); empty when none were passed to it."""
    values = {key: environ.pop(key, None) for key in _LISTEN_VARS}
    if values["LISTEN_PID"] is None or values["LISTEN_FDS"] is None:
        return []
    try:
        if int(values["LISTEN_PID"]) != pid:
            return []  # meant for another process (the variables leaked through an exec)
        count = int(values["LISTEN_FDS"])
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID/LISTEN_FDS: %r", values)
        return []
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    names += ["unknown"] * (count - len(names))
    return [(FIRST_FD + i, names[i]) for i in range(max(0, count))]


def inherited_listeners(environ: MutableMapping[str, str] | None = None) -> list[Inherited]:
    """The listening stream sockets systemd passed to this process (see :func:`listen_fds`).

    Raises:
        OSError: a passed descriptor is not a socket.
    """
    found = []
    for fd, name in listen_fds(os.environ if environ is None else environ, os.getpid()):
        os.set_inheritable(fd, False)  # as sd_listen_fds(): not passed on to children
        sock = InheritedListener(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            log.warning("ignoring descriptor %d (%s): not a TCP stream socket", fd, name)
            sock.detach()
            continue
        found.append(Inherited(fd, name, sock))
    return found


def match_listeners(services: Iterable[tuple[str, int]], inherited: list[Inherited]) -> dict[str, Inherited]:
    """``{service name: inherited}`` for ``services`` as ``(name, configured port)``: by
    descriptor name first, then by bound port. What no service takes is logged and closed."""
    services = list(services)
    by_name = {i.name: i for i in inherited}
    matched: dict[str, Inherited] = {}
    for name, _ in services:
        if name in by_name:
            matched[name] = by_name[name]
    taken = {id(i) for i in matched.values()}
    for name, port in services:
        if name in matched or not port:
            continue
        for candidate in inherited:
            if id(candidate) not in taken and candidate.port == port:
                matched[name] = candidate
                taken.add(id(candidate))
                break
    for leftover in inherited:
        if id(leftover) not in taken:
            log.warning(
                "socket activation: descriptor %d (name %r, port %d) matches no service by name or port; "
                "closing it",
                leftover.fd,
                leftover.name,
                leftover.port,
            )
            leftover.sock.close()
    return matched


class Notifier:
    """``sd_notify`` over a datagram socket; does nothing when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        # systemd expects a ping at least every WATCHDOG_USEC; half leaves room for a slow tick.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        usec = 0
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid is None or watchdog_pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", "0"))
            except ValueError:
                log.warning("ignoring malformed WATCHDOG_USEC=%r", env.get("WATCHDOG_USEC"))
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False (logged) if it could not be sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd's Type=notify-reload match this to its reload request.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

"""etcd clients for several members: etcd3gw (etcd's gRPC gateway over HTTP) with failover.

Shared by the host's registrar and the client's ``etcd://`` resolver (the wire layer is what
both sides import), so both read endpoints, TLS and credentials the same way. etcd3gw talks to
one member; :class:`EtcdMembers` keeps one client per member and moves to the next when a
member does not answer, so a cluster that has lost a member (but kept its quorum) keeps
serving. User and password go through etcd's own ``/v3/auth/authenticate``: the token it
returns is sent on every request.

etcd3gw is imported only here, and only when an etcd backend is used.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("rpyc_host.wire.etcd")

API_PATH = "/v3/"  # etcd >= 3.4 serves the gateway here; fixed, so no version probe per client
DEFAULT_PORT = 2379

T = TypeVar("T")


class EtcdUnavailable(ConnectionError):
    """No etcd member answered; the message lists each member's error."""


def parse_endpoint(text: str) -> tuple[str, str, int]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` -> (protocol, host, port)."""
    protocol, sep, rest = text.partition("://")
    if not sep:
        protocol, rest = "", text
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [v6 address]:port
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.removeprefix(":") or str(DEFAULT_PORT)
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            host, port_text = rest, str(DEFAULT_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"etcd endpoint {text!r}: expected host:port")
    if protocol not in ("", "http", "https"):
        raise ValueError(f"etcd endpoint {text!r}: scheme must be http or https")
    return protocol, host, int(port_text)


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach the members: TLS files and credentials (all optional)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 2.0


class EtcdMembers:
    """One etcd3gw client per member; :meth:`call` runs an operation on the first that answers."""

    def __init__(self, endpoints: Sequence[str], options: EtcdOptions | None = None) -> None:
        import etcd3gw  # lazy: only deployments that use etcd need it installed

        if not endpoints:
            raise ValueError("etcd: no endpoints given")
        self.options = options or EtcdOptions()
        self.endpoints = tuple(endpoints)
        self.clients: list[Any] = []
        for text in self.endpoints:
            protocol, host, port = parse_endpoint(text)
            tls = protocol == "https" or self.options.ca is not None
            self.clients.append(
                etcd3gw.client(
                    host=host,
                    port=port,
                    protocol="https" if tls else "http",
                    ca_cert=self.options.ca,
                    cert_cert=self.options.cert,
                    cert_key=self.options.key,
                    timeout=self.options.timeout,
                    api_path=API_PATH,
                )
            )
        self._current = 0
        self._authenticated: set[int] = set()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return ",".join(self.endpoints)

    def _authenticate(self, index: int, client: Any) -> None:
        if self.options.user is None or index in self._authenticated:
            return
        answer = client.post(
            client.get_url("/auth/authenticate"),
            json={"name": self.options.user, "password": self.options.password or ""},
        )
        client.session.headers["Authorization"] = answer["token"]
        self._authenticated.add(index)

    def call(self, operation: Callable[[Any], T]) -> T:
        """``operation(client)`` on the current member, else on each other member in turn."""
        from etcd3gw.exceptions import Etcd3Exception

        errors: list[str] = []
        with self._lock:
            start = self._current
        for step in range(len(self.clients)):
            index = (start + step) % len(self.clients)
            client = self.clients[index]
            try:
                self._authenticate(index, client)
                result = operation(client)
            except (Etcd3Exception, OSError) as exc:
                errors.append(f"{self.endpoints[index]}: {_reason(exc)}")
                self._authenticated.discard(index)  # a restarted member needs a fresh token
                continue
            if index != start:
                log.info("etcd: using member %s", self.endpoints[index])
                with self._lock:
                    self._current = index
            return result
        raise EtcdUnavailable(f"no etcd member answered: {'; '.join(errors)}")

    def skip(self, index: int) -> None:
        """Member ``index`` stopped answering: start with the next one from now on."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self.clients)

    def close(self) -> None:
        for client in self.clients:
            try:
                client.session.close()
            except Exception:
                pass


def _reason(exc: BaseException) -> str:
    """One line: etcd's own error text when it gave one (``authentication failed ...``)."""
    detail = getattr(exc, "detail_text", None)
    if isinstance(detail, str) and detail.strip():
        try:
            parsed = json.loads(detail)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("error"):
            return str(parsed["error"])[:200]
        if not detail.lstrip().startswith("<"):
            return detail.strip().splitlines()[0][:200]
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]

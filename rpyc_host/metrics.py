"""Metrics and health over HTTP: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz``, and
the status page at ``/`` (:mod:`rpyc_host.status`).

Calls are counted in plain per-(service, method) records under a small lock, and turned into
Prometheus families only when scraped (a custom collector), which keeps the cost per call to
about a microsecond. Connection figures are read from the servers at scrape time.

Families:

- ``rpyc_host_calls_total{service,method}``, ``rpyc_host_call_errors_total{service,method}``
- ``rpyc_host_call_duration_seconds{service,method}`` (histogram)
- ``rpyc_host_calls_in_flight{service}``
- ``rpyc_host_connections_open{service}``, ``rpyc_host_connections_total{service}``
- ``rpyc_host_connections_refused_total{service,reason}`` (limit, auth, tls, throttle)
- ``rpyc_host_limit_refusals_total{service,limit}``: requests refused by a ``limits:`` cap
- ``rpyc_host_held{service,resource}``: what clients hold now (see :mod:`rpyc_host.budget`)
- ``rpyc_host_oneway_errors_total{service,method}``: one-way calls that raised (:mod:`rpyc_host.oneway_calls`)
- ``rpyc_host_gateway_refusals_total{reason}``: gateway refusals (``max_connections``,
  ``max_connections_per_ip``, ``request_timeout``, ``auth``, ``throttled``, ``body_too_large``,
  ``headers_too_large``, ``bad_request``)
- ``rpyc_host_service_<name>{service}``: whatever a service's own ``metrics()`` returns
  (the file service's bytes in and out, the ingest service's records and rejects)

Under the ``forking`` server type each connection's calls run in a child process, so call
counts and durations of forking services are not collected; connection figures are.
"""

from __future__ import annotations

import bisect
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import inherited
from .errors import StartupError

if TYPE_CHECKING:
    from .config import Config
    from .host import Host

log = logging.getLogger("rpyc_host.metrics")

BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class CallStats:
    """Counts and a latency histogram for one (service, method)."""

    __slots__ = ("buckets", "calls", "errors", "lock", "total")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.lock = threading.Lock()

    def add(self, seconds: float, error: bool) -> None:
        slot = bisect.bisect_left(BUCKETS, seconds)
        with self.lock:
            self.calls += 1
            self.total += seconds
            self.buckets[slot] += 1
            if error:
                self.errors += 1


class CallBook:
    """Every (service, method)'s :class:`CallStats`."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], CallStats] = {}
        self._lock = threading.Lock()

    def record(self, service: str, method: str, seconds: float, error: bool) -> None:
        key = (service, method)
        stats = self._stats.get(key)
        if stats is None:
            with self._lock:
                stats = self._stats.setdefault(key, CallStats())
        stats.add(seconds, error)

    def items(self) -> list[tuple[tuple[str, str], CallStats]]:
        with self._lock:
            return list(self._stats.items())


class HostCollector:
    """Builds the metric families from the host's servers and call book at scrape time."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily("rpyc_host_calls", "Calls served", labels=["service", "method"])
        errors = CounterMetricFamily(
            "rpyc_host_call_errors", "Calls that raised", labels=["service", "method"]
        )
        durations = HistogramMetricFamily(
            "rpyc_host_call_duration_seconds", "Call duration", labels=["service", "method"]
        )
        for (service, method), stats in self.host.calls.items() if self.host.calls else ():
            with stats.lock:
                counts, total, n, failed = list(stats.buckets), stats.total, stats.calls, stats.errors
            calls.add_metric([service, method], n)
            errors.add_metric([service, method], failed)
            cumulative, running = [], 0
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric([service, method], cumulative, total)
        yield from (calls, errors, durations)

        in_flight = GaugeMetricFamily("rpyc_host_calls_in_flight", "Calls being served", labels=["service"])
        open_ = GaugeMetricFamily("rpyc_host_connections_open", "Open connections", labels=["service"])
        admitted = CounterMetricFamily("rpyc_host_connections", "Connections admitted", labels=["service"])
        for hosted in self.host.hosted:
            name, server = hosted.config.name, hosted.server
            in_flight.add_metric([name], server.in_flight)
            open_.add_metric([name], server.admitted)
            admitted.add_metric([name], server.total_admitted)
        yield from (in_flight, open_, admitted)

        refused = CounterMetricFamily(
            "rpyc_host_connections_refused", "Connections refused", labels=["service", "reason"]
        )
        for (service, reason), count in self.host.refusals.by_service().items():
            refused.add_metric([service, reason], count)
        yield refused

        limit_refusals = CounterMetricFamily(
            "rpyc_host_limit_refusals", "Requests refused by a limit", labels=["service", "limit"]
        )
        held = GaugeMetricFamily(
            "rpyc_host_held", "Resources clients hold now", labels=["service", "resource"]
        )
        for hosted in self.host.hosted:
            ledger = hosted.server.ledger
            for limit, count in ledger.refusal_counts().items():
                limit_refusals.add_metric([hosted.config.name, limit], count)
            for resource, amount in ledger.snapshot().items():
                held.add_metric([hosted.config.name, resource], amount)
        yield from (limit_refusals, held)

        oneway_errors = CounterMetricFamily(
            "rpyc_host_oneway_errors", "One-way calls that raised", labels=["service", "method"]
        )
        for hosted in self.host.hosted:
            book = getattr(hosted.server, "oneway", None)
            for method, count in book.errors().items() if book is not None else ():
                oneway_errors.add_metric([hosted.config.name, method], count)
        yield oneway_errors

        gateway = self.host.gateway
        if gateway is not None:
            refused = CounterMetricFamily(
                "rpyc_host_gateway_refusals",
                "Gateway connections and requests refused, by reason",
                labels=["reason"],
            )
            for reason, count in gateway.refusal_counts().items():
                refused.add_metric([reason], count)
            yield refused

        for hosted in self.host.hosted:
            own = getattr(hosted.service, "metrics", None)
            if not callable(own):
                continue
            try:
                figures = own()
            except Exception:
                log.exception("%s: metrics() failed", hosted.config.name)
                continue
            for key, value in figures.items():
                family = GaugeMetricFamily(
                    f"rpyc_host_service_{key}", f"{key} (from the service)", labels=["service"]
                )
                family.add_metric([hosted.config.name], float(value))
                yield family


def listener_accepting(server: Any) -> bool:
    """Whether a service's listener is open and listening (no connection is made to check)."""
    try:
        return bool(server.active) and bool(
            server.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
    except OSError:
        return False


class MetricsServer:
    """The HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``."""

    def __init__(self, config: Config, host: Host) -> None:
        self.host = host
        bind_host, port = config.metrics.host, config.metrics.port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HostCollector(host))
        self.started = time.time()
        from .status import StatusPage  # it reads this module's histograms

        self.status = StatusPage(host)
        handler = type("Handler", (_Handler,), {"owner": self})
        try:
            self.httpd = ThreadingHTTPServer((bind_host, port), handler)
        except OSError as exc:
            raise StartupError(
                f"metrics: cannot listen on {bind_host}:{port}: {exc.strerror or exc}"
            ) from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        inherited.hold(self)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on %s:%d (/ status page, /metrics, /healthz, /readyz)", *self.address)

    def close_in_child(self) -> None:
        """In a forked connection process: the listener's copy goes (see :mod:`.inherited`)."""
        self.httpd.socket.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {service: state}): ``accepting`` or ``down``, and ``draining`` for every
        service once the host is stopping, while its listeners still accept for drain_delay."""
        if self.host.draining:
            return False, {h.config.name: "draining" for h in self.host.hosted}
        listeners = {
            h.config.name: "accepting" if listener_accepting(h.server) else "down" for h in self.host.hosted
        }
        ready = bool(listeners) and all(state == "accepting" for state in listeners.values())
        return ready, listeners


class _Handler(BaseHTTPRequestHandler):
    owner: MetricsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, self.owner.status.render().encode(), "text/html; charset=utf-8")
        elif path == "/metrics":
            self._send(200, generate_latest(self.owner.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            uptime = time.time() - self.owner.started
            self._json(200, {"status": "ok", "uptime": round(uptime, 3)})
        elif path == "/readyz":
            ready, listeners = self.owner.readiness()
            status = "ready" if ready else "draining" if self.owner.host.draining else "not ready"
            self._json(200 if ready else 503, {"status": status, "services": listeners})
        else:
            self._json(404, {"error": f"no such endpoint {path!r}; try /, /metrics, /healthz or /readyz"})

    def _json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

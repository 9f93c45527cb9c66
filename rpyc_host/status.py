"""The live status page at the metrics port's ``/``: plain HTML that refreshes itself.

For each service: server type and address, connections open and in total, calls per second,
and per method the calls, errors, p50 and p99; then refusals by reason (connections and
limits), reloads and uptime. No scripts: the page asks the browser to reload it every few
seconds (``<meta http-equiv="refresh">``), and calls per second are measured between two
renderings (or since start-up, for the first one).

Latency quantiles come from the call histogram (:mod:`rpyc_host.metrics`), so each is the upper
bound of the bucket it falls in ("<= 2.5 ms"). Under the ``forking`` server type calls run in
child processes and are not counted here (the page says so).
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .metrics import BUCKETS, CallStats

if TYPE_CHECKING:
    from .host import Host

REFRESH_SECONDS = 5


@dataclass(frozen=True)
class MethodRow:
    service: str
    method: str
    calls: int
    errors: int
    p50: float | None
    p99: float | None


def quantile(stats: CallStats, q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` (None without calls)."""
    with stats.lock:
        counts, total = list(stats.buckets), stats.calls
    if not total:
        return None
    rank = q * total
    running = 0
    for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
        running += count
        if running >= rank:
            return bound
    return float("inf")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return f"> {BUCKETS[-1] * 1000:g} ms"
    return f"<= {seconds * 1000:g} ms"


class StatusPage:
    """Renders the page for one host; keeps the previous rendering's totals for rates."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, int]] | None = None

    def method_rows(self) -> list[MethodRow]:
        book = self.host.calls
        rows = []
        for (service, method), stats in sorted(book.items() if book else ()):
            rows.append(
                MethodRow(
                    service, method, stats.calls, stats.errors, quantile(stats, 0.5), quantile(stats, 0.99)
                )
            )
        return rows

    def rates(self, rows: list[MethodRow]) -> dict[str, float]:
        """Calls per second per service, since the previous rendering (or since start-up)."""
        now = time.monotonic()
        totals: dict[str, int] = {}
        for row in rows:
            totals[row.service] = totals.get(row.service, 0) + row.calls
        with self._lock:
            then, before = self._last if self._last is not None else (self.started, {})
            self._last = (now, totals)
        elapsed = max(now - then, 1e-3)
        return {name: (count - before.get(name, 0)) / elapsed for name, count in totals.items()}

    def render(self) -> str:
        host = self.host
        rows = self.method_rows()
        rates = self.rates(rows)
        uptime = time.monotonic() - self.started
        out = [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
            "<title>rpyc-host status</title><style>",
            "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0 1.5em}"
            "th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
            "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
            ".err{color:#b00}.muted{color:#777}",
            "</style></head><body>",
            "<h1>rpyc-host</h1>",
            f'<p>up <span id="uptime">{uptime:.0f}</span> s; '
            f"config <code>{html.escape(host.config.source)}</code>; "
            f'reloads <span id="reloads">{host.reloads}</span></p>',
            "<h2>Services</h2><table id=services><tr><th>service</th><th>type</th><th>address</th>"
            "<th>connections open</th><th>connections total</th><th>calls/s</th></tr>",
        ]
        for hosted in host.hosted:
            name = hosted.config.name
            address = "{}:{}".format(*hosted.address)
            note = (
                " <span class=muted>(calls counted in the children)</span>"
                if hosted.config.type == "forking"
                else ""
            )
            out.append(
                f'<tr id="service-{html.escape(name)}"><td>{html.escape(name)}{note}</td>'
                f"<td>{html.escape(hosted.config.type)}</td><td>{html.escape(address)}</td>"
                f"<td class=open>{hosted.server.admitted}</td>"
                f"<td class=total>{hosted.server.total_admitted}</td>"
                f"<td class=rate>{rates.get(name, 0.0):.1f}</td></tr>"
            )
        out.append("</table>")
        out.append(
            "<h2>Methods</h2><table id=methods><tr><th>method</th><th>calls</th><th>errors</th>"
            "<th>p50</th><th>p99</th></tr>"
        )
        if not rows:
            out.append("<tr><td colspan=5 class=muted>no calls yet (or metrics are off)</td></tr>")
        for row in rows:
            label = html.escape(f"{row.service}.{row.method}")
            err = " class=err" if row.errors else ""
            out.append(
                f'<tr id="method-{label}"><td>{label}</td><td class=calls>{row.calls}</td>'
                f"<td class=errors{err}>{row.errors}</td><td class=p50>{_ms(row.p50)}</td>"
                f"<td class=p99>{_ms(row.p99)}</td></tr>"
            )
        out.append("</table>")
        out.append(
            "<h2>Refusals</h2><table id=refusals><tr><th>service</th><th>reason</th><th>count</th></tr>"
        )
        refusals = sorted(host.refusals.by_service().items())
        for hosted in host.hosted:
            refusals += [
                ((hosted.config.name, limit), n)
                for limit, n in sorted(hosted.server.ledger.refusal_counts().items())
            ]
        if not refusals:
            out.append("<tr><td colspan=3 class=muted>none</td></tr>")
        for (service, reason), count in refusals:
            out.append(
                f'<tr id="refusal-{html.escape(service)}-{html.escape(reason)}">'
                f"<td>{html.escape(service)}</td>"
                f"<td>{html.escape(reason)}</td><td class=count>{count}</td></tr>"
            )
        out.append("</table>")
        out.append(
            f"<p class=muted>refreshes every {REFRESH_SECONDS} s; "
            "/metrics has the same figures for Prometheus</p>"
        )
        out.append("</body></html>")
        return "\n".join(out)

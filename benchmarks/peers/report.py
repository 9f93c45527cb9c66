"""Medians over rounds, ratios to the best peer and to the floor, targets, JSON and the chart.

Ratios are the claim: every figure is divided by the best peer's figure for the same workload
in the same run (bare rpyc, XML-RPC, Pyro5, gRPC), and by the raw socket floor's. For
throughput higher is better (ratio > 1 beats the peer); for latency lower is better.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import fmt, table
from benchmarks.peers.clients import System

FLOOR = "raw socket (floor)"
HOST = "host threaded"
TOKEN = "host threaded + token"
BARE = "bare rpyc threaded"
FILES = "host files.upload"  # blake3, the client's default hash
FILES_SHA256 = "host files.upload sha256"
FILES_DOWN = "host files.download"
FILES_DOWN_SHA256 = "host files.download sha256"
# The same transfers with both ends' files on a tmpfs: no disk under them, as under gRPC's server.
FILES_MEMORY = "host files.upload tmpfs"
FILES_DOWN_MEMORY = "host files.download tmpfs"

Figures = dict[str, dict[str, float]]  # system name -> figure name -> median value


def medians(rounds: list[dict[str, dict[str, float]]]) -> Figures:
    """Per system, the median of each figure over the rounds that measured it."""
    names = {name for r in rounds for name in r}
    out: Figures = {}
    for name in names:
        runs = [r[name] for r in rounds if name in r]
        out[name] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    return out


def _best(figs: Figures, systems: list[System], key: str, higher: bool) -> float | None:
    values = [figs[s.name][key] for s in systems if s.peer and s.name in figs]
    if not values:
        return None
    return max(values) if higher else min(values)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


@dataclass(frozen=True)
class Results:
    systems: list[System]
    seq: Figures
    par: Figures
    bulk: Figures
    idle: Figures
    clients: int
    idle_count: int

    def small_table(self) -> list[list[str]]:
        best_seq = _best(self.seq, self.systems, "calls_per_s", True)
        best_par = _best(self.par, self.systems, "calls_per_s", True)
        best_p99 = _best(self.par, self.systems, "p99_us", False)
        floor_seq = self.seq.get(FLOOR, {}).get("calls_per_s")
        floor_par = self.par.get(FLOOR, {}).get("calls_per_s")
        n = self.clients
        rows = [
            [
                "system",
                "p50 us",
                "p99 us",
                "calls/s",
                "x best peer",
                "x floor",
                f"{n}-proc calls/s",
                "x best peer",
                "x floor",
                f"{n}-proc p99 us",
                "x best peer",
            ]
        ]
        for s in self.systems:
            if s.name not in self.seq:
                continue
            q, p = self.seq[s.name], self.par.get(s.name)
            rows.append(
                [
                    s.name,
                    fmt(q["p50_us"]),
                    fmt(q["p99_us"]),
                    fmt(q["calls_per_s"]),
                    _ratio(q["calls_per_s"], best_seq),
                    _ratio(q["calls_per_s"], floor_seq),
                    fmt(p["calls_per_s"]) if p else "-",
                    _ratio(p["calls_per_s"], best_par) if p else "-",
                    _ratio(p["calls_per_s"], floor_par) if p else "-",
                    fmt(p["p99_us"]) if p else "-",
                    _ratio(p["p99_us"], best_p99) if p else "-",
                ]
            )
        return rows

    def bulk_table(self) -> list[list[str]]:
        best = _best(self.bulk, self.systems, "mb_per_s", True)
        floor = self.bulk.get(FLOOR, {}).get("mb_per_s")
        grpc = self.bulk.get("gRPC", {}).get("mb_per_s")  # the streaming baseline file transfers aim at
        rows = [["system", "MB/s", "MiB sent", "x best peer", "x gRPC", "x floor"]]
        for s in self.systems:
            if s.name in self.bulk:
                b = self.bulk[s.name]
                rows.append(
                    [
                        f"{s.name} ({BULK_HOW[s.bulk or '']})",
                        fmt(b["mb_per_s"]),
                        fmt(b["mib_sent"]),
                        _ratio(b["mb_per_s"], best),
                        _ratio(b["mb_per_s"], grpc),
                        _ratio(b["mb_per_s"], floor),
                    ]
                )
        return rows

    def idle_table(self) -> list[list[str]]:
        rows = [
            [
                "system",
                "p99 us, none",
                f"p99 us, {self.idle_count} idle",
                "x (with / none)",
                "opened",
                "open s",
                "server RSS +MiB",
            ]
        ]
        for s in self.systems:
            if s.name in self.idle:
                i = self.idle[s.name]
                rows.append(
                    [
                        s.name,
                        fmt(i["p99_none_us"]),
                        fmt(i["p99_idle_us"]),
                        f"{i['p99_idle_us'] / i['p99_none_us']:.2f}",
                        fmt(i["opened"]),
                        fmt(i["open_s"], 1),
                        fmt(i["server_rss_mib"], 1),
                    ]
                )
        return rows

    def checks(self) -> list[tuple[str, float | None, str, bool]]:
        """(what, measured ratio, target, holds) for each of issue 7's targets."""
        out: list[tuple[str, float | None, str, bool]] = []

        def add(what: str, value: float | None, base: float | None, target: float, higher: bool) -> None:
            ratio = value / base if value is not None and base else None
            ok = ratio is not None and (ratio >= target if higher else ratio <= target)
            out.append((what, ratio, f"{'>=' if higher else '<='} {target}", ok))

        def seq(name: str) -> float | None:
            return self.seq.get(name, {}).get("calls_per_s")

        for peer, target in ((BARE, 0.95), ("Pyro5", 1.2), ("gRPC", 3.0), ("XML-RPC", 5.0)):
            add(f"host threaded calls/s vs {peer}", seq(HOST), seq(peer), target, True)
        add(f"host + token calls/s vs {BARE}", seq(TOKEN), seq(BARE), 0.9, True)
        add(
            f"host threaded {self.clients}-proc p99 vs {BARE}",
            self.par.get(HOST, {}).get("p99_us"),
            self.par.get(BARE, {}).get("p99_us"),
            1.0,
            False,
        )
        for name in (FILES, FILES_SHA256, FILES_DOWN, FILES_DOWN_SHA256, FILES_MEMORY, FILES_DOWN_MEMORY):
            what = name.removeprefix("host ") + ("" if name.endswith("sha256") else " blake3")
            add(
                f"{what} MB/s vs gRPC client-streaming",
                self.bulk.get(name, {}).get("mb_per_s"),
                self.bulk.get("gRPC", {}).get("mb_per_s"),
                1.0,
                True,
            )
        add(
            f"host threaded p99 with {self.idle_count} idle vs none",
            self.idle.get(HOST, {}).get("p99_idle_us"),
            self.idle.get(HOST, {}).get("p99_none_us"),
            1.5,
            False,
        )
        return out

    def text(self) -> str:
        parts = [
            "Small calls: add(1, 2), sequential from one client, then from "
            f"{self.clients} client processes at once",
            table(self.small_table()),
            "",
            "Bulk: 1 MiB pieces of random bytes (MB/s = 10^6 bytes/s)",
            table(self.bulk_table()),
            "",
            f"Idle connections: call p99 from one client, alone and beside {self.idle_count} idle ones",
            table(self.idle_table()),
            "",
            "Targets (ratios from this run):",
        ]
        for what, ratio, target, ok in self.checks():
            shown = f"{ratio:.2f}" if ratio is not None else "not measured"
            parts.append(f"[{'PASS' if ok else 'MISS'}] {what}: {shown} (target {target})")
        return "\n".join(parts)

    def markdown(self) -> str:
        """The three tables as Markdown, for docs/performance.md."""

        def md(rows: list[list[str]]) -> str:
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            return "\n".join(lines)

        checks = "\n".join(
            f"| {what} | {'-' if r is None else f'{r:.2f}'} | {target} | {'holds' if ok else 'misses'} |"
            for what, r, target, ok in self.checks()
        )
        return "\n\n".join(
            [
                md(self.small_table()),
                md(self.bulk_table()),
                md(self.idle_table()),
                "| target | ratio | wanted | |\n|---|---|---|---|\n" + checks,
            ]
        )

    def to_json(self, meta: dict[str, Any], rounds: dict[str, Any]) -> dict[str, Any]:
        return {
            **meta,
            "systems": [s.__dict__ for s in self.systems],
            "median": {"sequential": self.seq, "parallel": self.par, "bulk": self.bulk, "idle": self.idle},
            "checks": [
                {"check": what, "ratio": r, "target": target, "ok": ok}
                for what, r, target, ok in self.checks()
            ],
            "rounds": rounds,
        }

    def chart(self, path: Path, title: str) -> None:
        """Four bar charts: sequential and parallel calls/s, bulk MB/s, idle p99 ratio."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {"host": "#1f77b4", "peer": "#ff7f0e", "floor": "#9e9e9e"}

        def color(name: str) -> str:
            system = next(s for s in self.systems if s.name == name)
            return colors["peer" if system.peer else "floor" if name == FLOOR else "host"]

        panels = [
            ("sequential calls/s (higher is better)", self.seq, "calls_per_s", False),
            (f"{self.clients} client processes: calls/s", self.par, "calls_per_s", False),
            ("bulk MB/s, 1 MiB pieces (log scale)", self.bulk, "mb_per_s", True),
            (f"call p99 with {self.idle_count} idle connections / without", self.idle, "ratio", False),
        ]
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
        for ax, (label, figs, key, log) in zip(axes.flat, panels, strict=True):
            names = [s.name for s in self.systems if s.name in figs]
            values = [
                figs[n]["p99_idle_us"] / figs[n]["p99_none_us"] if key == "ratio" else figs[n][key]
                for n in names
            ]
            ax.barh(names, values, color=[color(n) for n in names])
            ax.invert_yaxis()
            ax.set_title(label, fontsize=10)
            ax.tick_params(axis="y", labelsize=8)
            if log:
                ax.set_xscale("log")
            if key == "ratio":
                ax.axvline(1.5, color="#d62728", linestyle="--", linewidth=1)
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:,.2f}" if key == "ratio" else f" {v:,.0f}", va="center", fontsize=7)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
        fig.legend(handles, ["this host", "peers", "floor"], loc="lower center", ncol=3)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0.04, 1, 0.96))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


BULK_HOW = {
    "raw": "sendall",
    "rpyc": "rpyc.connect defaults, a call per piece",
    "host": "client.connect, a call per piece",
    "files": "client.files.upload of a file, blake3, root on disk: O_DIRECT + fsync",
    "files-sha256": "client.files.upload of a file, sha256, root on disk",
    "files-down": "client.files.download, server copy warm, blake3, to disk: O_DIRECT + fsync",
    "files-down-sha256": "client.files.download, server copy warm, sha256, to disk",
    "files-memory": "client.files.upload, blake3, both ends on tmpfs: fsync called, costs nothing",
    "files-down-memory": "client.files.download, blake3, both ends on tmpfs: fsync called, costs nothing",
    "xmlrpc": "Binary, a call per piece",
    "pyro5": "marshal serializer, a call per piece",
    "grpc": "client-streaming, one call",
    "": "",
}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

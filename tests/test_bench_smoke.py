"""The concurrency, server CPU, TLS and connection benchmarks run end to end in their ``--quick`` modes and
print their targets (smoke only: figures on a shared machine are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("script", "result", "targets"),
    [
        ("bench_concurrency.py", "concurrency", 4),
        ("bench_server_cpu.py", "server_cpu", 2),
        ("bench_tls.py", "tls", 3),
        ("bench_connections.py", "connections", 1),
    ],
)
def test_benchmark_quick_mode_reports_its_targets(script: str, result: str, targets: int) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    verdicts = [line for line in out.stdout.splitlines() if line.startswith(("[PASS]", "[MISS]"))]
    assert len(verdicts) == targets, out.stdout
    assert all("target" in line for line in verdicts)
    saved = json.loads((ROOT / "benchmarks" / "results" / f"{result}.json").read_text())
    assert [c["check"] for c in saved["checks"]] == [v[7:] for v in verdicts]

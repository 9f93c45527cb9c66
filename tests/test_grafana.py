"""The Grafana dashboard in deploy/grafana asks only for metrics the host really exports."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import rpyc

import client
from rpyc_host.testing import running_host

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "rpyc-host.json"
NAME = re.compile(r"\b(rpyc_host_[a-z_]+)")


def test_every_metric_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {m for p in dashboard["panels"] for t in p["targets"] for m in NAME.findall(t["expr"])}
    assert queried, "the dashboard queries nothing"
    config = f"""
services:
  demo: {{class: services.demo:DemoService, port: 0}}
  files: {{class: services.files:FileService, port: 0, options: {{root: "{tmp_path}"}}}}
  ingest: {{class: services.ingest:IngestService, port: 0, options: {{database: "sqlite:///{tmp_path}/i.db"}}}}
metrics: {{enabled: true, host: 127.0.0.1, port: 0}}
"""
    with running_host(config) as host:
        assert host.metrics is not None
        with rpyc.connect(*host.address("demo")) as conn:
            conn.root.add(1, 2)
        with client.connect(host="127.0.0.1", port=host.address("files")[1]) as conn:
            conn.root.open_read  # noqa: B018 - a connection that holds nothing still lists its families
        url = "http://{}:{}/metrics".format(*host.metrics.address)
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported.add(name)
            if kind == "counter":
                exported.add(name + "_total")
            if kind == "histogram":
                exported.update({name + "_bucket", name + "_sum", name + "_count"})
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"

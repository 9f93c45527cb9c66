"""The status page at the metrics port's ``/``, rendered by a real headless browser (Debian's
chromium, installed by scripts/test.sh), with the numbers read off the page after known calls."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import rpyc

from rpyc_host.testing import running_host

CONFIG = """
server: {type: threaded}
services:
  demo: {class: services.demo:DemoService, port: 0}
  forked: {class: services.demo:DemoService, port: 0, type: forking}
metrics: {enabled: true, host: 127.0.0.1, port: 0}
"""


def render(url: str, profile: Path) -> str:
    """The page's DOM after chromium loaded and laid it out."""
    browser = shutil.which("chromium")
    assert browser, "chromium is missing: scripts/test.sh installs Debian's chromium package"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Cells(HTMLParser):
    """Text of every element with an id, and of the cells with a class inside each row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self._row: str | None = None
        self._cell: str | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "tr" and named.get("id"):
            self._row = str(named["id"])
            self.rows[self._row] = {}
        elif tag == "td" and self._row and named.get("class"):
            self._cell = str(named["class"]).split()[0]
        elif tag == "span" and named.get("id"):
            self._id = str(named["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag in ("td", "span"):
            self._cell = self._id = None

    def handle_data(self, data: str) -> None:
        if self._row and self._cell:
            self.rows[self._row][self._cell] = self.rows[self._row].get(self._cell, "") + data
        if self._id:
            self.ids[self._id] = data


@pytest.mark.slow
def test_the_page_shows_the_calls_that_were_made(tmp_path: Path) -> None:
    with running_host(CONFIG) as host:
        assert host.metrics is not None
        with rpyc.connect(*host.address("demo")) as conn:
            add = conn.root.add
            for i in range(7):
                assert add(i, 1) == i + 1
            with pytest.raises(TypeError):
                add("x", 1)
            url = "http://{}:{}/".format(*host.metrics.address)
            dom = render(url, tmp_path / "profile")
    page = Cells()
    page.feed(dom)
    add_row = page.rows["method-demo.add"]
    assert add_row["calls"] == "8" and add_row["errors"] == "1"
    assert re.fullmatch(r"<= [0-9.]+ ms", add_row["p50"]) and re.fullmatch(r"<= [0-9.]+ ms", add_row["p99"])
    demo = page.rows["service-demo"]
    assert demo["open"] == "1" and demo["total"] == "1"
    assert float(demo["rate"]) > 0
    assert "service-forked" in page.rows
    assert page.ids["reloads"] == "0" and float(page.ids["uptime"]) >= 0
    assert '<meta http-equiv="refresh"' in dom

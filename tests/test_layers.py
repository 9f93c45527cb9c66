"""The packages import one way: wire <- the rest of rpyc_host <- services and client; nothing
imports tests.

    rpyc_host.wire    imports nothing of this project outside rpyc_host.wire
    rpyc_host         never imports client, services or tests
    services          may import rpyc_host, never client or tests
    client            may import rpyc_host.wire only (a client machine needs no host code)

Read from the source with ``ast``, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("rpyc_host", "services", "client", "tests", "benchmarks", "examples")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import of a project package in ``path``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PROJECT:
                found.append((node.lineno, name))
    return found


def allowed(importer: str, imported: str) -> bool:
    top = imported.split(".")[0]
    if top == "tests":
        return importer.startswith("tests")
    if importer.startswith("rpyc_host.wire"):
        return imported.startswith("rpyc_host.wire") or imported == "rpyc_host"
    if importer.startswith("rpyc_host"):
        return top == "rpyc_host"
    if importer.startswith("services"):
        return top in ("rpyc_host", "services")
    if importer.startswith("client"):
        return top == "client" or imported.startswith("rpyc_host.wire") or imported == "rpyc_host"
    return True  # tests, benchmarks and examples may use everything shipped


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    "path", modules("rpyc_host", "services", "client", "benchmarks", "examples"), ids=str
)
def test_imports_go_one_way(path: Path) -> None:
    importer = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    wrong = [f"line {line}: {name}" for line, name in imports_of(path) if not allowed(importer, name)]
    assert not wrong, f"{importer} imports across the layers: {', '.join(wrong)}"


def test_the_walk_sees_a_wrong_import(tmp_path: Path) -> None:
    # The rule must be able to fail: a host module importing the client is caught.
    assert not allowed("rpyc_host.gateway.server", "client.connection")
    assert not allowed("rpyc_host.wire.dial", "rpyc_host.config")
    assert not allowed("client.pool", "rpyc_host.config")
    assert not allowed("services.files.service", "client.files")
    assert not allowed("benchmarks.bench_pool", "tests.helpers")
    assert allowed("client.connection", "rpyc_host.wire.dial")
    assert allowed("services.ingest.service", "rpyc_host.wire.jsonlines")

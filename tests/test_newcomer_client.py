"""The client CLI: one convention for what a subcommand acts on (positional) and each
subcommand's own usage when an argument is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import rpyc

from rpyc_host.testing import run_cli, running_host


def test_ingest_count_and_query_both_take_the_topic_as_a_positional(tmp_path: Path) -> None:
    database = json.dumps(f"sqlite:///{tmp_path / 'ingest.db'}")
    config = (
        "services:\n  ingest:\n    class: services.ingest:IngestService\n    port: 0\n"
        f"    options: {{database: {database}}}\n"
    )
    with running_host(config) as host:
        h, p = host.address("ingest")
        with rpyc.connect(h, p) as conn:
            conn.root.submit("load", b'{"i": 1}\n{"i": 2}\n', "b1")
            conn.root.submit("other", b'{"i": 3}\n', "b2")
        target = ("--host", h, "--port", str(p))
        counted = run_cli("-m", "client", "ingest", "count", "load", *target)
        assert (counted.returncode, counted.stdout) == (0, "2\n"), counted.stderr
        every = run_cli("-m", "client", "ingest", "count", *target)
        assert (every.returncode, every.stdout) == (0, "3\n"), every.stderr
        query = run_cli("-m", "client", "ingest", "query", "load", *target)
        assert [json.loads(line)["record"] for line in query.stdout.splitlines()] == [{"i": 1}, {"i": 2}]


def test_a_wrong_subcommand_argument_shows_that_subcommands_usage() -> None:
    for argv, prog, stray in [
        (("ingest", "count", "--topic", "load"), "python -m client ingest count", "--topic"),
        (("files", "ls", "--bogus"), "python -m client files ls", "--bogus"),
        (("call", "demo", "add", "--nope"), "python -m client call", "--nope"),
    ]:
        result = run_cli("-m", "client", *argv)
        assert result.returncode == 2
        assert result.stderr.startswith(f"usage: {prog} "), result.stderr
        assert result.stderr.strip().endswith(f"{prog}: error: unrecognized arguments: {stray}"), (
            result.stderr
        )

"""Every log line written on a call's behalf carries the call's request id and trace id, in text
and in JSON, so one request can be followed through several services' logs."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import client
from rpyc_host.testing import ServerProcess
from rpyc_host.wire import context

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE}-b7ad6b7169203331-01"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_service_log_line_names_the_request_and_the_trace(
    fmt: str, start_server: Callable[..., ServerProcess], write_config: Callable[[str], Path]
) -> None:
    proc = start_server(
        write_config(
            textwrap.dedent(f"""
            services:
              notes: {{class: tests.sample_services:NoteService, port: 0}}
            logging: {{level: INFO, format: {fmt}}}
            """)
        )
    )
    with client.connect(host="127.0.0.1", port=proc.address("notes")[1]) as conn:
        note = conn.root.note
        with context.use(context.CallContext(traceparent=PARENT, request_id="order-42")):
            note("with a context")
        note("without one")
    line = proc.wait_for("with a context")
    if fmt == "json":
        record = json.loads(line)
        assert record["request_id"] == "order-42" and record["trace_id"] == TRACE
        assert record["conn"].startswith("notes-")
    else:
        assert f"req=order-42 trace={TRACE}] note: with a context" in line
        assert "[notes-" in line
    plain = proc.wait_for("without one")
    # The client library gives every call a request id of its own, and no trace without one.
    if fmt == "json":
        record = json.loads(plain)
        assert record["request_id"] and record["request_id"] != "order-42" and "trace_id" not in record
    else:
        assert "req=" in plain and "trace=" not in plain

"""What a person reads: one log line when a connection opens and one when it closes, the reason
when a service's on_connect refuses a client, and a suggestion for a mistyped method name."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import rpyc

from rpyc_host.testing import ServerProcess, running_host, wait_until

DEMO = "services:\n  demo: {class: services.demo:DemoService, port: 0}\n"


@pytest.mark.parametrize("server_type", ["threaded", "threadpool", "forking"])
def test_a_connection_writes_one_line_when_it_opens_and_one_when_it_closes(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess], server_type: str
) -> None:
    proc = start_server(write_config(DEMO + f"server: {{type: {server_type}}}\n"))
    with rpyc.connect(*proc.address("demo")) as conn:
        add = conn.root.add
        assert [add(i, i) for i in range(3)] == [0, 2, 4]
        connid = dict(conn.root.session())["connection_id"]
    proc.wait_for(f"[{connid} 127.0.0.1:")
    proc.wait_for("disconnected after")
    mine = [line for line in proc.lines if f"[{connid} " in line]
    assert len(mine) == 2, "\n".join(mine)
    opened, closed = mine
    assert re.search(rf"INFO .*: \[{connid} 127\.0\.0\.1:\d+\] connected$", opened), opened
    assert re.search(
        rf"INFO .*: \[{connid} 127\.0\.0\.1:\d+\] disconnected after \d+\.\d\d s: "
        r"\d+ requests, \d+(\.\d)? k?B in, \d+(\.\d)? k?B out \(client closed\)$",
        closed,
    ), closed
    assert not [line for line in proc.lines if "accepted (" in line or "server started on" in line]


def test_a_clean_shutdown_with_clients_connected_logs_no_socket_errors(
    write_config: Callable[[str], Path], start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(write_config(DEMO))
    conn = rpyc.connect(*proc.address("demo"))
    try:
        assert conn.root.ping() == "pong"
        assert proc.stop() == 0
    finally:
        conn.close()
    assert "Bad file descriptor" not in proc.log and "Errno" not in proc.log, proc.log
    assert re.search(r"disconnected after .* \(server stopping\)", proc.log), proc.log


REFUSER = """
import rpyc


@rpyc.service
class Refuser(rpyc.Service):
    def on_connect(self, conn):
        raise RuntimeError("no seats left")

    @rpyc.exposed
    def ping(self):
        return "pong"
"""


@pytest.mark.parametrize("server_type", ["threaded", "threadpool"])
def test_an_on_connect_failure_reaches_a_plain_rpyc_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, server_type: str
) -> None:
    (tmp_path / "refuser_app.py").write_text(REFUSER)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = f"services:\n  seats: {{class: refuser_app:Refuser, port: 0, type: {server_type}}}\n"
    caplog.set_level(logging.DEBUG, logger="rpyc_host.seats")
    attempts = 10
    with running_host(config) as host:
        for _ in range(attempts):  # socket numbers get reused: every client still reads why
            conn = rpyc.connect(*host.address("seats"))
            try:
                with pytest.raises(ConnectionRefusedError) as info:
                    conn.root.ping()
            finally:
                conn.close()
            assert str(info.value).startswith("seats refused the connection: RuntimeError: no seats left")
            gc.collect()  # the half-built server-side connection goes: the next client still reads why
        wait_until(
            lambda: host.refusals.snapshot().get("on_connect") == attempts, 10, "the refusals to be counted"
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert {r.getMessage() for r in warnings} == {
        "refused the connection: on_connect raised RuntimeError: no seats left"
    }
    assert len(warnings) == attempts and not any(r.exc_info for r in warnings)
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno == logging.DEBUG]
    assert len(tracebacks) == attempts


def test_a_mistyped_method_gets_a_suggestion() -> None:
    with running_host(DEMO) as host, rpyc.connect(*host.address("demo")) as conn:
        with pytest.raises(AttributeError) as info:
            conn.root.ad  # noqa: B018
        assert conn.root.add(1, 2) == 3  # the connection is still fine
    assert "cannot access 'ad' (did you mean 'add'?)" in str(info.value)

"""Call contexts across services: deadlines that shrink along a chain of calls, request ids that
follow them, refusal of work whose deadline passed, and nothing changed for plain rpyc peers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rpyc
from rpyc.utils.server import ThreadedServer

import client
from rpyc_host.host import Host
from rpyc_host.testing import running_host, wait_until
from rpyc_host.wire import DeadlineExceeded, context
from tests.helpers import relay_chain

SERVER_TYPES = ["threaded", "threadpool", "forking"]


@pytest.fixture(params=SERVER_TYPES)
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Host, Host, Path]]:
    """Service A (relay) on the given server type calling service B (slow, recording events)."""
    events = tmp_path / "events"
    with relay_chain(events, f"server: {{type: {request.param}, pool_size: 4}}") as (a, b):
        yield a, b, events


def test_a_deadline_holds_through_a_chain_and_b_is_told(chain: tuple[Host, Host, Path]) -> None:
    a, _, events = chain
    with client.connect(host="127.0.0.1", port=a.address("relay")[1]) as conn:
        relay = conn.root.relay
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded), context.deadline(0.2):
            relay(1.0)
        took = time.monotonic() - started
    assert took < 0.6, f"DeadlineExceeded after {took:.2f} s for a 0.2 s deadline"
    # B started at most once (on a loaded machine the deadline may pass before it arrives, and
    # then B refuses it unstarted), and never slept out its second.
    text = events.read_text() if events.exists() else ""
    assert text.count("call-start") <= 1 and "call-end" not in text


def test_request_id_and_remaining_time_flow_downstream(chain: tuple[Host, Host, Path]) -> None:
    a, _, _ = chain
    with client.connect(host="127.0.0.1", port=a.address("ask")[1], timeout=30) as conn:
        ask = conn.root.context_seen
        with context.deadline(5.0, request_id="req-42"):
            request_id, left, (downstream_id, downstream_left) = ask()
    assert request_id == "req-42" and downstream_id == "req-42"
    assert 0 < downstream_left <= left <= 5.0
    # Without a block, every call still carries an id and the connection's timeout.
    with client.connect(host="127.0.0.1", port=a.address("ask")[1], timeout=7) as conn:
        request_id, left, (downstream_id, _) = conn.root.context_seen()
    assert request_id and request_id == downstream_id and 0 < left <= 7


def test_work_whose_deadline_passed_on_arrival_is_not_started(tmp_path: Path) -> None:
    events = tmp_path / "events"
    config = f"""
services:
  slow: {{class: tests.sample_services:SlowService, port: 0, options: {{events: "{events}"}}}}
"""
    with running_host(config) as host:
        port = host.address("slow")[1]
        # A peer whose clock says the deadline already passed: the host refuses, unstarted.
        with rpyc.connect("127.0.0.1", port) as raw:
            expired = (-0.5, None, None, "late-1")
            with pytest.raises(Exception) as caught:
                raw.root.sleep(1.0, **{context.KWARG: expired})
            assert "deadline had passed when it arrived" in str(caught.value)
        # The client library does not even send a call whose deadline has passed.
        with client.connect(host="127.0.0.1", port=port) as conn, context.deadline(0.05) as ctx:
            sleep = conn.root.sleep
            wait_until(ctx.expired, 5, "the 50 ms deadline to pass")
            with pytest.raises(DeadlineExceeded, match="passed before it was sent"):
                sleep(1.0)
        assert not events.exists() or "call-start" not in events.read_text()


@rpyc.service
class _Stock(rpyc.Service):
    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


def test_the_client_sends_no_context_to_a_stock_rpyc_server() -> None:
    server = ThreadedServer(_Stock, hostname="127.0.0.1", port=0, protocol_config={"allow_pickle": False})
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        with client.connect(host="127.0.0.1", port=server.port) as conn:
            assert conn.root.add(2, 3) == 5  # an extra keyword would be a TypeError here
        # Let the server's connection thread see the close before the server closes its socket.
        wait_until(lambda: not server.clients, 10, "the stock server to notice the close")
    finally:
        server.close()
        thread.join(5)
    assert not thread.is_alive()


def test_plain_rpyc_callbacks_never_get_a_context(tmp_path: Path) -> None:
    with running_host("services:\n  demo: {class: services.demo:DemoService, port: 0}\n") as host:
        seen: list[int] = []
        with rpyc.connect(*host.address("demo")) as conn:
            assert conn.root.countdown(3, seen.append) == 3  # list.append takes no keywords
        assert seen == [3, 2, 1]

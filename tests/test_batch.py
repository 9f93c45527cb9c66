"""Batched calls: one request for many calls, outcomes per call, caps, pools and plain peers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import rpyc
from rpyc.core import consts
from rpyc.core.protocol import Connection
from rpyc.utils.server import ThreadedServer

import client
from client.batch import _entry_of
from rpyc_host.testing import running_host
from rpyc_host.wire import context
from tests import sample_services

DEMO = """
services:
  demo: {class: services.demo:DemoService, port: 0}
"""


def requests_served(host: Any) -> int:
    """Requests the demo service's connections have received so far."""
    server = host.hosted[0].server
    return sum(conn._config["host_traffic"].requests for conn in list(server.connections))


def calls_counted(host: Any, method: str) -> tuple[int, int]:
    """(calls, errors) the host's call book holds for the demo service's ``method``."""
    for (service, name), stats in host.calls.items():
        if service == "demo" and name.removeprefix("exposed_") == method:
            return stats.calls, stats.errors
    return 0, 0


def test_a_batch_of_1000_adds_is_one_request_with_results_in_order() -> None:
    config = DEMO + "metrics: {enabled: true, port: 0}\n"
    with running_host(config) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        _entry_of(conn)  # the one lookup of the entry point, cached for the connection
        before = requests_served(host)
        with client.batch(conn) as b:
            results = [b.root.add(i, i) for i in range(1000)]
        assert requests_served(host) - before <= 2  # the batch call (and a netref release at most)
        assert [r.value for r in results] == [2 * i for i in range(1000)]
        assert all(r.ok and r.error is None for r in results)
        with client.batch(conn) as b:
            b.root.add(1, "x")
        assert calls_counted(host, "add") == (1001, 1)  # each batched call is counted as its method


def test_failing_calls_fail_alone_with_their_own_type_and_message() -> None:
    with running_host(DEMO) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        with client.batch(conn) as b:
            first = b.root.add(1, 2)
            bad = b.root.add(1, "x")
            echo_bad = b.root.echo(5)
            last = b.root.echo(text="still runs")
        assert first.value == 3 and last.value == "still runs"
        assert not bad.ok and type(bad.error) is TypeError
        assert str(bad.error) == "add(a, b): b must be a number, got str"
        with pytest.raises(TypeError, match="echo\\(text\\): text must be a str, got int"):
            _ = echo_bad.value
        for result in (bad, echo_bad):
            assert "Traceback" not in str(result.error) and "Traceback" not in repr(result.error)
            assert "File " not in getattr(result.error, "_remote_tb", "")
            assert client.is_remote(result.error)


def test_a_non_exposed_name_is_refused_for_that_call_only() -> None:
    with running_host(DEMO) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        with client.batch(conn) as b:
            hidden = b.call("_count")
            hook = b.root.on_connect(None)
            typo = b.root.ad(1, 2)
            fine = b.root.ping()
        assert fine.value == "pong"
        for result in (hidden, hook, typo):
            assert type(result.error) is AttributeError
        assert "cannot access '_count'" in str(hidden.error)
        assert "did you mean 'add'" in str(typo.error)
        assert dict(conn.root.session())["calls"] == 2  # ping and session: nothing hidden ran


def test_a_batch_over_max_batch_calls_is_refused_whole_naming_the_limit() -> None:
    config = DEMO + "limits: {max_batch_calls: 5}\n"
    with running_host(config) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        b = client.batch(conn)
        results = [b.root.add(i, i) for i in range(6)]
        with pytest.raises(
            ValueError, match=r"a batch of 6 calls is more than limits.max_batch_calls allows \(5\)"
        ):
            b.flush()
        assert all(isinstance(r.error, ValueError) for r in results)
        assert dict(conn.root.session())["calls"] == 1  # none of the six ran
        assert host.hosted[0].server.ledger.refusal_counts() == {"max_batch_calls": 1}
        with client.batch(conn) as ok:
            five = [ok.root.add(i, 1) for i in range(5)]
        assert [r.value for r in five] == [1, 2, 3, 4, 5]


def test_a_passed_deadline_stops_the_remaining_calls() -> None:
    config = "services:\n  slow: {class: tests.sample_services:SlowService, port: 0}\n"
    with running_host(config) as host, client.connect(host="127.0.0.1", port=host.address("slow")[1]) as conn:
        b = client.batch(conn)
        first = b.root.sleep(0.5)
        rest = [b.root.add(i, i) for i in range(3)]
        with client.deadline(0.3), pytest.raises(client.DeadlineExceeded):
            b.flush()  # the client stops waiting at its deadline
        # The server finished the sleep, then refused the rest; the next call reads its reply
        # only after that one, so the connection stays usable.
        assert conn.root.add(2, 2) == 4
        assert all(isinstance(r.error, client.DeadlineExceeded) for r in [first, *rest])


def test_the_server_reports_each_call_after_a_deadline_as_deadline_exceeded() -> None:
    config = "services:\n  slow: {class: tests.sample_services:SlowService, port: 0}\n"
    with running_host(config) as host, client.connect(host="127.0.0.1", port=host.address("slow")[1]) as conn:
        calls = (("sleep", (0.4,), ()), ("add", (1, 2), ()), ("add", (3, 4), ()))
        outcomes = _with_server_deadline(conn, _entry_of(conn), calls, 0.2)
        assert outcomes[0][0] is True
        assert [ok for ok, _ in outcomes[1:]] == [False, False]
        for _, raw in outcomes[1:]:
            assert raw[0] == ("rpyc_host.wire.errors", "DeadlineExceeded")


def _with_server_deadline(conn: Any, entry: Any, calls: Any, seconds: float) -> Any:
    """The raw outcomes of ``calls`` sent with a call context whose deadline is ``seconds`` away,
    read by waiting up to 10 s (rpyc's own request, past the client's deadline handling)."""
    ctx = context.CallContext().narrowed(seconds)
    kwargs = ((context.KWARG, ctx.to_wire()),)
    res = Connection.async_request(conn, consts.HANDLE_CALL, entry, (calls,), kwargs)
    res.set_expiry(10)
    return res.value


def test_batches_keep_working_for_netref_results_and_list_arguments() -> None:
    with running_host(DEMO) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        with client.batch(conn) as b:
            counter = b.root.new_counter(10)
            listed = b.root.add(1.5, 2)
        assert counter.value.increment(5) == 15  # a live object, usable after the batch
        assert listed.value == 3.5


@pytest.fixture
def pool_hosts() -> Iterator[tuple[Any, Any]]:
    config = "services:\n  flaky: {class: tests.sample_services:StallFirstService, port: 0}\n"
    sample_services.STALL_RELEASE.clear()
    if sample_services._STALLED.locked():  # an earlier test stalled already: the next one stalls
        sample_services._STALLED.release()
    try:
        with running_host(config) as one, running_host(config) as two:
            yield one, two
    finally:
        sample_services.STALL_RELEASE.set()


def _pool(one: Any, two: Any, **options: Any) -> client.ServicePool:
    target = f"static:127.0.0.1:{one.address('flaky')[1]},127.0.0.1:{two.address('flaky')[1]}"
    return client.connect_service(target, timeout=1.0, **options)


def test_a_pool_batch_goes_to_one_instance(pool_hosts: tuple[Any, Any]) -> None:
    one, two = pool_hosts
    with _pool(one, two) as pool:
        with pool.batch() as b:
            results = [b.root.add(i, 1) for i in range(100)]
        assert [r.value for r in results] == list(range(1, 101))
        assert sorted(pool.stats().values()) == [0, 1]  # one instance answered the whole batch


def test_a_pool_retries_a_failed_batch_only_when_every_method_is_idempotent(
    pool_hosts: tuple[Any, Any],
) -> None:
    one, two = pool_hosts
    # stall_first is not idempotent: the batch is not retried.
    with _pool(one, two, idempotent={"add"}) as pool, pytest.raises(TimeoutError), pool.batch() as b:
        b.root.add(1, 1)
        b.root.stall_first()
    sample_services.STALL_RELEASE.set()
    sample_services._STALLED.release()  # the next stall_first stalls again
    sample_services.STALL_RELEASE.clear()
    try:
        with _pool(one, two, idempotent={"add", "stall_first"}) as pool:
            with pool.batch() as b:
                added = b.root.add(1, 1)
                stalled = b.root.stall_first()
            assert (added.value, stalled.value) == (2, "done")  # the second instance answered
            assert sorted(pool.stats().values()) == [0, 1]
    finally:
        sample_services.STALL_RELEASE.set()


@rpyc.service
class PlainService(rpyc.Service):
    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b

    @rpyc.exposed
    def div(self, a: int, b: int) -> float:
        return a / b


@contextmanager
def plain_rpyc_server() -> Iterator[int]:
    server = ThreadedServer(PlainService, hostname="127.0.0.1", port=0)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        server.close()
        thread.join(10)


def test_against_a_plain_rpyc_server_the_calls_are_pipelined() -> None:
    with plain_rpyc_server() as port, client.connect(host="127.0.0.1", port=port) as conn:
        with client.batch(conn) as b:
            results = [b.root.add(i, i) for i in range(500)]
            zero = b.root.div(1, 0)
            missing = b.root.nope()
        assert _entry_of(conn) is None
        assert [r.value for r in results] == [2 * i for i in range(500)]
        assert isinstance(zero.error, ZeroDivisionError)
        assert isinstance(missing.error, AttributeError)


def test_plain_rpyc_clients_are_unaffected() -> None:
    with running_host(DEMO) as host:
        conn = rpyc.connect("127.0.0.1", host.address("demo")[1])
        try:
            assert conn.root.add(1, 2) == 3
            with pytest.raises(TypeError):
                conn.root.add(1, "x")
            names = [m for m, _, _ in conn.root.describe()[1]]
            assert "rpyc_host_batch" not in names and "add" in names
            # A plain rpyc client may use the entry point too: outcomes are plain tuples.
            outcomes = conn.root.rpyc_host_batch((("add", (1, 2), ()), ("add", (1, "x"), ())))
            assert outcomes[0] == (True, 3)
            assert outcomes[1][0] is False and outcomes[1][1][0] == ("builtins", "TypeError")
            with client.batch(conn) as b:  # client.batch on a plain rpyc connection
                r = b.root.add(2, 3)
            assert r.value == 5
        finally:
            conn.close()


def test_malformed_batches_are_refused_with_what_was_wrong() -> None:
    with running_host(DEMO) as host:
        conn = rpyc.connect("127.0.0.1", host.address("demo")[1])
        try:
            with pytest.raises(TypeError, match="takes one tuple"):
                conn.root.rpyc_host_batch([("add", (1, 2), ())])  # a list travels by reference
            outcomes = conn.root.rpyc_host_batch((("add", [1, 2], ()), ("rpyc_host_batch", ((),), ())))
            assert outcomes[0][0] is False and "triple" in outcomes[0][1][1][0]
            assert outcomes[1][0] is False and "cannot contain another batch" in outcomes[1][1][1][0]
        finally:
            conn.close()


def test_a_result_before_the_flush_says_so() -> None:
    with running_host(DEMO) as host, client.connect(host="127.0.0.1", port=host.address("demo")[1]) as conn:
        b = client.batch(conn)
        pending = b.root.add(1, 2)
        assert not pending.ok and pending.error is None
        with pytest.raises(RuntimeError, match="not been sent"):
            _ = pending.value
        with pytest.raises(KeyError), client.batch(conn) as dropped:
            never = dropped.root.add(1, 1)
            raise KeyError("leaves the block")
        assert not dropped.sent and not never.ok

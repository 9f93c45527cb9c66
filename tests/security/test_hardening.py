"""Object-graph escapes and parameter abuse."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rpyc
from rpyc.core import consts
from rpyc.core.netref import syncreq

from rpyc_host.host import Host
from rpyc_host.testing import running_host

CONFIG = """
services:
  demo: {class: services.demo:DemoService, port: 0}
  inspect: {class: tests.sample_services:InspectService, port: 0}
"""


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with running_host(CONFIG) as h:
        yield h


@pytest.fixture
def conn(host: Host) -> Iterator[Any]:
    c = rpyc.connect(*host.address("demo"))
    yield c
    c.close()


@pytest.fixture
def bystander(host: Host) -> Iterator[Any]:
    """Another client whose connection must survive every refusal."""
    c = rpyc.connect(*host.address("demo"))
    yield c
    assert c.root.add(1, 1) == 2
    c.close()


ESCAPES: dict[str, Callable[[Any], Any]] = {
    "root._conn": lambda root: root._conn,
    "root.__dict__": lambda root: root.__dict__,
    "root.__class__.__mro__ via getattr": lambda root: root.__getattr__("__class__"),
    "root.describe.__globals__": lambda root: root.describe.__globals__,
    "root.on_connect": lambda root: root.on_connect,
    "root._connid": lambda root: root._connid,
    "root.exposed_echo.__code__": lambda root: root.exposed_echo.__code__,
    "counter._value": lambda root: root.new_counter()._value,
    "counter.increment.__globals__": lambda root: root.new_counter().increment.__globals__,
    "setattr on root": lambda root: setattr(root, "greeting", "hacked"),
    "delattr on root": lambda root: delattr(root, "greeting"),
}


@pytest.mark.parametrize("attempt", list(ESCAPES), ids=list(ESCAPES))
def test_object_graph_escape_is_refused(attempt: str, conn: Any, bystander: Any) -> None:
    with pytest.raises(AttributeError):
        ESCAPES[attempt](conn.root)
    assert conn.root.ping() == "pong"  # the refusal did not close this connection either
    assert bystander.root.echo("still here") == "still here"


def test_netref_dunders_are_local_to_the_client(conn: Any) -> None:
    # root.__init__ is the client's own proxy method: its globals are the client's rpyc module,
    # nothing of the server's.
    assert conn.root.__init__.__globals__["__name__"] == "rpyc.core.netref"


def test_exposed_prefix_reaches_only_the_same_exposed_method(conn: Any) -> None:
    assert conn.root.exposed_echo("x") == conn.root.echo("x") == "x"
    with pytest.raises(AttributeError):
        conn.root.exposed__count()


def test_dir_shows_only_exposed_names(conn: Any) -> None:
    names = set(dir(conn.root))
    exposed = {
        "add",
        "count",
        "countdown",
        "describe",
        "health",
        "echo",
        "new_counter",
        "ping",
        "session",
        "get_service_aliases",
        "get_service_name",
        "rpyc_host_context",  # the marker telling the client library this peer takes call contexts
        "rpyc_host_context_text",  # and in their compact form
        "rpyc_host_batch",  # the batch entry point: many calls in one request
        "log_event",
        "events",
    }
    assert exposed <= names
    leaked = {n for n in names if not n.startswith("__")} - exposed
    assert leaked == set()
    assert "on_connect" not in names and "_connid" not in names and "greeting" not in names


def test_pickle_payloads_are_refused(conn: Any, bystander: Any) -> None:
    # What pickle.dumps(netref) asks the server for; refused there.
    with pytest.raises(ValueError, match="pickling is disabled"):
        syncreq(conn.root, consts.HANDLE_PICKLE, pickle.HIGHEST_PROTOCOL)
    # And the host never pickles a client's object: its netrefs refuse to be pickled.
    with pytest.raises(TypeError, match="refusing to pickle a remote object"):
        pickle.dumps(conn.root.new_counter())
    # A pickle crafted by a client is just bytes to the server: it never unpickles arguments.
    evil = pickle.dumps(ValueError("boom"))
    assert conn.root.echo.__call__ is not None
    with pytest.raises(TypeError):
        conn.root.echo(evil)  # echo takes str only; the bytes stay bytes


def test_netref_smuggled_back_as_an_argument_is_refused(host: Host, bystander: Any) -> None:
    with rpyc.connect(*host.address("inspect")) as c:
        with pytest.raises(TypeError, match="one of this server's own objects passed back"):
            c.root.kinds(c.root.describe)
        with pytest.raises(TypeError, match="one of this server's own objects passed back"):
            c.root.kinds(x=(1, c.root.echo))
        assert c.root.kinds(1, "a", b"b", (1, 2)) == ("int", "str", "bytes", "tuple")


def test_client_lists_and_dicts_arrive_as_local_copies(host: Host) -> None:
    with rpyc.connect(*host.address("inspect")) as c:
        assert c.root.kinds([1, 2], {"a": [3]}, {4}) == ("list", "dict", "set")
        assert c.root.total(list(range(100))) == 4950
        assert c.root.show([1, [2, {"k": (3,)}]]) == "[1, [2, {'k': (3,)}]]"


def test_callbacks_stay_remote(conn: Any) -> None:
    seen: list[int] = []
    assert conn.root.countdown(3, seen.append) == 3
    assert seen == [3, 2, 1]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


PARAMETER_ABUSE: dict[str, tuple[str, tuple[Any, ...], type[BaseException]]] = {
    "add wrong types": ("add", ("1", 2), TypeError),
    "add bools": ("add", (True, 2), TypeError),
    "echo bytes": ("echo", (b"x",), TypeError),
    "echo int": ("echo", (5,), TypeError),
    "countdown negative": ("countdown", (-1, print), ValueError),
    "countdown huge": ("countdown", (10**9, print), ValueError),
    "countdown not callable": ("countdown", (3, 5), TypeError),
    "new_counter str": ("new_counter", ("0",), TypeError),
    "too many args": ("ping", (1, 2, 3), TypeError),
}


@pytest.mark.parametrize("case", list(PARAMETER_ABUSE), ids=list(PARAMETER_ABUSE))
def test_demo_parameter_abuse_gets_a_clear_error(case: str, conn: Any, bystander: Any) -> None:
    method, args, error = PARAMETER_ABUSE[case]
    with pytest.raises(error) as info:
        getattr(conn.root, method)(*args)
    assert "Traceback (most recent call last)" not in str(info.value)
    assert "<traceback denied>" in str(info.value)
    assert conn.root.ping() == "pong"


def test_huge_strings_and_deep_nesting(host: Host, conn: Any, bystander: Any) -> None:
    big = "x" * (8 * 1024 * 1024)
    assert conn.root.echo(big) == big
    with rpyc.connect(*host.address("inspect")) as c:
        with pytest.raises(ValueError, match="nested deeper than 32 levels"):
            c.root.kinds(nested(40))
        deep_tuple: Any = ()
        for _ in range(40):
            deep_tuple = (deep_tuple,)
        assert c.root.kinds(deep_tuple) == ("tuple",)  # plain tuples are values, not references
        assert c.root.ping() if hasattr(c.root, "ping") else True


def test_unexpected_errors_are_logged_with_their_traceback_but_not_sent(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    with rpyc.connect(*host.address("inspect")) as c, pytest.raises(ZeroDivisionError) as info:
        c.root.boom()
    assert "<traceback denied>" in str(info.value)
    assert "Traceback" in caplog.text and "call failed: ZeroDivisionError" in caplog.text

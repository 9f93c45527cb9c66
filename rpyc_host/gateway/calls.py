"""What the gateway can call, and how a call crosses to the service over rpyc.

- :class:`Catalog`: every exposed method of the listed services as ``<service>.<method>``, with
  its signature (for ``-32602`` checks and introspection) and docstring, read from the served
  classes once at start-up.
- :class:`Session`: the rpyc connections one HTTP connection uses, one per service, opened on
  first use through :func:`client.connect` to the service's own listener, so ``on_connect``,
  per-connection state (the file service's current directory), limits and authentication apply
  exactly as for a Python client.
- :class:`RPCError`: a call that failed, with the JSON-RPC code both protocols report.

Values: arguments arrive as JSON or XML-RPC values; lists become tuples (rpyc would pass a list
by reference, one round trip per element). Results must be plain values: tuples (and lists or
dicts a service returns by reference) are copied, and anything else that arrives as a NetRef (a
live object, a callback) fails that one call with a clear message.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rpyc.core.netref import BaseNetref

from ..exposure import describe_class, exposed_methods

log = logging.getLogger("rpyc_host.gateway")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000  # the method raised: data carries the exception type
UNAVAILABLE = -32001  # the service could not be reached
NOT_TRANSFERABLE = -32002  # the result holds a live object that cannot cross HTTP

# Copying a by-reference container costs a round trip per element; past this it is refused.
MAX_COPIED_ITEMS = 100_000
_CONTAINERS = {"builtins.list": list, "builtins.tuple": tuple, "builtins.dict": dict, "builtins.set": list}


class RPCError(Exception):
    """A call that failed: ``code`` (JSON-RPC numbering, also the XML-RPC faultCode), a message
    for the caller, and for server errors the exception type name as ``kind``."""

    def __init__(self, code: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind


@dataclass(frozen=True)
class Method:
    """One callable: ``service.name``, its signature without ``self``, its docstring."""

    service: str
    name: str
    signature: inspect.Signature | None
    doc: str
    display: str  # the signature as describe() shows it

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"

    def check_params(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """RPCError(-32602) if the arguments do not fit the signature."""
        if self.signature is None:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise RPCError(INVALID_PARAMS, f"{self.full_name}{self.display}: {exc}") from None


class Catalog:
    """The exposed methods of the listed services, by ``service.method``."""

    def __init__(self, classes: Iterable[tuple[str, type]]) -> None:
        self.methods: dict[str, Method] = {}
        for service, cls in classes:
            displays = {name: sig for name, sig, _ in describe_class(cls)[1]}
            for name, member in exposed_methods(cls).items():
                method = Method(
                    service, name, _signature(member), inspect.getdoc(member) or "", displays[name]
                )
                self.methods[method.full_name] = method

    def get(self, name: str) -> Method:
        method = self.methods.get(name)
        if method is None:
            raise RPCError(METHOD_NOT_FOUND, f"no method {name!r}{_suggest(name, self.methods)}")
        return method


def _signature(member: Callable[..., Any]) -> inspect.Signature | None:
    try:
        sig = inspect.signature(member)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        sig = sig.replace(parameters=params[1:])
    return sig


def _suggest(name: str, known: Iterable[str]) -> str:
    from ..errors import did_you_mean

    return did_you_mean(name, known) or "; system.listMethods lists them"


# -- values ----------------------------------------------------------------------------------------


def to_call_value(value: Any) -> Any:
    """A decoded JSON / XML-RPC argument as rpyc should carry it: lists become tuples."""
    if isinstance(value, list):
        return tuple(to_call_value(v) for v in value)
    if isinstance(value, dict):
        return {k: to_call_value(v) for k, v in value.items()}
    return value


def plain_result(value: Any, where: str) -> Any:
    """A result with every NetRef resolved: containers copied, live objects refused."""
    if isinstance(value, BaseNetref):
        name_pack = object.__getattribute__(value, "____id_pack__")[0]
        kind = _CONTAINERS.get(name_pack)
        if kind is None:
            shown = name_pack.rsplit(".", 1)[-1]
            raise RPCError(
                NOT_TRANSFERABLE,
                f"{where} returned a live object ({shown}) that cannot cross XML-RPC or JSON-RPC; "
                "only plain values can (str, bytes, numbers, bool, None, tuples, lists, dicts); "
                "use rpyc to work with live objects",
                kind="NotTransferable",
            )
        if len(value) > MAX_COPIED_ITEMS:
            raise RPCError(
                NOT_TRANSFERABLE,
                f"{where} returned a {shown_of(name_pack)} of {len(value)} items by reference; "
                f"the gateway copies at most {MAX_COPIED_ITEMS}; return a tuple",
                kind="NotTransferable",
            )
        value = kind(value.items()) if kind is dict else kind(value)
    if isinstance(value, tuple | list):
        return [plain_result(v, where) for v in value]
    if isinstance(value, dict):
        return {str(plain_result(k, where)): plain_result(v, where) for k, v in value.items()}
    return value


def shown_of(name_pack: str) -> str:
    return name_pack.rsplit(".", 1)[-1]


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """``(type name, message)`` of an exception raised by a service, without any traceback.

    rpyc re-raises a service's exception locally as a subclass whose ``str()`` appends the remote
    traceback; the message is built from ``args`` instead.
    """
    cls = type(exc)
    name = cls.__name__.rsplit(".", 1)[-1]  # a service's own exception arrives as "module.Class"
    if isinstance(exc, OSError) and exc.strerror:
        return name, str(exc.strerror)
    args = exc.args
    if len(args) == 1:
        return name, str(args[0])
    return name, ", ".join(str(a) for a in args) if args else name


# -- sessions --------------------------------------------------------------------------------------


Connector = Callable[[str], Any]


class Session:
    """The backend rpyc connections of one HTTP connection; see the module docstring.

    Not shared between threads: one HTTP connection is served by one thread at a time.
    """

    def __init__(self, catalog: Catalog, connector: Connector) -> None:
        self.catalog = catalog
        self._connect = connector
        self._conns: dict[str, Any] = {}
        self._bound: dict[str, Any] = {}

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``service.method`` and return its result as plain values.

        Raises:
            RPCError: unknown method (-32601), arguments that do not fit (-32602), the service
                raised (-32000, with the exception type), could not be reached (-32001), or
                returned a live object (-32002).
        """
        method = self.catalog.get(name)
        args = tuple(to_call_value(a) for a in args)
        kwargs = {k: to_call_value(v) for k, v in kwargs.items()}
        method.check_params(args, kwargs)
        bound = self._bound.get(name)
        if bound is None:
            bound = getattr(self._connection(method.service).root, method.name)
            self._bound[name] = bound
        try:
            result = bound(*args, **kwargs)
        except (EOFError, ConnectionError, TimeoutError) as exc:
            # The connection is gone or stuck: drop it so the next call reconnects. The call
            # itself is not retried (it may have run).
            self._drop(method.service)
            kind, message = describe_exception(exc)
            if isinstance(exc, TimeoutError):
                raise RPCError(SERVER_ERROR, f"{name}: no reply in time ({message})", kind) from None
            raise RPCError(UNAVAILABLE, f"{name}: connection to the service lost ({message})", kind) from None
        except Exception as exc:
            kind, message = describe_exception(exc)
            raise RPCError(SERVER_ERROR, message, kind) from None
        return plain_result(result, name)

    def _connection(self, service: str) -> Any:
        conn = self._conns.get(service)
        if conn is not None and not conn.closed:
            return conn
        try:
            conn = self._connect(service)
        except Exception as exc:
            kind, message = describe_exception(exc)
            raise RPCError(UNAVAILABLE, f"service {service!r} is unavailable: {message}", kind) from None
        self._conns[service] = conn
        return conn

    def _drop(self, service: str) -> None:
        conn = self._conns.pop(service, None)
        for key in [k for k in self._bound if k.startswith(service + ".")]:
            del self._bound[key]
        if conn is not None:
            _close_quietly(conn)

    def close(self) -> None:
        """Close every backend connection (runs the services' ``on_disconnect``)."""
        self._bound.clear()
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        log.debug("closing a backend connection failed", exc_info=True)

"""What the gateway can call, the value rules, and the error codes.

- :class:`Catalog`: every exposed method of the listed services as ``<service>.<method>``, with
  its signature (for ``-32602`` checks and introspection) and docstring, read from the served
  classes once at start-up.
- :class:`Session`: what one HTTP connection uses to reach the services, one link per service
  opened on first use (see :mod:`.links`), so ``on_connect``, per-connection state (the file
  service's current directory), limits and authentication apply exactly as for an rpyc client.
- :class:`RPCError`: a call that failed, with the JSON-RPC code both protocols report.

Values: arguments arrive as JSON or XML-RPC values; lists become tuples (what an rpyc client's
lists turn into on the server), nested at most :data:`MAX_DEPTH` deep. Results must be plain
values: tuples, lists, sets and dicts are copied (over rpyc, lists and dicts a service returns
by reference too), and anything else (a live object, a callback) fails that one call with a
clear message.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rpyc.core.netref import BaseNetref

from ..exposure import describe_class, exposed_methods
from ..wire import context

log = logging.getLogger("rpyc_host.gateway")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000  # the method raised: data carries the exception type
UNAVAILABLE = -32001  # the service could not be reached
NOT_TRANSFERABLE = -32002  # the result holds a live object that cannot cross HTTP
DEADLINE_EXCEEDED = -32003  # the request's deadline (X-Request-Timeout, grpc-timeout) passed

# Copying a by-reference container costs a round trip per element; past this it is refused.
MAX_COPIED_ITEMS = 100_000
_CONTAINERS = {"builtins.list": list, "builtins.tuple": tuple, "builtins.dict": dict, "builtins.set": list}
# Exact types that cross as they are (as rpyc's brine carries them; subclasses do not).
_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})
MAX_DEPTH = 32  # arguments: as deep as the host copies an rpyc client's containers
MAX_RESULT_DEPTH = 100


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
    _positional: tuple[int, float] | None = field(init=False, repr=False, compare=False)

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_positional", _positional_range(self.signature))

    def check_params(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """RPCError(-32602) if the arguments do not fit the signature."""
        if self.signature is None:
            return
        fits = self._positional
        if fits is not None and not kwargs and fits[0] <= len(args) <= fits[1]:
            return  # the common case, without Signature.bind's cost
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


def _positional_range(sig: inspect.Signature | None) -> tuple[int, float] | None:
    """``(fewest, most)`` positional arguments that bind, when no keyword-only one is required."""
    if sig is None:
        return None
    fewest, most = 0, 0.0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            most += 1
            if p.default is p.empty:
                fewest += 1
        elif p.kind is p.VAR_POSITIONAL:
            most = float("inf")
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None
    return fewest, most


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


def to_call_value(value: Any, depth: int = 0) -> Any:
    """A decoded JSON / XML-RPC argument as the service should get it: lists become tuples.

    Raises:
        RPCError: -32602 for arguments nested deeper than MAX_DEPTH.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if depth >= MAX_DEPTH:
        raise RPCError(
            INVALID_PARAMS, f"arguments nested deeper than {MAX_DEPTH} levels (the gateway's limit)"
        )
    if kind is list or kind is tuple:
        return tuple([to_call_value(v, depth + 1) for v in value])
    if kind is dict:
        return {k: to_call_value(v, depth + 1) for k, v in value.items()}
    return value


def plain_result(value: Any, where: str, depth: int = 0) -> Any:
    """A result as plain values: containers copied (a NetRef one too), live objects refused."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if depth >= MAX_RESULT_DEPTH:
        raise RPCError(
            INTERNAL_ERROR, f"{where} returned values nested deeper than {MAX_RESULT_DEPTH} levels"
        )
    if isinstance(value, BaseNetref):
        value = _copy_netref(value, where)
        kind = type(value)
    if kind is tuple or kind is list or kind is set or kind is frozenset:
        return [plain_result(v, where, depth + 1) for v in value]
    if kind is dict:
        return {
            str(plain_result(k, where, depth + 1)): plain_result(v, where, depth + 1)
            for k, v in value.items()
        }
    if kind is complex:
        return value  # refused by the encoders with their own message (-32603)
    raise _live_object(where, kind.__name__)


def _copy_netref(value: Any, where: str) -> Any:
    name_pack = object.__getattribute__(value, "____id_pack__")[0]
    kind = _CONTAINERS.get(name_pack)
    if kind is None:
        raise _live_object(where, shown_of(name_pack))
    if len(value) > MAX_COPIED_ITEMS:
        raise RPCError(
            NOT_TRANSFERABLE,
            f"{where} returned a {shown_of(name_pack)} of {len(value)} items by reference; "
            f"the gateway copies at most {MAX_COPIED_ITEMS}; return a tuple",
            kind="NotTransferable",
        )
    return kind(value.items()) if kind is dict else kind(value)


def _live_object(where: str, shown: str) -> RPCError:
    return RPCError(
        NOT_TRANSFERABLE,
        f"{where} returned a live object ({shown}) that cannot cross XML-RPC or JSON-RPC; "
        "only plain values can (str, bytes, numbers, bool, None, tuples, lists, dicts); "
        "use rpyc to work with live objects",
        kind="NotTransferable",
    )


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


class Link(Protocol):
    """One HTTP connection's way into one service (in-process, or an rpyc connection)."""

    def call(self, method: Method, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...

    def close(self) -> None: ...


Opener = Callable[[str], Link]


class Session:
    """The links of one HTTP connection, one per service it has called; see the module docstring.

    Not shared between threads: one HTTP connection is served by one thread at a time.
    """

    def __init__(self, catalog: Catalog, opener: Opener) -> None:
        self.catalog = catalog
        self._open = opener
        self._links: dict[str, Link] = {}
        self.authenticated = False  # a token was accepted on this connection
        self.deadline_hit = False  # a call of the request being served ran out of time
        # The W3C trace context headers of the request being served (for tracing spans).
        self.trace: tuple[str | None, str | None] = (None, None)

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``service.method`` and return its result as plain values.

        Raises:
            RPCError: unknown method (-32601), arguments that do not fit (-32602), the service
                raised (-32000, with the exception type), could not be reached (-32001), or
                returned a live object (-32002).
        """
        method = self.catalog.get(name)
        ctx = context.current()
        if ctx is not None and ctx.expired():
            self.deadline_hit = True
            raise RPCError(
                DEADLINE_EXCEEDED,
                f"{name}: the request's deadline passed before the call",
                "DeadlineExceeded",
            )
        for arg in args:
            if type(arg) not in _SCALARS:  # scalars cross as they are: no copy for them
                args = tuple([to_call_value(a) for a in args])
                break
        if kwargs:
            kwargs = {k: to_call_value(v) for k, v in kwargs.items()}
        method.check_params(args, kwargs)
        link = self._links.get(method.service)
        if link is None:
            link = self._links[method.service] = self._open(method.service)
        try:
            result = link.call(method, args, kwargs)
        except RPCError as exc:
            if exc.kind == "DeadlineExceeded":
                self.deadline_hit = True
                exc.code = DEADLINE_EXCEEDED
            if getattr(link, "broken", False):
                self.drop(method.service)
            raise
        return result if type(result) in _SCALARS else plain_result(result, name)

    def drop(self, service: str) -> None:
        """Forget a service's link (it broke): the next call opens a new one."""
        link = self._links.pop(service, None)
        if link is not None:
            _close_quietly(link)

    def close(self) -> None:
        """Close every link (runs the services' ``on_disconnect``, gives back their slots)."""
        links, self._links = list(self._links.values()), {}
        for link in links:
            _close_quietly(link)


def _close_quietly(link: Link) -> None:
    try:
        link.close()
    except Exception:
        log.warning("closing a gateway session failed", exc_info=True)

"""Turn a configured ``module:Class`` into the rpyc service the host serves.

- an ``rpyc.Service`` subclass is served as written;
- any other class is wrapped: its public methods (names not starting with ``_``) become exposed
  methods, like XML-RPC's ``register_instance``;
- every served class gets ``describe()`` (name, exposed methods, signatures, first doc line).

Options from the config go to the class's constructor once, at start-up. Each connection is
then served by a shallow copy of that instance: attributes set in ``__init__`` are shared by
all connections (stores, limits), those set in ``on_connect`` belong to the connection.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

import rpyc

from .errors import ConfigError, did_you_mean
from .protocol import HostConnection
from .wire import context

# rpyc.Service exposes these itself; describe() lists the service's own methods.
_RPYC_BUILTINS = {"get_service_aliases", "get_service_name"}
EXPOSED_PREFIX = "exposed_"


def import_class(class_path: str, path: str) -> type:
    """Import ``module:Class``; ConfigError at ``path`` if it is not importable or not a class."""
    module_name, sep, attr = class_path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{class_path!r} is not of the form 'module:Class' (for example 'services.demo:DemoService')",
            path=path,
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} for {class_path!r}: {exc}", path=path
        ) from None
    except Exception as exc:  # a broken user module: say what it raised
        raise ConfigError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}", path=path
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"{module_name!r} has no attribute {part!r}{did_you_mean(part, names)}", path=path
            )
        obj = getattr(obj, part)
    if not inspect.isclass(obj):
        raise ConfigError(f"{class_path!r} is a {type(obj).__name__}, not a class", path=path)
    return obj


def exposed_methods(cls: type) -> dict[str, Callable[..., Any]]:
    """The callables a client may call on ``cls``, by the name clients use."""
    found: dict[str, Callable[..., Any]] = {}
    for name in dir(cls):
        if name.startswith(EXPOSED_PREFIX):
            public = name[len(EXPOSED_PREFIX) :]
            member = getattr(cls, name)
            if public not in _RPYC_BUILTINS and callable(member):
                found[public] = member
    return dict(sorted(found.items()))


def describe_class(cls: type) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    """``(service name, ((method, signature, first doc line), ...))``, all plain values."""
    methods = []
    for name, member in exposed_methods(cls).items():
        try:
            try:
                sig = inspect.signature(member, eval_str=True)
            except Exception:  # an annotation that does not evaluate: show it as written
                sig = inspect.signature(member)
            params = list(sig.parameters.values())
            if params and params[0].name == "self":
                sig = sig.replace(parameters=params[1:])
            signature = str(sig).replace("typing.", "").replace("collections.abc.", "")
        except (TypeError, ValueError):
            signature = "(...)"
        doc = (inspect.getdoc(member) or "").strip().splitlines()
        methods.append((name, signature, doc[0] if doc else ""))
    name = cls.get_service_name() if issubclass(cls, rpyc.Service) else cls.__name__.upper()  # type: ignore[attr-defined]
    return name, tuple(methods)


def _exposed_describe(self: rpyc.Service) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    """Describe this service: its name and exposed methods with signatures and summaries."""
    return describe_class(type(self))


def _exposed_health(self: rpyc.Service) -> tuple[tuple[str, Any], ...]:
    """Status and uptime of this service: (("status", "ok"), ("uptime", seconds), ...)."""
    status, detail = "ok", ""
    check = getattr(self, "check_health", None)
    if callable(check):
        try:
            healthy = check()
        except Exception as exc:  # a failing check is an answer, not a crash
            healthy, detail = False, f"{type(exc).__name__}: {exc}"
        status = "ok" if healthy else "degraded"
    started = getattr(self, "_host_started_at", None) or time.time()
    return (
        ("status", status),
        ("uptime", round(time.time() - started, 3)),
        ("service", type(self).get_service_name()),
        ("detail", detail),
    )


def wrap_plain_class(cls: type) -> type[rpyc.Service]:
    """Serve an ordinary class: one instance, built from the options, behind an rpyc Service."""

    def __init__(self: Any, **options: Any) -> None:
        self._target = cls(**options)

    namespace: dict[str, Any] = {
        "__init__": __init__,
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
        "_plain_class": cls,
    }
    # Constructor checks (unknown options) follow the wrapped class's signature.
    namespace["__signature__"] = inspect.signature(cls)
    for name, member in inspect.getmembers(cls, callable):
        if name.startswith("_") or inspect.isclass(member):
            continue
        namespace[EXPOSED_PREFIX + name] = _delegate(name, member)
    return type(cls.__name__, (rpyc.Service,), namespace)


def _delegate(name: str, member: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(member)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._target, name)(*args, **kwargs)

    return call


def prepare_class(cls: type) -> type[rpyc.Service]:
    """The class the host instantiates: ``cls`` (wrapped if plain) plus describe()."""
    base = cls if issubclass(cls, rpyc.Service) else wrap_plain_class(cls)
    namespace: dict[str, Any] = {
        "_protocol": HostConnection,
        "__module__": base.__module__,
        "__doc__": base.__doc__,
    }
    # Tells the client library this peer takes call contexts off (rpyc_host.wire.context).
    namespace[EXPOSED_PREFIX + context.MARKER] = context.VERSION
    if not hasattr(base, EXPOSED_PREFIX + "describe"):
        namespace[EXPOSED_PREFIX + "describe"] = _exposed_describe
    if not hasattr(base, EXPOSED_PREFIX + "health"):
        namespace[EXPOSED_PREFIX + "health"] = _exposed_health
    # Same name, so rpyc derives the same service name (DemoService -> DEMO).
    return type(base.__name__, (base,), namespace)


def instantiate(cls: type[rpyc.Service], options: Mapping[str, Any], path: str) -> rpyc.Service:
    """Build the service with its options; ConfigError at ``path`` if it rejects them."""
    init_owner = getattr(cls, "_plain_class", cls)
    try:
        sig = inspect.signature(init_owner)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [
            n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in options:
            if key not in accepted:
                known = ", ".join(accepted) or "none"
                raise ConfigError(
                    f"unknown option {key!r}{did_you_mean(key, accepted)}; "
                    f"{init_owner.__name__} takes: {known}",
                    path=f"{path}.{key}",
                )
    try:
        service = cls(**options)
        service._host_started_at = time.time()
        return service
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{init_owner.__name__} rejected its options: {exc}", path=path) from None


def per_connection(prototype: rpyc.Service) -> rpyc.Service:
    """The root object for one new connection: a shallow copy of the configured instance."""
    return copy.copy(prototype)

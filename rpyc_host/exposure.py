"""Turn a configured ``module:Class`` into the rpyc service the host serves.

- an ``rpyc.Service`` subclass is served as written;
- any other class is wrapped: its public methods (names not starting with ``_``) become exposed
  methods, like XML-RPC's ``register_instance``;
- every served class gets ``describe()`` (name, exposed methods, signatures, first doc line)
  and the hidden batch entry point (many calls in one request, :mod:`rpyc_host.batching`).

Options from the config go to the class's constructor once, at start-up. Which instance then
serves a connection is ``services.<name>.instance`` (:mod:`rpyc_host.instances`):

- ``connection`` (default): a shallow copy of that instance per connection (:func:`per_connection`):
  attributes set in ``__init__`` are shared by all connections (stores, limits), those set in
  ``on_connect`` or by a call belong to the connection;
- ``shared``: the instance itself serves every connection; ``on_connect``/``on_disconnect`` run
  once per connection, each with its connection, and the service must be thread-safe (on the
  ``forking`` server it is shared within one child process, i.e. one connection);
- ``call``: ``on_connect``/``on_disconnect`` run once per connection on the connection's copy,
  and each call runs on a fresh shallow copy of that copy as ``on_connect`` left it: what
  ``on_connect`` set is seen by every call, what a call sets is gone by the next one.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import rpyc

from . import batching
from .errors import ConfigError, did_you_mean
from .protocol import HostConnection
from .wire import batch, context

# rpyc.Service exposes these itself; describe() lists the service's own methods.
_RPYC_BUILTINS = {"get_service_aliases", "get_service_name", batch.ENTRY}
EXPOSED_PREFIX = "exposed_"
log = logging.getLogger("rpyc_host")


# Folders user classes are imported from (besides sys.path), in the order they were added.
APP_DIRS: list[str] = []


def add_app_dirs(dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Let ``module:Class`` names resolve in these folders too, like ``python -m`` does for the
    current directory (and uvicorn's ``--app-dir``): earlier folders win over installed packages."""
    new = []
    for entry in dirs:
        folder = os.path.abspath(entry)
        if folder not in APP_DIRS and folder not in new:
            new.append(folder)
    APP_DIRS.extend(new)
    for folder in reversed(new):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    if new:
        importlib.invalidate_caches()


def _where_looked() -> str:
    places = ", ".join(APP_DIRS) if APP_DIRS else "no app folder"
    return (
        f"looked in {places} and the installed packages: run from the folder that holds it, "
        "or add --app-dir DIR or PYTHONPATH=DIR"
    )


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
        missing = exc.name or ""
        if missing and not (module_name == missing or module_name.startswith(missing + ".")):
            # The module exists but imports something that is not installed.
            raise ConfigError(
                f"importing {module_name!r} failed: {exc} (install it in this environment)", path=path
            ) from None
        raise ConfigError(
            f"cannot import module {module_name!r} for {class_path!r}: {exc} ({_where_looked()})",
            path=path,
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


def marked_not_renamed(cls: type) -> dict[str, tuple[str, Any]]:
    """Members marked ``@rpyc.exposed`` that no ``@rpyc.service`` renamed: ``{name: (the name
    that decorator would add, the member)}``. Without it, rpyc refuses every one of them."""
    found: dict[str, tuple[str, Any]] = {}
    for klass in reversed(cls.__mro__):
        for name, raw in vars(klass).items():
            prefix = getattr(raw, "__exposed__", None)
            if prefix is None:  # @rpyc.exposed under @staticmethod or @classmethod
                prefix = getattr(getattr(raw, "__func__", None), "__exposed__", None)
            if isinstance(prefix, str) and prefix and not name.startswith(prefix):
                found[name] = (prefix + name, raw)
    return {name: entry for name, entry in found.items() if not hasattr(cls, entry[0])}


def prepare_class(cls: type) -> type[rpyc.Service]:
    """The class the host instantiates: ``cls`` (wrapped if plain) plus describe(), health(),
    the call-context marker and the batch entry point (:mod:`rpyc_host.batching`).

    A Service whose methods are marked ``@rpyc.exposed`` but whose class lacks ``@rpyc.service``
    is served as that decorator would have made it (a warning says so): rpyc alone would answer
    every call with ``cannot access``, which is never what the marks mean."""
    base = cls if issubclass(cls, rpyc.Service) else wrap_plain_class(cls)
    namespace: dict[str, Any] = {
        "_protocol": HostConnection,
        "__module__": base.__module__,
        "__doc__": base.__doc__,
    }
    marked = marked_not_renamed(base)
    if marked:
        log.warning(
            "%s:%s marks %s with @rpyc.exposed but the class has no @rpyc.service: serving them "
            "as that decorator would (add it: plain rpyc servers refuse them)",
            cls.__module__,
            cls.__qualname__,
            ", ".join(marked),
        )
        namespace.update(marked.values())
    # Tells the client library this peer takes call contexts off (rpyc_host.wire.context).
    namespace[EXPOSED_PREFIX + context.MARKER] = context.VERSION
    namespace[EXPOSED_PREFIX + context.TEXT_MARKER] = context.TEXT_VERSION
    # Many calls in one request (rpyc_host.batching); hidden from describe() like the marker.
    namespace[EXPOSED_PREFIX + batch.ENTRY] = batching.entry
    if not hasattr(base, EXPOSED_PREFIX + "describe"):
        namespace[EXPOSED_PREFIX + "describe"] = _exposed_describe
    if not hasattr(base, EXPOSED_PREFIX + "health"):
        namespace[EXPOSED_PREFIX + "health"] = _exposed_health
    # Same name, so rpyc derives the same service name (DemoService -> DEMO).
    return type(base.__name__, (base,), namespace)


def check_options(cls: type[rpyc.Service], options: Mapping[str, Any], path: str) -> None:
    """Check ``options`` against the constructor without calling it (nothing is created, opened
    or deleted): unknown and missing options, then the class's own ``check_options(**options)``
    if it has one. ConfigError at ``path`` (or ``path.<option>``) naming what is wrong."""
    init_owner = getattr(cls, "_plain_class", cls)
    try:
        sig = inspect.signature(init_owner)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = sig.parameters.values()
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            for key in options:
                if key not in named:
                    raise ConfigError(
                        f"unknown option {key!r}{did_you_mean(key, named)}; "
                        f"{init_owner.__name__} takes: {', '.join(named) or 'none'}",
                        path=f"{path}.{key}",
                    )
        missing = [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is p.empty
            and p.name not in options
        ]
        if missing:
            raise ConfigError(
                f"{init_owner.__name__} needs option(s) {', '.join(map(repr, missing))}: "
                "add them under options:",
                path=path,
            )
    checker = getattr(init_owner, "check_options", None)
    if callable(checker):
        try:
            checker(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{init_owner.__name__} rejected its options: {exc}", path=path) from None


def instantiate(cls: type[rpyc.Service], options: Mapping[str, Any], path: str) -> rpyc.Service:
    """Build the service with its options; ConfigError at ``path`` if it rejects them.

    Whatever the constructor raises becomes one ConfigError line (``<Class>(...) failed:
    <Type>: <message>``) with the original exception as its ``__cause__``, for a DEBUG traceback.
    """
    check_options(cls, options, path)
    init_owner = getattr(cls, "_plain_class", cls)
    try:
        service = cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{init_owner.__name__} rejected its options: {exc}", path=path) from exc
    except Exception as exc:
        where = path.removesuffix(".options")
        raise ConfigError(
            f"{init_owner.__name__}(...) failed: {type(exc).__name__}: {exc}", path=where
        ) from exc
    service._host_started_at = time.time()
    return service


def per_connection(prototype: rpyc.Service) -> rpyc.Service:
    """The root object for one new connection in ``connection`` mode: a shallow copy of the
    configured instance."""
    return copy.copy(prototype)

"""Turn parsed YAML into frozen dataclasses, rejecting anything unexpected.

The configuration sections in :mod:`rpyc_host.config` are plain dataclasses; this module walks
their fields and type annotations, so a new setting is one new field with a default. Every
mistake raises :class:`~rpyc_host.errors.ConfigError` naming the dotted key path, the value and
what was expected; unknown keys get a "did you mean".

Field metadata understood here:

- ``key``: the YAML key when it is not a Python identifier (``class``);
- ``check``: ``fn(value) -> str | None``, returning a complaint for a value of the right type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def yaml_key(field: dataclasses.Field[Any]) -> str:
    """The key a field is spelled with in YAML."""
    return str(field.metadata.get("key", field.name))


def build(cls: type[T], raw: Any, path: str) -> T:
    """Validate ``raw`` (a mapping from YAML) into an instance of dataclass ``cls``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping of settings, got {_describe(raw)}", path=path)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown key {key!r}{did_you_mean(str(key), fields)}; known keys: {known}",
                path=_join(path, str(key)),
            )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, field in fields.items():
        sub = _join(path, key)
        if key in raw:
            value = convert(hints[field.name], raw[key], sub)
            check: Callable[[Any], str | None] | None = field.metadata.get("check")
            if check is not None and value is not None:
                complaint = check(value)
                if complaint:
                    raise ConfigError(f"{value!r} {complaint}", path=sub)
            values[field.name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"required key {key!r} is missing", path=path or "(top level)")
    return cls(**values)


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert where YAML is looser (int to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)  # type: ignore[arg-type]
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {_describe(value)}", path=path)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"key {k!r} must be a string", path=path)
            out[k] = convert(value_type, v, _join(path, k))
        return out
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(tp)
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {_describe(value)}", path=path)
        return tuple(convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: `port: true` must not pass as 1.
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{value!r} is not {_TYPE_NAMES.get(tp, tp.__name__)}", path=path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def one_of(choices: Mapping[str, Any] | tuple[str, ...]) -> Callable[[str], str | None]:
    """A ``check`` that accepts only the given names, suggesting the nearest."""
    names = sorted(choices)

    def check(value: str) -> str | None:
        if value in names:
            return None
        return f"is not one of {', '.join(names)}{did_you_mean(value, names)}"

    return check


def port_check(value: int) -> str | None:
    if 0 <= value <= 65535:
        return None
    return "is not a port (1-65535, or 0 for any free port)"


def at_least(minimum: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if value >= minimum else f"is too small (the minimum is {minimum})"

    return check

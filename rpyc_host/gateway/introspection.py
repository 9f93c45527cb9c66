"""``system.listMethods``, ``system.methodHelp`` and ``system.methodSignature`` over a Catalog.

The XML-RPC introspection convention (the same names ``SimpleXMLRPCServer`` registers): help
is the signature and the whole docstring; a signature is ``[[return type, param types...]]``
with XML-RPC type names read from the annotations (``any`` where no single type is written).
"""

from __future__ import annotations

import inspect
from typing import Any

from .calls import INVALID_PARAMS, Catalog, Method, RPCError

SYSTEM_METHODS = ("system.listMethods", "system.methodHelp", "system.methodSignature")

_XMLRPC_TYPES = {
    "int": "int",
    "float": "double",
    "bool": "boolean",
    "str": "string",
    "bytes": "base64",
    "None": "nil",
    "tuple": "array",
    "list": "array",
    "dict": "struct",
}


def list_methods(catalog: Catalog, extra: tuple[str, ...] = ()) -> list[str]:
    return sorted([*catalog.methods, *SYSTEM_METHODS, *extra])


def method_help(catalog: Catalog, name: str) -> str:
    method = _method(catalog, name)
    return f"{method.full_name}{method.display}\n\n{method.doc}".rstrip()


def method_signature(catalog: Catalog, name: str) -> list[list[str]]:
    method = _method(catalog, name)
    sig = method.signature
    if sig is None:
        return [["any"]]
    params = [
        _type_name(p.annotation)
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [[_type_name(sig.return_annotation), *params]]


def _method(catalog: Catalog, name: Any) -> Method:
    if not isinstance(name, str):
        raise RPCError(INVALID_PARAMS, f"expected a method name (string), got {type(name).__name__}")
    return catalog.get(name)


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.strip()
    if "|" in text:
        return "any"
    return _XMLRPC_TYPES.get(text.split("[", 1)[0], "any")


def call_system(catalog: Catalog, name: str, args: tuple[Any, ...]) -> Any:
    """Run one of SYSTEM_METHODS; RPCError(-32602) for a wrong argument count."""
    want = 0 if name == "system.listMethods" else 1
    if len(args) != want:
        raise RPCError(INVALID_PARAMS, f"{name} takes {want} argument(s), got {len(args)}")
    if name == "system.listMethods":
        return list_methods(catalog)
    if name == "system.methodHelp":
        return method_help(catalog, args[0])
    return method_signature(catalog, args[0])

"""XML-RPC at ``/RPC2``: one call per request, faults for errors, introspection, multicall.

Fault codes follow the JSON-RPC numbering the gateway uses everywhere (-32700 parse error,
-32600 invalid request, -32601 unknown method, -32602 bad arguments, -32603 internal error,
-32000 the method raised: ``faultString`` is ``"<ExceptionType>: <message>"``). Binary travels
as ``<base64>`` and arrives at the method as ``bytes``; ``None`` as ``<nil/>``. A body with a
``<!DOCTYPE`` is refused (-32700): XML-RPC has no use for DTDs, and entities are what XML
expansion bombs are made of.

Decoding: a request under :data:`FAST_DECODE_BYTES` is parsed by ElementTree's C tree builder and
read with :func:`_decode_fast` (no Python callback per element); anything it does not know
(``dateTime.iso8601``, extension types, malformed XML) goes to ``xmlrpc.client.loads``, which
decides exactly as the standard library's server does.
"""

from __future__ import annotations

import base64
import binascii
import logging
import xml.parsers.expat
from typing import Any
from xml.etree.ElementTree import Element, ParseError, fromstring
from xmlrpc.client import Fault, dumps, loads

from .calls import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    RPCError,
    Session,
)
from .introspection import SYSTEM_METHODS, call_system, list_methods

log = logging.getLogger("rpyc_host.gateway")

CONTENT_TYPE = "text/xml; charset=utf-8"
MULTICALL = "system.multicall"
FAST_DECODE_BYTES = 64 * 1024  # larger bodies stream through expat without building a tree


def handle(body: bytes, session: Session) -> bytes:
    """The XML-RPC response body for one request body."""
    if b"<!DOCTYPE" in body:
        return _fault(RPCError(PARSE_ERROR, "parse error: a DOCTYPE is not accepted in an XML-RPC request"))
    try:
        params, method = decode_request(body)
    except RPCError as exc:
        return _fault(exc)
    except (xml.parsers.expat.ExpatError, ValueError, TypeError, IndexError, KeyError) as exc:
        return _fault(RPCError(PARSE_ERROR, f"parse error: not a valid XML-RPC request ({exc})"))
    if not isinstance(method, str) or not method:
        return _fault(RPCError(INVALID_REQUEST, "invalid request: no <methodName>"))
    try:
        result = multicall(session, params) if method == MULTICALL else call(session, method, params)
        return _response(result, method)
    except RPCError as exc:
        return _fault(exc)
    except Exception:
        log.exception("XML-RPC %s failed inside the gateway", method)
        return _fault(RPCError(INTERNAL_ERROR, "internal error in the gateway (see the server log)"))


def decode_request(body: bytes) -> tuple[tuple[Any, ...], str | None]:
    """``(params, method name)`` of a ``<methodCall>``, as ``xmlrpc.client.loads`` returns them."""
    if len(body) <= FAST_DECODE_BYTES:
        try:
            root = fromstring(body)
            if root.tag == "methodCall":
                return _decode_fast(root)
        except (ParseError, _Unknown, ValueError, binascii.Error):
            pass  # the standard library decides, with its own message
    params, method = loads(body, use_builtin_types=True)
    return params, method


class _Unknown(Exception):
    """Something the fast decoder leaves to ``xmlrpc.client``."""


def _decode_fast(root: Element) -> tuple[tuple[Any, ...], str | None]:
    method: str | None = None
    params: tuple[Any, ...] = ()
    for child in root:
        if child.tag == "methodName" and method is None and not len(child):
            method = child.text or ""
        elif child.tag == "params" and not params:
            values = []
            for param in child:
                if param.tag != "param" or len(param) != 1:
                    raise _Unknown()
                values.append(_value(param[0], 0))
            params = tuple(values)
        else:
            raise _Unknown()
    return params, method


_INTS = frozenset({"int", "i4", "i8", "i1", "i2", "biginteger"})


def _value(value: Element, depth: int) -> Any:
    if value.tag != "value":
        raise _Unknown()
    if not len(value):
        return value.text or ""  # a value without a type is a string
    if len(value) != 1 or (value.text and value.text.strip()):
        raise _Unknown()
    typed = value[0]
    tag, text = typed.tag, typed.text
    if tag in _INTS:
        return int(text or "")
    if tag == "string":
        return text or ""
    if tag == "boolean":
        if text not in ("0", "1"):
            raise _Unknown()
        return text == "1"
    if tag in ("double", "float"):
        return float(text or "")
    if tag == "nil":
        return None
    if tag == "base64":
        return base64.decodebytes((text or "").encode("ascii"))
    if depth >= MAX_DEPTH:
        raise RPCError(
            INVALID_PARAMS, f"arguments nested deeper than {MAX_DEPTH} levels (the gateway's limit)"
        )
    if tag == "array":
        if len(typed) != 1 or typed[0].tag != "data":
            raise _Unknown()
        return [_value(v, depth + 1) for v in typed[0]]
    if tag == "struct":
        members = {}
        for member in typed:
            if member.tag != "member" or len(member) != 2 or member[0].tag != "name":
                raise _Unknown()
            members[member[0].text or ""] = _value(member[1], depth + 1)
        return members
    raise _Unknown()


def call(session: Session, method: str, params: tuple[Any, ...]) -> Any:
    if method in SYSTEM_METHODS:
        if method == "system.listMethods" and not params:
            return list_methods(session.catalog, (MULTICALL,))
        return call_system(session.catalog, method, params)
    return session.call(method, params, {})


def multicall(session: Session, params: tuple[Any, ...]) -> list[Any]:
    """``system.multicall([{"methodName": ..., "params": [...]}, ...])``: ``[result]`` or a fault
    struct per call, in order; one failing call does not stop the others."""
    if len(params) != 1 or not isinstance(params[0], list | tuple):
        raise RPCError(INVALID_PARAMS, "system.multicall takes one array of {methodName, params} structs")
    results: list[Any] = []
    for i, entry in enumerate(params[0]):
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("methodName"), str):
                raise RPCError(INVALID_REQUEST, f"call #{i}: expected a struct with a methodName string")
            name, args = entry["methodName"], entry.get("params", [])
            if name == MULTICALL:
                raise RPCError(INVALID_REQUEST, f"call #{i}: system.multicall cannot be nested")
            if not isinstance(args, list | tuple):
                raise RPCError(INVALID_PARAMS, f"call #{i}: params must be an array")
            result = call(session, name, tuple(args))
            _check_marshallable(result, name)
            results.append([result])
        except RPCError as exc:
            results.append({"faultCode": exc.code, "faultString": _fault_string(exc)})
    return results


def _check_marshallable(result: Any, method: str) -> None:
    try:
        dumps((result,), methodresponse=True, allow_none=True)
    except (TypeError, OverflowError) as exc:
        raise RPCError(INTERNAL_ERROR, f"{method} returned a value XML-RPC cannot carry: {exc}") from None


def _response(result: Any, method: str) -> bytes:
    try:
        return dumps((result,), methodresponse=True, allow_none=True, encoding="utf-8").encode("utf-8")
    except (TypeError, OverflowError) as exc:
        # e.g. an int over 2**31-1 (XML-RPC's <int> is 32-bit) or a complex number
        return _fault(RPCError(INTERNAL_ERROR, f"{method} returned a value XML-RPC cannot carry: {exc}"))


def _fault_string(exc: RPCError) -> str:
    return f"{exc.kind}: {exc.message}" if exc.kind else exc.message


def _fault(exc: RPCError) -> bytes:
    return dumps(Fault(exc.code, _fault_string(exc)), methodresponse=True, encoding="utf-8").encode("utf-8")

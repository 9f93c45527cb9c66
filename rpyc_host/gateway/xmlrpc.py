"""XML-RPC at ``/RPC2``: one call per request, faults for errors, introspection, multicall.

Fault codes follow the JSON-RPC numbering the gateway uses everywhere (-32700 parse error,
-32600 invalid request, -32601 unknown method, -32602 bad arguments, -32603 internal error,
-32000 the method raised: ``faultString`` is ``"<ExceptionType>: <message>"``). Binary travels
as ``<base64>`` and arrives at the method as ``bytes``; ``None`` as ``<nil/>``. A body with a
``<!DOCTYPE`` is refused (-32700): XML-RPC has no use for DTDs, and entities are what XML
expansion bombs are made of.
Requests are decoded by :mod:`.xmldecode`, responses encoded by :mod:`.xmlencode`.
"""

from __future__ import annotations

import logging
import xml.parsers.expat
from typing import Any

from . import xmlencode
from .calls import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    RPCError,
    Session,
)
from .introspection import SYSTEM_METHODS, call_system, list_methods
from .xmldecode import decode_request

log = logging.getLogger("rpyc_host.gateway")

CONTENT_TYPE = "text/xml; charset=utf-8"
MULTICALL = "system.multicall"


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
        if method == MULTICALL:
            result = multicall(session, params)
        elif method in SYSTEM_METHODS:
            result = call(session, method, params)
        else:  # the common case, without the call() in between
            result = session.call(method, params, {})
        return _response(result, method)
    except RPCError as exc:
        return _fault(exc)
    except Exception:
        log.exception("XML-RPC %s failed inside the gateway", method)
        return _fault(RPCError(INTERNAL_ERROR, "internal error in the gateway (see the server log)"))


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
        xmlencode.check(result)
    except (TypeError, OverflowError) as exc:
        raise RPCError(INTERNAL_ERROR, f"{method} returned a value XML-RPC cannot carry: {exc}") from None


def _response(result: Any, method: str) -> bytes:
    try:
        return xmlencode.response(result)
    except (TypeError, OverflowError) as exc:
        # e.g. an int over 2**31-1 (XML-RPC's <int> is 32-bit) or a complex number
        return _fault(RPCError(INTERNAL_ERROR, f"{method} returned a value XML-RPC cannot carry: {exc}"))


def _fault_string(exc: RPCError) -> str:
    return f"{exc.kind}: {exc.message}" if exc.kind else exc.message


def _fault(exc: RPCError) -> bytes:
    return xmlencode.fault(exc.code, _fault_string(exc))

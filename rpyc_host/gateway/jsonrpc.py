"""JSON-RPC 2.0 at ``/jsonrpc``: single requests, batches and notifications.

Errors use the spec's codes: -32700 parse error, -32600 invalid request, -32601 method not
found, -32602 invalid params, -32603 internal error; a method that raised gives -32000 with
``data: {"type": "<ExceptionType>", "message": "<message>"}`` (never a traceback), a service
that cannot be reached -32001, a result holding a live object -32002. A result JSON cannot
encode (``inf``, a complex number) is -32603.

Bytes: JSON has no bytes type, so a bytes value travels as ``{"__bytes__": "<base64>"}`` both
ways: as an argument it reaches the method as ``bytes``; a ``bytes`` result is returned in the
same form. ``params`` may be an array (positional) or an object (keyword arguments).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from .calls import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    RPCError,
    Session,
)
from .introspection import SYSTEM_METHODS, call_system
from .jsonencode import BYTES_KEY, result_text

log = logging.getLogger("rpyc_host.gateway")

CONTENT_TYPE = "application/json"
_ID_TYPES = (str, int, float, type(None))


def handle(body: bytes, session: Session) -> bytes | None:
    """The JSON-RPC response body for one request body; None when nothing is to be returned
    (only notifications)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _encode(_error(None, RPCError(PARSE_ERROR, f"Parse error: {exc}")))
    except RecursionError:
        # The C decoder recurses once per nesting level; a deep body must not end the thread.
        return _encode(
            _error(
                None,
                RPCError(PARSE_ERROR, "Parse error: the body is nested too deeply to decode"),
            )
        )
    if isinstance(data, list):
        if not data:
            return _encode(_error(None, RPCError(INVALID_REQUEST, "Invalid Request: empty batch")))
        replies = [reply for reply in (_one(item, session) for item in data) if reply is not None]
        return ("[" + ",".join(replies) + "]").encode() if replies else None
    reply = _one(data, session)
    return reply.encode() if reply is not None else None


def _one(request: Any, session: Session) -> str | None:
    """One request's response as JSON text, or None for a notification."""
    if not isinstance(request, dict):
        return _encode_text(_error(None, RPCError(INVALID_REQUEST, "Invalid Request: expected an object")))
    has_id = "id" in request
    req_id = request.get("id")
    if has_id and (not isinstance(req_id, _ID_TYPES) or isinstance(req_id, bool)):
        return _encode_text(
            _error(None, RPCError(INVALID_REQUEST, "Invalid Request: id must be a string, number or null"))
        )
    try:
        if request.get("jsonrpc") != "2.0":
            raise RPCError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
        method = request.get("method")
        if not isinstance(method, str):
            raise RPCError(INVALID_REQUEST, 'Invalid Request: "method" must be a string')
        args, kwargs = _params(request.get("params", []))
        if method in SYSTEM_METHODS:
            if kwargs:
                raise RPCError(INVALID_PARAMS, f"{method} takes positional params")
            result = call_system(session.catalog, method, args)
        else:
            result = session.call(method, args, kwargs)
        if not has_id:
            return None
        try:
            return result_text(result, req_id)
        except (TypeError, ValueError) as exc:
            raise RPCError(INTERNAL_ERROR, f"{method} returned a value JSON cannot carry: {exc}") from None
    except RPCError as exc:
        return _encode_text(_error(req_id, exc)) if has_id else None
    except Exception:
        log.exception("JSON-RPC %r failed inside the gateway", request.get("method"))
        error = RPCError(INTERNAL_ERROR, "Internal error in the gateway (see the server log)")
        return _encode_text(_error(req_id, error)) if has_id else None


def _params(params: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(params, list):
        for param in params:
            kind = type(param)
            if kind is dict or kind is list:
                return tuple([bytes_in(p) for p in params]), {}
        return tuple(params), {}  # scalars only: nothing to decode
    if isinstance(params, dict):
        return (), {k: bytes_in(v) for k, v in params.items()}
    raise RPCError(INVALID_REQUEST, 'Invalid Request: "params" must be an array or an object')


def bytes_in(value: Any, depth: int = 0) -> Any:
    """Decode every ``{"__bytes__": "<base64>"}`` in an argument to ``bytes``.

    Raises:
        RPCError: -32602 for bad base64, or arguments nested deeper than MAX_DEPTH.
    """
    kind = type(value)
    if kind is not dict and kind is not list:
        return value
    if depth >= MAX_DEPTH:
        raise RPCError(INVALID_PARAMS, f"params nested deeper than {MAX_DEPTH} levels (the gateway's limit)")
    if kind is dict:
        if len(value) == 1 and BYTES_KEY in value:
            encoded = value[BYTES_KEY]
            try:
                if not isinstance(encoded, str):
                    raise ValueError("not a string")
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise RPCError(
                    INVALID_PARAMS, f'{{"{BYTES_KEY}": ...}} must hold base64 text ({exc})'
                ) from None
        return {k: bytes_in(v, depth + 1) for k, v in value.items()}
    return [bytes_in(v, depth + 1) for v in value]


def _error(req_id: Any, exc: RPCError) -> dict[str, Any]:
    message = f"{exc.kind}: {exc.message}" if exc.kind else exc.message
    error: dict[str, Any] = {"code": exc.code, "message": message}
    if exc.kind:
        error["data"] = {"type": exc.kind, "message": exc.message}
    return {"jsonrpc": "2.0", "error": error, "id": req_id}


def _encode_text(response: dict[str, Any]) -> str:
    return json.dumps(response)


def _encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response).encode()

"""Encoding a JSON-RPC result response quickly, byte for byte as the general encoder.

:func:`result_text` writes what ``json.JSONEncoder(default=<bytes as {"__bytes__": base64}>,
allow_nan=False).encode({"jsonrpc": "2.0", "result": result, "id": req_id})`` writes. A scalar
result (``int``, finite ``float``, ``str``, ``bool``, ``None``, ``bytes``) with an ``int``,
``str`` or ``None`` id is formatted directly; everything else goes through that encoder, so its
output and its exceptions (``TypeError``, ``ValueError``) are the standard library's.
"""

from __future__ import annotations

import base64
import json
import math
from json.encoder import encode_basestring_ascii
from typing import Any

BYTES_KEY = "__bytes__"


def _bytes_out(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {BYTES_KEY: base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Built once: json.dumps with options builds a new encoder on every call.
ENCODER = json.JSONEncoder(default=_bytes_out, allow_nan=False)


def result_text(result: Any, req_id: Any) -> str:
    """``{"jsonrpc": "2.0", "result": ..., "id": ...}`` as JSON text.

    Raises:
        TypeError, ValueError: as the general encoder (a type JSON cannot carry, ``inf``).
    """
    value = _scalar(result)
    kind = type(req_id)
    if kind is int:
        ident = int.__repr__(req_id)
    elif kind is str:
        ident = encode_basestring_ascii(req_id)
    elif req_id is None:
        ident = "null"
    else:
        value = None
    if value is None:
        return ENCODER.encode({"jsonrpc": "2.0", "result": result, "id": req_id})
    return f'{{"jsonrpc": "2.0", "result": {value}, "id": {ident}}}'


def _scalar(value: Any) -> str | None:
    """The JSON text of a scalar, or None for anything left to the general encoder."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is float:
        return float.__repr__(value) if math.isfinite(value) else None
    if kind is bytes:
        return f'{{"{BYTES_KEY}": "{base64.b64encode(value).decode("ascii")}"}}'
    return None

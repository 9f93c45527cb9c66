"""Decoding an XML-RPC ``<methodCall>`` quickly, with ``xmlrpc.client.loads`` as the judge.

Three paths, fastest first; each hands anything it does not fully understand to the next:

1. :func:`_decode_flat`: a request whose parameters are all scalars (``int``/``i4``/``i8``,
   ``string``, ``double``, ``boolean``, ``nil``, untyped) with no entity, CDATA, comment,
   attribute, carriage return or control character, matched by regular expressions over
   the bytes; values are converted exactly as ``xmlrpc.client`` converts them (``int()``,
   ``float()``, the text itself);
2. :func:`_decode_tree` for bodies up to :data:`FAST_DECODE_BYTES`: ElementTree's C tree builder
   (no Python callback per element), arrays and structs nested at most ``MAX_DEPTH`` deep;
3. ``xmlrpc.client.loads``, which decides everything else (``dateTime.iso8601``, extension
   types, malformed XML) exactly as the standard library's server does.

Callers refuse a ``<!DOCTYPE`` before decoding (no entity is ever expanded).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any
from xml.etree.ElementTree import Element, ParseError, fromstring
from xmlrpc.client import loads

from .calls import INVALID_PARAMS, MAX_DEPTH, RPCError

FAST_DECODE_BYTES = 64 * 1024  # larger bodies stream through expat without building a tree

_TEXT = rb"[^<>&\x00-\x08\x0b-\x1f]*"  # no markup, entity, carriage return or control character
# XML's whitespace is these four only (a regular expression's \s also takes \v and \f, which
# expat refuses), and nothing may stand before an XML declaration.
_WS = rb"[ \t\r\n]*"
_FLAT = re.compile(
    rb"(?:<\?xml version=(?:'1\.0'|\"1\.0\")"
    rb"(?: encoding=(?:'utf-8'|\"utf-8\"|'UTF-8'|\"UTF-8\"))?"
    + _WS
    + rb"\?>)?"
    + _WS
    + rb"<methodCall>"
    + _WS
    + rb"<methodName>([A-Za-z0-9_.]+)</methodName>"
    + _WS
    + rb"(?:<params>([^&\x00-\x08\x0b-\x1f]*)</params>"
    + _WS
    + rb")?</methodCall>"
    + _WS
)
_PARAM = re.compile(
    _WS
    + rb"<param>"
    + _WS
    + rb"<value>(?:"
    + _WS
    + rb"<(int|i4|i8|string|double|boolean)>("
    + _TEXT
    + rb")</\1>"
    + _WS
    + rb"|"
    + _WS
    + rb"(<nil/>)"
    + _WS
    + rb"|("
    + _TEXT
    + rb"))</value>"
    + _WS
    + rb"</param>"
    + _WS
)


def decode_request(body: bytes) -> tuple[tuple[Any, ...], str | None]:
    """``(params, method name)`` of a ``<methodCall>``, as ``xmlrpc.client.loads`` returns them.

    Raises:
        RPCError: -32602 for arrays or structs nested deeper than MAX_DEPTH.
        ExpatError, ValueError, TypeError, ...: what ``xmlrpc.client.loads`` raises.
    """
    flat = _decode_flat(body)
    if flat is not None:
        return flat
    if len(body) <= FAST_DECODE_BYTES:
        try:
            root = fromstring(body)
            if root.tag == "methodCall":
                return _decode_tree(root)
        except (ParseError, _Unknown, ValueError, binascii.Error):
            pass  # the standard library decides, with its own message
    params, method = loads(body, use_builtin_types=True)
    return params, method


def _decode_flat(body: bytes) -> tuple[tuple[Any, ...], str] | None:
    match = _FLAT.fullmatch(body)
    if match is None:
        return None
    inner = match[2]
    values: list[Any] = []
    if inner and not inner.isspace():
        pos, end = 0, len(inner)
        while pos < end:
            param = _PARAM.match(inner, pos)
            if param is None:
                return None
            pos = param.end()
            kind, text, nil, plain = param.groups()
            value: Any
            try:
                if kind is None:
                    value = None if nil is not None else _text(plain)
                elif kind == b"string":
                    value = _text(text)
                elif kind == b"double":
                    # Numbers straight from the bytes: only ASCII ones convert, the rest (which
                    # float() and int() of the text might still take) go to the slower paths.
                    value = float(text)
                elif kind == b"boolean":
                    if text not in (b"0", b"1"):
                        return None
                    value = text == b"1"
                else:
                    value = int(text)
            except ValueError:  # not UTF-8, not XML text, or not a number: the slower paths say why
                return None
            values.append(value)
    return tuple(values), match[1].decode("ascii")


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8")
    if "\ufffe" in text or "\uffff" in text:
        raise ValueError("not XML characters")  # expat refuses them
    return text


class _Unknown(Exception):
    """Something the fast decoder leaves to ``xmlrpc.client``."""


def _decode_tree(root: Element) -> tuple[tuple[Any, ...], str | None]:
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

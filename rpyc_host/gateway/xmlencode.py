"""Encoding an XML-RPC ``<methodResponse>`` quickly, byte for byte as ``xmlrpc.client.dumps``.

:func:`response` writes what ``dumps((value,), methodresponse=True, allow_none=True,
encoding="utf-8").encode("utf-8")`` writes, for values built only of the exact types the
gateway's results are made of (``int``, ``bool``, ``float``, ``str``, ``bytes``, ``None``,
``list``, ``tuple``, ``dict`` with ``str`` keys). Anything else (another type, an int outside
32 bits, a non-string key, nesting past :data:`MAX_NESTING`) is handed to ``dumps`` itself, so
its result and its exceptions (``TypeError``, ``OverflowError``) are the standard library's.
"""

from __future__ import annotations

import base64
from typing import Any
from xmlrpc.client import Fault, dumps

_HEAD = "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n"
_TAIL = "</param>\n</params>\n</methodResponse>\n"
_INT_HEAD = _HEAD.encode() + b"<value><int>"
_INT_TAIL = b"</int></value>\n" + _TAIL.encode()
_MAXINT = 2**31 - 1
_MININT = -(2**31)
MAX_NESTING = 100  # deeper values go to dumps (which also catches a container holding itself)


class _Slow(Exception):
    """A value this module leaves to ``xmlrpc.client.dumps``."""


def response(value: Any) -> bytes:
    """The ``<methodResponse>`` carrying ``value``, UTF-8 encoded.

    Raises:
        TypeError, OverflowError: as ``xmlrpc.client.dumps`` (a type or int XML-RPC cannot carry).
        UnicodeEncodeError: a string with a lone surrogate (as ``dumps(...).encode()``).
    """
    kind = type(value)
    if kind is int and _MININT <= value <= _MAXINT:
        return b"%b%d%b" % (_INT_HEAD, value, _INT_TAIL)
    out = [_HEAD]
    try:
        _dump(value, out.append, 0)
    except _Slow:
        return dumps((value,), methodresponse=True, allow_none=True, encoding="utf-8").encode("utf-8")
    out.append(_TAIL)
    return "".join(out).encode("utf-8")


def fault(code: int, message: str) -> bytes:
    """The ``<fault>`` response ``xmlrpc.client.dumps(Fault(code, message))`` writes."""
    if type(code) is not int or not _MININT <= code <= _MAXINT or type(message) is not str:
        return dumps(Fault(code, message), methodresponse=True, encoding="utf-8").encode("utf-8")
    return (
        "<?xml version='1.0'?>\n<methodResponse>\n<fault>\n<value><struct>\n"
        f"<member>\n<name>faultCode</name>\n<value><int>{code}</int></value>\n</member>\n"
        f"<member>\n<name>faultString</name>\n<value><string>{_escape(message)}</string></value>\n"
        "</member>\n</struct></value>\n</fault>\n</methodResponse>\n"
    ).encode()


def check(value: Any) -> None:
    """Raise what ``dumps`` would raise for ``value`` (TypeError, OverflowError), without
    keeping the text."""
    try:
        _dump(value, _discard, 0)
    except _Slow:
        dumps((value,), methodresponse=True, allow_none=True)


def _discard(_: str) -> None:
    pass


def _escape(text: str) -> str:
    # What xmlrpc.client.escape does; the checks skip the copies for text with no markup.
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


def _dump(value: Any, write: Any, depth: int) -> None:
    kind = type(value)
    if kind is str:
        write(f"<value><string>{_escape(value)}</string></value>\n")
    elif kind is int:
        if value > _MAXINT or value < _MININT:
            raise _Slow()
        write(f"<value><int>{value}</int></value>\n")
    elif kind is bool:
        write("<value><boolean>1</boolean></value>\n" if value else "<value><boolean>0</boolean></value>\n")
    elif kind is float:
        write(f"<value><double>{value!r}</double></value>\n")
    elif value is None:
        write("<value><nil/></value>")
    elif kind is list or kind is tuple:
        if depth >= MAX_NESTING:
            raise _Slow()
        write("<value><array><data>\n")
        for item in value:
            _dump(item, write, depth + 1)
        write("</data></array></value>\n")
    elif kind is dict:
        if depth >= MAX_NESTING:
            raise _Slow()
        write("<value><struct>\n")
        for key, item in value.items():
            if type(key) is not str:
                raise _Slow()
            write(f"<member>\n<name>{_escape(key)}</name>\n")
            _dump(item, write, depth + 1)
            write("</member>\n")
        write("</struct></value>\n")
    elif kind is bytes:
        write(f"<value><base64>\n{base64.encodebytes(value).decode('ascii')}</base64></value>\n")
    else:
        raise _Slow()

"""The fast path of a batch: JSON decoding, the schema check and re-encoding in msgspec's C code.

A batch takes it when every line decodes to a JSON object and passes the schema; a batch with
any problem goes back to the service's per-record path, which builds the precise message for
each bad record. So the fast path only has to be exact about what it *accepts*: msgspec is
stricter than ``json`` in every case where they differ (it refuses ``NaN``/``Infinity``,
numbers out of the float range, lone surrogate escapes, a BOM, unescaped control characters
and, in a batch stored as received, a schema field given twice), and each refusal just means
the slower path. Lines
must be ``str``: the service keeps a line that is not UTF-8 as bytes, and msgspec's own UTF-8
check lets encoded surrogates through.

Stored records are encoded compactly (no spaces, non-ASCII as UTF-8); the text decodes to the
same value ``json`` would have written. A record whose encoding msgspec could change (any
value other than str, int, float or bool, a non-string key, a non-finite float) is encoded by
``json``'s C encoder instead, which also gives the old error messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import msgspec

from rpyc_host.wire.jsonlines import fast_json_encoder

from .storage import JsonLines

_TYPES: dict[str, Any] = {
    "any": Any,
    "bool": bool,
    "float": int | float,  # JSON does not tell 1 from 1.0
    "int": int,
    "list": list,
    "number": int | float,
    "object": dict,
    "str": str,
}
"""Schema type name -> the msgspec type that accepts exactly the values the schema allows."""

_PLAIN = frozenset({str, int, float, bool})
_STR = frozenset({str})
_DICT = frozenset({dict})
_ENCODER = msgspec.json.Encoder()
_MSGSPEC_ENCODE = _ENCODER.encode
_MSGSPEC_ENCODE_LINES = _ENCODER.encode_lines
_JSON_ENCODE = fast_json_encoder(compact=True)


class FastPath:
    """Decoders for one schema (``(field, type name, _)`` triples, every field required)."""

    def __init__(self, schema: Sequence[tuple[str, str, Any]]) -> None:
        # Fields get identifier names and are renamed to the schema's: a schema field may be
        # any non-empty string, which a class attribute cannot always be.
        fields = [(f"f{i}", _TYPES[type_name]) for i, (_, type_name, _) in enumerate(schema)]
        rename = {f"f{i}": name for i, (name, _, _) in enumerate(schema)}
        # gc=False: the checked copies are thrown away at once; untracked, they trigger no
        # collections of the host's heap (1,000 tracked objects a batch would, several times).
        struct = msgspec.defstruct("IngestRecord", fields, rename=rename, gc=False)
        self._records: type | None = list[struct] if schema else None  # type: ignore[valid-type]
        self._decode_dict = msgspec.json.Decoder(dict[str, Any]).decode
        self._decode_checked = msgspec.json.Decoder(struct).decode

    def check(self, lines: Sequence[str | bytes]) -> bool:
        """True if every line is a JSON object that passes the schema (the records are not built)."""
        if not _STR.issuperset(map(type, lines)):
            return False
        try:
            for _ in map(self._decode_checked, lines):
                pass
        except (msgspec.DecodeError, RecursionError):
            return False
        return True

    def decode(self, lines: Sequence[str | bytes]) -> list[dict[str, Any]] | None:
        """Every line as a dict, if each is a JSON object that passes the schema; else None."""
        if not _STR.issuperset(map(type, lines)):
            return None
        try:
            records = list(map(self._decode_dict, lines))
            if self._records is not None:
                msgspec.convert(records, self._records)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
        return records


def encode(record: dict[str, Any]) -> str:
    """One record as compact JSON text, as ``json.dumps(record, allow_nan=False)`` would write
    it but without spaces; raises its TypeError, ValueError or RecursionError."""
    if _PLAIN.issuperset(map(type, record.values())) and _STR.issuperset(map(type, record)):
        try:
            out = _MSGSPEC_ENCODE(record)
        except ValueError:  # a lone surrogate, which only json can escape
            pass
        else:
            # msgspec writes NaN and infinities as null, which json refuses: let json say so.
            if b"null" not in out:
                return out.decode()
    return _JSON_ENCODE(record)


class Raised:
    """In :func:`run`'s results: the processor raised ``error`` for the record at this place."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def run(processor: Callable[[dict[str, Any]], Any], records: Sequence[dict[str, Any]]) -> list[Any]:
    """``processor(record)`` for every record, in C's loop rather than Python's: one result per
    record, in order, a :class:`Raised` where it raised (an ``Exception``; others propagate)."""
    results: list[Any] = []
    rest = iter(records)
    while len(results) < len(records):
        try:
            # list.extend keeps what it appended before an exception, so len(results) is the
            # index of the record that raised; ``rest`` resumes after it.
            results.extend(map(processor, rest))
        except Exception as exc:
            results.append(Raised(exc))
        else:
            if len(results) < len(records):
                # The processor raised StopIteration, which ends map() like an exhausted
                # iterator (and the exception is gone): that record is rejected as raising it.
                results.append(Raised(StopIteration()))
    return results


def encode_all(results: list[Any]) -> JsonLines | None:
    """``results`` as one block of JSON lines if every one is a dict that :func:`encode` would
    give to msgspec (checked and encoded in C for the whole batch); None if any is not."""
    if not (
        _DICT.issuperset(map(type, results))
        and _PLAIN.issuperset(map(type, chain.from_iterable(map(dict.values, results))))
    ):
        return None
    try:
        "".join(chain.from_iterable(results))  # every key a str: join refuses anything else
        block = _MSGSPEC_ENCODE_LINES(results)
    except (TypeError, ValueError):  # a key that is not a str; a lone surrogate
        return None
    if b"null" in block:  # a non-finite float: json refuses it (see encode)
        return None
    return JsonLines(block, len(results))

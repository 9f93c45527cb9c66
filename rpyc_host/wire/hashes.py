"""The integrity hashes a file transfer can use, by name, shared by the file service and its client.

- ``blake3`` (the default): a cryptographic hash, SIMD in Rust, several times SHA-256's speed;
- ``xxh3_128``: faster still, but not cryptographic: it detects corruption (a flipped bit, a
  torn write), never a deliberate change made to collide;
- ``sha256``: on request, and what old clients (which name no hash) get.

Every factory returns an object with ``update(buffer)``, ``copy()`` and ``hexdigest()``; each
releases the GIL while hashing a large buffer, so a hash thread runs beside the socket thread.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import blake3
import xxhash


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...
    def copy(self) -> Any: ...
    def hexdigest(self) -> str: ...


DEFAULT = "blake3"
LEGACY = "sha256"  # what a transfer opened without naming a hash uses (clients before the choice)

HASHES: dict[str, Callable[[], Hasher]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,
    "xxh3_128": xxhash.xxh3_128,
}


def check_name(name: Any) -> str:
    """``name`` if it is a known hash; else ValueError listing the names (and the closest one)."""
    if isinstance(name, str) and name in HASHES:
        return name
    names = sorted(HASHES)
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower().replace("-", "_"), names, n=1, cutoff=0.5)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise ValueError(f"unknown hash {name!r}{hint}; known hashes: {', '.join(names)}")


def new(name: str) -> Hasher:
    """A fresh hasher for ``name`` (ValueError naming the known hashes if there is none)."""
    return HASHES[check_name(name)]()

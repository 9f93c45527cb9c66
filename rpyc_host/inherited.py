"""What a forked connection process lets go of: the parent's descriptors it must not keep.

``fork()`` copies every descriptor. A connection process that kept the gateway's HTTP
connections would hold each one open after the host closed it (the client never reads its
end), a copy of a listener keeps its port bound after the host closed it, and every copy counts
against the child's own descriptor limit. Whatever owns such descriptors registers here with
:func:`hold`; the forking server calls :func:`let_go` in each new child, before it serves.
"""

from __future__ import annotations

import weakref
from typing import Protocol


class Holder(Protocol):
    def close_in_child(self) -> None:
        """In a forked child: close this object's inherited descriptors, not touching the parent's
        (no shutdown, no lock another thread of the parent may have held at fork)."""


_HOLDERS: weakref.WeakSet[Holder] = weakref.WeakSet()


def hold(holder: Holder) -> None:
    """Have ``holder.close_in_child()`` run in every forked connection process."""
    _HOLDERS.add(holder)


def let_go() -> None:
    """In a forked connection process: every holder closes what it inherited."""
    for holder in list(_HOLDERS):
        holder.close_in_child()

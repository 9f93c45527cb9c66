"""Registrars: each keeps the host's services findable by clients, one per ``registry.backend``.

``rpyc`` (:mod:`.rpyc`): rpyc's registry, re-registering every ``interval`` seconds. ``etcd``
(:mod:`.etcd`): one key per instance under a lease that is kept alive; clients watch the prefix.
A registrar has ``start()`` (never blocks on the network) and ``close()`` (deregisters, bounded
by ``registry.timeout``); the host closes it first when stopping, before draining.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import Config

# backend -> "module:class"; imported only when chosen, so etcd3gw is needed only for etcd.
BACKENDS: dict[str, str] = {
    "etcd": "rpyc_host.registration.etcd:EtcdRegistrar",
    "rpyc": "rpyc_host.registration.rpyc:RpycRegistrar",
}


class Registrar(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...


def make_registrar(config: Config, host: Any) -> Registrar:
    """The registrar for ``config.registry.backend`` (the config check allows only known ones)."""
    module, _, name = BACKENDS[config.registry.backend].partition(":")
    registrar: Registrar = getattr(importlib.import_module(module), name)(config, host)
    return registrar

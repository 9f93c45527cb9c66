"""rpyc's registry: ``python -m rpyc_host.registry`` runs one bound to a single address.

``python -m rpyc_host.registry --host 10.0.0.1 --port 18811`` runs rpyc's
``TCPRegistryServer`` bound to one address (``rpyc_registry`` itself always binds every
interface), with listing on so ``python -m client services`` works.

The host's registrars live in :mod:`rpyc_host.registration` (rpyc's registry and etcd, chosen
by ``registry.backend``); :class:`Registrar` here is rpyc's, under the name it always had.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rpyc.utils.registry import DEFAULT_PRUNING_TIMEOUT, TCPRegistryServer

from .registration.rpyc import Entry, RpycRegistrar, registry_client

log = logging.getLogger("rpyc_host.registry")

Registrar = RpycRegistrar

__all__ = ["Entry", "Registrar", "RpycRegistrar", "main", "registry_client"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rpyc_host.registry``: rpyc's TCP registry server on one address."""
    parser = argparse.ArgumentParser(
        prog="python -m rpyc_host.registry",
        description="Run rpyc's TCP registry server bound to one address (no authentication: "
        "keep it on a private network).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=18811, help="TCP port, 0 for any (default: %(default)s)")
    parser.add_argument(
        "--prune",
        type=float,
        default=DEFAULT_PRUNING_TIMEOUT,
        help="seconds after which an entry not refreshed is dropped (default: %(default)s)",
    )
    parser.add_argument("--no-listing", action="store_true", help="refuse to list service names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = TCPRegistryServer(
            host=args.host, port=args.port, pruning_timeout=args.prune, allow_listing=not args.no_listing
        )
    except OSError as exc:
        print(f"Error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    host, port = server.sock.getsockname()[:2]
    log.info("registry listening on %s:%d (tcp, prune after %.0f s)", host, port, args.prune)
    try:
        server.start()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

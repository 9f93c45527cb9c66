"""``python -m client services``: where a service's instances are, from a target or rpyc's registry.

    python -m client services                          # registry from $RPYC_HOST_REGISTRY or config.yaml
    python -m client services --registry 10.0.0.1:18811
    python -m client services --registry 10.0.0.1 DEMO # the addresses of one name
    python -m client services dns://10.96.0.10:53/demo.default.svc.cluster.local
    python -m client services etcd://10.0.0.1:2379,10.0.0.2:2379/rpyc-host/DEMO

Listing needs a registry started with listing on (``python -m rpyc_host.registry`` has it on;
``rpyc_registry`` needs ``-l true``); one name can always be looked up.
"""

from __future__ import annotations

import argparse
import sys

from rpyc.utils.registry import TCPRegistryClient

from .cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .discovery import DiscoveryError, is_target, resolver_for
from .errors import ConfigError
from .pool import default_registry, parse_registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("services", help="list the services rpyc's registry knows, with addresses")
    parser.add_argument(
        "name",
        nargs="?",
        help="a target (dns://..., etcd://..., registry://..., static:...) or a name in rpyc's registry",
    )
    parser.add_argument(
        "--registry", help="host or host:port (default: $RPYC_HOST_REGISTRY, then the config's registry:)"
    )
    parser.add_argument("--config", help="config file (default: $RPYC_HOST_CONFIG or config.yaml)")
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for the registry (default: %(default)s)"
    )
    parser.set_defaults(func=cmd_services)


def cmd_services(args: argparse.Namespace) -> int:
    if args.name and is_target(args.name):
        return _show_target(args.name, args.timeout)
    try:
        host, port = parse_registry(args.registry) if args.registry else default_registry(args.config)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    registry = TCPRegistryClient(host, port=port, timeout=args.timeout)
    try:
        names = (args.name.upper(),) if args.name else registry.list()
        if names is None:
            print(
                f"Error: the registry at {host}:{port} does not allow listing (start rpyc_registry "
                "with -l true, or use python -m rpyc_host.registry); look up one name: "
                "python -m client services NAME",
                file=sys.stderr,
            )
            return EXIT_FAILED
        found = {name: registry.discover(name) for name in sorted(names)}
    except OSError as exc:
        print(f"Error: registry {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    if not any(found.values()):
        what = f"no instance of {args.name.upper()!r}" if args.name else "no services"
        print(f"{what} registered with {host}:{port}", file=sys.stderr)
        return EXIT_FAILED if args.name else EXIT_OK
    for name, addresses in found.items():
        where = ", ".join(f"{h}:{p}" for h, p in addresses) or "(no live entry)"
        print(f"{name:<20} {where}")
    return EXIT_OK


def _show_target(target: str, timeout: float) -> int:
    """One line per instance a target resolves to (``host:port``, and SRV priority/weight)."""
    try:
        resolver = resolver_for(target, timeout=timeout)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        endpoints = resolver.resolve()
    except DiscoveryError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        resolver.close()
    if not endpoints:
        print(f"no instance listed by {resolver.describe()}", file=sys.stderr)
        return EXIT_FAILED
    for endpoint in endpoints:
        where = (
            f"[{endpoint.host}]:{endpoint.port}"
            if ":" in endpoint.host
            else f"{endpoint.host}:{endpoint.port}"
        )
        extra = (
            f"  priority {endpoint.priority} weight {endpoint.weight}"
            if endpoint.priority or endpoint.weight
            else ""
        )
        print(f"{resolver.service:<20} {where}{extra}")
    return EXIT_OK

"""``python server.py``: validate the configuration and run the host."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from . import logs
from .config import load_config
from .errors import ConfigError, StartupError
from .host import Host, build_services, close_services

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="server.py", description="Host the RPyC services configured in a YAML file."
    )
    parser.add_argument(
        "--config", default="config.yaml", metavar="PATH", help="configuration file (default: %(default)s)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, print it resolved (secrets masked), exit",
    )
    parser.add_argument(
        "--log-level", metavar="LEVEL", help="override logging.level (DEBUG, INFO, WARNING, ERROR)"
    )
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        help="for supervisors and scripts: once every listener accepts, atomically write JSON with "
        "the pid and the real address of every service, the gateway, metrics and the console",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        if args.check:
            close_services(s for _, s in build_services(config))
            yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
            return EXIT_OK
        logs.configure(
            (args.log_level or config.log_level).upper(), config.logging.format, config.logging.dict
        )
        return Host(config, ready_file=args.ready_file).run()
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_FAILED

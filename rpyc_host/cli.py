"""``rpyc-host`` / ``python server.py``: validate the configuration and run the host.

Every mistake a user can make (a bad config value, a class that does not import, options a
constructor rejects or fails on, a bad ``--log-level``) is one ``Error: ...`` line and exit 2;
the traceback, when there is one, is shown only at ``--log-level DEBUG``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Sequence

import yaml

from . import logs, schema
from .config import LOG_LEVELS, Config, load_config
from .errors import ConfigError, StartupError
from .exposure import add_app_dirs
from .host import Host, check_services, require_services
from .version import version_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def program_name() -> str:
    """The command as it was run: ``rpyc-host``, ``server.py`` or ``python -m rpyc_host``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m rpyc_host" if name in ("", "__main__.py", "-c") else name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name(), description="Host the RPyC services configured in a YAML file."
    )
    parser.add_argument(
        "--config", default="config.yaml", metavar="PATH", help="configuration file (default: %(default)s)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration (import each class, check its options without building it), "
        "print it resolved (secrets masked), exit",
    )
    parser.add_argument(
        "--log-level", metavar="LEVEL", help="override logging.level (DEBUG, INFO, WARNING, ERROR, CRITICAL)"
    )
    parser.add_argument(
        "--app-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also import service classes from DIR (repeatable; the current directory and the "
        "config file's directory are always searched)",
    )
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        help="for supervisors and scripts: once every listener accepts, atomically write JSON with "
        "the pid and the real address of every service, the gateway, metrics and the console",
    )
    parser.add_argument("--version", action="version", version=version_text(parser.prog))
    return parser.parse_args(argv)


def apply_log_level(config: Config, override: str | None) -> Config:
    """The config with ``--log-level`` applied, validated like ``logging.level``."""
    if override is None:
        return config
    problem = schema.one_of(LOG_LEVELS)(override.upper())
    if problem:
        raise ConfigError(f"{override!r} {problem}", path="--log-level")
    logging_section = dataclasses.replace(config.logging, level=override.upper())
    return dataclasses.replace(config, logging=logging_section)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    debug = (args.log_level or "").upper() == "DEBUG"
    try:
        add_app_dirs([*args.app_dir, os.getcwd(), os.path.dirname(os.path.abspath(args.config))])
        config = apply_log_level(load_config(args.config), args.log_level)
        debug = config.log_level == "DEBUG"
        if args.check:
            check_services(config)
            return _print_yaml(config)
        require_services(config)
        logs.configure(config.log_level, config.logging.format, config.logging.dict)
        return Host(config, ready_file=args.ready_file).run()
    except ConfigError as exc:
        _report(exc, debug)
        return EXIT_USAGE
    except StartupError as exc:
        _report(exc, debug)
        return EXIT_FAILED


def _report(exc: Exception, debug: bool) -> None:
    if debug and exc.__cause__ is not None:
        traceback.print_exception(exc.__cause__, file=sys.stderr)
    print(f"Error: {exc}", file=sys.stderr)


def _print_yaml(config: Config) -> int:
    try:
        yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (``| head``) has what it wanted; point stdout at /dev/null so the flush at
        # exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK

"""``python -m client``: call, describe and explore services from a shell.

    python -m client call demo add 1 2          # arguments are Python literals
    python -m client describe demo
    python -m client shell demo                 # interactive, with conn and root bound

Installed as ``rpyc-host-client`` too. Every subcommand takes what it acts on as positional
arguments (a service, a method, a topic, a path) and everything else as ``--options``.

Exit status: 0 on success, 1 when the call or connection failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import ast
import code
import importlib
import os
import pkgutil
import platform
import pprint
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import rpyc

import client as client_pkg
from rpyc_host.wire.stream_reader import StreamReader

from .connection import DEFAULT_TIMEOUT, connect, describe
from .errors import ConfigError, ConnectError, describe_error
from .settings import load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _literal(text: str) -> Any:
    """A Python literal, or the text itself when it is not one (``echo hello`` works)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", help="service name from the config file (e.g. demo)")
    add_connection_options(parser)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--config, --host, --port and --timeout, for commands that connect to one service."""
    parser.add_argument("--config", help="config file (default: $RPYC_HOST_CONFIG or config.yaml)")
    parser.add_argument("--host", help="connect here instead of the configured host")
    parser.add_argument("--port", type=int, help="connect here instead of the configured port")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds for connecting and per call (default: %(default)s)",
    )


def version_text(prog: str) -> str:
    """``<prog> <version> (rpyc <version>, Python <version>)``, as ``rpyc-host --version`` prints
    it; read from the installed package's metadata, so the client imports nothing of the host."""
    try:
        version = metadata.version("rpyc-host")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    return f"{prog} {version} (rpyc {rpyc.__version__}, Python {platform.python_version()})"


def program_name() -> str:
    """The command as the user typed it: ``python -m client`` or the installed ``rpyc-host-client``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m client" if name in ("", "__main__.py", "-c") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text(parser.prog))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    call = sub.add_parser("call", help="call an exposed method and print the result")
    add_target(call)
    call.add_argument("method")
    call.add_argument("args", nargs="*", help="arguments, as Python literals (1, 'a', (1, 2), None)")
    call.set_defaults(func=cmd_call)
    describe_cmd = sub.add_parser("describe", help="list a service's methods and signatures")
    add_target(describe_cmd)
    describe_cmd.set_defaults(func=cmd_describe)
    health = sub.add_parser("health", help="ask services for health(); exit 0 if all are ok, else 1")
    health.add_argument("service", nargs="?", help="one service (default: every service in the config)")
    health.add_argument("--config", help="config file (default: $RPYC_HOST_CONFIG or config.yaml)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds per service (%(default)s)")
    health.set_defaults(func=cmd_health)
    shell = sub.add_parser("shell", help="interactive console with conn and root bound")
    add_target(shell)
    shell.set_defaults(func=cmd_shell)
    # Service-specific command groups live in client/cmd_<name>.py, each with register(sub).
    for info in sorted(pkgutil.iter_modules(client_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"client.{info.name}").register(sub)
    _mark_leaves(parser)
    return parser


def _mark_leaves(parser: argparse.ArgumentParser) -> None:
    """Record on every (sub)command which parser it was, so a stray argument is reported with
    that subcommand's own usage rather than the top-level one."""
    parser.set_defaults(cli_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _mark_leaves(child)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse like ``parse_args``, but unknown arguments get the innermost subcommand's usage."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "cli_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def connect_from_args(args: argparse.Namespace) -> Any:
    return connect(args.service, host=args.host, port=args.port, config=args.config, timeout=args.timeout)


def cmd_call(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        method = getattr(conn.root, args.method)
        result = method(*[_literal(a) for a in args.args])
        if isinstance(result, StreamReader):  # a streamed result: one item a line, as they come
            with result:
                for item in result:
                    print(item if isinstance(item, str) else pprint.pformat(item), flush=True)
            return EXIT_OK
        print(result if isinstance(result, str) else pprint.pformat(result))
    return EXIT_OK


def cmd_describe(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        info = describe(conn)
    print(info["service"])
    for name, meta in info["methods"].items():
        doc = f"  - {meta['doc']}" if meta["doc"] else ""
        print(f"  {name}{meta['signature']}{doc}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)  # read once for every service
    names = [args.service] if args.service else [e.name for e in settings.services.values() if e.enabled]
    healthy = True
    for name in names:
        try:
            with connect(name, config=settings, timeout=args.timeout, retries=0) as conn:
                facts = dict(conn.root.health())
        except Exception as exc:
            print(f"{name}: down ({remote_message(exc)})")
            healthy = False
            continue
        detail = f", {facts['detail']}" if facts.get("detail") else ""
        print(f"{name}: {facts['status']} (up {facts['uptime']:.0f} s{detail})")
        healthy &= facts["status"] == "ok"
    return EXIT_OK if healthy else EXIT_FAILED


def cmd_shell(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        banner = f"Connected to {args.service!r}. Names: conn, root (try root.describe()). Ctrl-D to leave."
        code.interact(banner=banner, local={"conn": conn, "root": conn.root}, exitmsg="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\nError: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        print(f"Error: {getattr(args, 'service', args.command)}: {remote_message(exc)}", file=sys.stderr)
        return EXIT_FAILED


def remote_message(exc: BaseException) -> str:
    """``Type: message`` as a person reads it (no remote traceback text)."""
    return describe_error(exc)


if __name__ == "__main__":
    os._exit(main())

"""``python -m client files ...``: the file service from a shell.

    python -m client files ls [-l] [PATH]
    python -m client files upload big.iso isos/          # progress bar on stderr
    python -m client files download isos/big.iso . --no-progress
    python -m client files upload big.iso --hash sha256  # blake3 (default), xxh3_128 or sha256

Every command connects to the ``files`` service of the config file (``--service`` for another
name). Exit status: 0 on success, 1 with a one-line ``Error: ...`` on failure, 2 for usage
errors, 130 when interrupted (run the same transfer again to resume it).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from typing import Any, TextIO

from . import DEFAULT_TIMEOUT, ConnectError
from . import files as files_lib
from .cli import EXIT_FAILED, EXIT_OK, connect_from_args, remote_message

EXIT_INTERRUPTED = 130


def register(sub: Any) -> None:
    """Add the ``files`` command group to the top-level subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--service", default="files", help="service name in the config (default: files)")
    common.add_argument("--config", help="config file (default: $RPYC_HOST_CONFIG or config.yaml)")
    common.add_argument("--host", help="connect here instead of the configured host")
    common.add_argument("--port", type=int, help="connect here instead of the configured port")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per call")

    group = sub.add_parser("files", help="browse and transfer files on a file service")
    cmds = group.add_subparsers(dest="files_command", required=True, metavar="ACTION")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return cmds.add_parser(name, help=help, parents=[common])

    p = cmd("ls", "list a directory")
    p.add_argument("path", nargs="?", default=".")
    p.add_argument("-l", "--long", action="store_true", help="kind, size, mode and mtime too")
    p.set_defaults(func=_guarded(cmd_ls))
    p = cmd("pwd", "print the directory commands start in (the service's root)")
    p.set_defaults(func=_guarded(lambda conn, args: print(conn.root.pwd())))
    p = cmd("mkdir", "create a directory")
    p.add_argument("path")
    p.add_argument(
        "-p", "--parents", action="store_true", help="create missing parents; no error if it exists"
    )
    p.set_defaults(func=_guarded(lambda conn, args: conn.root.mkdir(args.path, args.parents)))
    p = cmd("rm", "remove a file, link or empty directory")
    p.add_argument("path")
    p.add_argument("-r", "--recursive", action="store_true", help="remove a directory and everything in it")
    p.set_defaults(func=_guarded(cmd_rm))
    for name, help_text in (("cp", "copy a file or directory tree"), ("mv", "move or rename")):
        p = cmd(name, help_text)
        p.add_argument("src")
        p.add_argument("dst", help="new path, or an existing directory to put SRC in")
        p.set_defaults(func=_guarded(_two_paths(name)))
    p = cmd("upload", "send a local file (resumes an interrupted upload)")
    p.add_argument("local")
    p.add_argument("remote", nargs="?", help="remote path or directory (default: the local name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing remote file")
    _transfer_options(p)
    p.set_defaults(func=_guarded(cmd_upload))
    p = cmd("download", "fetch a remote file (resumes LOCAL.part)")
    p.add_argument("remote")
    p.add_argument("local", nargs="?", help="local path or directory (default: the remote name)")
    _transfer_options(p)
    p.set_defaults(func=_guarded(cmd_download))


def _transfer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for scripts)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    p.add_argument(
        "--hash",
        choices=files_lib.HASHES,
        default=files_lib.DEFAULT_HASH,
        help="integrity hash (default: blake3; xxh3_128 detects corruption only, not tampering)",
    )


def _guarded(action: Any) -> Any:
    """Connect, run ``action(conn, args)``, turn failures into one ``Error:`` line and a status."""

    def run(args: argparse.Namespace) -> int:
        try:
            with connect_from_args(args) as conn:
                action(conn, args)
            return EXIT_OK
        except KeyboardInterrupt:
            print("\nError: interrupted; run the same command again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except ConnectError:
            raise  # cli.main words connection failures itself
        except (OSError, ValueError, TypeError) as exc:
            print(f"Error: {args.service}: {remote_message(exc)}", file=sys.stderr)
            return EXIT_FAILED

    return run


def cmd_ls(conn: Any, args: argparse.Namespace) -> None:
    if not args.long:
        for name in conn.root.ls(args.path):
            print(name)
        return
    for e in files_lib.ls(conn, args.path):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
        suffix = "/" if e.kind == "dir" else ("@" if e.kind == "symlink" else "")
        print(f"{e.mode:04o} {e.kind:<7} {e.size:>14,} {when} {e.name}{suffix}")


def cmd_rm(conn: Any, args: argparse.Namespace) -> None:
    try:
        conn.root.rm(args.path, args.recursive)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY and not args.recursive:
            message = f"{args.path!r}: directory not empty (use rm -r to remove it and its contents)"
            raise OSError(errno.ENOTEMPTY, message) from None
        raise


def _two_paths(name: str) -> Any:
    def action(conn: Any, args: argparse.Namespace) -> None:
        getattr(conn.root, name)(args.src, args.dst)

    return action


def cmd_upload(conn: Any, args: argparse.Namespace) -> None:
    if not os.path.isfile(args.local):
        raise FileNotFoundError(2, f"{args.local!r}: no such local file")
    remote = args.remote or os.path.basename(args.local)
    if remote.endswith("/") or (conn.root.exists(remote) and conn.root.stat(remote)[1] == "dir"):
        remote = f"{remote.rstrip('/')}/{os.path.basename(args.local)}"
    bar = None if args.no_progress else ProgressBar(f"upload {remote}")
    try:
        size, digest = files_lib.upload(
            conn,
            args.local,
            remote,
            overwrite=args.overwrite,
            resume=not args.no_resume,
            progress=bar,
            timeout=args.timeout,
            hash=args.hash,
        )
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, f"{remote!r}: already exists (use --overwrite to replace it)"
        ) from None
    if bar is not None:
        bar.finish()
    print(f"{remote}: {size:,} bytes, {args.hash} {digest}")


def cmd_download(conn: Any, args: argparse.Namespace) -> None:
    local = args.local or os.path.basename(args.remote.rstrip("/"))
    if os.path.isdir(local):
        local = os.path.join(local, os.path.basename(args.remote.rstrip("/")))
    bar = None if args.no_progress else ProgressBar(f"download {args.remote}")
    size, digest = files_lib.download(
        conn,
        args.remote,
        local,
        resume=not args.no_resume,
        progress=bar,
        timeout=args.timeout,
        hash=args.hash,
    )
    if bar is not None:
        bar.finish()
    print(f"{local}: {size:,} bytes, {args.hash} {digest}")


class ProgressBar:
    """A one-line progress bar: bytes, percent, rate and ETA, redrawn at most 10 times a second.

    Usage::

        bar = ProgressBar("upload big.iso")
        files.upload(conn, "big.iso", "big.iso", progress=bar)
        bar.finish()

    On a terminal it redraws in place; elsewhere it prints only the final line.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 24) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self.first_done = 0
        self.last_draw = 0.0
        self.done = 0
        self.total = 0

    def __call__(self, done: int, total: int) -> None:
        if self.total == 0 and self.done == 0:
            self.first_done = done  # a resumed transfer: rate counts only this run's bytes
        self.done, self.total = done, total
        now = time.monotonic()
        if self.live and now - self.last_draw >= 0.1:
            self.last_draw = now
            self.stream.write("\r" + self.render(now))
            self.stream.flush()

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.first_done) / elapsed
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _duration(left) if left != float("inf") else "--:--"
        return (
            f"{self.label} [{bar}] {frac:6.1%} {_bytes(self.done)}/{_bytes(self.total)} "
            f"{_bytes(rate)}/s ETA {eta}"
        )

    def finish(self) -> None:
        line = self.render()
        self.stream.write(("\r" if self.live else "") + line + "\n")
        self.stream.flush()


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

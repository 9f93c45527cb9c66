"""The file service's tree operations and its sandbox: every bad path is refused, clearly."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import pytest

import client
from rpyc_host.testing import running_host


def files_config(root: Path, **options: Any) -> str:
    opts = ", ".join(f"{k}: {v}" for k, v in {"root": str(root), **options}.items())
    return f"""
services:
  files:
    class: services.files:FileService
    port: 0
    options: {{{opts}}}
logging: {{level: WARNING}}
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside root holding a secret no client may see."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_bytes(b"top secret")
    return path


@pytest.fixture
def connect(root: Path) -> Iterator[Callable[[], Any]]:
    """One in-process host serving FileService on root; connect() opens more clients to it."""
    with ExitStack() as stack:
        host = stack.enter_context(running_host(files_config(root)))
        address = host.address("files")

        def connect() -> Any:
            cm: AbstractContextManager[Any] = client.connect(host=address[0], port=address[1], timeout=10)
            return stack.enter_context(cm)

        yield connect


@pytest.fixture
def fs(connect: Callable[[], Any]) -> Any:
    return connect().root


def message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(getattr(exc.value, "strerror", None) or exc.value)


# -- tree operations ---------------------------------------------------------------------------------


def test_root_is_created_and_pwd_is_relative(fs: Any, root: Path) -> None:
    assert root.is_dir()
    assert fs.pwd() == "."
    assert fs.mkdir("a/b", True) == "a/b"
    assert fs.cd("a/b") == "a/b"
    assert fs.pwd() == "a/b"
    assert fs.cd("..") == "a"
    assert fs.cd() == "."


def test_cd_is_per_connection(connect: Callable[[], Any]) -> None:
    one, two = connect().root, connect().root
    one.mkdir("only-one")
    one.cd("only-one")
    one.write_bytes("f.txt", b"x")
    assert one.pwd() == "only-one"
    assert two.pwd() == "."
    assert two.exists("f.txt") is False
    assert two.exists("only-one/f.txt") is True


def test_ls_stat_exists(fs: Any, root: Path) -> None:
    fs.mkdir("d")
    fs.write_bytes("d/a.txt", b"hello")
    assert fs.ls() == ("d",)
    assert fs.ls("d") == ("a.txt",)
    (entry,) = fs.ls("d", True)
    assert entry[:3] == ("a.txt", "file", 5)
    assert isinstance(entry[3], float) and entry[4] == 0o644
    assert fs.stat("d")[1] == "dir"
    assert fs.stat("d/a.txt") == entry
    assert fs.exists("d/a.txt") and not fs.exists("d/nope") and not fs.exists("nope/x")


def test_small_files_roundtrip_and_limit(fs: Any) -> None:
    size, digest = fs.write_bytes("x.bin", b"\x00\x01" * 100)
    assert size == 200 and len(digest) == 64
    assert fs.read_bytes("x.bin") == b"\x00\x01" * 100
    fs.write_bytes("x.bin", b"new")  # write_bytes replaces by default
    assert fs.read_bytes("x.bin") == b"new"
    with pytest.raises(FileExistsError):
        fs.write_bytes("x.bin", b"again", False)


def test_cp_file_and_tree_mv_rm(fs: Any, root: Path) -> None:
    fs.mkdir("src/sub", True)
    fs.write_bytes("src/a.txt", b"A")
    fs.write_bytes("src/sub/b.txt", b"B")
    assert fs.cp("src/a.txt", "a-copy.txt") == "a-copy.txt"
    assert fs.read_bytes("a-copy.txt") == b"A"
    assert fs.cp("src", "dst") == "dst"
    assert fs.read_bytes("dst/sub/b.txt") == b"B"
    fs.mkdir("into")
    assert fs.cp("a-copy.txt", "into") == "into/a-copy.txt"  # an existing directory receives it
    assert fs.mv("dst", "moved") == "moved"
    assert not fs.exists("dst") and fs.read_bytes("moved/a.txt") == b"A"
    with pytest.raises(FileExistsError, match=r"a-copy\.txt"):
        fs.mv("into/a-copy.txt", "a-copy.txt")
    with pytest.raises(ValueError, match="into itself"):
        fs.cp("src", "src/sub")
    with pytest.raises(OSError, match="not empty"):
        fs.rm("moved")
    fs.rm("moved", True)
    fs.rm("a-copy.txt")
    assert sorted(os.listdir(root)) == ["into", "src"]


# -- bad input -------------------------------------------------------------------------------------


def test_absolute_paths_are_refused(fs: Any) -> None:
    for call in (
        lambda: fs.read_bytes("/etc/passwd"),
        lambda: fs.ls("/"),
        lambda: fs.cd("/etc"),
        lambda: fs.write_bytes("/tmp/x", b"x"),
    ):
        with pytest.raises(PermissionError) as exc:
            call()
        assert "absolute paths are not allowed" in message(exc)


@pytest.mark.parametrize("path", ["..", "../outside/secret.txt", "a/../../outside", "./../x"])
def test_dotdot_escapes_are_refused(fs: Any, path: str) -> None:
    fs.mkdir("a")
    for call in (fs.read_bytes, fs.ls, fs.cd, fs.stat, fs.exists):
        with pytest.raises(PermissionError) as exc:
            call(path)
        assert "outside the service's root" in message(exc) and repr(path) in message(exc)


def test_symlinks_pointing_outside_are_never_followed(fs: Any, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "secret.txt", root / "filelink")
    attempts = {
        "read file link": lambda: fs.read_bytes("filelink"),
        "read through dir link": lambda: fs.read_bytes("dirlink/secret.txt"),
        "open_read": lambda: fs.open_read("filelink"),
        "write through dir link": lambda: fs.write_bytes("dirlink/new.txt", b"x"),
        "write onto file link": lambda: fs.write_bytes("filelink", b"x"),
        "list": lambda: fs.ls("dirlink"),
        "cd": lambda: fs.cd("dirlink"),
        "cp link": lambda: fs.cp("filelink", "copy"),
        "mv link": lambda: fs.mv("dirlink", "moved"),
        "mkdir through link": lambda: fs.mkdir("dirlink/sub"),
    }
    for what, call in attempts.items():
        with pytest.raises(PermissionError) as exc:
            call()
        assert "link" in message(exc), what
        assert str(outside) not in message(exc), what
    fs.write_bytes("plain.txt", b"p")
    with pytest.raises(PermissionError):
        fs.cp("plain.txt", "dirlink/plain.txt")
    with pytest.raises(PermissionError):
        fs.mv("plain.txt", "dirlink/plain.txt")
    # ls and stat describe links without following them; rm removes the link, not the target.
    assert fs.stat("filelink")[1:3] == ("symlink", 0)
    fs.rm("dirlink")
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"top secret"


def test_nul_bytes_and_over_long_names(fs: Any) -> None:
    with pytest.raises(ValueError, match="NUL"):
        fs.read_bytes("a\x00b")
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        fs.write_bytes("n" * 256, b"x")
    with pytest.raises(ValueError, match="longer than 4096"):
        fs.ls("a/" * 3000)
    with pytest.raises(TypeError, match="must be a str"):
        fs.ls(5)
    with pytest.raises(PermissionError, match="reserved"):
        fs.read_bytes(".upload-0123456789abcdef-0123456789abcdef.part")


def test_directories_and_missing_parents(fs: Any) -> None:
    fs.mkdir("d")
    with pytest.raises(IsADirectoryError) as exc:
        fs.write_bytes("d", b"x")
    assert "'d'" in message(exc)
    with pytest.raises(IsADirectoryError):
        fs.open_write("d")
    with pytest.raises(IsADirectoryError):
        fs.read_bytes("d")
    with pytest.raises(IsADirectoryError):
        fs.open_read("d")
    with pytest.raises(FileNotFoundError) as exc:
        fs.write_bytes("no/such/dir/f.txt", b"x")
    assert "no" in message(exc)
    with pytest.raises(FileNotFoundError):
        fs.mkdir("no/such")
    with pytest.raises(FileExistsError):
        fs.mkdir("d")
    with pytest.raises(PermissionError, match="cannot remove the current directory"):
        fs.rm(".", True)
    fs.write_bytes("f", b"x")
    with pytest.raises(NotADirectoryError):
        fs.cd("f")
    with pytest.raises(NotADirectoryError):
        fs.mkdir("f/sub", True)


def test_server_keeps_serving_after_errors(connect: Callable[[], Any]) -> None:
    fs = connect().root
    for bad in ("/etc", "..", "a\x00", "missing"):
        with pytest.raises((PermissionError, ValueError, FileNotFoundError)):
            fs.read_bytes(bad)
    assert fs.pwd() == "."
    assert connect().root.write_bytes("ok", b"1")[0] == 1


def test_fifo_is_not_read(fs: Any, root: Path) -> None:
    os.mkfifo(root / "pipe")
    with pytest.raises(PermissionError, match="not a regular file"):
        fs.read_bytes("pipe")
    assert fs.stat("pipe")[1] == "other"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_file_size": -1}, "max_file_size must be >= 0"),
        ({"small_io_limit": "big"}, "small_io_limit must be an integer"),
        ({"transfer_timeout": 0}, "transfer_timeout must be a number of seconds > 0"),
        ({"max_totl_bytes": 5}, "did you mean"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, Any], error: str) -> None:
    from rpyc_host.errors import ConfigError

    with pytest.raises(ConfigError, match=error), running_host(files_config(tmp_path / "r", **options)):
        pass

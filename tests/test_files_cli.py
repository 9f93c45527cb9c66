"""``python -m client files ...`` against ``python server.py``: exit codes, one-line errors, transfers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from rpyc_host.testing import ServerProcess, run_cli


def test_cli_transfers_and_errors(
    tmp_path: Path,
    write_config: Callable[[str], Path],
    start_server: Callable[..., ServerProcess],
) -> None:
    config = write_config(
        f"""
        services:
          files:
            class: services.files:FileService
            port: 0
            options: {{root: {tmp_path / "root"}}}
        """
    )
    server = start_server(config)
    host, port = server.address("files")

    def cli(*args: str) -> tuple[int, str, str]:
        result = run_cli(
            "-m", "client", "files", *args, "--host", host, "--port", str(port), "--config", str(config)
        )
        return result.returncode, result.stdout, result.stderr

    src = tmp_path / "local.bin"
    src.write_bytes(os.urandom(3 << 20))
    assert cli("mkdir", "-p", "in/box")[0] == 0
    code, out, err = cli("upload", str(src), "in/")
    assert code == 0, err
    assert "in/local.bin: 3,145,728 bytes, blake3" in out
    assert "100.0%" in err and "ETA" in err  # the progress bar's final line
    code, out, err = cli("upload", str(src), "in/", "--no-progress")
    assert (
        code == 1
        and err.strip()
        == "Error: files: FileExistsError: 'in/local.bin': already exists (use --overwrite to replace it)"
    )
    code, out, _ = cli("ls", "-l", "in")
    assert code == 0 and "3,145,728" in out and "box/" in out
    back = tmp_path / "back.bin"
    code, out, err = cli("download", "in/local.bin", str(back), "--no-progress")
    assert code == 0 and err == "" and back.read_bytes() == src.read_bytes()
    code, out, err = cli("download", "in/local.bin", str(back), "--no-progress", "--hash", "sha256")
    assert code == 0 and err == "", err
    assert out.strip() == f"{back}: 3,145,728 bytes, sha256 {hashlib.sha256(src.read_bytes()).hexdigest()}"
    assert cli("cp", "in", "copy")[0] == 0
    assert cli("mv", "copy", "moved")[0] == 0
    assert cli("rm", "-r", "moved")[0] == 0
    assert cli("ls")[1].split() == ["in"]
    for args, expected in [
        (("ls", "/etc"), "PermissionError: '/etc': absolute paths are not allowed"),
        (("ls", "../.."), "PermissionError: '../..': leads outside the service's root"),
        (
            ("download", "missing", str(tmp_path / "m")),
            "FileNotFoundError: 'missing': no such file or directory",
        ),
        (("rm", "in"), "OSError: 'in': directory not empty (use rm -r to remove it and its contents)"),
    ]:
        code, out, err = cli(*args)
        assert code == 1, args
        assert len(err.strip().splitlines()) == 1 and expected in err, err
        assert "None -> None" not in err
    assert not (tmp_path / "m.part").exists()

"""README examples run as written, and run again: a second run finds the first one's results."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from rpyc_host.testing import PROJECT_ROOT, run_cli, running_host


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """The fenced (language, code) blocks of one README section."""
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def test_the_files_examples_run_twice(tmp_path: Path) -> None:
    blocks = readme_blocks("### Files")
    python = [code for lang, code in blocks if lang == "python"]
    shell = [code for lang, code in blocks if lang == "bash"]
    assert len(python) == 1 and len(shell) == 1
    (tmp_path / "girl.jpg").write_bytes(b"\xff\xd8 not really a jpeg " * 1000)
    config = (
        "services:\n  files:\n    class: services.files:FileService\n    port: 0\n"
        f"    options: {{root: {tmp_path / 'root'}}}\n"
    )
    with running_host(config) as host:
        _, port = host.address("files")
        client_config = tmp_path / "config.yaml"  # what client.connect("files") reads in this folder
        client_config.write_text(config.replace("port: 0", f"port: {port}"))
        for attempt in (1, 2):
            result = run_cli("-c", python[0], cwd=tmp_path)
            assert result.returncode == 0, f"run {attempt}: {result.stderr}"
            assert "girl.jpg" in result.stdout
            for line in shell[0].strip().splitlines():
                words = shlex.split(line, comments=True)
                assert words[:3] == [".venv/bin/python", "-m", "client"], line
                quiet = ["--no-progress"] if words[4] in ("upload", "download") else []
                result = run_cli(*words[1:], *quiet, cwd=tmp_path)
                assert result.returncode == 0, f"run {attempt}: {line}: {result.stderr}"
        assert (tmp_path / "copy.jpg").read_bytes() == (tmp_path / "girl.jpg").read_bytes()

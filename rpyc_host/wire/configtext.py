"""A configuration file's text as data: YAML, then ``${VAR}`` / ``${VAR:-default}`` expansion.

Both the host's validator (:mod:`rpyc_host.config`) and the client's light reader
(``client.settings``) start from :func:`read_text`, so a file means the same to both. A value
that is exactly one ``${...}`` takes the type YAML gives the expanded text, so
``port: ${DEMO_PORT:-18861}`` is an integer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from .errors import WireError

_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class ConfigTextError(WireError, ValueError):
    """The text is not YAML, or names an unset variable; ``path`` is the dotted key, if any."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def read_text(text: str) -> Any:
    """Parse YAML text and expand environment references; ConfigTextError for either mistake."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigTextError(f"{where}YAML syntax error: {problem}") from None
    return expand_env(raw if raw is not None else {})


def expand_env(value: Any, path: str = "", environ: Mapping[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    env = os.environ if environ is None else environ
    if isinstance(value, dict):
        return {k: expand_env(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigTextError(
            f"environment variable {name!r} is not set (set it, or write ${{{name}:-default}})", path
        )

    result = _ENV_REF.sub(substitute, value)
    if _ENV_REF.fullmatch(value):
        # A whole-value reference takes the type YAML gives the text: ports stay integers.
        try:
            parsed = yaml.safe_load(result) if result.strip() else result
        except yaml.YAMLError:
            return result
        return parsed if isinstance(parsed, str | int | float | bool) else result
    return result

"""What every subcommand shares: one-line errors and reading config files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def fail(prog: str, message: str) -> int:
    """Bad input ends with one line naming the problem and exit status 2 (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of config keys; errors name the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = p.read_text()
    try:
        values = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:  # the parsers' own texts name no file
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ValueError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as YAML (``lam=0.5`` -> ('lam', 0.5))."""
    if "=" not in text:
        raise ValueError(f"--override expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (comma-separated options)."""
    return [t.strip() for t in text.split(",") if t.strip()]

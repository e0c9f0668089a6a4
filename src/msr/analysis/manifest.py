"""``figures/<set>/MANIFEST.json``: what every figure and table is, and what it was made from.

For each item (one notebook's outputs): the sha256 of every file, the runs it was made from
(from the provenance record the notebook wrote) and the tables it read; for the whole set: the
git commit of the code (and whether the working tree had uncommitted changes), the hash of the
pipeline config (and, given ``--config-record``, the resolved config itself), every run's
directory and the sha256 of its ``config.json``, ``summary.json`` and ``metrics.csv`` (not
``probes.csv``: tens of MB a run on CIFAR), the sha256 of every source table, and ``set_dir``,
the manifest's own folder below the project root. Paths are relative to the project root.
No timestamps, so a rerun on the same inputs gives the same bytes.

``msr verify`` (msr.analysis.verify) checks a set against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from msr import atomic

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
MANIFEST_VERSION = 2
# the run files whose hashes the manifest records (msr.training.rundir's names)
RUN_FILES = ("config.json", "summary.json", "metrics.csv")


def load_config_file(path: str | Path):
    """A config file: JSON by suffix (PyYAML would read JSON's ``1e-05`` as a string), else YAML."""
    text = Path(path).read_text()
    return json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)


def config_digest(config: dict) -> str:
    """The hash of a resolved pipeline config: sha256 of its canonical JSON (sorted keys, no
    spaces), as the workflow computes ``config_sha256``."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(cwd: str | Path = ".") -> dict:
    """``{"commit": sha or None, "dirty": bool or None}``; None outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def build_manifest(provenance: Sequence[str | Path], runs_root: str | Path | None = None,
                   run_dirs: dict[str, str] | None = None, config_sha256: str | None = None,
                   cwd: str | Path = ".", out: str | Path | None = None,
                   config: dict | None = None) -> dict:
    """The manifest as a dict. ``run_dirs`` maps run ids to their directories (from
    ``runs.csv``); else they are looked up below ``runs_root``. ``out``: where the manifest
    will be written (recorded as ``set_dir``); ``config``: the resolved pipeline config."""
    if config is not None:
        digest = config_digest(config)
        if config_sha256 is not None and config_sha256 != digest:
            raise ValueError(f"the config record hashes to {digest}, not to the given config sha256 {config_sha256}")
        config_sha256 = digest
    items = []
    used: set[str] = set()
    sources: set[str] = set()
    for path in sorted(Path(p) for p in provenance):
        record = json.loads(path.read_text())
        files = []
        for out in record["outputs"]:
            files.append({"path": out, "sha256": sha256_file(Path(cwd) / out)})
        kind = "figure" if any(f["path"].endswith(FIGURE_SUFFIXES) for f in files) else "table"
        runs = sorted(record.get("runs", []))
        used.update(runs)
        sources.update(record.get("sources", []))
        items.append({
            "name": record["name"],
            "kind": kind,
            "files": files,
            "notebook": f"notebooks/{record['name']}.ipynb",
            "sources": record.get("sources", []),
            "n_runs": len(runs),
            "runs": runs,
        })
    run_configs, run_locations, run_hashes = {}, {}, {}
    for rid in sorted(used):
        rdir = Path(run_dirs[rid]) if run_dirs and rid in run_dirs else Path(runs_root or ".") / rid
        run_locations[rid] = rdir.as_posix()
        run_hashes[rid] = {name: sha256_file(Path(cwd) / rdir / name) if (Path(cwd) / rdir / name).exists() else None
                           for name in RUN_FILES}
        run_configs[rid] = run_hashes[rid]["config.json"]
    git = git_state(cwd)
    manifest = {
        "description": "Figures and tables of the msr pipeline: files with sha256, the runs each "
                       "was made from, and the code/config that made them. Check with "
                       "`msr verify <this folder>`.",
        "manifest_version": MANIFEST_VERSION,
        "set_dir": _relative(out, cwd).parent.as_posix() if out is not None else None,
        "name": (config or {}).get("name"),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "config_sha256": config_sha256,
        "items": items,
        "run_config_sha256": run_configs,
        "run_dirs": run_locations,
        "run_sha256": run_hashes,
        "source_sha256": {src: sha256_file(Path(cwd) / src) if (Path(cwd) / src).exists() else None
                          for src in sorted(sources)},
    }
    if config is not None:
        manifest["config"] = config
    return manifest


def _relative(path: str | Path, cwd: str | Path) -> Path:
    """``path`` relative to ``cwd`` (the project root), as the manifest's paths are."""
    path, cwd = Path(path), Path(cwd)
    if not path.is_absolute():
        return path
    return Path(os.path.relpath(path, cwd.resolve()))


def write_manifest(manifest: dict, out: str | Path) -> None:
    atomic.write_text(out, json.dumps(manifest, indent=1, sort_keys=False) + "\n")

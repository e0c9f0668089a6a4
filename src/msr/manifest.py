"""``figures/MANIFEST.json``: what every figure and table is, and what it was made from.

For each item (one notebook's outputs): the sha256 of every file, the runs it was made from
(from the provenance record the notebook wrote) and the hash of each of those runs'
``config.json``; for the whole manifest: the git commit of the code (and whether the working
tree had uncommitted changes) and the hash of the pipeline config. No timestamps, so a rerun
on the same inputs gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from msr import io as msr_io

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


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
                   cwd: str | Path = ".") -> dict:
    """The manifest as a dict. ``run_dirs`` maps run ids to their directories (from
    ``runs.csv``); else they are looked up below ``runs_root``."""
    items = []
    used: set[str] = set()
    for path in sorted(Path(p) for p in provenance):
        record = json.loads(path.read_text())
        files = []
        for out in record["outputs"]:
            files.append({"path": out, "sha256": sha256_file(Path(cwd) / out)})
        kind = "figure" if any(f["path"].endswith(FIGURE_SUFFIXES) for f in files) else "table"
        runs = sorted(record.get("runs", []))
        used.update(runs)
        items.append({
            "name": record["name"],
            "kind": kind,
            "files": files,
            "notebook": f"notebooks/{record['name']}.ipynb",
            "sources": record.get("sources", []),
            "n_runs": len(runs),
            "runs": runs,
        })
    run_configs = {}
    for rid in sorted(used):
        rdir = Path(run_dirs[rid]) if run_dirs and rid in run_dirs else Path(runs_root or ".") / rid
        cfg = Path(cwd) / rdir / "config.json"
        run_configs[rid] = sha256_file(cfg) if cfg.exists() else None
    git = git_state(cwd)
    return {
        "description": "Figures and tables of the msr pipeline: files with sha256, the runs each "
                       "was made from, and the code/config that made them.",
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "config_sha256": config_sha256,
        "items": items,
        "run_config_sha256": run_configs,
    }


def write_manifest(manifest: dict, out: str | Path) -> None:
    msr_io.write_text(out, json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="msr manifest",
        description="Write figures/MANIFEST.json from the provenance records the notebooks left.")
    parser.add_argument("--provenance", nargs="+", required=True, type=Path,
                        help="provenance records (results/provenance/<name>.json)")
    parser.add_argument("--runs-table", type=Path, default=None,
                        help="results/tables/runs.csv, to find each run's directory")
    parser.add_argument("--runs", type=Path, default=Path("results/runs"),
                        help="runs root, used when --runs-table is not given [results/runs]")
    parser.add_argument("--config-sha256", default=None, help="hash of the pipeline config")
    parser.add_argument("--out", type=Path, default=Path("figures/MANIFEST.json"))
    args = parser.parse_args(argv)
    run_dirs = None
    if args.runs_table is not None:
        import csv

        with args.runs_table.open() as f:
            run_dirs = {row["run_id"]: row["run_dir"] for row in csv.DictReader(f)}
    try:
        manifest = build_manifest(args.provenance, args.runs, run_dirs, args.config_sha256)
    except (OSError, KeyError, json.JSONDecodeError) as err:
        print(f"msr manifest: error: {err}", file=sys.stderr)
        return 2
    write_manifest(manifest, args.out)
    print(f"wrote {args.out} ({len(manifest['items'])} items)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

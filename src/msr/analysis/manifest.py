"""``figures/<set>/MANIFEST.json``: what every figure and table is, and what it was made from.

For each item (one notebook's outputs): the sha256 of every file, the runs it was made from
(from the provenance record the notebook wrote) and the tables it read; for the whole set: the
git commit of the code (and whether the working tree had uncommitted changes), the hash of the
pipeline config (and, given ``--config-record``, the resolved config itself), every run's
directory and the sha256 of its ``config.json``, ``summary.json`` and ``metrics.csv`` (not
``probes.csv``: tens of MB a run on CIFAR), the sha256 of every source table, and ``set_dir``,
the manifest's own folder below the project root. Paths are relative to the project root.
No timestamps, so a rerun on the same inputs gives the same bytes.

Provenance (version 3): where the runs were made and what they gave, so a reader can tell
what reproduces where and ``msr reproduce`` can retrain any run from the manifest alone:

- ``runs``: per run, its config (``config.json`` less the machine keys and the variant spec,
  which is recorded by hash, without its labels ``description`` and ``claim``), ``status``,
  ``final_test_acc``, ``diverged_at_step``, ``results_sha256`` (``metrics.csv`` without its timing columns - the bits a rerun must
  repeat; the whole-file hashes above cannot match a rerun, since seconds and images/s, like
  summary.json's timings, are measurements of the machine) and ``machine``, an index into
- ``machines``: each distinct machine the runs were trained on (msr.machine's record: CPU
  model, kernel ISA flags, torch, oneDNN, MKL, CUDA, cuDNN, GPU) with device, precision, threads
  and the number of runs; runs from before the record name only ``device_name``;
- ``runs_made_on``: that list in one sentence (one machine, or several: say which);
- ``manifest_made_on``: the machine that wrote the manifest (in the pipeline, the one whose
  notebooks drew the figures) with its plotting packages' versions.

``msr verify`` (msr.analysis.verify) checks a set against it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from msr import atomic, machine

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
MANIFEST_VERSION = 3
# the run files whose hashes the manifest records (msr.training.rundir's names)
RUN_FILES = ("config.json", "summary.json", "metrics.csv")
# config.json keys that say where a run was made, not what it is (msr.training.run.config_record)
RUN_MACHINE_KEYS = ("versions", "device_name", "machine")
# variant-spec fields that label a variant (for tables) and change nothing it trains: left out of
# the spec's hash, so rewording a description does not make a published run "another config"
SPEC_LABELS = ("description", "claim")
# metrics.csv columns that time the machine: never equal on a rerun, so not part of a result
TIMING_COLUMNS = ("seconds", "images_per_s")
# the packages that draw the figures and tables (their versions decide the files' bytes)
PLOT_PACKAGES = ("matplotlib", "seaborn", "pandas", "numpy")


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


def git_state(cwd: str | Path = ".", *, own: str | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}``; None outside a git checkout. ``own``:
    the set's own folder (``figures/<set>``), whose files this very pipeline run rewrites - a
    regenerated committed set is not a dirty tree; any other tracked change is."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 *([f":(exclude){own}"] if own else []))
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def results_digest(metrics: str | Path) -> str | None:
    """sha256 of a run's ``metrics.csv`` without its :data:`TIMING_COLUMNS`: every epoch's
    step, lr, losses and accuracies as written (17 significant digits), so equal digests mean a
    bitwise equal run. None if the file is missing or unreadable."""
    try:
        with open(metrics, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not rows:
        return None
    keep = [i for i, name in enumerate(rows[0]) if name not in TIMING_COLUMNS]
    text = "".join(",".join(row[i] for i in keep if i < len(row)) + "\n" for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def run_record(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's entry in the manifest's ``runs`` (without its machine index) and the machine it
    was made on (an entry of ``machines``, without ``n_runs``). Missing or unreadable files
    give None fields, never an error: the manifest records what is there."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json") or {}
    summary = _read_json(run_dir / "summary.json") or {}
    spec = config.get("variant_spec")
    record = {
        "config": {k: v for k, v in config.items() if k not in RUN_MACHINE_KEYS and k != "variant_spec"} or None,
        "variant_spec_sha256": config_digest({k: v for k, v in spec.items() if k not in SPEC_LABELS})
        if isinstance(spec, dict) else None,
        "status": summary.get("status"),
        "final_test_acc": summary.get("final_test_acc"),
        "diverged_at_step": summary.get("diverged_at_step"),
        "results_sha256": results_digest(run_dir / "metrics.csv"),
    }
    device = config.get("device")
    where = {
        "machine": config.get("machine"),  # None: a run from before msr.machine
        "device_name": config.get("device_name"),
        "versions": config.get("versions"),
        "device": str(device).split(":")[0] if device else None,
        "precision": config.get("precision"),
        "threads": config.get("threads"),
    }
    return record, where


def describe_machines(machines: Sequence[dict[str, Any]]) -> str:
    """``machines`` in one sentence for the manifest's readers."""
    def one(entry: dict[str, Any]) -> str:
        what = machine.describe(entry.get("machine") or {"device_name": entry.get("device_name"),
                                                         "torch": (entry.get("versions") or {}).get("torch")})
        threads = entry.get("threads")
        how = ", ".join(str(x) for x in (entry.get("device"), entry.get("precision"),
                                         f"{threads} thread{'s' if threads != 1 else ''}" if threads else None) if x)
        return f"{entry.get('n_runs', 0)} run(s) on {what}" + (f" [{how}]" if how else "")

    if not machines:
        return "no runs"
    if len(machines) == 1:
        return f"all {one(machines[0])}"
    return (f"runs made on {len(machines)} different machines or settings - a run reproduces bitwise only "
            f"on its own: " + "; ".join(f"#{i}: {one(m)}" for i, m in enumerate(machines)))


def manifest_machine() -> dict[str, Any]:
    """The machine writing the manifest (no torch: it trains nothing) and the plotting
    packages' versions; in the pipeline the same machine ran the notebooks."""
    record = machine.machine_record(None, with_torch=False)
    packages = {}
    for name in PLOT_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    record["packages"] = packages
    return record


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
    runs: dict[str, dict[str, Any]] = {}
    machines: list[dict[str, Any]] = []
    for rid in sorted(used):
        rdir = Path(run_dirs[rid]) if run_dirs and rid in run_dirs else Path(runs_root or ".") / rid
        run_locations[rid] = rdir.as_posix()
        run_hashes[rid] = {name: sha256_file(Path(cwd) / rdir / name) if (Path(cwd) / rdir / name).exists() else None
                           for name in RUN_FILES}
        run_configs[rid] = run_hashes[rid]["config.json"]
        record, where = run_record(Path(cwd) / rdir)
        if where not in machines:
            machines.append(where)
        record["machine"] = machines.index(where)
        runs[rid] = record
    for i, entry in enumerate(machines):
        entry["n_runs"] = sum(1 for r in runs.values() if r["machine"] == i)
    set_dir = _relative(out, cwd).parent.as_posix() if out is not None else None
    git = git_state(cwd, own=set_dir)
    manifest = {
        "description": "Figures and tables of the msr pipeline: files with sha256, the runs each "
                       "was made from, and the code/config that made them. Check with "
                       "`msr verify <this folder>`.",
        "manifest_version": MANIFEST_VERSION,
        "set_dir": set_dir,
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
        "reproducibility": "A run repeats bitwise only on the same CPU model (and kernel ISA flags), "
                           "torch (with its oneDNN/MKL/cuDNN), precision and thread count - or the "
                           "same GPU model; elsewhere its numbers agree statistically, within the "
                           "seed spread. `msr reproduce <this folder>` retrains a sample and says which.",
        "runs_made_on": describe_machines(machines),
        "machines": machines,
        "manifest_made_on": manifest_machine(),
        "runs": runs,
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

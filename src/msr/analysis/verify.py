"""``msr verify figures/<set>``: does a figure set still match its MANIFEST.json?

For a reader who wants to cite a set: checks every file the manifest lists (sha256), that no
other figure/table file sits in the set's folder, the tables the notebooks read and the runs
they name (each run's config.json, summary.json and metrics.csv) where those are present, and
the config - a given ``--config`` file, or the project's ``workflow/config/*.yaml`` whose
``name:`` is the set's - against the resolved config the manifest records. Prints ``OK`` or
exactly what differs; exit 0 when everything checked matches, 1 when anything differs, 2 when
there is no readable manifest.

Path-agnostic: the manifest records ``set_dir``, its own folder below the project root, so the
set's files are found next to the manifest wherever the folder now lies; the project root
(for runs, tables, configs) is the folder ``set_dir`` levels above it, or ``--root``. What is
not there (a set copied out of its project, results not downloaded) is reported as not checked,
not as a difference - unless asked for explicitly (``--runs``, ``--config``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import yaml

from msr.analysis.manifest import (
    FIGURE_SUFFIXES,
    RUN_FILES,
    config_digest,
    load_config_file,
    sha256_file,
)

MANIFEST = "MANIFEST.json"
# files in a set's folder that are part of a figure set (anything else, like a README, is not)
SET_SUFFIXES = (*FIGURE_SUFFIXES, ".csv", ".md", ".tex")
NOT_SET_FILES = {"README.md", MANIFEST}


class Report:
    def __init__(self) -> None:
        self.differences: list[str] = []
        self.notes: list[str] = []
        self.checked: list[str] = []

    def differ(self, text: str) -> None:
        self.differences.append(text)


def _set_dir(manifest: dict) -> PurePosixPath:
    """The manifest's folder below the project root; for manifests without ``set_dir``, the
    folder all its files share (``figures`` for the first, flat layout)."""
    if manifest.get("set_dir"):
        return PurePosixPath(manifest["set_dir"])
    paths = [PurePosixPath(f["path"]).parent for item in manifest.get("items", []) for f in item["files"]]
    if not paths:
        return PurePosixPath(".")
    return PurePosixPath(os.path.commonpath([p.as_posix() for p in paths]))


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none"


def _check_files(manifest: dict, here: Path, set_dir: PurePosixPath, root: Path, report: Report) -> None:
    listed: set[Path] = set()
    n = 0
    for item in manifest.get("items", []):
        for entry in item["files"]:
            rel = PurePosixPath(entry["path"])
            try:
                path = here / rel.relative_to(set_dir)
            except ValueError:  # a file outside the set's folder: relative to the project root
                path = root / rel
            listed.add(path.resolve())
            n += 1
            if not path.is_file():
                report.differ(f"missing: {entry['path']} (of {item['name']})")
            elif (digest := sha256_file(path)) != entry["sha256"]:
                report.differ(f"changed: {entry['path']} (of {item['name']}): sha256 {_short(digest)}, "
                              f"manifest {_short(entry['sha256'])}")
    extra = sorted(p for p in here.iterdir() if p.is_file() and p.suffix in SET_SUFFIXES
                   and p.name not in NOT_SET_FILES and not p.name.startswith(".") and p.resolve() not in listed)
    for path in extra:
        report.differ(f"not in the manifest: {path.name} (a file of another run of the set?)")
    report.checked.append(f"{n} files")


def _check_sources(manifest: dict, root: Path, report: Report) -> None:
    sources = manifest.get("source_sha256") or {}
    present = {s: d for s, d in sources.items() if (root / s).is_file()}
    for src, digest in sorted(present.items()):
        if sha256_file(root / src) != digest:
            report.differ(f"changed: {src} (a table the figures were made from; re-aggregated since?)")
    if present:
        report.checked.append(f"{len(present)} tables")
    if len(present) < len(sources):
        report.notes.append(f"{len(sources) - len(present)} source table(s) not checked: not under {root}")


def _check_runs(manifest: dict, root: Path, runs_root: Path | None, report: Report) -> None:
    run_ids = sorted({r for item in manifest.get("items", []) for r in item.get("runs", [])})
    locations = manifest.get("run_dirs") or {}
    hashes = manifest.get("run_sha256") or {rid: {"config.json": d}
                                            for rid, d in (manifest.get("run_config_sha256") or {}).items()}

    # older manifests record no run directories: the pipeline's runs roots, newest layout first
    name = manifest.get("name")
    defaults = [root / "results" / name / "runs"] if name else []
    defaults.append(root / "results" / "runs")

    def where(rid: str) -> Path:
        if runs_root is not None:
            return runs_root / rid
        if rid in locations:
            return root / locations[rid]
        return next((d / rid for d in defaults if (d / rid).is_dir()), defaults[-1] / rid)

    found = [rid for rid in run_ids if where(rid).is_dir()]
    if not found and runs_root is None:
        if run_ids:
            report.notes.append(f"{len(run_ids)} run(s) not checked: no run directory found "
                                f"(e.g. {where(run_ids[0])}; give --runs)")
        return
    for rid in run_ids:
        rdir = where(rid)
        if not rdir.is_dir():
            report.differ(f"run missing: {rid} ({rdir})")
            continue
        for name in RUN_FILES:
            expected = (hashes.get(rid) or {}).get(name)
            if name not in (hashes.get(rid) or {}):
                continue  # an older manifest records config.json only
            path = rdir / name
            actual = sha256_file(path) if path.is_file() else None
            if actual != expected:
                what = "missing" if actual is None else "differs"
                hint = " (retrained with other options?)" if name == "config.json" else " (retrained or damaged?)"
                report.differ(f"run {rid}: {name} {what}{hint if actual is not None else ''}")
    report.checked.append(f"{len(run_ids)} runs")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _find_config(manifest: dict, root: Path) -> Path | None:
    name = manifest.get("name") or (manifest.get("config") or {}).get("name")
    folder = root / "workflow" / "config"
    if not name or not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.y*ml")):
        try:
            if (yaml.safe_load(path.read_text()) or {}).get("name") == name:
                return path
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    return None


def _check_config(manifest: dict, root: Path, given: Path | None, report: Report) -> None:
    recorded = manifest.get("config")
    digest = manifest.get("config_sha256")
    if recorded is not None and digest is not None and config_digest(recorded) != digest:
        report.differ("the manifest's config record does not hash to its config_sha256 (edited by hand?)")
    path = given or _find_config(manifest, root)
    if path is None:
        report.notes.append("config not checked: none given (--config) and none found by the set's name")
        return
    try:
        values = load_config_file(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        report.differ(f"config {path}: unreadable ({err.__class__.__name__})")
        return
    if not isinstance(values, dict):
        report.differ(f"config {path}: not a mapping of config keys")
        return
    if recorded is None:
        # an older manifest: only the hash of the resolved config, so only a resolved config
        # (all defaults filled in) can be compared
        if config_digest(values) == digest:
            report.checked.append(f"config {path}")
        elif given is not None:
            report.differ(f"config {path}: cannot be compared - the manifest records only the hash of the "
                          "resolved config, and this file does not hash to it")
        else:
            report.notes.append(f"config {path} not checked: the manifest records only the hash of the resolved config")
        return
    # a config file overlays the defaults: each key it sets must have the recorded value
    want, have = _flatten(values), _flatten(recorded)
    for key, value in want.items():
        if key not in have:
            report.differ(f"config {path.name}: {key} = {value!r}, not in the config the set was made with")
        elif have[key] != value:
            report.differ(f"config {path.name}: {key} = {value!r}, the set was made with {have[key]!r}")
    report.checked.append(f"config {path}")


def verify(target: str | Path, *, root: str | Path | None = None, runs: str | Path | None = None,
           config: str | Path | None = None) -> Report:
    """Check a figure set (its folder or its MANIFEST.json); raises ValueError without a
    readable manifest."""
    target = Path(target)
    path = target / MANIFEST if target.is_dir() else target
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest (is {target} a figure set?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable manifest ({err.__class__.__name__})") from None
    if not isinstance(manifest, dict) or "items" not in manifest:
        raise ValueError(f"{path}: not an msr manifest (no items)")
    here = path.parent
    set_dir = _set_dir(manifest)
    base = Path(root) if root is not None else here.joinpath(*[".."] * len(set_dir.parts))
    base = base.resolve()
    report = Report()
    _check_files(manifest, here, set_dir, base, report)
    _check_sources(manifest, base, report)
    _check_runs(manifest, base, Path(runs) if runs is not None else None, report)
    _check_config(manifest, base, Path(config) if config is not None else None, report)
    return report

"""``msr verify figures/<set>``: does a figure set still match its MANIFEST.json?

For a reader who wants to cite a set: checks every file the manifest lists (sha256), that no
other file of any kind sits in the set's folder (its subfolders included; a ``README.md`` next
to the manifest is allowed, for notes about the set), the tables the notebooks read and the
runs they name (each run's config.json, summary.json and metrics.csv) where those are present,
that the recorded ``git_commit`` exists in the clone the set lies in, and the config - a given
``--config`` file, or the project's ``workflow/config/*.yaml`` whose ``name:`` is the set's -
against the resolved config the manifest records. Prints ``OK`` or exactly what differs; exit
0 when everything checked matches, 1 when anything differs, 2 when there is no readable manifest.

Path-agnostic: the manifest records ``set_dir``, its own folder below the project root, so the
set's files are found next to the manifest wherever the folder now lies; the project root
(for runs, tables, configs) is the folder ``set_dir`` levels above it, or ``--root``. What is
not there (a set copied out of its project, results not downloaded, a set outside any git
clone) is reported as not checked, not as a difference - unless asked for explicitly
(``--runs``, ``--config``).

A manifest is input from whoever made the set: a path in it that leaves the set (an item file
with ``..``, an absolute path, a symlink pointing out of the folder) or the project (a table, a
run directory) is reported and never read, and the commit is handed to git only as a hash.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import yaml

from msr.analysis.manifest import (
    RUN_FILES,
    config_digest,
    load_config_file,
    results_digest,
    sha256_file,
)

MANIFEST = "MANIFEST.json"
# the files next to the manifest that it does not list: itself and notes about the set;
# any other unlisted file, of any kind, is reported
NOT_SET_FILES = {"README.md", MANIFEST}
COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # sha1 or sha256 object names


class Report:
    def __init__(self) -> None:
        self.differences: list[str] = []
        self.notes: list[str] = []
        self.checked: list[str] = []

    def differ(self, text: str) -> None:
        self.differences.append(text)


def contained_path(text: object) -> PurePosixPath | None:
    """``text`` as a relative path that stays below its base (no ``..``, not absolute, not
    empty); None for anything else."""
    if not isinstance(text, str) or not text or "\\" in text or "\0" in text:
        return None
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or path == PurePosixPath("."):
        return None
    return path


def _set_dir(manifest: dict) -> PurePosixPath:
    """The manifest's folder below the project root; for manifests without ``set_dir``, the
    folder all its files share (``figures`` for the first, flat layout)."""
    if manifest.get("set_dir"):
        set_dir = contained_path(manifest["set_dir"])
        if set_dir is None:
            raise ValueError(f"set_dir {manifest['set_dir']!r} is not a folder below the project root")
        return set_dir
    paths = [PurePosixPath(f["path"]).parent for item in manifest.get("items", []) for f in item["files"]
             if contained_path(f.get("path")) is not None]
    if not paths:
        return PurePosixPath(".")
    return PurePosixPath(os.path.commonpath([p.as_posix() for p in paths]))


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none"


def _check_files(manifest: dict, here: Path, set_dir: PurePosixPath, report: Report) -> None:
    listed: set[str] = set()
    home = here.resolve()
    n = 0
    for item in manifest.get("items", []):
        for entry in item["files"]:
            rel = contained_path(entry.get("path"))
            if rel is not None and set_dir != PurePosixPath("."):
                try:
                    rel = rel.relative_to(set_dir)
                except ValueError:
                    rel = None
            if rel is None:
                report.differ(f"outside the set: {entry.get('path')!r} (of {item['name']}) - a manifest lists only "
                              f"files inside {set_dir.as_posix()}/; not read")
                continue
            path = here / rel
            listed.add(rel.as_posix())
            n += 1
            if not path.resolve().is_relative_to(home):
                report.differ(f"outside the set: {entry['path']} (of {item['name']}) is a link to "
                              f"{path.resolve()}; not read")
            elif not path.is_file():
                report.differ(f"missing: {entry['path']} (of {item['name']})")
            elif (digest := sha256_file(path)) != entry["sha256"]:
                report.differ(f"changed: {entry['path']} (of {item['name']}): sha256 {_short(digest)}, "
                              f"manifest {_short(entry['sha256'])}")
    for rel in _unlisted(here, listed):
        report.differ(f"not in the manifest: {rel} (a file of another run of the set, or added by hand?)")
    report.checked.append(f"{n} files")


def _unlisted(here: Path, listed: set[str]) -> list[str]:
    """Every file, link or other entry below ``here`` that the manifest does not list (paths
    relative to ``here``), except :data:`NOT_SET_FILES` next to the manifest. Links are not
    followed; a subfolder with its own manifest is another set and is skipped."""
    extra = []
    for folder, dirs, files in os.walk(here):
        top = Path(folder) == here
        for name in sorted(dirs):
            sub = Path(folder) / name
            if sub.is_symlink():
                files.append(name)  # a link to a folder: reported, never followed
                dirs.remove(name)
            elif (sub / MANIFEST).is_file():
                dirs.remove(name)
        dirs.sort()
        for name in sorted(files):
            rel = (Path(folder) / name).relative_to(here).as_posix()
            if rel in listed or (top and name in NOT_SET_FILES):
                continue
            extra.append(rel)
    return sorted(extra)


def _check_sources(manifest: dict, root: Path, report: Report) -> None:
    sources = manifest.get("source_sha256") or {}
    for src in sorted(s for s in sources if contained_path(s) is None):
        report.differ(f"outside the project: source table {src!r}; not read")
    sources = {s: d for s, d in sources.items() if contained_path(s) is not None}
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
    # run ids and directories are joined to the project root: one that climbs out is not read
    for rid in [r for r in run_ids if contained_path(r) is None or (r in locations and contained_path(locations[r]) is None)]:
        report.differ(f"outside the project: run {rid!r} ({locations.get(rid, 'no directory')!r}); not read")
        run_ids.remove(rid)
    hashes = manifest.get("run_sha256") or {rid: {"config.json": d}
                                            for rid, d in (manifest.get("run_config_sha256") or {}).items()}

    # older manifests record no run directories: the pipeline's runs roots, newest layout first
    name = manifest.get("name")
    defaults = [root / "results" / name / "runs"] if contained_path(name) is not None else []
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
                recorded = (manifest.get("runs") or {}).get(rid) or {}
                if name == "metrics.csv" and recorded.get("results_sha256") and \
                        results_digest(path) == recorded["results_sha256"]:
                    hint = " (in its timing columns only: retrained, with bitwise equal results)"
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


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def _check_commit(manifest: dict, root: Path, report: Report) -> None:
    """The recorded ``git_commit`` must exist in the clone the set lies in (the project root
    must be the clone's top folder: a set copied into some other repository is not checked)."""
    commit = manifest.get("git_commit")
    if manifest.get("git_dirty"):
        report.notes.append("the set was made from a working tree with uncommitted changes: "
                            "its commit alone does not regenerate it")
    if commit is None:
        report.notes.append("git commit not checked: the manifest records none")
        return
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        report.differ(f"git_commit {commit!r} is not a commit hash")
        return
    if not git_top(root):
        report.notes.append(f"git commit {commit[:12]} not checked: {root} is not a git clone (or git is missing)")
        return
    found = _git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    if found is not None and found.returncode == 0:
        report.checked.append(f"commit {commit[:12]}")
        return
    shallow = _git(root, "rev-parse", "--is-shallow-repository")
    if shallow is not None and shallow.stdout.strip() == "true":
        report.notes.append(f"git commit {commit[:12]} not checked: this clone is shallow "
                            "(git fetch --unshallow to check it)")
        return
    report.differ(f"git_commit {commit[:12]} does not exist in this clone (made from unpublished code, "
                  "or history rewritten since?)")


def load_manifest(target: str | Path) -> tuple[Path, dict]:
    """A set's manifest (``target``: its folder or its MANIFEST.json) and its path; ValueError
    without a readable manifest."""
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
    return path, manifest


def project_root(manifest: dict, here: Path, root: str | Path | None = None) -> Path:
    """The project root of a set whose manifest lies in ``here``: ``root`` if given, else the
    folder ``set_dir`` levels above it. ValueError for a ``set_dir`` that leaves the project."""
    set_dir = _set_dir(manifest)
    base = Path(root) if root is not None else here.joinpath(*[".."] * len(set_dir.parts))
    return base.resolve()


def git_top(root: Path) -> bool:
    """Whether ``root`` is the top folder of a git clone (git found and answering)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    return top is not None and top.returncode == 0 and Path(top.stdout.strip()).resolve() == root.resolve()


def verify(target: str | Path, *, root: str | Path | None = None, runs: str | Path | None = None,
           config: str | Path | None = None) -> Report:
    """Check a figure set (its folder or its MANIFEST.json); raises ValueError without a
    readable manifest."""
    path, manifest = load_manifest(target)
    here = path.parent
    set_dir = _set_dir(manifest)
    base = project_root(manifest, here, root)
    report = Report()
    _check_files(manifest, here, set_dir, report)
    _check_sources(manifest, base, report)
    _check_runs(manifest, base, Path(runs) if runs is not None else None, report)
    _check_config(manifest, base, Path(config) if config is not None else None, report)
    _check_commit(manifest, base, report)
    if manifest.get("runs_made_on"):
        report.notes.append(f"trained: {manifest['runs_made_on']} (bitwise reruns need the same; "
                            "`msr reproduce` checks a sample)")
    return report

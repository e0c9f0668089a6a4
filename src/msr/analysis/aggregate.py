"""Run directories -> tidy tables and statistics over seeds (presentation lives in msr.analysis.figures).

``msr aggregate`` reads the run directories written by ``msr train`` (docs/architecture.md, "The run
directory") and writes, into ``--out``:

- ``runs.csv``    one row per run: every config field (the variant spec flattened as
  ``spec_<field>``; ``lr_factor``: every param group's factor of the variant's own lr;
  ``eval_split``: what the run's ``*_test_*`` numbers were measured on), the run's place in
  the grid (``tag``, ``sweep``), status, final/best accuracies, diverged step, time and
  memory; with ``lr_selection``, ``lr_selected_factor``: the factor chosen on the validation
  split for the run's variant (empty for a variant not tuned);
- ``summary.csv`` one row per group of seeds (same dataset, arch, variant, sweep point):
  ``n``, ``n_completed``, ``n_diverged``, ``divergence_rate`` and, for every metric in
  ``SUMMARY_METRICS``, ``<metric>_mean/_std/_ci95`` over the *completed* runs;
- ``curves.csv``  every run's per-epoch ``metrics.csv`` stacked, with the run's keys.

Every listed run must be complete and undamaged (``msr.training.rundir.check_complete``: config.json,
summary.json, metrics.csv agreeing with it, a whole probes.csv); one that is not stops the
aggregation with a one-line :class:`~msr.training.rundir.RunDirError` naming the run's file - a run is
never dropped from a table or a figure while the provenance still lists it. So ``n_completed``
counts exactly the runs each mean averages (a completed run always has a finite headline).

Why completed runs only: a diverged run's last evaluation is of a model that is about to
become non-finite, so averaging it in would mix two different outcomes. Divergence is
instead reported as its own count and rate, next to every mean (never dropped silently).
Final-epoch numbers are the headline; ``best_test_acc`` is kept but is selected on the test
set and must only ever be shown labelled as such.

Validation runs (the lr selection's: tag ``val-lrx<f>``, sweep ``lr_selection``,
``eval_split`` ``validation``) are rows of runs.csv like every run, but their ``final_test_acc``
is VALIDATION accuracy: they form their own groups in summary.csv (the sweep and the eval split
are group keys) and a table or figure of test results must take ``eval_split == "test"`` runs
only (the main grid is sweep ``base``).

Per-step probes (``probes.csv``) stay in the run directories; ``load_probes`` reads the few
runs a figure needs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from msr import atomic
from msr.training.rundir import (
    METRIC_COLUMNS,
    METRICS,
    MISSING_MEANS,
    PROBES,
    check_complete,
    damaged,
    last_probe_step,
    read_json,
)

# The keys that place a run in the grid, in path order: <dataset>/<arch>/<variant>/<tag>/seed<k>
RUN_KEYS = ("dataset", "arch", "variant", "tag", "seed")
# Runs that differ only in the seed form one group
GROUP_KEYS = ("dataset", "arch", "depth", "variant", "sweep", "eval_split", "tag", "lr", "lr_factor",
              "batch_size", "noise_delta", "epochs", "image_size")
SUMMARY_METRICS = (
    "final_test_acc",
    "best_test_acc",
    "final_train_acc",
    "final_clean_train_acc",
    "train_test_gap",
    "clean_train_test_gap",
    "final_test_loss",
    "final_train_loss",
    "final_clean_train_loss",
    "mean_step_seconds",
    "images_per_s",
    "peak_memory_mb",
    "wall_seconds",
    "train_seconds",
)
# lr sweep tags: lrx<factor> (every group at a factor of the variant's lr); lr<v> (older sets:
# the conv group's lr); the lr selection's validation runs: val-lrx<factor>
_SWEEP_OF_TAG = (("base", re.compile(r"^base$")), ("lr", re.compile(r"^lrx?[0-9.eE+-]+$")),
                 ("batch_size", re.compile(r"^bs\d+$")), ("noise_delta", re.compile(r"^d[0-9.eE+-]+$")),
                 ("lr_selection", re.compile(r"^val-lrx[0-9.eE+-]+$")))


# --------------------------------------------------------------------------------------------
# Reading run directories


def sweep_of_tag(tag: str) -> str:
    """``base`` / ``lr`` / ``batch_size`` / ``noise_delta`` / ``lr_selection`` from the
    pipeline's tags (``base``, ``lrx2``, ``bs32``, ``d0.2``, ``val-lrx0.5``); anything else is
    its own sweep ``other``."""
    for sweep, pattern in _SWEEP_OF_TAG:
        if pattern.match(tag):
            return sweep
    return "other"


def depth_of_arch(arch: str) -> int | None:
    m = re.fullmatch(r"resnet(\d+)", str(arch))
    return int(m.group(1)) if m else None


def run_dir_of(path: Path) -> Path:
    """A run directory from itself or from its summary.json."""
    return path.parent if path.name == "summary.json" else path


def find_run_dirs(root: Path) -> list[Path]:
    """Every complete run directory (with a summary.json) under ``root``, in sorted order."""
    return sorted(p.parent for p in Path(root).glob("*/*/*/*/seed*/summary.json"))


def run_id(run_dir: Path, root: Path | None = None) -> str:
    """``<dataset>/<arch>/<variant>/<tag>/seed<k>``: the run's path below the runs root."""
    run_dir = Path(run_dir)
    if root is not None:
        try:
            return run_dir.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return "/".join(run_dir.parts[-5:])


def load_run(run_dir: Path, root: Path | None = None) -> dict:
    """One flat record of a run: config fields, spec fields (``spec_*``), summary, keys.
    A damaged or incomplete run is a RunDirError naming its file."""
    run_dir = run_dir_of(Path(run_dir))
    summary = check_complete(run_dir)
    config = read_json(run_dir / "config.json")
    record: dict = {"run_id": run_id(run_dir, root), "run_dir": run_dir.as_posix()}
    for key, value in config.items():
        if key == "variant_spec":
            record.update({f"spec_{k}": v for k, v in (value or {}).items()})
        elif key == "versions":
            record.update({f"version_{k}": v for k, v in (value or {}).items()})
        elif key == "overrides":
            record["overrides"] = json.dumps(value or {}, sort_keys=True)
        elif isinstance(value, dict | list):
            record[key] = json.dumps(value, sort_keys=True)
        else:
            record[key] = value
    for key, value in MISSING_MEANS.items():
        if "." not in key:  # an older msr's run: what its missing keys mean
            record.setdefault(key, value)
    record["tag"] = run_dir.parent.name
    record["sweep"] = sweep_of_tag(record["tag"])
    record["depth"] = depth_of_arch(record.get("arch", ""))
    for key, value in summary.items():
        record[key] = value
    record["diverged"] = summary.get("status") == "diverged"
    train_acc, test_acc = _num(summary.get("final_train_acc")), _num(summary.get("final_test_acc"))
    record["train_test_gap"] = train_acc - test_acc
    # clean: eval mode, no augmentation (msr.training.run.CLEAN_TRAIN_IMAGES) - comparable with test
    record["clean_train_test_gap"] = _num(summary.get("final_clean_train_acc")) - test_acc
    return record


def _num(value) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def load_runs(run_dirs: Iterable[Path], root: Path | None = None) -> pd.DataFrame:
    """``runs.csv``: one row per run, sorted by the grid keys."""
    records = [load_run(Path(d), root) for d in run_dirs]
    if not records:
        return pd.DataFrame(columns=["run_id", "run_dir", *RUN_KEYS, "sweep", "status"])
    frame = pd.DataFrame.from_records(records)
    front = ["run_id", *RUN_KEYS, "sweep", "depth", "status", "final_test_acc", "best_test_acc",
             "best_epoch", "diverged", "diverged_at_step"]
    front = [c for c in front if c in frame.columns]
    frame = frame[front + [c for c in frame.columns if c not in front]]
    return frame.sort_values(["dataset", "depth", "arch", "variant", "tag", "seed"],
                             kind="stable").reset_index(drop=True)


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """``curves.csv``: every run's metrics.csv (one row per epoch) with the run's keys (a key
    that metrics.csv also has, like ``lr``, gets the prefix ``run_``)."""
    keys = ["run_id", *RUN_KEYS, "sweep", "eval_split", "lr", "lr_factor", "batch_size", "noise_delta", "status"]
    keys = [k for k in keys if k in runs.columns]
    frames = []
    for row in runs.itertuples(index=False):
        path = Path(row.run_dir) / METRICS
        if not path.exists():  # never drop a listed run's curve silently
            raise damaged(path, "missing")
        metrics = pd.read_csv(path)
        if metrics.empty:
            continue
        # the run's base lr is `run_lr`; `lr` stays the scheduled lr of that epoch
        for key in reversed(keys):
            metrics.insert(0, f"run_{key}" if key in metrics.columns else key, getattr(row, key))
        frames.append(metrics)
    if not frames:
        return pd.DataFrame(columns=[*(f"run_{k}" if k == "lr" else k for k in keys), *METRIC_COLUMNS])
    curves = pd.concat(frames, ignore_index=True)
    return curves


def load_probes(run_dirs: Iterable[Path | str], metrics: Sequence[str] | None = None,
                root: Path | None = None) -> pd.DataFrame:
    """The probes of a few runs (long format: run_id, step, layer, metric, value); a missing or
    truncated probes.csv is a RunDirError, never a run silently left out of a figure."""
    frames = []
    for run_dir in run_dirs:
        path = run_dir_of(Path(run_dir)) / PROBES
        last_probe_step(path)  # exists, has the header, ends with a whole line
        probes = pd.read_csv(path)
        if metrics is not None:
            probes = probes[probes["metric"].isin(list(metrics))]
        probes.insert(0, "run_id", run_id(run_dir_of(Path(run_dir)), root))
        frames.append(probes)
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", "layer", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Statistics over seeds


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t quantile, e.g. 2.776 for 95% and 4 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def mean_std_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Mean, sample std (ddof=1), half-width of the t confidence interval, and n of the finite
    values; std and CI are NaN below two values."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    std = float(x.std(ddof=1))
    return mean, std, t_quantile(confidence, n - 1) * std / math.sqrt(n), n


def summarize(runs: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS,
              by: Sequence[str] = GROUP_KEYS, confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of seeds: counts, divergence rate and mean/std/CI of each metric over
    the group's completed runs (see the module docstring for why)."""
    by = [k for k in by if k in runs.columns]
    metrics = [m for m in metrics if m in runs.columns]
    columns = [*by, "n", "n_completed", "n_diverged", "divergence_rate", "seeds",
               "median_diverged_at_step"]
    columns += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci95")]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, group in runs.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        status = group["status"].astype(str)
        completed = group[status == "completed"]
        if "final_test_acc" in completed:
            # a completed run without a headline would be counted in n but not in the mean
            finite = np.isfinite(pd.to_numeric(completed["final_test_acc"], errors="coerce").to_numpy(dtype=float))
            if not finite.all():
                bad = completed.get("run_id", completed["seed"])[~finite].tolist()
                raise ValueError(f"completed run(s) {bad} have no finite final_test_acc: their run "
                                 "directories are damaged; delete them and rerun")
        n_div = int((status == "diverged").sum())
        row.update(n=len(group), n_completed=len(completed), n_diverged=n_div,
                   divergence_rate=n_div / len(group),
                   seeds=" ".join(str(s) for s in sorted(group["seed"].tolist())))
        steps = pd.to_numeric(group.loc[status == "diverged", "diverged_at_step"], errors="coerce") \
            if "diverged_at_step" in group else pd.Series(dtype=float)
        row["median_diverged_at_step"] = float(steps.median()) if steps.notna().any() else math.nan
        for m in metrics:
            mean, std, ci, _ = mean_std_ci(pd.to_numeric(completed[m], errors="coerce"), confidence)
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci95": ci})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------
# CLI


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Atomic write (temp file + rename), so a half-written table is never read."""
    atomic.atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def selected_factors(path: str | Path) -> dict[tuple[str, str, str], float]:
    """(dataset, arch, variant) -> the lr factor chosen on the validation split, from the lr
    selection's record (msr.pipeline.selection writes it: ``{"selected": [{"dataset", "arch",
    "variant", "lr_factor", ...}]}``); a damaged one is a ValueError naming it."""
    try:
        record = json.loads(Path(path).read_text())
        return {(s["dataset"], s["arch"], s["variant"]): float(s["lr_factor"]) for s in record["selected"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable lr selection record ({type(err).__name__})") from None


def add_selection(runs: pd.DataFrame, factors: dict[tuple[str, str, str], float]) -> pd.DataFrame:
    """``lr_selected_factor``: the factor chosen for each run's variant (NaN: not tuned)."""
    runs = runs.copy()
    keys = zip(runs.get("dataset", []), runs.get("arch", []), runs.get("variant", []), strict=True)
    runs["lr_selected_factor"] = [factors.get(k, math.nan) for k in keys]
    return runs


def aggregate(run_dirs: Iterable[Path], out: Path, root: Path | None = None,
              lr_selection: str | Path | None = None) -> dict[str, Path]:
    """Write runs.csv, summary.csv and curves.csv for ``run_dirs`` into ``out`` (with
    ``lr_selection``, the lr selection's record: runs.csv gets ``lr_selected_factor``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs, root)
    if lr_selection is not None:
        runs = add_selection(runs, selected_factors(lr_selection))
    paths = {"runs": out / "runs.csv", "summary": out / "summary.csv", "curves": out / "curves.csv"}
    _write_csv(runs, paths["runs"])
    _write_csv(summarize(runs), paths["summary"])
    _write_csv(load_curves(runs), paths["curves"])
    return paths

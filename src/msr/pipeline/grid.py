"""The grid of runs a pipeline config asks for, and the checks the config schema cannot make.

workflow/rules/common.smk calls this module while Snakemake parses the workflow, so every
problem here stops the pipeline before any job, with one line that names the config key:

- :func:`check_types` (before the schema) - list items that ``--config`` turned into strings,
  and NaN or infinity anywhere (YAML floats that pass the schema's bounds);
- :func:`check_config` - what JSON schema cannot say: a sweep with values but no variants (or
  the reverse), ``train.overrides`` that msr's own variant validation rejects for a variant of
  the grid, a ``train.train_subset`` outside a dataset's training set (msr.catalog's rule), a
  batch size larger than a dataset's training set (``train.epochs`` / ``train.batch_size``
  null: each dataset's own, from msr.catalog - :func:`per_dataset`);
- :func:`check_set_name` - a config that changes the default study but kept its set name
  (a config file without ``name:`` inherits the default's) would overwrite the default set;
- :func:`build_grid` - every run of the config (main grid, then each sweep), refusing two
  sweep values that would share one run directory (0.8 and 0.8000001 both give ``lr0.8``).

And after training, before aggregation (the pipeline's ``check_runs`` rule, and ``reset`` at
the start of every train job), the *recorded* options of each run directory (its
``config.json``) are compared with what the config asks for (:func:`expected_record`), so a
config edit is noticed even when Snakemake's own metadata (``.snakemake/``) is gone or only
modification times are compared (``--rerun-triggers mtime``).

Nothing here imports torch at module level: ``msr reset-run`` runs before every
train job and must stay cheap.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msr import catalog

SWEEP_TAGS = {"lr": "lr", "batch_size": "bs", "noise_delta": "d"}


class GridError(ValueError):
    """A config the pipeline cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class Run:
    """One training run: its place in the grid and the options only it gets."""

    dataset: str
    arch: str
    variant: str
    tag: str  # base | lr<v> | bs<v> | d<v>
    seed: int
    batch_size: int  # resolved: train.batch_size, or the dataset's own (msr.catalog) when null
    lr: float | None = None  # None: the variant's default
    noise_delta: float | None = None  # None: the variant's default

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.dataset, self.arch, self.variant, self.tag, str(self.seed))

    @property
    def path(self) -> str:
        """The run directory below the set's runs folder (also the run id of runs.csv)."""
        return f"{self.dataset}/{self.arch}/{self.variant}/{self.tag}/seed{self.seed}"


def fmt_value(value: float) -> str:
    """Sweep values in run tags: 0.05 -> '0.05', 1.0 -> '1', 32 -> '32'."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else format(float(value), "g")


def _spec(variant: str, overrides: Mapping[str, Any]):
    from msr.core.variants import get_spec  # torch: only where a grid is built

    return get_spec(variant, **overrides)


def per_dataset(train: Mapping[str, Any], key: str, dataset: str) -> int:
    """``train.epochs`` / ``train.batch_size`` for a run on ``dataset``: the config's value, or
    the dataset's own default (msr.catalog) where the config leaves it null."""
    return catalog.dataset(dataset).or_default(key, train[key])


# ------------------------------------------------------------------------ config checks


def _sweep_axis(cfg: Mapping[str, Any], sweep: Mapping[str, Any], axis: str) -> list:
    return sweep[axis] if sweep.get(axis) is not None else cfg[axis]


def check_types(cfg: Mapping[str, Any]) -> None:
    """``--config seeds=[0,1]`` gives the strings '0' and '1' (Snakemake parses only the
    top-level value): say so, instead of the schema's "'0' is not of type 'integer'". And
    every number must be finite: YAML's ``.nan`` and ``.inf`` are floats that pass the schema's
    bounds (NaN compares false with everything), and would fail only inside a job."""
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise GridError(f"config {key}={value!r}: not a finite number (NaN and infinity are not valid settings)")
    lists = {"seeds": cfg.get("seeds")}
    for name, sweep in (cfg.get("sweeps") or {}).items():
        if isinstance(sweep, Mapping):
            lists[f"sweeps.{name}.values"] = sweep.get("values")
            lists[f"sweeps.{name}.seeds"] = sweep.get("seeds")
    for key, values in lists.items():
        if isinstance(values, list) and any(isinstance(v, str) for v in values):
            raise GridError(
                f"config {key}={values!r}: the items are strings, not numbers (`--config` passes "
                f"list items as text); put the list in a YAML file and pass it with --configfile"
            )


def _numbers(value: Any, key: str = "") -> list[tuple[str, float]]:
    """Every float in a config, with its dotted key (list items as key[i])."""
    if isinstance(value, float):
        return [(key, value)]
    if isinstance(value, Mapping):
        return [n for k, v in value.items() for n in _numbers(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list | tuple):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{key}[{i}]")]
    return []


def check_config(cfg: Mapping[str, Any]) -> None:
    """Everything the schema cannot check; run after schema validation (defaults filled in)."""
    train = cfg["train"]
    grid_variants = dict.fromkeys(cfg["variants"])
    for name, sweep in cfg["sweeps"].items():
        if bool(sweep["variants"]) != bool(sweep["values"]):
            has, lacks = ("values", "variants") if sweep["values"] else ("variants", "values")
            raise GridError(f"config sweeps.{name}: has {has} but no {lacks}; give both, or neither to skip the sweep")
        grid_variants.update(dict.fromkeys(sweep["variants"]))

    overrides = dict(train["overrides"])
    for variant in grid_variants:
        try:
            _spec(variant, overrides)
        except (ValueError, TypeError) as err:
            raise GridError(f"config train.overrides={overrides!r}: {err}") from None

    subset = train.get("train_subset")
    grid_datasets = dict.fromkeys(cfg["datasets"])
    for sweep in cfg["sweeps"].values():
        if sweep["variants"]:
            grid_datasets.update(dict.fromkeys(_sweep_axis(cfg, sweep, "datasets")))
    for dataset in grid_datasets:
        try:
            catalog.dataset(dataset).check_train_subset(subset)
        except ValueError as err:
            raise GridError(f"config train.train_subset={subset!r} for {dataset}: {err}") from None

    def check_batch(key: str, batch: int | None, datasets: Sequence[str]) -> None:
        for dataset in datasets:
            full = catalog.dataset(dataset).train_size
            n = min(full, subset or math.inf)
            batch_here = catalog.dataset(dataset).or_default("batch_size", batch)
            if batch_here > n:
                raise GridError(
                    f"config {key}: batch size {batch_here} is larger than the training set of {dataset} "
                    f"({n} images{', train.train_subset' if subset and subset < full else ''})"
                )

    check_batch("train.batch_size", train["batch_size"], cfg["datasets"])
    for name, sweep in cfg["sweeps"].items():
        datasets = _sweep_axis(cfg, sweep, "datasets")
        if sweep["variants"]:
            check_batch("train.batch_size", train["batch_size"], datasets)
        if name == "batch_size":
            for value in sweep["values"]:
                check_batch("sweeps.batch_size.values", int(value), datasets)


# Where the data live and what a job may use: they change no result, so a config that differs
# from the default only there is still the default study.
_NOT_THE_STUDY = {"resources", "train.data_root", "train.data_mirror"}


def check_set_name(cfg: Mapping[str, Any], default: Mapping[str, Any], default_file: str) -> None:
    """A config that is not the default study must not write into the default study's set.

    Snakemake overlays every config file on ``default_file``, so a file without ``name:``
    inherits the default's - and its runs and figures would replace that set's committed ones
    (figures/digits). ``cfg`` and ``default`` are both validated (defaults filled in)."""
    if cfg["name"] != default["name"]:
        return
    changed = _changed_keys(cfg, default)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise GridError(
            f"config name={cfg['name']!r} is the set of {default_file}, but this config changes "
            f"{shown}: its runs and figures would replace that set's. Give it its own set: "
            f"`name: my-study` in your config file (or --config name=my-study)"
        )


def _changed_keys(a: Any, b: Any, key: str = "") -> list[str]:
    if key in _NOT_THE_STUDY:
        return []
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = list(a) + [k for k in b if k not in a]
        return [c for k in keys for c in _changed_keys(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))]
    return [] if a == b else [key]


# ------------------------------------------------------------------------------ the grid


def build_grid(cfg: Mapping[str, Any]) -> dict[tuple, Run]:
    """Every run of the config, in a stable order: the main grid, then each sweep.

    A sweep point that is exactly a run of the main grid (same dataset, arch, variant, seed and
    the same resolved value) is not trained twice: the figures take it from the main grid.
    """
    train = cfg["train"]
    overrides = dict(train["overrides"])
    runs: dict[tuple, Run] = {}

    def base_lr(variant: str) -> float:
        return _spec(variant, overrides).resolved_lr(train["lr"])

    def base_noise(variant: str) -> float:
        """train.noise_delta changes the noisy variants only (a variant without noise keeps none)."""
        own = _spec(variant, overrides).noise_delta
        return train["noise_delta"] if train["noise_delta"] is not None and own > 0 else own

    def base(variant: str, dataset: str) -> dict[str, Any]:
        noisy = train["noise_delta"] is not None and _spec(variant, overrides).noise_delta > 0
        return dict(lr=train["lr"], batch_size=per_dataset(train, "batch_size", dataset),
                    noise_delta=train["noise_delta"] if noisy else None)

    for dataset in cfg["datasets"]:
        for arch in cfg["archs"]:
            for variant in cfg["variants"]:
                for seed in cfg["seeds"]:
                    run = Run(dataset, arch, variant, "base", seed, **base(variant, dataset))
                    runs[run.key] = run

    def in_main(d: str, a: str, v: str, s: int) -> bool:
        return d in cfg["datasets"] and a in cfg["archs"] and v in cfg["variants"] and s in cfg["seeds"]

    for name, sweep in cfg["sweeps"].items():
        tags: dict[str, float] = {}
        for value in sweep["values"]:
            tag = SWEEP_TAGS[name] + fmt_value(int(value) if name == "batch_size" else value)
            if tag in tags:
                raise GridError(
                    f"config sweeps.{name}.values: {tags[tag]!r} and {value!r} give the same run tag "
                    f"{tag!r} (tags keep 6 significant digits); keep one of them"
                )
            tags[tag] = value
        for dataset in _sweep_axis(cfg, sweep, "datasets"):
            for arch in _sweep_axis(cfg, sweep, "archs"):
                for variant in sweep["variants"]:
                    for tag, value in tags.items():
                        for seed in _sweep_axis(cfg, sweep, "seeds"):
                            opts = base(variant, dataset)
                            if name == "lr":
                                same = value == base_lr(variant)
                                opts["lr"] = float(value)
                            elif name == "batch_size":
                                value = int(value)
                                same = value == opts["batch_size"]
                                ratio = value / opts["batch_size"]
                                opts["batch_size"] = value
                                scale = {"none": None, "linear": ratio, "sqrt": math.sqrt(ratio)}[sweep["lr_scaling"]]
                                if scale is not None:
                                    opts["lr"] = round(base_lr(variant) * scale, 10)
                            else:
                                same = value == base_noise(variant)
                                opts["noise_delta"] = float(value)
                            if same and in_main(dataset, arch, variant, seed):
                                continue
                            run = Run(dataset, arch, variant, tag, seed, **opts)
                            runs.setdefault(run.key, run)
    return runs


# ----------------------------------------------------- recorded options vs the config's


def expected_record(run: Run, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``msr train`` records in the run's config.json when trained from this config,
    resolved as msr resolves them (a variant's own lr/noise when the config leaves them unset).

    Only what decides the result: not the device, threads or probe interval. ``precision`` and
    ``image_size`` are compared only when the config sets them (``auto``/null resolve inside
    msr by device and dataset); ``train_subset`` always.
    """
    train = cfg["train"]
    overrides = dict(train["overrides"])
    spec = _spec(run.variant, {**overrides, **({} if run.noise_delta is None else {"noise_delta": run.noise_delta})})
    record: dict[str, Any] = {
        "dataset": run.dataset, "arch": run.arch, "variant": run.variant, "seed": run.seed,
        "epochs": per_dataset(train, "epochs", run.dataset), "batch_size": run.batch_size,
        "lr": spec.resolved_lr(run.lr),
        "noise_delta": spec.noise_delta,
        "overrides": overrides,
    }
    if train["image_size"] is not None:
        record["image_size"] = train["image_size"]
    if train.get("precision", "auto") != "auto":
        record["precision"] = train["precision"]
    # msr records train_subset always (None: the whole set; older runs lack the key: the same)
    record["train_subset"] = train.get("train_subset")
    return record


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def differences(expected: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> expected`` for every expected option the record does not match."""
    return [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in expected.items()
            if not _same(recorded.get(key), value)]


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's config.json, or None when there is none yet; a damaged one is an error
    naming the file (msr train writes it atomically, so only outside hands damage it)."""
    path = Path(run_dir) / "config.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise GridError(f"{path} is not valid JSON ({err.msg}); delete the run directory {run_dir} to retrain it") from None
    if not isinstance(record, dict):
        raise GridError(f"{path} does not hold a JSON object; delete the run directory {run_dir} to retrain it")
    return record


def find_stale(runs_root: str | Path, expected: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Run path -> differences, for every run directory whose config.json disagrees with
    ``expected`` (run path -> :func:`expected_record`). A missing config.json counts as stale:
    a summary without the options it was trained with cannot be trusted."""
    stale = {}
    for path, want in expected.items():
        record = read_record(Path(runs_root) / path)
        diff = ["config.json is missing"] if record is None else differences(want, record)
        if diff:
            stale[path] = diff
    return stale


def check_runs(runs_root: str | Path, expected: Mapping[str, Mapping[str, Any]], out: str | Path,
               log: str | Path | None = None, command: str = "make run") -> None:
    """The pipeline's gate before aggregation: every run was trained with the options the config
    gives. Stale runs lose their summary.json (so the next pipeline run retrains them) and the
    check fails naming them (also in ``log``); else ``out`` records the checked options."""
    from msr import atomic

    try:
        stale = find_stale(runs_root, expected)
    except GridError as err:
        _log(log, str(err))
        raise
    if stale:
        for path in stale:
            (Path(runs_root) / path / "summary.json").unlink(missing_ok=True)
        shown = "; ".join(f"{p} ({', '.join(d)})" for p, d in list(stale.items())[:5])
        more = f"; and {len(stale) - 5} more" if len(stale) > 5 else ""
        message = (
            f"{len(stale)} run(s) under {runs_root} were trained with other options than the config gives "
            f"(a config edit that Snakemake's metadata did not record): {shown}{more}. Their summary.json "
            f"files were removed so they are retrained: rerun the same command (e.g. `{command}`)"
        )
        _log(log, message + "\n" + "\n".join(f"stale: {p}: {', '.join(d)}" for p, d in stale.items()))
        raise GridError(message)
    _log(log, f"{len(expected)} run(s) under {runs_root} match the config")
    atomic.write_json(Path(out), {"runs": {p: dict(r) for p, r in expected.items()}})
    for old in Path(out).parent.glob("runs-*.json"):
        if old.name != Path(out).name:
            old.unlink(missing_ok=True)  # the check of an earlier config: outdated


def _log(path: str | Path | None, text: str) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def reset(run_dir: str | Path, expected: Mapping[str, Any], log=print) -> bool:
    """Before a train job: clear ``run_dir`` when its config.json was written for other options
    (msr train refuses to mix two configs in one directory; the job is retraining this run
    because its options changed). Returns whether it cleared anything."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None:
        return False
    diff = differences(expected, record)
    if not diff:
        return False
    from msr.training.rundir import RunLock  # no torch

    # never under a live writer's feet (a duplicate job, a second Snakemake with --nolock):
    # RunLock fails at once naming the holder
    with RunLock(run_dir):
        log(f"{run_dir}: options changed ({', '.join(diff)}); starting this run over")
        shutil.rmtree(run_dir)
    return True

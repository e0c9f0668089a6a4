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
- :func:`build_grid` - every run of the config (main grid, the lr selection's validation runs,
  then each sweep), refusing two sweep values that would share one run directory (0.8 and
  0.8000001 both give ``lrx0.8``).

Learning rates are FACTORS of each variant's own lr, every param group scaled together
(``msr train --lr-factor``): one lr sweep value then means the same for every variant.
``train.lr`` (one conv-group lr for every run) is the factor ``train.lr / the variant's lr``.
The variants of ``lr_selection`` get their factor from validation runs (tag ``val-lrx<f>``:
trained on the training data less a held-out validation split, evaluated on it, never on the
test set; msr.pipeline.selection chooses). Their main-grid runs and sweeps (batch size: that
factor x the batch scaling) therefore carry :data:`SELECTED` until the choice exists:
:func:`resolve` fills it in, and drops an lr sweep point that the choice makes equal to a
main-grid run (:attr:`Run.unless_selected`: the main grid's run is reused). Snakemake makes
that choice a ``checkpoint`` (workflow/rules/train.smk).

And after training, before aggregation (the pipeline's ``check_runs`` rule, and ``reset`` at
the start of every train job), the *recorded* options of each run directory (its
``config.json``) are compared with what the config asks for (:func:`expected_record`), so a
config edit is noticed even when Snakemake's own metadata (``.snakemake/``) is gone or only
modification times are compared (``--rerun-triggers mtime``).

Nothing here imports torch at module level: ``msr reset-run`` runs before every
train job and must stay cheap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msr import catalog
from msr.training.rundir import MISSING_MEANS  # torch-free

SWEEP_TAGS = {"lr": "lrx", "batch_size": "bs", "noise_delta": "d"}
SELECTION_TAG = "val-lrx"  # validation runs of the lr selection: val-lrx<factor>
SELECTED = "selected"  # an lr factor that the validation runs choose (resolve() fills it in)


class GridError(ValueError):
    """A config the pipeline cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class Run:
    """One training run: its place in the grid and the options only it gets."""

    dataset: str
    arch: str
    variant: str
    tag: str  # base | lrx<f> | bs<v> | d<v> | val-lrx<f>
    seed: int
    batch_size: int  # resolved: train.batch_size, or the dataset's own (msr.catalog) when null
    # every param group at this factor of the variant's own lr; None: the factor chosen on the
    # validation split (lr_selection) times lr_scale - unknown until the selection runs ran
    lr_factor: float | None = 1.0
    lr_scale: float = 1.0  # multiplies a chosen factor (the batch-size sweep's lr scaling)
    noise_delta: float | None = None  # None: the variant's default
    eval_split: str = "test"  # "validation": an lr selection run (msr train --eval-split)
    validation_size: int | None = None
    # an lr sweep point of a variant whose factor is chosen: when the choice equals lr_factor,
    # this point IS the main grid's run (reused, not trained)
    unless_selected: bool = False

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.dataset, self.arch, self.variant, self.tag, str(self.seed))

    @property
    def path(self) -> str:
        """The run directory below the set's runs folder (also the run id of runs.csv)."""
        return f"{self.dataset}/{self.arch}/{self.variant}/{self.tag}/seed{self.seed}"

    @property
    def needs_selection(self) -> bool:
        """Whether this run's options (or its existence) wait for the lr selection."""
        return self.lr_factor is None or self.unless_selected

    def resolve(self, factors: Mapping[tuple[str, str, str], float]) -> Run | None:
        """This run with the chosen factor filled in (``factors``: (dataset, arch, variant) ->
        factor, :func:`msr.pipeline.selection.load`); None for an lr sweep point that the choice
        makes the main grid's run."""
        if not self.needs_selection:
            return self
        where = (self.dataset, self.arch, self.variant)
        if where not in factors:
            raise GridError(f"the lr selection has no factor for {'/'.join(where)}; rerun the pipeline "
                            "(its select_lr step) to choose one")
        chosen = float(factors[where])
        if self.unless_selected:
            same = math.isclose(chosen, self.lr_factor, rel_tol=1e-9, abs_tol=0.0)
            return None if same else dataclasses.replace(self, unless_selected=False)
        return dataclasses.replace(self, lr_factor=round(chosen * self.lr_scale, 12), lr_scale=1.0)


def resolve(runs: Mapping[tuple, Run], factors: Mapping[tuple[str, str, str], float]) -> dict[tuple, Run]:
    """Every run of the grid with the chosen factors filled in, the reused sweep points dropped."""
    out = {}
    for key, run in runs.items():
        resolved = run.resolve(factors)
        if resolved is not None:
            out[key] = resolved
    return out


def tuned_variants(cfg: Mapping[str, Any]) -> list[str]:
    """The variants whose lr factor is chosen on the validation split: ``lr_selection.variants``
    that are in the main grid (a variant without main-grid runs has nothing to tune)."""
    return [v for v in cfg["lr_selection"]["variants"] if v in cfg["variants"]]


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
    check_selection(cfg)


def check_selection(cfg: Mapping[str, Any]) -> None:
    """``lr_selection``: complete, not fighting ``train.lr``, and a validation split that leaves
    every dataset enough images to hold out and to train on."""
    sel, train = cfg["lr_selection"], cfg["train"]
    if not sel["variants"]:
        return
    if not sel["factors"]:
        raise GridError("config lr_selection: has variants but no factors; give both, or no variants to skip the selection")
    if train["lr"] is not None and tuned_variants(cfg):
        raise GridError(f"config train.lr={train['lr']!r} sets every run's lr, but lr_selection.variants "
                        f"{tuned_variants(cfg)} would choose theirs on the validation split: set one of them "
                        "(train.lr: null, or lr_selection.variants: [])")
    n_val, subset = sel["validation_size"], train.get("train_subset")
    if n_val is None:
        raise GridError("config lr_selection.validation_size: give the number of training images to hold "
                        "out for validation (the selection never looks at the test set)")
    for dataset in cfg["datasets"]:
        facts = catalog.dataset(dataset)
        full = facts.train_size
        if subset is not None:
            left, trains = full - min(subset, full), min(subset, full)
            where = f"outside train.train_subset={subset}"
        else:
            left, trains = full - 1, full - n_val
            where = "in the training split"
        if n_val > left:
            raise GridError(f"config lr_selection.validation_size={n_val}: {dataset} has {full} training images, "
                            f"{max(left, 0)} of them {where} to hold out")
        if n_val < facts.num_classes:
            raise GridError(f"config lr_selection.validation_size={n_val}: fewer than the {facts.num_classes} "
                            f"classes of {dataset}")
        batch = per_dataset(train, "batch_size", dataset)
        if trains < batch:
            raise GridError(f"config lr_selection.validation_size={n_val}: leaves {trains} images of {dataset} to "
                            f"train on, fewer than the batch size {batch} "
                            f"(train.batch_size, or {dataset}'s default when null)")


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
    """Every run of the config, in a stable order: the main grid, the lr selection's validation
    runs, then each sweep.

    A sweep point that is exactly a run of the main grid (same dataset, arch, variant, seed and
    the same resolved value) is not trained twice: the figures take it from the main grid. For
    a variant whose factor is chosen on the validation split, an lr sweep point whose factor
    the selection may choose is kept with ``unless_selected`` (:func:`resolve` drops it once
    the choice equals it).
    """
    train = cfg["train"]
    overrides = dict(train["overrides"])
    sel = cfg["lr_selection"]
    tuned = set(tuned_variants(cfg))
    runs: dict[tuple, Run] = {}

    def own_factor(variant: str) -> float:
        """train.lr (one conv-group lr for all) as a factor of the variant's own, else 1."""
        if train["lr"] is None:
            return 1.0
        return round(train["lr"] / _spec(variant, overrides).lr, 12)

    def chosen(dataset: str, arch: str, variant: str) -> bool:
        """Is this run's base factor the one chosen on the validation split? (the selection runs
        for the main grid's datasets and archs; a sweep elsewhere keeps the default)"""
        return variant in tuned and dataset in cfg["datasets"] and arch in cfg["archs"]

    def base_noise(variant: str) -> float:
        """train.noise_delta changes the noisy variants only (a variant without noise keeps none)."""
        own = _spec(variant, overrides).noise_delta
        return train["noise_delta"] if train["noise_delta"] is not None and own > 0 else own

    def base(dataset: str, arch: str, variant: str) -> dict[str, Any]:
        noisy = train["noise_delta"] is not None and _spec(variant, overrides).noise_delta > 0
        return dict(lr_factor=None if chosen(dataset, arch, variant) else own_factor(variant),
                    batch_size=per_dataset(train, "batch_size", dataset), noise_delta=train["noise_delta"] if noisy else None)

    for dataset in cfg["datasets"]:
        for arch in cfg["archs"]:
            for variant in cfg["variants"]:
                for seed in cfg["seeds"]:
                    run = Run(dataset, arch, variant, "base", seed, **base(dataset, arch, variant))
                    runs[run.key] = run

    selection_tags = _tags("lr_selection.factors", SELECTION_TAG, sel["factors"])
    for dataset in cfg["datasets"]:
        for arch in cfg["archs"]:
            for variant in (v for v in cfg["variants"] if v in tuned):
                for tag, factor in selection_tags.items():
                    for seed in sel["seeds"]:
                        opts = {**base(dataset, arch, variant), "lr_factor": float(factor)}
                        run = Run(dataset, arch, variant, tag, seed, eval_split="validation",
                                  validation_size=sel["validation_size"], **opts)
                        runs[run.key] = run

    def in_main(d: str, a: str, v: str, s: int) -> bool:
        return d in cfg["datasets"] and a in cfg["archs"] and v in cfg["variants"] and s in cfg["seeds"]

    candidates = [float(f) for f in sel["factors"]]
    for name, sweep in cfg["sweeps"].items():
        tags = _tags(f"sweeps.{name}.values", SWEEP_TAGS[name],
                     [int(v) if name == "batch_size" else v for v in sweep["values"]])
        for dataset in _sweep_axis(cfg, sweep, "datasets"):
            for arch in _sweep_axis(cfg, sweep, "archs"):
                for variant in sweep["variants"]:
                    for tag, value in tags.items():
                        for seed in _sweep_axis(cfg, sweep, "seeds"):
                            opts = base(dataset, arch, variant)
                            main = in_main(dataset, arch, variant, seed)
                            if name == "lr":
                                value = float(value)
                                if opts["lr_factor"] is None:  # the main grid's factor is chosen later
                                    opts["unless_selected"] = main and any(math.isclose(value, c) for c in candidates)
                                    same = False
                                else:
                                    same = math.isclose(value, opts["lr_factor"], rel_tol=1e-9, abs_tol=0.0)
                                opts["lr_factor"] = value
                            elif name == "batch_size":
                                value = int(value)
                                same = value == opts["batch_size"]
                                ratio = value / opts["batch_size"]
                                opts["batch_size"] = value
                                scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[sweep["lr_scaling"]]
                                if opts["lr_factor"] is None:
                                    opts["lr_scale"] = round(scale, 12)
                                else:
                                    opts["lr_factor"] = round(opts["lr_factor"] * scale, 12)
                            else:
                                same = value == base_noise(variant)
                                opts["noise_delta"] = float(value)
                            if same and main:
                                continue
                            run = Run(dataset, arch, variant, tag, seed, **opts)
                            runs.setdefault(run.key, run)
    return runs


def _tags(key: str, prefix: str, values: Sequence) -> dict[str, Any]:
    """Run tag -> value; two values with one tag (6 significant digits) are a config error."""
    tags: dict[str, Any] = {}
    for value in values:
        tag = prefix + fmt_value(value)
        if tag in tags:
            raise GridError(f"config {key}: {tags[tag]!r} and {value!r} give the same run tag {tag!r} "
                            "(tags keep 6 significant digits); keep one of them")
        tags[tag] = value
    return tags


# ----------------------------------------------------- recorded options vs the config's


def expected_record(run: Run, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``msr train`` records in the run's config.json when trained from this config,
    resolved as msr resolves them (a variant's own lr/noise when the config leaves them unset).

    Only what decides the result: not the device, threads or probe interval. ``precision`` and
    ``image_size`` are compared only when the config sets them (``auto``/null resolve inside
    msr by device and dataset); ``train_subset``, the evaluation split and the variant's warm-up
    always. ``lr`` is the conv group's (every group follows the same factor); for a run whose
    factor is still to be chosen it reads ``"selected x <scale>"`` (:data:`SELECTED`) - such a
    record is for hashing only: compare the record of :meth:`Run.resolve`'s run.
    """
    train = cfg["train"]
    overrides = dict(train["overrides"])
    spec = _spec(run.variant, {**overrides, **({} if run.noise_delta is None else {"noise_delta": run.noise_delta})})
    lr: float | str = f"{SELECTED} x {run.lr_scale!r}" if run.lr_factor is None else spec.lr * run.lr_factor
    record: dict[str, Any] = {
        "dataset": run.dataset, "arch": run.arch, "variant": run.variant, "seed": run.seed,
        "epochs": per_dataset(train, "epochs", run.dataset), "batch_size": run.batch_size,
        "lr": lr,
        "noise_delta": spec.noise_delta,
        "overrides": overrides,
    }
    if train["image_size"] is not None:
        record["image_size"] = train["image_size"]
    if train.get("precision", "auto") != "auto":
        record["precision"] = train["precision"]
    # msr records train_subset always (None: the whole set; older runs lack the key: the same)
    record["train_subset"] = train.get("train_subset")
    record["eval_split"] = run.eval_split
    record["validation_size"] = run.validation_size
    record["variant_spec.warmup"] = spec.warmup
    record["variant_spec.warmup_from"] = spec.warmup_from
    return record


def _recorded(record: Mapping[str, Any], key: str) -> Any:
    """``record[key]``, a dotted key reading into nested objects (``variant_spec.warmup``); a
    key an older msr did not write means :data:`MISSING_MEANS`'s value."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING_MEANS.get(key)
        value = value[part]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def differences(expected: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> expected`` for every expected option the record does not match."""
    return [f"{key}: {_recorded(recorded, key)!r} -> {value!r}" for key, value in expected.items()
            if not _same(_recorded(recorded, key), value)]


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
        if any(isinstance(v, str) and v.startswith(SELECTED) for v in want.values()):
            raise GridError(f"{path}: its expected options wait for the lr selection ({want.get('lr')!r}); "
                            "compare the record of the resolved run (Run.resolve)")
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

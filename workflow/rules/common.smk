# Shared definitions: the grid of runs built from the (validated) config, and the paths of
# every file the rules exchange. Functions only - no rules here.

import hashlib
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from snakemake.exceptions import WorkflowError

try:
    from msr.data import cache_path as _msr_cache_path
    from msr.models import parse_arch as _msr_parse_arch
    from msr.variants import VARIANTS as _MSR_VARIANTS
except ImportError as err:  # pragma: no cover - a setup problem, not a config problem
    raise WorkflowError(
        f"the msr package is not importable ({err}); run `make run` (creates .venv) or "
        "`pip install -e .` in the environment that runs snakemake"
    )

# Rules call the `msr` console script: make the one next to this Python interpreter win, so
# `.venv/bin/snakemake` works without activating the venv (also inside cluster jobs, which
# re-read this file).
os.environ.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

# The software environment of every rule when run with `--sdm conda` (otherwise the
# environment that runs snakemake is used; see workflow/envs/msr.yaml).
CONDA_ENV = "../envs/msr.yaml"
RUNS_ROOT = "results/runs"
TABLES = {
    "runs": "results/tables/runs.csv",
    "summary": "results/tables/summary.csv",
    "curves": "results/tables/curves.csv",
}
DATA_ROOT = config["train"]["data_root"]
# msr.data downloads CIFAR into <data_root>/raw/<folder> (the folder inside the official archive)
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def check_archs(archs, where):
    """Depth must be 6n+2 (the schema has already checked the `resnetN` form)."""
    for arch in archs:
        try:
            _msr_parse_arch(arch)
        except ValueError as err:
            raise WorkflowError(f"config {where}: {err}")


def fmt_value(value):
    """Sweep values in run tags: 0.05 -> '0.05', 1.0 -> '1', 32 -> '32'."""
    return format(float(value), "g") if not isinstance(value, int) else str(value)


@dataclass(frozen=True)
class Run:
    """One training run: its place in the grid and the options only it gets."""

    dataset: str
    arch: str
    variant: str
    tag: str  # base | lr<v> | bs<v> | d<v>
    seed: int
    lr: float | None = None  # None: the variant's default
    batch_size: int = 128
    noise_delta: float | None = None  # None: the variant's default

    @property
    def key(self):
        return (self.dataset, self.arch, self.variant, self.tag, str(self.seed))

    @property
    def dir(self):
        return f"{RUNS_ROOT}/{self.dataset}/{self.arch}/{self.variant}/{self.tag}/seed{self.seed}"

    @property
    def summary(self):
        return f"{self.dir}/summary.json"


def base_lr(variant):
    return config["train"]["lr"] if config["train"]["lr"] is not None else _MSR_VARIANTS[variant].lr


def base_noise(variant):
    """train.noise_delta changes the magnitude of the noisy variants only (a variant without
    noise keeps none); None keeps each variant's own."""
    delta, own = config["train"]["noise_delta"], _MSR_VARIANTS[variant].noise_delta
    return delta if delta is not None and own > 0 else own


def build_grid(cfg):
    """Every run of the config, in a stable order: the main grid, then each sweep.

    A sweep point that is exactly a run of the main grid (same dataset, arch, variant, seed and
    the same resolved value) is not trained twice: the figures take it from the main grid.
    """
    train = cfg["train"]
    runs = {}

    def add(run):
        runs.setdefault(run.key, run)

    def base(variant):
        noisy = train["noise_delta"] is not None and _MSR_VARIANTS[variant].noise_delta > 0
        return dict(lr=train["lr"], batch_size=train["batch_size"],
                    noise_delta=train["noise_delta"] if noisy else None)

    for dataset in cfg["datasets"]:
        for arch in cfg["archs"]:
            for variant in cfg["variants"]:
                for seed in cfg["seeds"]:
                    add(Run(dataset, arch, variant, "base", seed, **base(variant)))
    in_main = lambda d, a, v, s: (d in cfg["datasets"] and a in cfg["archs"]  # noqa: E731
                                  and v in cfg["variants"] and s in cfg["seeds"])

    for name, sweep in cfg["sweeps"].items():
        datasets = sweep["datasets"] if sweep["datasets"] is not None else cfg["datasets"]
        archs = sweep["archs"] if sweep["archs"] is not None else cfg["archs"]
        seeds = sweep["seeds"] if sweep["seeds"] is not None else cfg["seeds"]
        check_archs(archs, f"sweeps.{name}.archs")
        for dataset in datasets:
            for arch in archs:
                for variant in sweep["variants"]:
                    for value in sweep["values"]:
                        for seed in seeds:
                            opts = base(variant)
                            if name == "lr":
                                tag, same = f"lr{fmt_value(value)}", value == base_lr(variant)
                                opts["lr"] = float(value)
                            elif name == "batch_size":
                                value = int(value)
                                tag, same = f"bs{value}", value == train["batch_size"]
                                opts["batch_size"] = value
                                scale = {"none": None, "linear": value / train["batch_size"],
                                         "sqrt": math.sqrt(value / train["batch_size"])}[sweep["lr_scaling"]]
                                if scale is not None:
                                    opts["lr"] = round(base_lr(variant) * scale, 10)
                            else:
                                tag, same = f"d{fmt_value(value)}", value == base_noise(variant)
                                opts["noise_delta"] = float(value)
                            if same and in_main(dataset, arch, variant, seed):
                                continue
                            add(Run(dataset, arch, variant, tag, seed, **opts))
    return runs


def processed_path(dataset):
    """The processed cache `msr prepare` writes for this dataset under the config's options."""
    try:
        return _msr_cache_path(dataset, DATA_ROOT, image_size=config["train"]["image_size"]).as_posix()
    except ValueError as err:
        raise WorkflowError(f"config train.image_size={config['train']['image_size']!r} "
                            f"for dataset {dataset!r}: {err}")


check_archs(config["archs"], "archs")
for _name in ("probe_dataset", "probe_arch"):
    _value = config["analysis"][_name]
    _valid = config["datasets"] if _name == "probe_dataset" else config["archs"]
    if _value is not None and _value not in _valid:
        raise WorkflowError(f"config analysis.{_name}={_value!r} is not in the grid's "
                            f"{'datasets' if _name == 'probe_dataset' else 'archs'} {_valid}")

RUNS = build_grid(config)
DATASETS = sorted({run.dataset for run in RUNS.values()})
PREPARED = {processed_path(d): d for d in DATASETS}  # cache path -> dataset


def prepare_input(wildcards):
    """CIFAR is prepared from its downloaded folder; digits/synthetic need no input."""
    dataset = PREPARED[f"{DATA_ROOT}/processed/{wildcards.name}.pt"]
    if dataset in CIFAR_FOLDERS:
        return [f"{DATA_ROOT}/raw/{CIFAR_FOLDERS[dataset]}"]
    return []


def probe_every(run):
    """Sweep runs may probe more sparsely (train.sweep_probe_every): only the main grid's probes are plotted."""
    sparse = config["train"]["sweep_probe_every"]
    return config["train"]["probe_every"] if run.tag == "base" or sparse is None else sparse


def train_args(wildcards):
    """The command-line options of one run - and nothing else, so editing any other part of the
    config (another run, a sweep, the analysis) never changes this job's params."""
    key = (wildcards.dataset, wildcards.arch, wildcards.variant, wildcards.tag, wildcards.seed)
    if key not in RUNS:
        raise WorkflowError(f"{'/'.join(key)} is not a run of the configured grid")
    run, train = RUNS[key], config["train"]
    args = [f"--dataset {run.dataset}", f"--arch {run.arch}", f"--variant {run.variant}",
            f"--seed {run.seed}", f"--epochs {train['epochs']}", f"--batch-size {run.batch_size}",
            f"--device {train['device']}", f"--probe-every {probe_every(run)}",
            f"--data-root {DATA_ROOT}"]
    if run.lr is not None:
        args.append(f"--lr {run.lr!r}")
    if run.noise_delta is not None:
        args.append(f"--noise-delta {run.noise_delta!r}")
    if train["image_size"] is not None:
        args.append(f"--image-size {train['image_size']}")
    for name, value in sorted(train["overrides"].items()):
        args.append(f"--override {shlex.quote(f'{name}={json.dumps(value)}')}")
    return " ".join(args)


def all_summaries():
    return [run.summary for run in RUNS.values()]


def config_sha256():
    """Hash of the whole validated config (defaults filled in), for the manifest."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- figures and tables
# name -> outputs (besides the provenance record); every figure is PNG + PDF, every table
# CSV + Markdown + LaTeX
FIGURES = ["fig1_curves", "fig2_mean_shift", "fig3_lr_stability", "fig4_isocline",
           "fig5_batch_size", "fig6_noise"]
TABLES_OUT = ["tab1_ablation", "tab2_cost"]


def figure_files(name):
    return [f"figures/{name}.png", f"figures/{name}.pdf"]


def table_files(name):
    return [f"figures/{name}.csv", f"figures/{name}.md", f"figures/{name}.tex"]


def all_outputs():
    files = [f for name in FIGURES for f in figure_files(name)]
    return files + [f for name in TABLES_OUT for f in table_files(name)]


def sweep_params(name):
    """What a sweep figure needs to pick its runs: the sweep's variants and the main grid's
    reference values (sweep points equal to a main-grid run are taken from the main grid)."""
    sweep = config["sweeps"][name]
    return {
        "variants": sweep["variants"],
        "base_batch_size": config["train"]["batch_size"],
        "lr_scaling": sweep.get("lr_scaling"),
    }


PROBE_SELECTION = {
    "dataset": config["analysis"]["probe_dataset"] or config["datasets"][0],
    "arch": config["analysis"]["probe_arch"] or config["archs"][0],
}

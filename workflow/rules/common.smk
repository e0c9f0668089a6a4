# Shared definitions: the validated config, the grid of runs built from it, and the paths of
# every file the rules exchange. Functions and constants only - no rules here.
#
# Every output of a config lives under its set's name (config `name:`): results/<name>/ (runs,
# tables, executed notebooks, provenance, logs, benchmarks, checks) and figures/<name>/ (figures,
# tables, MANIFEST.json), so two sets never share or clear each other's files. Only data/ (the
# datasets, identical for every set) is shared.

import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError

try:
    from msr import catalog
    from msr.pipeline import grid, selection
    from msr.data import cache_path as _msr_cache_path
    from msr.core.models import parse_arch as _msr_parse_arch
except ImportError as err:  # pragma: no cover - a setup problem, not a config problem
    raise WorkflowError(
        f"the msr package is not importable ({err}); run `make run` (creates .venv) or "
        "`pip install -e .` in the environment that runs snakemake"
    )


def _config_error(err):
    return WorkflowError(str(err))


# ----------------------------------------------------------------- values in shell commands
# Every value a rule's shell command gets from the config is quoted where it is made: sh() for
# params (data_root, data_mirror, overrides, the train options), `:q` for JSON. The rest is safe
# by construction: the set name is a schema pattern of letters, digits, '.', '_', '-', the
# wildcards are constrained to the grid's datasets, archs, variants, tags and seeds, the rest
# are integers and hashes. (Adding `:q` to those in the shell text would change the text, which
# Snakemake's `code` rerun trigger compares: every run of every existing study would retrain.)
def sh(*args):
    """Arguments as one shell command-line fragment, each quoted (shlex.quote leaves a safe value
    such as `data` or `--seed` as it is, so a job's params stay what they were)."""
    return " ".join(shlex.quote(str(arg)) for arg in args)


# --------------------------------------------------------------------- the config, checked
# Order matters: the schema's message for `--config seeds=[0,1]` ("'0' is not of type
# 'integer'") hides the cause, so that case is named first; msr.pipeline.grid's checks need the
# defaults the schema fills in.
try:
    grid.check_types(config)
except grid.GridError as err:
    raise _config_error(err)

validate(config, "../schemas/config.schema.yaml")

try:
    grid.check_config(config)
except grid.GridError as err:
    raise _config_error(err)

# Rules call the `msr` console script: make the ones next to
# this Python interpreter win, so `.venv/bin/snakemake` works without activating the venv (also
# inside cluster jobs, which re-read this file).
os.environ.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
# How long a train job waits for a free GPU slot (msr.infra.gpu), when the config says: through
# the environment, like PATH, not the shell command - whose text is a rerun trigger, while a
# resource should be none.
if config["resources"].get("gpu_wait_s") is not None:
    os.environ.update(MSR_GPU_WAIT_S=str(config["resources"]["gpu_wait_s"]))  # cluster jobs re-read this file

# The software environment of every rule when run with `--sdm conda` (otherwise the
# environment that runs snakemake is used; see workflow/envs/msr.yaml).
CONDA_ENV = "../envs/msr.yaml"

SET = config["name"]
RESULTS = f"results/{SET}"
FIGURES_DIR = f"figures/{SET}"
RUNS_ROOT = f"{RESULTS}/runs"
LOGS = f"{RESULTS}/logs"
TABLES = {
    "runs": f"{RESULTS}/tables/runs.csv",
    "summary": f"{RESULTS}/tables/summary.csv",
    "curves": f"{RESULTS}/tables/curves.csv",
}
MANIFEST = f"{FIGURES_DIR}/MANIFEST.json"
DATA_ROOT = config["train"]["data_root"]
# msr.data downloads CIFAR into <data_root>/raw/<folder> (the folder inside the official archive)
CIFAR_FOLDERS = {name: facts.raw_folder for name, facts in catalog.DATASETS.items() if facts.raw_folder}


def check_archs(archs, where):
    """Depth must be 6n+2 (the schema has already checked the `resnetN` form)."""
    for arch in archs:
        try:
            _msr_parse_arch(arch)
        except ValueError as err:
            raise WorkflowError(f"config {where}: {err}")


check_archs(config["archs"], "archs")
for _sweep_name, _sweep in config["sweeps"].items():
    if _sweep["archs"] is not None:
        check_archs(_sweep["archs"], f"sweeps.{_sweep_name}.archs")
for _name in ("probe_dataset", "probe_arch"):
    _value = config["analysis"][_name]
    _valid = config["datasets"] if _name == "probe_dataset" else config["archs"]
    if _value is not None and _value not in _valid:
        raise WorkflowError(f"config analysis.{_name}={_value!r} is not in the grid's "
                            f"{'datasets' if _name == 'probe_dataset' else 'archs'} {_valid}")

try:
    RUNS = grid.build_grid(config)
except grid.GridError as err:
    raise _config_error(err)

# Last: a config that changes the default study must not keep the default's set name (a config
# file without `name:` inherits it, and would overwrite figures/digits).
_DEFAULT_CONFIG = "workflow/config/default.yaml"
with open(Path(workflow.basedir) / _DEFAULT_CONFIG) as _f:
    _default = yaml.safe_load(_f)
validate(_default, "../schemas/config.schema.yaml")
try:
    grid.check_set_name(config, _default, _DEFAULT_CONFIG)
except grid.GridError as err:
    raise _config_error(err)

# What every run's config.json must record (grid.expected_record), keyed by run path;
# its hash names the check_runs output, so a config edit that changes any run's options
# reruns the check even where Snakemake keeps no metadata (analysis.smk, check_runs). A run
# whose lr factor is chosen on the validation split records "selected" here; the check
# compares the record with the choice filled in (grid.Run.resolve).
EXPECTED = {run.path: grid.expected_record(run, config) for run in RUNS.values()}
GRID_SHA = hashlib.sha256(json.dumps(EXPECTED, sort_keys=True).encode()).hexdigest()[:16]
RUNS_CHECKED = f"{RESULTS}/checks/runs-{GRID_SHA}.json"

# The lr selection (train.smk: the select_lr checkpoint): the validation runs, the choice
# (read by the main grid's train jobs), and its table, published with the figures.
SELECTION_RUNS = [run for run in RUNS.values() if run.eval_split == "validation"]
SELECTING = bool(SELECTION_RUNS)
SELECTION = f"{RESULTS}/lr_selection.json"
SELECTION_TABLE = f"{FIGURES_DIR}/lr_selection.csv"
SELECTION_PROVENANCE = f"{RESULTS}/provenance/lr_selection.json"
_FACTORS = {}


def chosen_factors():
    """(dataset, arch, variant) -> the factor chosen on the validation split, for an input or
    params function. Before the first choice, checkpoints.get raises Snakemake's
    IncompleteCheckpointException: the job waits for select_lr (params <TBD> in a dry-run).
    Once a choice exists it is read directly: Snakemake's first DAG pass treats every checkpoint
    output as incomplete, and <TBD> params there would fire the params trigger of every tuned
    run and leave its downstream jobs (the notebooks) marked for a rerun at every invocation.
    When select_lr does rerun, Snakemake re-evaluates every job that takes its output as input
    once it has finished, so a changed choice still retrains the tuned runs (params trigger)."""
    path = SELECTION if os.path.exists(SELECTION) else checkpoints.select_lr.get().output.json
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _FACTORS:
        _FACTORS.clear()
        _FACTORS[key] = selection.load(path)
    return _FACTORS[key]


def resolved(run):
    """The run with its chosen lr factor filled in (None: a sweep point reused from the main grid)."""
    return run.resolve(chosen_factors()) if run.needs_selection else run


def processed_path(dataset):
    """The processed cache `msr prepare` writes for this dataset under the config's options."""
    try:
        return _msr_cache_path(dataset, DATA_ROOT, image_size=config["train"]["image_size"]).as_posix()
    except ValueError as err:
        raise WorkflowError(f"config train.image_size={config['train']['image_size']!r} "
                            f"for dataset {dataset!r}: {err}")


DATASETS = sorted({run.dataset for run in RUNS.values()})
PREPARED = {processed_path(d): d for d in DATASETS}  # cache path -> dataset


def prepare_input(wildcards):
    """CIFAR is prepared from its downloaded folder; digits, synthetic and Fashion-MNIST (an
    extracted copy, a mirror such as Debian's package, or the download: msr finds it) need none."""
    dataset = PREPARED[f"{DATA_ROOT}/processed/{wildcards.name}.pt"]
    if dataset in CIFAR_FOLDERS:
        return [f"{DATA_ROOT}/raw/{CIFAR_FOLDERS[dataset]}"]
    return []


def run_of(wildcards):
    key = (wildcards.dataset, wildcards.arch, wildcards.variant, wildcards.tag, wildcards.seed)
    if key not in RUNS:
        raise WorkflowError(f"{'/'.join(key)} is not a run of the configured grid (set {SET!r})")
    return RUNS[key]


def probe_every(run):
    """Sweep runs may probe more sparsely (train.sweep_probe_every): only the main grid's probes are plotted."""
    sparse = config["train"]["sweep_probe_every"]
    return config["train"]["probe_every"] if run.tag == "base" or sparse is None else sparse


def train_args(wildcards):
    """The command-line options of one run - and nothing else, so editing any other part of the
    config (another run, a sweep, the analysis) never changes this job's params. A run whose lr
    factor is chosen on the validation split reads the choice (after select_lr)."""
    run, train = run_of(wildcards), config["train"]
    if run.needs_selection:
        run = resolved(run)
        if run is None:
            raise WorkflowError(f"{run_of(wildcards).path} is the main grid's run at the chosen lr factor: not trained twice")
    args = ["--dataset", run.dataset, "--arch", run.arch, "--variant", run.variant,
            "--seed", run.seed, "--epochs", grid.per_dataset(train, "epochs", run.dataset), "--batch-size", run.batch_size,
            "--device", train["device"], "--probe-every", probe_every(run),
            "--data-root", DATA_ROOT]
    if run.lr_factor != 1.0:
        args += ["--lr-factor", repr(run.lr_factor)]
    if run.eval_split != "test":
        args += ["--eval-split", run.eval_split, "--validation-size", run.validation_size]
    if run.noise_delta is not None:
        args += ["--noise-delta", repr(run.noise_delta)]
    if train["image_size"] is not None:
        args += ["--image-size", train["image_size"]]
    if train["eval_every"] is not None:
        args += ["--eval-every", train["eval_every"]]
    if train["precision"] != "auto":
        args += ["--precision", train["precision"]]
    if train["train_subset"] is not None:
        args += ["--train-subset", train["train_subset"]]
    for name, value in sorted(train["overrides"].items()):
        args += ["--override", f"{name}={json.dumps(value)}"]
    return sh(*args)


def expected_json(wildcards):
    """What the run's config.json must say; the train job clears a directory that says otherwise."""
    run = run_of(wildcards)
    record = grid.expected_record(resolved(run), config) if run.lr_factor is None else EXPECTED[run.path]
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def selection_input(wildcards):
    """The lr selection, for a run whose factor it chooses (Snakemake orders the job after it).
    ancient: a rerun of select_lr (one validation run retrained) rewrites the file, and only a
    changed choice - a changed --lr-factor, Snakemake's params trigger - retrains the run."""
    return [ancient(SELECTION)] if run_of(wildcards).lr_factor is None else []


def resolved_expected(factors):
    """EXPECTED of every run the pipeline trains, with the chosen factors filled in."""
    return {run.path: grid.expected_record(run, config) for run in grid.resolve(RUNS, factors).values()}


def check_all_runs(selection_files, out, log):
    """check_runs: every run directory against the config, tuned runs against the choice."""
    factors = selection.load(selection_files[0]) if SELECTING else {}
    grid.check_runs(RUNS_ROOT, resolved_expected(factors), out, log=log)


def runs_per_gpu():
    """K of `msr train --gpu-slots K`: runs sharing one GPU (msr claims a free slot itself); 0 (off)
    for CPU runs, which hold no GPU (`auto` lets msr decide: it skips the claim without a GPU)."""
    return config["resources"]["runs_per_gpu"] if config["train"]["device"] != "cpu" else 0


def summary_of(run):
    return f"{RUNS_ROOT}/{run.path}/summary.json"


def static_summaries():
    """Every run known before the lr selection: the main grid (its paths do not depend on the
    chosen factors), the validation runs and every sweep point the choice cannot make a
    main-grid run. `snakemake -n` lists these."""
    return [summary_of(run) for run in RUNS.values() if not run.unless_selected]


def selected_summaries(wildcards=None):
    """The lr sweep points that the selection might have made main-grid runs: those it did not
    (known once select_lr has run)."""
    maybe = [run for run in RUNS.values() if run.unless_selected]
    if not maybe:
        return []
    factors = chosen_factors()
    return [summary_of(run) for run in maybe if run.resolve(factors) is not None]


def all_summaries(wildcards=None):
    """Every run the pipeline trains (an input function: the tail waits for the selection)."""
    return static_summaries() + selected_summaries()


def selection_runs_summaries():
    return [summary_of(run) for run in SELECTION_RUNS]


def config_json():
    """The whole validated config (defaults filled in) as canonical JSON, recorded in the manifest."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def config_sha256():
    """Hash of config_json() (msr.analysis.manifest.config_digest computes the same), for the manifest."""
    return hashlib.sha256(config_json().encode()).hexdigest()


# ---------------------------------------------------------------- figures and tables
def resolved_sweep(name):
    """A sweep's settings with its null axes resolved to the main grid's, as notebooks need them."""
    sweep = config["sweeps"][name]
    return {
        "variants": sweep["variants"],
        "values": sweep["values"],
        "seeds": sweep["seeds"] if sweep["seeds"] is not None else config["seeds"],
        "datasets": sweep["datasets"] if sweep["datasets"] is not None else config["datasets"],
        "archs": sweep["archs"] if sweep["archs"] is not None else config["archs"],
        "lr_scaling": sweep["lr_scaling"],
        "base_batch_size": config["train"]["batch_size"],
    }


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
# the claims table and the peers figure compare variants across the whole study. margins: T3's
# equivalence margin per dataset of the study, in pp (analysis.margins, else
# analysis.default_margin); min_sweep_seeds: runs an lr sweep point needs to be judged;
# lr_selection: which variants' lr factors were chosen on the validation split, and how
# (their choice: lr_selection.csv / runs.csv's lr_factor); lr_unit: what an lr sweep value is
STUDY = {
    "variants": config["variants"],
    "datasets": config["datasets"],
    "archs": config["archs"],
    "seeds": config["seeds"],
    "sweeps": {name: resolved_sweep(name) for name in ("lr", "batch_size", "noise_delta")},
    "margins": {d: config["analysis"]["margins"].get(d, config["analysis"]["default_margin"])
                for d in sorted(set(config["datasets"]) | {d for s in ("lr", "batch_size", "noise_delta")
                                                           for d in resolved_sweep(s)["datasets"]})},
    "min_sweep_seeds": config["analysis"]["min_sweep_seeds"],
    "lr_selection": {
        "variants": grid.tuned_variants(config),
        "factors": config["lr_selection"]["factors"],
        "seeds": config["lr_selection"]["seeds"],
        "validation_size": config["lr_selection"]["validation_size"],
        "rule": selection.RULE,
    },
    "lr_unit": "factor of each variant's own lr, every param group scaled together",
}

# Every figure and table: one notebook each (notebooks/<name>.ipynb), one rule each, generated
# from this list in analysis.smk. kind: figure -> PNG + PDF; table -> CSV + Markdown + LaTeX.
# label: its entry in `snakemake --report`; caption: workflow/report/<name>.rst.
ANALYSES = [
    dict(name="fig1_curves", kind="figure", label="1 training curves",
         params=dict(variants=config["variants"])),
    dict(name="fig2_mean_shift", kind="figure", label="2 mean shift",
         params=dict(variants=["plain", "bn", "zmi", "msr"], **PROBE_SELECTION)),
    dict(name="fig3_lr_stability", kind="figure", label="3 learning-rate stability",
         params=sweep_params("lr")),
    dict(name="fig4_isocline", kind="figure", label="4 isocline",
         params=dict(variants=["nf", "zmi", "zmg", "msr"], **PROBE_SELECTION)),
    dict(name="fig5_batch_size", kind="figure", label="5 batch size",
         params=sweep_params("batch_size")),
    dict(name="fig6_noise", kind="figure", label="6 noise magnitude",
         params=sweep_params("noise_delta")),
    dict(name="fig7_peers", kind="figure", label="7 every variant", params=STUDY),
    dict(name="tab1_ablation", kind="table", label="T1 main ablation",
         params=dict(variants=config["variants"])),
    dict(name="tab2_cost", kind="table", label="T2 cost",
         params=dict(variants=config["variants"])),
    dict(name="tab3_claims", kind="table", label="T3 claims and verdicts", params=STUDY),
]
EXTENSIONS = {"figure": ["png", "pdf"], "table": ["csv", "md", "tex"]}


def analysis_files(item):
    return [f"{FIGURES_DIR}/{item['name']}.{ext}" for ext in EXTENSIONS[item["kind"]]]


def all_outputs():
    """Every file of the figure set: the notebooks' figures and tables, and the lr selection's table."""
    return [f for item in ANALYSES for f in analysis_files(item)] + ([SELECTION_TABLE] if SELECTING else [])


def all_provenance():
    """The records the manifest is made from: one per notebook, and the lr selection's."""
    return ([f"{RESULTS}/provenance/{item['name']}.json" for item in ANALYSES]
            + ([SELECTION_PROVENANCE] if SELECTING else []))

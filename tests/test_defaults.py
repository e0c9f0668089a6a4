"""One definition per default. A run's options and their defaults live in
msr.training.config.RunConfig, the datasets' facts (and what null means for epochs and batch
size) in msr.catalog, a variant's own lr in the registry. Every other place that states one -
the pipeline's config schema, `msr`'s help and choices, the data functions, the grid that
resolves a config into runs - is generated from them or compared with them here, so two places
cannot disagree unnoticed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from msr import catalog
from msr import data as msr_data
from msr.cli import build_parser
from msr.core.variants import VARIANTS, get_spec
from msr.pipeline import grid
from msr.training import config
from msr.training.config import ConfigError, RunConfig
from msr.training.existing import requested_record

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "workflow/schemas/config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
TRAIN = SCHEMA["properties"]["train"]["properties"]
# keys of the schema's `train` that `msr train` does not have: the pipeline's own
PIPELINE_ONLY = {"sweep_probe_every", "data_mirror"}
SHIPPED = ["default.yaml", "smoke.yaml", "fashion-cpu.yaml", "fashion.yaml", "paper.yaml"]


def merged(name: str, **train) -> dict:
    """A shipped config as Snakemake sees it: default.yaml with the overlay deep-merged,
    validated by the schema (defaults filled in)."""

    def merge(base, over):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = yaml.safe_load((REPO / "workflow/config/default.yaml").read_text())
    if name != "default.yaml":
        cfg = merge(cfg, yaml.safe_load((REPO / "workflow/config" / name).read_text()))
    cfg = merge(cfg, {"train": train})
    validate(cfg, SCHEMA_PATH.as_posix())
    return cfg


def train_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]


# ------------------------------------------------------------------- schema vs RunConfig


def test_every_schema_train_key_is_a_run_option_or_named_as_the_pipelines():
    assert set(TRAIN) - set(config.defaults()) == PIPELINE_ONLY


@pytest.mark.parametrize("key", sorted(set(TRAIN) - PIPELINE_ONLY))
def test_schema_train_default_is_runconfigs(key):
    assert TRAIN[key]["default"] == config.defaults()[key]


def test_schema_choices_are_runconfigs():
    assert TRAIN["device"]["enum"] == list(config.DEVICES)
    assert TRAIN["precision"]["enum"] == list(config.PRECISIONS)


def _limits(key: str) -> tuple[list, list]:
    """(values at the schema's limits, values just beyond them) for one numeric key."""
    spec = TRAIN[key]
    integer = "integer" in spec["type"]
    step = 1 if integer else 0.01
    ok, bad = [], []
    if "minimum" in spec:
        ok.append(spec["minimum"])
        bad.append(spec["minimum"] - step)
    if "exclusiveMinimum" in spec:
        ok.append(spec["exclusiveMinimum"] + step)
        bad.append(spec["exclusiveMinimum"])
    if "maximum" in spec:
        ok.append(spec["maximum"])
        bad.append(spec["maximum"] + step)
    return ok, bad


NUMERIC = sorted(k for k in set(TRAIN) - PIPELINE_ONLY
                 if {"minimum", "exclusiveMinimum", "maximum"} & set(TRAIN[k]))


@pytest.mark.parametrize("key", NUMERIC)
def test_schema_limits_are_runconfigs(key):
    """What the schema lets through `msr train` accepts, and what it stops RunConfig stops."""
    ok, bad = _limits(key)
    assert ok and bad
    for value in ok:
        RunConfig(dataset="digits", variant="msr_noise", **{key: value}).validate()
    for value in bad:
        with pytest.raises(ConfigError, match=key):
            RunConfig(dataset="digits", variant="msr_noise", **{key: value}).validate()


def test_train_subset_has_one_limit_the_catalogs():
    """The schema cannot know a dataset's size: the grid (before any job) and RunConfig (before
    a run) both ask msr.catalog, and agree at the boundary."""
    for name, facts in catalog.DATASETS.items():
        for n, fine in ((1, True), (facts.train_size, True), (facts.train_size + 1, False), (0, False)):
            if fine:
                RunConfig(dataset=name, variant="bn", train_subset=n).validate()
            else:
                with pytest.raises(ConfigError, match=f"from 1 to {facts.train_size}"):
                    RunConfig(dataset=name, variant="bn", train_subset=n).validate()
    cfg = merged("default.yaml", train_subset=catalog.dataset("digits").train_size, batch_size=8)
    cfg["lr_selection"]["variants"] = []  # a subset of all 1437 leaves none to validate on
    grid.check_config(cfg)
    cfg["train"]["train_subset"] += 1
    with pytest.raises(grid.GridError, match=r"config train.train_subset=1438 for digits: .*from 1 to 1437"):
        grid.check_config(cfg)


# ------------------------------------------------------------------ the command line


def test_msr_train_help_states_runconfigs_defaults():
    """Every "default X" in `msr train --help` is RunConfig's default of that option; options
    whose default depends on the dataset or variant (None) say so in words, never a number."""
    d = config.defaults()
    stated = {}
    for action in train_parser()._actions:
        if action.dest not in d:  # options of the command, not of the run (--out, --gpu-slots, ...)
            continue
        for token in re.findall(r"\bdefault ([^\s:;,)]+)", action.help or ""):
            stated[action.dest] = token
        if d[action.dest] is None:
            assert "default:" in (action.help or ""), f"--{action.dest} does not say what it defaults to"
    assert stated == {k: str(d[k]) for k in stated}
    # every option with a fixed default states it
    fixed = {a.dest for a in train_parser()._actions if a.dest in d and d[a.dest] is not None
             and a.nargs != 0}
    assert fixed <= set(stated), fixed - set(stated)


def test_msr_train_flags_and_choices_are_runconfigs():
    d = config.defaults()
    actions = {a.dest: a for a in train_parser()._actions}
    assert tuple(actions["device"].choices) == config.DEVICES
    assert tuple(actions["precision"].choices) == config.PRECISIONS
    # a flag's absence is the default: --compile turns on what is off, --no-channels-last the reverse
    assert actions["compile"].const is True and d["compile"] is False
    assert actions["channels_last"].const is False and d["channels_last"] is True


def test_every_data_root_default_is_the_catalogs():
    parser = build_parser()
    roots = {
        "RunConfig": config.defaults()["data_root"],
        "schema train.data_root": TRAIN["data_root"]["default"],
        "msr prepare": parser.parse_args(["prepare", "--dataset", "digits"]).data_root,
        "msr download": parser.parse_args(["download", "--dataset", "digits"]).data_root,
        "msr datasets": parser.parse_args(["datasets"]).data_root,
        "msr bench": parser.parse_args(["bench"]).data_root,
    }
    for fn in (msr_data.load_dataset, msr_data.prepare, msr_data.cache_path, msr_data.download):
        roots[f"msr.data.{fn.__name__}"] = inspect.signature(fn).parameters["root"].default
    assert roots == dict.fromkeys(roots, catalog.DATA_ROOT)


def test_the_default_set_is_one_name():
    default_yaml = yaml.safe_load((REPO / "workflow/config/default.yaml").read_text())
    makefile = re.search(r"^SET\s*\?=.*,([\w.-]+)\)$", (REPO / "Makefile").read_text(), re.M)
    # the schema names no default set: a config must name its own (a nameless one would write
    # into the default set's figures); the default config names the catalog's
    assert "default" not in SCHEMA["properties"]["name"] and "name" in SCHEMA["required"]
    assert default_yaml["name"] == catalog.DEFAULT_SET
    assert makefile and makefile.group(1) == catalog.DEFAULT_SET
    parser = build_parser()
    assert parser.parse_args(["aggregate"]).runs == Path("results", catalog.DEFAULT_SET, "runs")
    assert parser.parse_args(["aggregate"]).out == Path("results", catalog.DEFAULT_SET, "tables")


# ------------------------------------------------------- null = the dataset's / variant's


@pytest.mark.parametrize("name", list(catalog.DATASETS))
def test_null_epochs_and_batch_size_are_the_datasets_own_everywhere(name):
    facts = catalog.dataset(name)
    cfg = RunConfig(dataset=name, variant="bn")
    cfg.validate()
    assert (cfg.epochs, cfg.batch_size) == (facts.epochs, facts.batch_size)
    pipeline = merged("default.yaml", epochs=None, batch_size=None, train_subset=None, image_size=None)
    pipeline.update(datasets=[name], variants=["bn"], seeds=[0])
    pipeline["lr_selection"]["variants"] = []  # the main grid's one run alone
    for sweep in pipeline["sweeps"].values():
        sweep.update(variants=[], values=[])
    grid.check_config(pipeline)
    (run,) = grid.build_grid(pipeline).values()
    assert run.batch_size == facts.batch_size
    assert grid.expected_record(run, pipeline)["epochs"] == facts.epochs


def test_the_shipped_configs_set_what_the_schema_would_default():
    """default.yaml is always loaded, so every shipped config states epochs and batch size
    (their budgets are measured for them); the schema's null is for a user's own config."""
    for name in SHIPPED:
        train = merged(name)["train"]
        assert train["epochs"] is not None and train["batch_size"] is not None, name


@pytest.mark.parametrize("name", SHIPPED)
def test_the_grids_expectation_is_what_msr_train_records(name):
    """For every run of every shipped config, the options the pipeline expects a run directory
    to record (grid.expected_record: lr, noise, epochs, batch resolved by the grid) equal the
    ones `msr train` records for the same options (existing.requested_record, resolved by
    RunConfig and the registry) - an unset lr is resolved to the same number on both sides."""
    cfg = merged(name)
    train = cfg["train"]
    runs = grid.build_grid(cfg)
    # the factors the lr selection chooses after its runs: any choice will do here (x0.5)
    chosen = {(r.dataset, r.arch, r.variant): 0.5 for r in runs.values() if r.lr_factor is None}
    for run in grid.resolve(runs, chosen).values():
        rc = RunConfig(dataset=run.dataset, arch=run.arch, variant=run.variant, seed=run.seed,
                       epochs=grid.per_dataset(train, "epochs", run.dataset), batch_size=run.batch_size,
                       lr_factor=run.lr_factor, noise_delta=run.noise_delta, image_size=train["image_size"],
                       train_subset=train["train_subset"], overrides=dict(train["overrides"]), device="cpu",
                       eval_split=run.eval_split, validation_size=run.validation_size)
        rc.validate()
        expected = grid.expected_record(run, cfg)
        expected.pop("precision", None)  # compared by the grid only, from the config
        # config.json also records the variant's whole spec (its warm-up among it)
        recorded = {**requested_record(rc), "variant_spec": dataclasses.asdict(get_spec(rc.variant, **rc.variant_overrides()))}
        assert grid.differences(expected, recorded) == [], run.path


def test_an_unset_lr_is_the_variants_own_on_every_side():
    for name, spec in VARIANTS.items():
        rc = RunConfig(dataset="digits", variant=name)
        rc.validate()
        run = grid.Run("digits", "resnet20", name, "base", 0, batch_size=32)
        assert requested_record(rc)["lr"] == grid.expected_record(run, merged("default.yaml"))["lr"] == spec.lr
        # the one resolution (RunConfig): an unset lr and factor is the variant's own, an lr
        # the conv group's, a factor every group's
        assert rc.resolved_lr(spec.lr) == spec.lr and rc.resolved_lr_factor(spec.lr) == 1.0

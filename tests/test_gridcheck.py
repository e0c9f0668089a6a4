"""msr.pipeline.grid: the config checks the schema cannot make (each error names the key), the grid
of runs, and the comparison of a run directory's recorded options with the config's - which
must agree exactly with what `msr train` records, or the pipeline would retrain forever.

The same checks are exercised through Snakemake (before any job) in tests/test_workflow.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from msr.cli import main as msr_main
from msr.pipeline import grid
from msr.pipeline.grid import GridError, Run

REPO = Path(__file__).resolve().parents[1]
SCHEMA = (REPO / "workflow/schemas/config.schema.yaml").as_posix()


def merged(*overlays: dict) -> dict:
    """default.yaml with overlays deep-merged (as Snakemake does), validated, defaults filled."""

    def merge(base, over):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = yaml.safe_load((REPO / "workflow/config/default.yaml").read_text())
    for overlay in overlays:
        cfg = merge(cfg, overlay)
    validate(cfg, SCHEMA)
    return cfg


@pytest.mark.parametrize("name", ["default.yaml", "paper.yaml", "fashion.yaml", "fashion-cpu.yaml", "smoke.yaml"])
def test_shipped_configs_pass(name):
    overlay = {} if name == "default.yaml" else yaml.safe_load((REPO / "workflow/config" / name).read_text())
    cfg = merged(overlay)
    grid.check_config(cfg)
    assert grid.build_grid(cfg)


@pytest.mark.parametrize("overlay, named", [
    ({"train": {"batch_size": 2000}}, "config train.batch_size: batch size 2000 is larger than the training set of digits (1437 images)"),
    ({"sweeps": {"batch_size": {"values": [8, 4096]}}}, "config sweeps.batch_size.values: batch size 4096 is larger than the training set of digits"),
    ({"datasets": ["fashion_mnist"], "train": {"train_subset": 1000, "batch_size": 128},
      "sweeps": {"batch_size": {"values": [2048]}}}, "batch size 2048 is larger than the training set of fashion_mnist (1000 images, train.train_subset)"),
    ({"train": {"overrides": {"bogus": 1}}}, "config train.overrides={'bogus': 1}: unknown override(s) ['bogus']"),
    ({"train": {"overrides": {"lam": 2.0}}}, "config train.overrides={'lam': 2.0}: variant 'bn': lam=2.0 must be a number in [0.0, 1.0]"),
    ({"sweeps": {"lr": {"variants": []}}}, "config sweeps.lr: has values but no variants"),
    ({"sweeps": {"noise_delta": {"values": []}}}, "config sweeps.noise_delta: has variants but no values"),
    ({"sweeps": {"lr": {"values": [0.8, 0.8000001]}}}, "config sweeps.lr.values: 0.8 and 0.8000001 give the same run tag 'lrx0.8'"),
    ({"lr_selection": {"factors": [0.5, 0.50000001]}}, "config lr_selection.factors: 0.5 and 0.50000001 give the same run tag 'val-lrx0.5'"),
    ({"lr_selection": {"factors": []}}, "config lr_selection: has variants but no factors"),
    ({"lr_selection": {"validation_size": None}}, "config lr_selection.validation_size: give the number of training images"),
    ({"lr_selection": {"validation_size": 1437}}, "config lr_selection.validation_size=1437: digits has 1437 training images, 1436 of them in the training split to hold out"),
    ({"lr_selection": {"validation_size": 1400}}, "config lr_selection.validation_size=1400: leaves 37 images of digits to train on, fewer than the batch size 64 (train.batch_size"),
    ({"lr_selection": {"validation_size": 5}}, "config lr_selection.validation_size=5: fewer than the 10 classes of digits"),
    ({"datasets": ["fashion_mnist"], "train": {"train_subset": 59800}},
     "config lr_selection.validation_size=288: fashion_mnist has 60000 training images, 200 of them outside train.train_subset=59800"),
    ({"train": {"lr": 0.1}}, "config train.lr=0.1 sets every run's lr, but lr_selection.variants"),
    ({"sweeps": {"noise_delta": {"values": [0.1, 0.1000000001]}}}, "give the same run tag 'd0.1'"),
])
def test_bad_configs_name_the_key(overlay, named):
    cfg = merged(overlay)
    with pytest.raises(GridError) as err:
        grid.check_config(cfg)
        grid.build_grid(cfg)
    assert named in str(err.value)


def test_overrides_are_checked_for_sweep_only_variants_too():
    # noise is defined for bn's post-activation net, not for nf_ws's pre-activation one
    off = {"variants": [], "values": []}
    cfg = merged({"variants": ["bn"], "train": {"overrides": {"noise_delta": 0.1}},
                  "sweeps": {"lr": {"variants": ["bn"]}, "batch_size": off, "noise_delta": off}})
    grid.check_config(cfg)
    cfg["sweeps"]["lr"]["variants"] = ["nf_ws"]
    with pytest.raises(GridError, match=r"config train.overrides=\{'noise_delta': 0.1\}: variant 'nf_ws': noise needs"):
        grid.check_config(cfg)


def test_config_strings_from_the_command_line_are_named():
    with pytest.raises(GridError, match=r"config seeds=\['0', '1'\]: the items are strings.*--configfile"):
        grid.check_types({"seeds": ["0", "1"]})
    with pytest.raises(GridError, match=r"config sweeps.lr.values=\['0.1'\]"):
        grid.check_types({"seeds": [0], "sweeps": {"lr": {"values": ["0.1"]}}})
    grid.check_types({"seeds": [0, 1], "sweeps": {"lr": {"values": [0.1]}}})



NO_SELECTION = {"lr_selection": {"variants": []}}


def test_grid_reuses_sweep_points_of_the_main_grid_and_scales_lr():
    cfg = merged(NO_SELECTION, {"variants": ["bn", "msr"], "seeds": [0, 1],
                                "sweeps": {"lr": {"variants": ["msr"], "values": [1, 2], "seeds": [1, 2]},
                                           "batch_size": {"variants": ["msr"], "values": [32], "seeds": [0], "lr_scaling": "sqrt"},
                                           "noise_delta": {"variants": [], "values": []}}})
    runs = grid.build_grid(cfg)
    paths = [r.path for r in runs.values()]
    # lr sweep values are factors of the variant's own lrs: x1 of seed 1 is the main grid's run,
    # seed 2 is not in the main grid
    assert "digits/resnet20/msr/lrx1/seed1" not in paths and "digits/resnet20/msr/lrx1/seed2" in paths
    assert "digits/resnet20/msr/lrx2/seed1" in paths and len(paths) == 4 + 3 + 1
    assert runs[("digits", "resnet20", "msr", "lrx2", "1")].lr_factor == 2.0
    bs = runs[("digits", "resnet20", "msr", "bs32", "0")]
    assert bs.batch_size == 32 and bs.lr_factor == pytest.approx((32 / 64) ** 0.5)
    assert not any(r.needs_selection for r in runs.values())
    # train.lr: one conv-group lr for every run, i.e. each variant's own factor
    cfg["train"]["lr"] = 0.2
    runs = grid.build_grid(cfg)
    assert runs[("digits", "resnet20", "bn", "base", "0")].lr_factor == 2.0
    assert runs[("digits", "resnet20", "msr", "base", "0")].lr_factor == 0.5
    assert grid.expected_record(runs[("digits", "resnet20", "msr", "base", "0")], cfg)["lr"] == pytest.approx(0.2)


def test_grid_with_lr_selection_waits_for_the_choice_and_reuses_the_chosen_point():
    cfg = merged({"variants": ["plain", "bn", "msr"], "seeds": [0, 1],
                  "lr_selection": {"variants": ["bn", "wn"], "factors": [0.5, 1, 2], "seeds": [0, 3],
                                   "validation_size": 300},
                  "sweeps": {"lr": {"variants": ["plain", "bn"], "values": [0.25, 1, 2], "seeds": [1, 2]},
                             "batch_size": {"variants": ["bn"], "values": [32, 64], "seeds": [0], "lr_scaling": "linear"},
                             "noise_delta": {"variants": [], "values": []}}})
    runs = grid.build_grid(cfg)
    at = lambda variant, tag, seed: runs.get(("digits", "resnet20", variant, tag, str(seed)))  # noqa: E731
    # wn is not in the main grid: nothing to tune; bn's validation runs: every factor x seed
    assert grid.tuned_variants(cfg) == ["bn"]
    val = [r for r in runs.values() if r.eval_split == "validation"]
    assert sorted(r.tag for r in val) == sorted(["val-lrx0.5", "val-lrx1", "val-lrx2"] * 2)
    assert {(r.variant, r.seed, r.validation_size) for r in val} == {("bn", 0, 300), ("bn", 3, 300)}
    assert all(r.lr_factor in (0.5, 1.0, 2.0) and not r.needs_selection for r in val)
    # bn's main grid waits for its factor; plain's does not
    assert at("bn", "base", 0).lr_factor is None and at("plain", "base", 0).lr_factor == 1.0
    # the lr sweep: plain's x1 of a main-grid seed is the main grid's run (reused); bn's x1 and x2
    # of a main-grid seed may become the main grid's run; x0.25 (not a candidate) and seed 2 (not
    # in the main grid) are trained whatever the choice
    assert at("plain", "lrx1", 1) is None and at("plain", "lrx1", 2) is not None
    assert at("bn", "lrx1", 1).unless_selected and at("bn", "lrx2", 1).unless_selected
    assert not at("bn", "lrx0.25", 1).unless_selected and not at("bn", "lrx1", 2).unless_selected
    # the batch-size sweep: the chosen factor times the batch scaling; bs 64 is the main grid's
    assert at("bn", "bs32", 0).lr_factor is None and at("bn", "bs32", 0).lr_scale == 0.5 and at("bn", "bs64", 0) is None
    # before the choice: a placeholder in the expected record, refused by the check
    placeholder = grid.expected_record(at("bn", "bs32", 0), cfg)
    assert placeholder["lr"] == "selected x 0.5" and placeholder["eval_split"] == "test"
    with pytest.raises(GridError, match="wait for the lr selection"):
        grid.find_stale("/nonexistent", {"x": placeholder})

    resolved = grid.resolve(runs, {("digits", "resnet20", "bn"): 2.0})
    get = lambda variant, tag, seed: resolved.get(("digits", "resnet20", variant, tag, str(seed)))  # noqa: E731
    assert get("bn", "base", 0).lr_factor == 2.0 and get("bn", "bs32", 0).lr_factor == 1.0
    assert get("bn", "lrx2", 1) is None and get("bn", "lrx1", 1).lr_factor == 1.0 and not get("bn", "lrx1", 1).unless_selected
    assert len(resolved) == len(runs) - 1  # bn x2 seed 1: the main grid's run
    assert grid.expected_record(get("bn", "base", 1), cfg)["lr"] == pytest.approx(0.2)
    with pytest.raises(GridError, match="no factor for digits/resnet20/bn"):
        grid.resolve(runs, {})


def test_analysis_margins_are_per_dataset():
    cfg = merged({"analysis": {"margins": {"fashion_mnist": 1.0}}})
    assert cfg["analysis"]["margins"] == {"fashion_mnist": 1.0} and cfg["analysis"]["default_margin"] == 0.5
    assert cfg["analysis"]["min_sweep_seeds"] == 2
    with pytest.raises(Exception, match="mnist"):
        merged({"analysis": {"margins": {"mnist": 1.0}}})


def test_expected_record_is_what_msr_train_records(tmp_path):
    """Trained for real (tiny): the recorded config.json matches the expectation exactly, for a
    run that leaves lr/noise to its variant and one that sets them, with overrides."""
    from msr.training import loop as msr_train

    cfg = merged({"train": {"epochs": 1, "image_size": 8, "precision": "fp32", "overrides": {"zmi_norm": 0.5}}})
    runs = [Run("digits", "resnet8", "msr_noise", "base", 0, batch_size=64),
            Run("digits", "resnet8", "msr", "bs32", 1, lr_factor=0.5, batch_size=32, noise_delta=0.05),
            Run("digits", "resnet8", "fixup", "val-lrx2", 0, lr_factor=2.0, batch_size=64, eval_split="validation",
                validation_size=300)]
    for run in runs:
        out = tmp_path / run.path
        rc = msr_train.RunConfig(dataset=run.dataset, arch=run.arch, variant=run.variant, seed=run.seed, epochs=1,
                                 lr_factor=run.lr_factor, batch_size=run.batch_size, noise_delta=run.noise_delta,
                                 eval_split=run.eval_split, validation_size=run.validation_size, image_size=8,
                                 precision="fp32", overrides={"zmi_norm": 0.5}, data_root=str(tmp_path / "data"),
                                 device="cpu", threads=1, probe_every=1000)
        msr_train.train(rc, out, log=lambda *a: None, progress=False)
        expected = grid.expected_record(run, cfg)
        assert grid.differences(expected, json.loads((out / "config.json").read_text())) == []
    stale = grid.find_stale(tmp_path, {r.path: grid.expected_record(r, cfg) for r in runs})
    assert stale == {}
    cfg["train"]["epochs"] = 2
    stale = grid.find_stale(tmp_path, {r.path: grid.expected_record(r, cfg) for r in runs})
    assert stale == {r.path: ["epochs: 1 -> 2"] for r in runs}
    cfg["train"].update(epochs=1, train_subset=500)  # trained on the whole set: stale too
    stale = grid.find_stale(tmp_path, {r.path: grid.expected_record(r, cfg) for r in runs})
    assert stale == {r.path: ["train_subset: None -> 500"] for r in runs}
    # a run trained with another lr factor, or evaluated on another split, or by a registry
    # whose warm-up has changed, is stale
    cfg["train"].update(train_subset=None)
    other = [Run("digits", "resnet8", "msr_noise", "base", 0, lr_factor=2.0, batch_size=64),
             Run("digits", "resnet8", "msr", "bs32", 1, lr_factor=0.5, batch_size=32, noise_delta=0.05,
                 eval_split="validation", validation_size=300)]
    stale = grid.find_stale(tmp_path, {r.path: grid.expected_record(r, cfg) for r in other})
    assert stale == {other[0].path: ["lr: 0.4 -> 0.8"],
                     other[1].path: ["eval_split: 'test' -> 'validation'", "validation_size: None -> 300"]}
    cfg["train"]["overrides"] = {"zmi_norm": 0.5, "warmup": 0.5}
    assert grid.differences(grid.expected_record(runs[0], cfg), json.loads((tmp_path / runs[0].path / "config.json").read_text())) \
        == ["overrides: {'zmi_norm': 0.5} -> {'zmi_norm': 0.5, 'warmup': 0.5}", "variant_spec.warmup: 0.0 -> 0.5"]


def test_a_run_of_an_older_msr_stays_valid_where_nothing_changed():
    """config.json of an older msr has no eval_split, validation_size or warm-up fields: they
    mean the test set, no validation split and no warm-up (rundir.MISSING_MEANS)."""
    cfg = merged(NO_SELECTION)
    run = Run("digits", "resnet20", "plain", "base", 0, batch_size=64)
    want = grid.expected_record(run, cfg)
    old = {k: v for k, v in want.items() if k not in ("eval_split", "validation_size") and "." not in k}
    old["variant_spec"] = {"lr": 0.1}
    assert grid.differences(want, old) == []
    assert grid.differences(grid.expected_record(Run("digits", "resnet20", "wn", "base", 0, batch_size=64), cfg),
                            {**old, "variant": "wn"}) == ["variant_spec.warmup: 0.0 -> 0.025",
                                                          "variant_spec.warmup_from: 0.0 -> 0.01"]


def fake_run(root: Path, path: str, record: dict) -> Path:
    run_dir = root / path
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(record))
    (run_dir / "summary.json").write_text("{}")
    return run_dir


def test_check_runs_removes_stale_summaries_and_names_them(tmp_path):
    want = {"dataset": "digits", "epochs": 10, "lr": 0.4, "overrides": {}}
    good = fake_run(tmp_path / "runs", "a/seed0", want)
    stale = fake_run(tmp_path / "runs", "b/seed0", {**want, "epochs": 4, "lr": 0.4000000000001})
    out, log = tmp_path / "checks" / "runs-x.json", tmp_path / "check.log"
    with pytest.raises(GridError) as err:
        grid.check_runs(tmp_path / "runs", {"a/seed0": want, "b/seed0": want}, out, log=log)
    message = str(err.value)
    assert "1 run(s)" in message and "b/seed0 (epochs: 4 -> 10)" in message and "rerun the same command" in message
    assert not (stale / "summary.json").exists() and (good / "summary.json").exists()
    assert not out.exists() and "stale: b/seed0: epochs: 4 -> 10" in log.read_text()

    # the next check (after the retrain) passes, records what it checked, and drops older records
    out.parent.mkdir()
    (out.parent / "runs-old.json").write_text("{}")
    (stale / "config.json").write_text(json.dumps(want))
    grid.check_runs(tmp_path / "runs", {"a/seed0": want, "b/seed0": want}, out, log=log)
    assert json.loads(out.read_text())["runs"]["b/seed0"] == want
    assert sorted(p.name for p in out.parent.iterdir()) == ["runs-x.json"]


def test_a_summary_without_its_config_is_stale(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")
    assert grid.find_stale(tmp_path / "runs", {"a": {"epochs": 1}}) == {"a": ["config.json is missing"]}


def test_reset_clears_only_a_directory_of_other_options(tmp_path):
    want = {"dataset": "digits", "epochs": 10}
    same = fake_run(tmp_path, "same", want)
    other = fake_run(tmp_path, "other", {**want, "epochs": 3})
    (other / "checkpoint.pt").write_bytes(b"x")
    lines = []
    assert grid.reset(same, want, log=lines.append) is False and (same / "summary.json").exists()
    assert grid.reset(other, want, log=lines.append) is True and not other.exists()
    assert lines == [f"{other}: options changed (epochs: 3 -> 10); starting this run over"]
    assert grid.reset(tmp_path / "new", want) is False  # nothing there yet

    # a directory another process is writing is never cleared under its feet
    from msr.training.rundir import RunDirError

    busy = fake_run(tmp_path, "busy", {**want, "epochs": 3})
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from msr.training.rundir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(busy)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"{busy} is being written by another process .*pid {holder.pid}"):
            grid.reset(busy, want)
        assert (busy / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert grid.reset(busy, want) is True and not busy.exists()

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"epochs": ')
    assert msr_main(["reset-run", str(damaged), json.dumps(want)]) == 1
    with pytest.raises(GridError, match=rf"{damaged}/config.json is not valid JSON .*delete the run directory"):
        grid.reset(damaged, want)
    assert (damaged / "config.json").exists()

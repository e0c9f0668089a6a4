"""``msr train --stacked --seeds ...`` (msr.training.stacked_loop): K seeds trained stacked in one
process write K standard run directories that equal K separate ``msr train`` runs (float
tolerance on a CPU), resume stacked or one by one, and keep a diverged seed to itself."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from msr.cli import main as msr_main
from msr.training import stacked_loop
from msr.training.config import ConfigError, RunConfig
from msr.training.loop import train
from msr.training.rundir import RunDirError
from msr.training.stacked_loop import train_stacked

SEEDS = [0, 1]
TIMING = {"seconds", "images_per_s"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cfg(tmp_path, seed: int, variant: str = "msr_noise", epochs: int = 3, **kw) -> RunConfig:
    # tiny digits runs: 8x8, resnet8, 512 training images in batches of 128 (4 steps an epoch), 1 thread; contiguous,
    # the layout stacked runs use. Short on purpose: float32 differences (grouped convs sum in
    # another order, ~1e-7 a step) grow where a ReLU or a BatchNorm statistic is on an edge -
    # as a second thread does to msr train alone; in float64 the two are equal to ~1e-15
    # (tests/test_stacked.py), so the arithmetic is the same
    return RunConfig(dataset="digits", arch="resnet8", variant=variant, epochs=epochs, seed=seed, image_size=8,
                     threads=1, data_root=str(tmp_path / "data"), channels_last=False, train_subset=512, batch_size=128,
                     probe_every=2, **kw)


def _metrics(run_dir) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _close(a: list[dict], b: list[dict], rtol: float) -> None:
    """Losses and lr to ``rtol``; accuracies to one image of the 360 test images."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] and [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, value in rb.items():
            tol = dict(abs=1.5 / 360) if key.endswith("_acc") else dict(rel=rtol, abs=1e-6)
            assert ra[key] == pytest.approx(value, **tol), (ra["epoch"], key)


@pytest.mark.parametrize("variant", ["msr_noise", "bn"])
def test_stacked_seeds_write_the_runs_separate_runs_write(tmp_path, variant):
    """Per-model noise and per-model BatchNorm statistics: every recorded number of each seed's
    metrics.csv equals that seed's own msr train run to float tolerance, and every file is there."""
    stacked_out = [tmp_path / "stacked" / f"seed{s}" for s in SEEDS]
    summaries = train_stacked([_cfg(tmp_path, s, variant) for s in SEEDS], stacked_out, log=lambda *_: None)
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    for seed, out in zip(SEEDS, stacked_out, strict=True):
        alone = tmp_path / "alone" / f"seed{seed}"
        train(_cfg(tmp_path, seed, variant), alone, log=lambda *_: None)
        assert {p.name for p in out.iterdir()} == {p.name for p in alone.iterdir()}  # config, metrics, probes, summary, checkpoint, lock
        _close(_metrics(out), _metrics(alone), rtol=1e-3)  # measured: <= 4e-7 (msr_noise), <= 2.2e-4 (bn) here
        record = json.loads((out / "config.json").read_text())
        assert record["seed"] == seed and record["train_path"] == "stacked" and record["stacked_seeds"] == SEEDS
        assert record["channels_last"] is False
        mine = torch.load(out / "checkpoint.pt", weights_only=True)
        theirs = torch.load(alone / "checkpoint.pt", weights_only=True)
        assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        assert mine["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
        for key, want in theirs["model"].items():  # its own model only, not the stack's storage
            assert mine["model"][key].shape == want.shape
            torch.testing.assert_close(mine["model"][key], want, rtol=1e-3, atol=1e-4)
    # the seeds trained apart
    assert _metrics(stacked_out[0])[-1]["train_loss"] != _metrics(stacked_out[1])[-1]["train_loss"]


def test_stacked_resume_equals_an_uninterrupted_stacked_run(tmp_path):
    whole = [tmp_path / "whole" / f"seed{s}" for s in SEEDS]
    cut = [tmp_path / "cut" / f"seed{s}" for s in SEEDS]
    cfgs = [_cfg(tmp_path, s) for s in SEEDS]
    quiet = lambda *_: None  # noqa: E731
    train_stacked(cfgs, whole, log=quiet)
    first = train_stacked(cfgs, cut, log=quiet, stop_after_epoch=1)
    assert [s["status"] for s in first] == ["interrupted", "interrupted"]
    assert all((out / "checkpoint.pt").exists() and not (out / "summary.json").exists() for out in cut)
    train_stacked(cfgs, cut, log=quiet)
    for a, b in zip(cut, whole, strict=True):
        assert _metrics(a) == _metrics(b)  # bitwise: the same process-independent computation
        assert (a / "probes.csv").read_text() == (b / "probes.csv").read_text()


def test_msr_train_resumes_a_stacked_checkpoint(tmp_path):
    """A stacked checkpoint is a run's own: msr train --seed k finishes it, as the stack would."""
    whole = [tmp_path / "whole" / f"seed{s}" for s in SEEDS]
    cut = [tmp_path / "cut" / f"seed{s}" for s in SEEDS]
    cfgs = [_cfg(tmp_path, s) for s in SEEDS]
    quiet = lambda *_: None  # noqa: E731
    train_stacked(cfgs, whole, log=quiet)
    train_stacked(cfgs, cut, log=quiet, stop_after_epoch=1)
    said = []
    summary = train(cfgs[1], cut[1], log=said.append)
    assert any("resuming after epoch 1" in line for line in said)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    _close(_metrics(cut[1]), _metrics(whole[1]), rtol=1e-3)


def test_complete_seeds_are_skipped_and_runs_at_other_epochs_refused(tmp_path):
    quiet = lambda *_: None  # noqa: E731
    outs = [tmp_path / f"seed{s}" for s in (0, 1, 2)]
    cfgs = [_cfg(tmp_path, s, epochs=2) for s in (0, 1, 2)]
    train(cfgs[0], outs[0], log=quiet)  # seed 0 complete
    train(cfgs[1], outs[1], log=quiet, stop_after_epoch=1)  # seed 1 after epoch 1, seed 2 fresh
    with pytest.raises(RunDirError, match="different epochs"):
        train_stacked(cfgs, outs, log=quiet)
    assert not outs[2].exists()  # nothing written for the refused group
    before = (outs[0] / "metrics.csv").read_text()
    train(cfgs[1], outs[1], log=quiet)
    summaries = train_stacked(cfgs, outs, log=quiet)  # 0 and 1 complete: only 2 trains
    assert [s["status"] for s in summaries] == ["completed"] * 3
    assert (outs[0] / "metrics.csv").read_text() == before


def test_a_diverged_seed_ends_diverged_and_the_others_train_on(tmp_path, monkeypatch):
    real = stacked_loop.StackedSeeds.of_variants

    def poisoned(*args, **kwargs):
        stacked = real(*args, **kwargs)
        with torch.no_grad():  # model 1's classifier (a view: the stack sees it)
            dict(stacked.models[1].named_parameters())["fc.weight"].fill_(float("inf"))
        return stacked

    monkeypatch.setattr(stacked_loop.StackedSeeds, "of_variants", poisoned)
    outs = [tmp_path / f"seed{s}" for s in SEEDS]
    summaries = train_stacked([_cfg(tmp_path, s, "msr") for s in SEEDS], outs, log=lambda *_: None)
    assert summaries[0]["status"] == "completed" and summaries[0]["epochs_completed"] == 3
    assert summaries[1]["status"] == "diverged" and summaries[1]["diverged_at_step"] == 1
    assert json.loads((outs[1] / "summary.json").read_text())["status"] == "diverged"
    monkeypatch.undo()
    alone = tmp_path / "alone0"
    train(_cfg(tmp_path, 0, "msr"), alone, log=lambda *_: None)
    _close(_metrics(outs[0]), _metrics(alone), rtol=1e-3)  # untouched by its neighbour


def test_stacked_group_must_share_one_config(tmp_path):
    a, b = _cfg(tmp_path, 0), dataclasses.replace(_cfg(tmp_path, 1), lr=0.1)
    with pytest.raises(ConfigError, match="differs in lr"):
        train_stacked([a, b], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match="each seed once"):
        train_stacked([a, _cfg(tmp_path, 0)], [tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stacked", "--out", "x"], "give them with --seeds"),
        (["--seeds", "0,1", "--out", "x"], "{seed}"),
        (["--seeds", "0,1", "--seed", "3", "--out", "x{seed}"], "either --seed or --seeds"),
        (["--seeds", "0,a", "--out", "x{seed}"], "seeds are integers"),
        (["--seeds", "0,1", "--stacked", "--compile", "--out", "x{seed}"], "compile"),
    ],
)
def test_bad_seed_requests_are_named(tmp_path, args, message, capsys):
    assert msr_main(["train", "--dataset", "digits", "--data-root", str(tmp_path / "d"), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_trains_seeds_stacked(tmp_path):
    pattern = str(tmp_path / "runs" / "seed{seed}")
    code = msr_main(["train", "--dataset", "digits", "--arch", "resnet8", "--image-size", "8", "--epochs", "1",
                     "--threads", "1", "--data-root", str(tmp_path / "data"), "--seeds", "3,5", "--stacked",
                     "--out", pattern, "--progress", "lines"])
    assert code == 0
    for seed in (3, 5):
        summary = json.loads((tmp_path / "runs" / f"seed{seed}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["epochs_completed"] == 1

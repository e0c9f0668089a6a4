"""Learning rates as factors of each variant's own (every group together), the variants' warm-up
(msr.training.schedule) and the validation split that lr selection trains and evaluates on
(msr.data.splits): never the test set."""

from __future__ import annotations

import json
import math

import pytest
import torch

from msr.core.method import cmrr_gradients_, project_gradients_
from msr.core.variants import build, get_spec
from msr.data import load_dataset, stratified_subset, validation_split
from msr.training.config import ConfigError, RunConfig
from msr.training.loop import train
from msr.training.run import Run
from msr.training.schedule import LinearWarmup


def tiny(tmp_path, **kw) -> RunConfig:
    """ResNet-8 on 8x8 digits: a real dataset, about a second an epoch."""
    values = dict(dataset="digits", arch="resnet8", variant="msr", epochs=2, seed=0, batch_size=64, image_size=8,
                  data_root=str(tmp_path / "data"), threads=1, probe_every=1000)
    values.update(kw)
    return RunConfig.from_dict(values)


def quiet(*_args, **_kw):
    pass


# ------------------------------------------------------------------------- lr factors


@pytest.mark.parametrize("variant", ["bn", "msr", "fixup", "wn"])
def test_factor_scales_every_group_of_the_variant_alike(variant):
    v = build(variant, depth=8)
    own = {g["name"]: g["lr"] for g in v.param_groups()}
    spec = v.spec
    assert own["conv"] == spec.lr and own["other"] == spec.other_lr
    if spec.scalar_lr is not None:
        assert own["scalar"] == spec.scalar_lr
    scaled = {g["name"]: g["lr"] for g in v.param_groups(factor=0.25)}
    assert scaled == {name: pytest.approx(lr * 0.25) for name, lr in own.items()}
    # the older spelling, a conv-group lr, is the factor lr / spec.lr
    assert {g["name"]: g["lr"] for g in v.param_groups(lr=spec.lr * 0.25)} == pytest.approx(scaled)
    with pytest.raises(ValueError, match="not both"):
        v.param_groups(lr=0.1, factor=1.0)


def test_one_factor_means_the_same_for_every_variant():
    """The point of factors: x0.25 is a quarter of each variant's own lrs, classifier included;
    one absolute lr would give bn's classifier 4x the share of msr's."""
    bn, msr = build("bn", depth=8), build("msr", depth=8)
    for factor in (0.125, 0.25, 2.0, 16.0):
        for v in (bn, msr):
            got = {g["name"]: g["lr"] / own["lr"] for g, own in zip(v.param_groups(factor=factor), v.param_groups(), strict=True)}
            assert got == {"conv": pytest.approx(factor), "other": pytest.approx(factor)}


def test_run_config_lr_and_factor(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        tiny(tmp_path, lr=0.1, lr_factor=2.0)
    with pytest.raises(ConfigError, match="lr_factor=-1"):
        tiny(tmp_path, lr_factor=-1)
    assert tiny(tmp_path, lr=0.2).resolved_lr_factor(0.4) == 0.5
    assert tiny(tmp_path, lr_factor=0.5).resolved_lr(0.4) == 0.2
    assert tiny(tmp_path).resolved_lr_factor(0.4) == 1.0


def test_a_run_records_its_factor_and_trains_every_group_at_it(tmp_path):
    out = tmp_path / "r"
    train(tiny(tmp_path, variant="fixup", lr_factor=0.25, epochs=1), out, log=quiet)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_factor"] == 0.25 and cfg["lr"] == pytest.approx(0.025) and cfg["eval_split"] == "test"
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    spec = get_spec("fixup")
    assert [g["initial_lr"] for g in groups] == pytest.approx([spec.lr / 4, spec.other_lr / 4, spec.scalar_lr / 4])
    # --lr (older spelling) records its factor too, and the same run is the same directory
    out2 = tmp_path / "r2"
    train(tiny(tmp_path, variant="fixup", lr=0.025, epochs=1), out2, log=quiet)
    assert json.loads((out2 / "config.json").read_text())["lr_factor"] == pytest.approx(0.25)


def test_cmrr_at_lr_over_one_plus_m_is_the_partial_projection_at_lr():
    """Why msr_cmrr has no hand-matched lr (docs/method.md, "Learning rates"): its update is
    (1+m) (G - m/(1+m) mean G), so at lr/(1+m) it IS the partial projection lam = m/(1+m) at lr,
    step for step with momentum; its lr is chosen on the validation split instead."""
    m, lr = 0.9, 0.4
    torch.manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a = torch.optim.SGD([a], lr=lr / (1 + m), momentum=0.9)
    opt_b = torch.optim.SGD([b], lr=lr, momentum=0.9)
    for step in range(20):
        g = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(step)) + 1.0
        a.grad, b.grad = g.clone(), g.clone()
        cmrr_gradients_([a], m=m)
        project_gradients_([b], lam=m / (1 + m))
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- warm-up


def _lrs_seen(optimizer: torch.optim.Optimizer) -> list[list[float]]:
    """The lr of every group as each optimizer step applies it (a pre-hook registered after the
    warm-up's sees the warmed values)."""
    seen: list[list[float]] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    return seen


def test_linear_warmup_ramps_every_group_and_leaves_the_schedule_alone():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.4}, {"params": [q], "lr": 0.1}], momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], gamma=0.1)
    warm = LinearWarmup.for_run(opt, fraction=0.5, from_lr=0.04, lr=0.4, total_steps=8)
    assert warm.steps == 4 and warm.start == pytest.approx(0.1)
    seen = _lrs_seen(opt)
    for _ in range(6):
        p.grad, q.grad = torch.ones(2), torch.ones(2)
        opt.step()
        assert [g["lr"] for g in opt.param_groups] == [0.4, 0.1]  # the scheduled values, restored
    ramp = [0.1 + 0.9 * t / 4 for t in range(4)] + [1.0, 1.0]
    assert [s[0] for s in seen] == pytest.approx([0.4 * r for r in ramp])  # from 0.04 up to 0.4
    assert [s[1] for s in seen] == pytest.approx([0.1 * r for r in ramp])  # the other group alike
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.04, 0.01])  # the decay never saw a warmed lr


@pytest.mark.parametrize("fraction, from_lr, lr", [(0.0, 0.0, 0.1), (0.05, 0.1, 0.1), (0.05, 0.1, 0.05)])
def test_no_warmup_without_a_fraction_or_when_the_lr_is_not_above_its_start(fraction, from_lr, lr):
    """Fixup's official rule: warm up only when the lr exceeds 0.1 (from 0.1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    assert LinearWarmup.for_run(opt, fraction=fraction, from_lr=from_lr, lr=lr, total_steps=100).steps == 0


def test_warmup_is_a_variant_field_that_any_variant_may_override():
    assert (get_spec("wn").warmup, get_spec("wn").warmup_from) == (0.025, 0.01)
    assert (get_spec("fixup").warmup, get_spec("fixup").warmup_from) == (0.05, 0.1)
    assert all(get_spec(v).warmup == 0 for v in ("bn", "msr", "skipinit", "nf_ws"))
    assert get_spec("msr", warmup=0.1, warmup_from=0.0).warmup == 0.1
    with pytest.raises(ValueError, match="warmup=1.0 is a fraction of the run"):
        get_spec("msr", warmup=1.0)
    with pytest.raises(ValueError, match="warmup_from"):
        get_spec("msr", warmup_from=-0.1)


def test_a_runs_optimizer_applies_its_variants_warmup(tmp_path):
    """fixup at x2 (lr 0.2 > 0.1): 5% of the run's steps from 0.1; at x1: none; wn: from 0.01."""
    def applied(**kw):
        run = Run(tiny(tmp_path, epochs=10, **kw), tmp_path / "unused", log=quiet)
        seen = _lrs_seen(run.optimizer)
        for _ in range(run.warmup.steps + 2):
            run.optimizer.step()
        return run, [s[0] for s in seen]

    run, conv = applied(variant="fixup", lr_factor=2.0)
    total = 10 * len(run.train_loader)
    assert run.warmup.steps == round(0.05 * total) > 1 and run.config_record()["warmup_steps"] == run.warmup.steps
    assert conv[0] == pytest.approx(0.1) and conv[-2:] == pytest.approx([0.2, 0.2])
    assert all(a < b for a, b in zip(conv[:run.warmup.steps], conv[1:run.warmup.steps + 1], strict=True))
    run, conv = applied(variant="fixup")
    assert run.warmup.steps == 0 and conv == pytest.approx([0.1, 0.1])
    run, conv = applied(variant="wn")
    assert run.warmup.steps == round(0.025 * total) and conv[0] == pytest.approx(0.01)


def test_resume_inside_the_warmup_is_bitwise_identical(tmp_path):
    """The warm-up's step count comes back with the checkpoint's step: a run killed mid-warm-up
    ends exactly where an uninterrupted one does."""
    cfg = dict(variant="fixup", lr_factor=2.0, overrides={"warmup": 0.75}, epochs=2)
    whole = train(tiny(tmp_path, **cfg), tmp_path / "whole", log=quiet)
    part = tmp_path / "part"
    assert train(tiny(tmp_path, **cfg), part, log=quiet, stop_after_epoch=1)["status"] == "interrupted"
    resumed = train(tiny(tmp_path, **cfg), part, log=quiet)
    assert resumed["final_test_acc"] == whole["final_test_acc"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- the validation split


@pytest.fixture(scope="module")
def digits_labels(tmp_path_factory):
    return load_dataset("digits", tmp_path_factory.mktemp("data"), image_size=8).train_y


def test_validation_split_is_disjoint_stratified_and_fixed(digits_labels):
    labels = digits_labels
    train_idx, val = validation_split(labels, 288)
    assert len(val) == 288 and len(train_idx) == len(labels) - 288
    assert set(train_idx.tolist()).isdisjoint(val.tolist())
    assert sorted(train_idx.tolist() + val.tolist()) == list(range(len(labels)))
    assert train_idx.tolist() == sorted(train_idx.tolist())  # the stored order is kept for training
    share = torch.bincount(labels[val], minlength=10).float() / 288
    full = torch.bincount(labels, minlength=10).float() / len(labels)
    assert (share - full).abs().max() < 0.01  # class-stratified
    torch.manual_seed(123)  # the global RNG does not move it
    again = validation_split(labels, 288)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], val)


def test_with_a_train_subset_the_validation_images_come_from_outside_it(digits_labels):
    labels = digits_labels
    train_idx, val = validation_split(labels, 300, train_subset=500)
    assert torch.equal(train_idx, stratified_subset(labels, 500))  # the study's own subset, same order
    assert len(val) == 300 and set(val.tolist()).isdisjoint(train_idx.tolist())
    with pytest.raises(ValueError, match="only 937 training images lie outside the train_subset of 500"):
        validation_split(labels, 1000, train_subset=500)
    with pytest.raises(ValueError, match="some must be left to train on"):
        validation_split(labels, len(labels))
    with pytest.raises(ValueError, match="validation_size=0"):
        validation_split(labels, 0)


def test_cli_lr_factor_and_eval_split(tmp_path, capsys):
    from msr.cli import main as msr_main

    base = ["train", "--data-root", str(tmp_path / "data"), "--dataset", "digits", "--arch", "resnet8",
            "--image-size", "8", "--epochs", "1", "--threads", "1", "--progress", "lines"]
    assert msr_main([*base, "--out", str(tmp_path / "bad"), "--eval-split", "validation"]) == 2
    assert "needs the number of training images to hold out" in capsys.readouterr().err
    assert msr_main([*base, "--out", str(tmp_path / "both"), "--lr", "0.2", "--lr-factor", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    out = tmp_path / "ok"
    assert msr_main([*base, "--out", str(out), "--variant", "bn", "--lr-factor", "0.5",
                     "--eval-split", "validation", "--validation-size", "300"]) == 0
    rec = json.loads((out / "config.json").read_text())
    assert (rec["lr_factor"], rec["lr"], rec["eval_split"], rec["eval_images"]) == (0.5, 0.05, "validation", 300)
    assert "final validation acc" in capsys.readouterr().out


def test_run_config_eval_split(tmp_path):
    with pytest.raises(ConfigError, match="needs the number of training images to hold out"):
        tiny(tmp_path, eval_split="validation")
    with pytest.raises(ConfigError, match="only with eval_split='validation'"):
        tiny(tmp_path, validation_size=100)
    with pytest.raises(ConfigError, match="eval_split='val'"):
        tiny(tmp_path, eval_split="val")


def test_a_validation_run_trains_on_the_rest_and_never_sees_the_test_set(tmp_path, digits_labels):
    out = tmp_path / "val"
    cfg = tiny(tmp_path, eval_split="validation", validation_size=288, epochs=1)
    run = Run(cfg, out, log=quiet)
    keep, held_out = validation_split(digits_labels, 288)
    ds = load_dataset("digits", tmp_path / "data", image_size=8)
    assert torch.equal(run.dataset.train_x, ds.train_x[keep])
    assert torch.equal(run.test_loader.images.cpu(), ds.train_x[held_out])  # evaluated on held-out training images
    assert torch.equal(run.test_loader.labels.cpu(), ds.train_y[held_out]) and run.test_loader.num_samples == 288
    summary = train(cfg, out, log=quiet)
    rec = json.loads((out / "config.json").read_text())
    assert rec["eval_split"] == "validation" and rec["validation_size"] == 288 and rec["eval_images"] == 288
    assert summary["steps"] == (len(digits_labels) - 288) // 64
    # the headline is validation accuracy: a multiple of 1/288, not of 1/360 (the test set's size)
    assert math.isclose(summary["final_test_acc"] * 288, round(summary["final_test_acc"] * 288), abs_tol=1e-6)
    with pytest.raises(ConfigError, match="digits: validation_size=1437"):
        train(tiny(tmp_path, eval_split="validation", validation_size=1437), tmp_path / "big", log=quiet)

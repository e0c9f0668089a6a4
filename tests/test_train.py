"""The trainer: run-directory contract, determinism, resume, divergence, CLI errors."""

import csv
import json

import pytest
import torch

from msr.cli import main as msr_main
from msr.core.method import slice_means
from msr.core.variants import build
from msr.training.config import ConfigError, RunConfig
from msr.training.loop import train
from msr.training.rundir import METRIC_COLUMNS, PROBE_COLUMNS

FILES = ["config.json", "metrics.csv", "probes.csv", "summary.json", "checkpoint.pt"]


def tiny(tmp_path, **kw):
    """ResNet-8 on 8x8 digits: a real dataset, a few seconds a run."""
    values = dict(
        dataset="digits", arch="resnet8", variant="msr", epochs=2, seed=0, batch_size=64,
        image_size=8, data_root=str(tmp_path / "data"), threads=1, probe_every=5,
    )
    values.update(kw)
    return RunConfig.from_dict(values)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def quiet(*_args, **_kw):
    pass


@pytest.fixture(scope="module")
def msr_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    summary = train(tiny(tmp), out, log=quiet)
    return out, summary


def test_run_directory_contract(msr_run):
    out, summary = msr_run
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    metrics = read_csv(out / "metrics.csv")
    assert list(metrics[0]) == METRIC_COLUMNS and [int(r["epoch"]) for r in metrics] == [1, 2]
    assert int(metrics[-1]["step"]) == 2 * (1437 // 64)
    probes = read_csv(out / "probes.csv")
    assert list(probes[0]) == PROBE_COLUMNS
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threads"] == 1 and cfg["lr"] == 0.4 and cfg["variant_spec"]["grad"] == "project"
    assert cfg["versions"]["torch"] == torch.__version__
    assert summary["status"] == "completed" and summary["diverged_at_step"] is None
    assert summary["final_test_acc"] == pytest.approx(float(metrics[-1]["test_acc"]))
    assert summary["final_clean_train_acc"] == pytest.approx(float(metrics[-1]["clean_train_acc"]))
    assert summary["best_test_acc"] >= summary["final_test_acc"]
    assert summary["epochs_completed"] == 2 and summary["peak_memory_mb"] > 0
    assert not list(out.glob(".*tmp"))  # no temp files left behind


def test_probes_cover_every_layer_and_show_the_isocline(msr_run):
    out, _ = msr_run
    probes = read_csv(out / "probes.csv")
    steps = sorted({int(r["step"]) for r in probes})
    assert steps[0] == 0 and steps[-1] == 44 and 5 in steps and 22 in steps  # start, every 5, epoch ends
    layers = {r["layer"] for r in probes if r["metric"] == "mean_shift"}
    assert layers == {"stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "blocks.2.conv1", "blocks.2.conv2"}
    iso = [float(r["value"]) for r in probes if r["metric"] == "slice_mean_rms"]
    assert iso and max(iso) < 1e-4  # msr stays zero-mean
    metrics = {r["metric"] for r in probes}
    assert {"mean_shift", "slice_mean_rms", "filter_norm", "gain", "gain_over_norm", "logit_rms", "grad_norm"} <= metrics
    # the gradient norm belongs to the step it was measured at: probe steps only
    assert sorted(int(r["step"]) for r in probes if r["metric"] == "grad_norm") == list(range(5, 45, 5))


def test_same_seed_same_numbers_different_seed_different(tmp_path, msr_run):
    out, _ = msr_run
    again = tmp_path / "again"
    train(tiny(tmp_path), again, log=quiet)
    cols = ["train_loss", "train_acc", "test_loss", "test_acc"]
    a = [[r[c] for c in cols] for r in read_csv(out / "metrics.csv")]
    b = [[r[c] for c in cols] for r in read_csv(again / "metrics.csv")]
    assert a == b
    other = tmp_path / "other"
    train(tiny(tmp_path, seed=1), other, log=quiet)
    assert [[r[c] for c in cols] for r in read_csv(other / "metrics.csv")] != a


def test_resume_after_kill_is_bitwise_identical(tmp_path, msr_run):
    out, _ = msr_run
    killed = tmp_path / "killed"
    cfg = tiny(tmp_path, variant="msr_noise")  # noise: the global RNG must be restored too
    first = train(cfg, killed, log=quiet, stop_after_epoch=1)
    assert first["status"] == "interrupted" and not (killed / "summary.json").exists()
    train(cfg, killed, log=quiet)
    straight = tmp_path / "straight"
    train(cfg, straight, log=quiet)
    cols = ["epoch", "step", "lr", "train_loss", "train_acc", "clean_train_loss", "clean_train_acc", "test_loss", "test_acc"]
    assert [[r[c] for c in cols] for r in read_csv(killed / "metrics.csv")] == [
        [r[c] for c in cols] for r in read_csv(straight / "metrics.csv")
    ]
    a = torch.load(killed / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_csv(killed / "probes.csv") == read_csv(straight / "probes.csv")


def test_completed_run_is_not_redone(msr_run):
    out, summary = msr_run
    stamp = (out / "summary.json").stat().st_mtime_ns
    messages = []
    again = train(tiny(out.parent), out, log=messages.append)
    assert again == json.loads((out / "summary.json").read_text())
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    assert "already complete" in messages[0]


def test_directory_of_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny(tmp_path, epochs=2), out, log=quiet, stop_after_epoch=1)
    with pytest.raises(ConfigError, match="different config.*seed"):
        train(tiny(tmp_path, epochs=2, seed=5), out, log=quiet)


def test_divergence_is_a_recorded_result(tmp_path, capsys):
    out = tmp_path / "div"
    code = msr_main([
        "train", "--dataset", "digits", "--arch", "resnet8", "--variant", "plain", "--lr", "1000",
        "--epochs", "2", "--image-size", "8", "--data-root", str(tmp_path / "data"), "--threads", "1",
        "--out", str(out),
    ])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_at_step"], int) and summary["diverged_at_step"] >= 1
    assert summary["steps"] == summary["diverged_at_step"] - 1
    assert summary["train_seconds"] > 0 and summary["mean_step_seconds"] > 0  # the partial epoch is timed
    assert "diverged" in capsys.readouterr().out


def test_zmg_without_zmi_keeps_initial_means_in_a_real_run(tmp_path):
    out = tmp_path / "zmg"
    train(tiny(tmp_path, variant="zmg", epochs=1), out, log=quiet)
    torch.manual_seed(0)  # the trainer seeds the global RNG right before building the model
    initial = build("zmg", depth=8, num_classes=10, in_channels=1).model.state_dict()
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    convs = [k for k, v in initial.items() if v.dim() == 4]
    assert len(convs) == 7
    for k in convs:
        assert not torch.equal(trained[k], initial[k])  # the kernels did train
        assert slice_means(initial[k]).abs().max() > 1e-2  # not zero-mean ...
        torch.testing.assert_close(slice_means(trained[k]), slice_means(initial[k]), atol=1e-5, rtol=0)  # ... but frozen


def test_lr_override_scales_groups(tmp_path):
    out = tmp_path / "lr"
    train(tiny(tmp_path, lr=0.8, epochs=1), out, log=quiet)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    lrs = [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert lrs == [0.8, pytest.approx(0.2)]
    assert json.loads((out / "config.json").read_text())["lr"] == 0.8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "batchnorm"], "valid variants: bn, bn_noise"),
        (["--dataset", "imagenet"], "valid datasets: digits"),
        (["--arch", "resnet21"], "6n\\+2"),
        (["--epochs", "0"], "epochs"),
        (["--override", "lam=3"], "lam"),
        (["--override", "nonsense=1"], "unknown override"),
        (["--override", "lam"], "KEY=VALUE"),
        (["--lr", "-1"], "lr"),
    ],
)
def test_cli_errors_name_the_problem_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = msr_main(["train", "--out", str(out), "--data-root", str(tmp_path / "data"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("msr train: error:")
    assert pytest.importorskip("re").search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_config_file_and_unknown_keys(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant: msr\nlearning_rate: 0.1\n")
    assert msr_main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown config key(s) ['learning_rate']" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(
        f"dataset: digits\narch: resnet8\nvariant: nf\nepochs: 1\nimage_size: 8\nthreads: 1\n"
        f"data_root: {tmp_path / 'data'}\noverrides: {{unity_kappa: 0.001}}\n"
    )
    out = tmp_path / "fromfile"
    # command-line options win over the file
    assert msr_main(["train", "--config", str(good), "--out", str(out), "--seed", "3", "--progress", "lines"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["variant"] == "nf" and cfg["seed"] == 3 and cfg["variant_spec"]["unity_kappa"] == 0.001
    assert msr_main(["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2


def test_noise_delta_turns_noise_on(tmp_path):
    out = tmp_path / "noise"
    train(tiny(tmp_path, variant="msr", noise_delta=0.2, epochs=1), out, log=quiet)
    assert json.loads((out / "config.json").read_text())["variant_spec"]["noise_delta"] == 0.2


def test_msr_weights_stay_zero_mean_through_real_training(msr_run):
    out, _ = msr_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    conv_weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    assert len(conv_weights) == 7
    assert max(slice_means(w).abs().max().item() for w in conv_weights) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run(tmp_path):
    out = tmp_path / "cuda"
    summary = train(tiny(tmp_path, device="cuda", epochs=2), out, log=quiet)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["device"].startswith("cuda") and cfg["precision"] == "bf16"
    assert summary["status"] == "completed" and summary["final_test_acc"] > 0.1
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert max(slice_means(v.float()).abs().max().item() for k, v in state.items() if v.dim() == 4) < 1e-4


def test_dataset_dependent_defaults():
    cifar = RunConfig.from_dict({"dataset": "cifar10"})
    assert (cifar.epochs, cifar.batch_size) == (200, 128)  # the paper's recipe
    digits = RunConfig.from_dict({"dataset": "digits", "epochs": 3})
    assert (digits.epochs, digits.batch_size) == (3, 32)


def test_eval_every_skips_evaluations_and_changes_nothing_else(tmp_path):
    """--eval-every E: the test set and the clean train subset are evaluated after epochs E, 2E,
    ... and the last; skipped epochs hold NaN. Evaluation draws no random number and moves no
    weight, so training, the final numbers and resume are those of a run evaluated every epoch."""
    every = train(tiny(tmp_path, epochs=4), tmp_path / "every", log=quiet)
    sparse_cfg = tiny(tmp_path, epochs=4, eval_every=3)
    train(sparse_cfg, tmp_path / "sparse", log=quiet, stop_after_epoch=2)  # killed after epoch 2
    sparse = train(sparse_cfg, tmp_path / "sparse", log=quiet)  # resumed
    a, b = read_csv(tmp_path / "every" / "metrics.csv"), read_csv(tmp_path / "sparse" / "metrics.csv")
    evaluated = ("test_loss", "test_acc", "clean_train_loss", "clean_train_acc")
    for ra, rb in zip(a, b, strict=True):
        for column in METRIC_COLUMNS:
            if column in ("seconds", "images_per_s"):
                continue
            if column in evaluated and rb["epoch"] in ("1", "2"):
                assert rb[column] == "nan", (rb["epoch"], column)
            else:
                assert ra[column] == rb[column], (rb["epoch"], column)
    for key in ("status", "final_test_acc", "final_clean_train_acc", "steps"):
        assert sparse[key] == every[key]
    assert sparse["best_test_acc"] == max(float(r["test_acc"]) for r in a if r["epoch"] in ("3", "4"))
    with pytest.raises(ConfigError, match="eval_every"):
        tiny(tmp_path, eval_every=0)

"""A run directory is consistent or rejected: resume checks, damaged files, the writer lock, a
full disk, clean train accuracy and bf16 on CPU (issue 9). Real tiny runs: ResNet-8 on 8x8
digits, 1 thread."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msr import data as msr_data
from msr.analysis import aggregate as agg
from msr.cli import main as msr_main
from msr.core.method import slice_means
from msr.core.variants import Variant, build
from msr.training.config import ConfigError, RunConfig
from msr.training.loop import train
from msr.training.run import CLEAN_TRAIN_IMAGES
from msr.training.rundir import METRIC_COLUMNS, RunDirError, RunLock, read_metrics, read_probes


def tiny(root: Path, **kw) -> RunConfig:
    values = dict(dataset="digits", arch="resnet8", variant="msr", epochs=3, seed=0, batch_size=64,
                  image_size=8, data_root=str(root / "data"), threads=1, probe_every=5)
    values.update(kw)
    return RunConfig.from_dict(values)


def cli_args(root: Path, out: Path, epochs: int = 3, seed: int = 0) -> list[str]:
    return ["train", "--dataset", "digits", "--arch", "resnet8", "--variant", "msr", "--epochs", str(epochs),
            "--seed", str(seed), "--batch-size", "64", "--image-size", "8", "--data-root", str(root / "data"),
            "--threads", "1", "--probe-every", "5", "--out", str(out)]


def quiet(*_a, **_k):
    pass


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def interrupted(root) -> Path:
    """A 3-epoch run killed after epoch 2: checkpoint, metrics.csv and probes.csv of 2 epochs."""
    out = root / "interrupted"
    assert train(tiny(root), out, log=quiet, stop_after_epoch=2)["status"] == "interrupted"
    return out


@pytest.fixture(scope="module")
def straight(root) -> Path:
    out = root / "straight"
    train(tiny(root), out, log=quiet)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return copy


# --------------------------------------------------------------------------------------------
# Clean train accuracy


def test_clean_train_accuracy_is_an_eval_pass_over_the_first_training_images(root, straight):
    metrics = read_metrics(straight / "metrics.csv")
    summary = json.loads((straight / "summary.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert summary["final_clean_train_acc"] == metrics[-1]["clean_train_acc"]
    assert json.loads((straight / "config.json").read_text())["clean_train_images"] == CLEAN_TRAIN_IMAGES
    # recompute it from the final weights: eval mode, no augmentation, the first 1000 images
    torch.manual_seed(0)
    model = build("msr", depth=8, num_classes=10, in_channels=1).model
    model.load_state_dict(torch.load(straight / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    ds = msr_data.load_dataset("digits", root / "data", image_size=8)
    loader = msr_data.DeviceLoader(ds.train_x[:1000], ds.train_y[:1000], batch_size=1000, train=False,
                                   mean=ds.mean, std=ds.std, channels_last=True)
    x, y = next(iter(loader))
    with torch.no_grad():
        logits = model(x)
    assert metrics[-1]["clean_train_acc"] == (logits.argmax(1) == y).sum().item() / 1000
    assert metrics[-1]["clean_train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    # it is not the running average over augmented batches
    assert [m["clean_train_acc"] for m in metrics] != [m["train_acc"] for m in metrics]


# --------------------------------------------------------------------------------------------
# Resume: the files must agree with the checkpoint


def test_one_extra_trailing_epoch_is_dropped_logged_and_retrained(root, straight, tmp_path):
    """A job that died between writing metrics.csv/probes.csv and checkpoint.pt."""
    out = tmp_path / "died_between"
    cfg = tiny(root)
    train(cfg, out, log=quiet, stop_after_epoch=1)
    epoch1 = (out / "checkpoint.pt").read_bytes()
    train(cfg, out, log=quiet, stop_after_epoch=2)
    (out / "checkpoint.pt").write_bytes(epoch1)  # files of epoch 2, checkpoint of epoch 1
    messages = []
    train(cfg, out, log=messages.append)
    assert any("metrics.csv: dropping epoch 2" in m for m in messages), messages
    assert any("probes.csv: dropping" in m for m in messages), messages
    assert any("resuming after epoch 1" in m for m in messages)
    # still bitwise identical to an uninterrupted run
    cols = [c for c in METRIC_COLUMNS if c not in ("seconds", "images_per_s")]
    assert [[m[c] for c in cols] for m in read_metrics(out / "metrics.csv")] == \
        [[m[c] for c in cols] for m in read_metrics(straight / "metrics.csv")]
    assert read_probes(out / "probes.csv") == read_probes(straight / "probes.csv")


def _cut(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def _drop_lines(path: Path, first: int, last: int | None = None) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:first] + (lines[last:] if last is not None else [])))


def _rows_of_last_step(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    last = lines[-1].split(",")[0]
    return [line for line in lines if line.split(",")[0] == last]


def _old_schema(path: Path) -> None:
    import csv

    rows = list(csv.DictReader(path.open()))
    keep = [c for c in METRIC_COLUMNS if not c.startswith("clean_")]
    path.write_text("\n".join([",".join(keep)] + [",".join(r[c] for c in keep) for r in rows]) + "\n")


DAMAGE = {
    "metrics truncated mid-line": ("metrics.csv", lambda p: _cut(p, 5), "truncated"),
    "metrics missing": ("metrics.csv", Path.unlink, "missing"),
    "metrics lost epoch 1": ("metrics.csv", lambda p: _drop_lines(p, 1, 2), r"holds epochs 2, but checkpoint.pt is after epoch 2"),
    "metrics behind the checkpoint": ("metrics.csv", lambda p: _drop_lines(p, 2), r"holds epochs 1, but checkpoint.pt is after epoch 2"),
    "metrics of an older msr": ("metrics.csv", _old_schema, r"older msr \(no column clean_train_loss, clean_train_acc"),
    "probes truncated mid-line": ("probes.csv", lambda p: _cut(p, 3), "truncated"),
    "probes cut at a line end": ("probes.csv", lambda p: _drop_lines(p, -3), r"step 44 has \d+ of the \d+ rows"),
    "probes lost the last step": ("probes.csv", lambda p: _drop_lines(p, -len(_rows_of_last_step(p))), "end at step 40"),
    "probes missing": ("probes.csv", Path.unlink, "missing"),
    "probes row garbled": ("probes.csv", lambda p: p.write_text(p.read_text().replace(",mean_shift,", ",mean_shift,x", 1)), "does not parse"),
    "checkpoint truncated": ("checkpoint.pt", lambda p: _cut(p, 4000), r"cannot be loaded \(RuntimeError"),
    "config not JSON": ("config.json", lambda p: p.write_text('{"dataset": "dig'), "not valid JSON"),
    "config missing": ("config.json", Path.unlink, "missing next to checkpoint.pt"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_directory_is_refused_naming_the_file(root, interrupted, copy_of, case):
    name, damage, reason = DAMAGE[case]
    out = copy_of(interrupted)
    damage(out / name)
    before = snapshot(out)
    with pytest.raises(RunDirError) as err:
        train(tiny(root), out, log=quiet)
    message = str(err.value)
    assert message.startswith(f"{out / name}:") and re.search(reason, message), message
    assert message.endswith(f"delete {out} to rerun this run") and "\n" not in message
    assert snapshot(out) == before  # nothing trained, nothing rewritten
    assert not (out / ".lock").exists()


def test_checkpoint_of_a_foreign_pickle_never_advises_unsafe_loading(root, interrupted, copy_of, capsys):
    import datetime

    out = copy_of(interrupted)
    torch.save({"epoch": datetime.date(2026, 1, 1)}, out / "checkpoint.pt")  # not allowed by weights_only
    assert msr_main(cli_args(root, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"msr train: error: {out / 'checkpoint.pt'}: cannot be loaded")
    assert "weights_only" not in err and "Traceback" not in err and f"delete {out}" in err


@pytest.mark.parametrize("case", ["checkpoint truncated", "metrics truncated mid-line", "config not JSON"])
def test_cli_reports_damage_in_one_line(root, interrupted, copy_of, capsys, case):
    name, damage, _ = DAMAGE[case]
    out = copy_of(interrupted)
    damage(out / name)
    assert msr_main(cli_args(root, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"msr train: error: {out / name}:"), err
    assert "Traceback" not in err and f"delete {out} to rerun this run" in err


# --------------------------------------------------------------------------------------------
# Complete = summary.json and a metrics.csv that agrees with it


def test_a_complete_run_is_not_redone_but_a_damaged_one_is_never_reported_complete(root, straight, copy_of, capsys):
    out = copy_of(straight)
    assert train(tiny(root), out, log=quiet) == json.loads((out / "summary.json").read_text())
    (out / "metrics.csv").unlink()
    summary_before = (out / "summary.json").read_bytes()
    with pytest.raises(RunDirError, match=f"^{re.escape(str(out / 'metrics.csv'))}: missing; .*delete {re.escape(str(out))}"):
        train(tiny(root), out, log=quiet)
    assert (out / "summary.json").read_bytes() == summary_before  # not rewritten with a NaN headline
    assert msr_main(cli_args(root, out)) == 2
    assert "metrics.csv: missing" in capsys.readouterr().err


def test_a_completed_summary_with_a_nan_headline_is_damaged(root, straight, copy_of):
    out = copy_of(straight)
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "final_test_acc": math.nan}))
    with pytest.raises(RunDirError, match="completed run with final_test_acc nan"):
        train(tiny(root), out, log=quiet)


def test_a_complete_run_of_another_config_is_refused_not_returned(root, straight, copy_of):
    out = copy_of(straight)
    with pytest.raises(ConfigError, match="different config.*epochs"):
        train(tiny(root, epochs=4), out, log=quiet)
    with pytest.raises(ConfigError, match="different config.*lr"):
        train(tiny(root, lr=0.1), out, log=quiet)


def test_damaged_completed_run_gives_no_table_with_one_seeds_mean_labelled_n2(root, tmp_path, capsys):
    """Issue 9 finding 2: seed 1 finished, then lost its metrics.csv; the old code resumed it
    into `completed` with final_test_acc NaN, and Table 1 showed seed 0's mean as n=2."""
    runs = tmp_path / "runs"
    dirs = [runs / "digits" / "resnet8" / "msr" / "base" / f"seed{s}" for s in (0, 1)]
    for seed, out in enumerate(dirs):
        assert msr_main(cli_args(root, out, epochs=1, seed=seed)) == 0
    (dirs[1] / "metrics.csv").unlink()
    (dirs[1] / "checkpoint.pt").unlink()
    # rerunning the damaged run is an error, not a NaN summary
    assert msr_main(cli_args(root, dirs[1], epochs=1, seed=1)) == 2
    assert f"{dirs[1] / 'metrics.csv'}: missing" in capsys.readouterr().err
    # the summary the old code wrote: aggregation refuses it, naming the run and the file
    summary = json.loads((dirs[1] / "summary.json").read_text())
    (dirs[1] / "summary.json").write_text(json.dumps({**summary, "final_test_acc": math.nan}))
    tables = tmp_path / "tables"
    assert msr_main(["aggregate", "--runs", str(runs), "--out", str(tables)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "digits/resnet8/msr/base/seed1/" in err and "metrics.csv: missing" in err
    assert not tables.exists() or not any(tables.iterdir())
    # with both seeds whole, n is 2 and the mean is over both
    good = agg.load_runs([dirs[0]], runs)
    both = agg.pd.concat([good, good.assign(seed=1, final_test_acc=good["final_test_acc"] - 0.1)])
    row = agg.summarize(both).iloc[0]
    assert row["n_completed"] == 2 and row["final_test_acc_mean"] == pytest.approx(good["final_test_acc"][0] - 0.05)
    # and a completed run without a headline is never counted in n
    with pytest.raises(ValueError, match="seed1.*no finite final_test_acc|no finite final_test_acc"):
        agg.summarize(agg.pd.concat([good, good.assign(seed=1, run_id="x/seed1", final_test_acc=math.nan)]))


# --------------------------------------------------------------------------------------------
# One writer per run directory


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.1)


def test_second_writer_fails_at_once_naming_the_holder_and_kill9_releases(root, tmp_path):
    out = tmp_path / "locked"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MSR_PREFORK_SOCKET", None)
    # a real `msr train` long enough to still be running while the second one starts
    args = cli_args(root, out, epochs=500)
    first = subprocess.Popen([sys.executable, "-m", "msr", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        # the first epoch is written under the lock
        _wait_for(lambda: (out / "checkpoint.pt").exists() or first.poll() is not None)
        assert first.poll() is None, first.stderr.read().decode()
        holder = (out / ".lock").read_text()
        assert holder.startswith(f"pid {first.pid} on {socket.gethostname()} since ")
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "msr", *args], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        assert second.stderr == (f"msr train: error: {out} is being written by another process ({holder.strip()}); "
                                 "wait for it to finish or stop it, then rerun\n")
        assert time.monotonic() - t0 < 60  # it did not wait for the first one
        assert first.poll() is None  # and left it alone
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the kernel released the lock with the process; the stale file only names the dead holder
    assert (out / ".lock").exists()
    summary = train(tiny(root, epochs=500), out, log=quiet, stop_after_epoch=int(read_metrics(out / "metrics.csv")[-1]["epoch"]) + 1)
    assert summary["status"] == "interrupted"
    assert not (out / ".lock").exists()


def test_lock_is_exclusive_and_survives_the_previous_holder_removing_its_file(tmp_path):
    out = tmp_path / "run"
    first = RunLock(out).acquire()
    with pytest.raises(RunDirError, match=f"pid {os.getpid()} on "):
        RunLock(out).acquire()  # flock conflicts between two open files, even in one process
    # a writer that opened the old file before its holder removed it must not also hold "the" lock
    fd = os.open(out / ".lock", os.O_RDWR)
    first.release()
    late = RunLock(out).acquire()
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed inode: lockable, but no longer the lock
    with pytest.raises(RunDirError):
        RunLock(out).acquire()
    os.close(fd)
    late.release()


# --------------------------------------------------------------------------------------------
# A full disk


@pytest.mark.parametrize("target", ["checkpoint.pt", "metrics.csv"])
def test_a_full_disk_is_one_line_naming_the_file(root, tmp_path, monkeypatch, capsys, target):
    out = tmp_path / "full"
    real_bytes, real_text = Path.write_bytes, Path.write_text

    def full(real):
        def write(self, data, *a, **k):
            if self.name.startswith(f".{target}."):
                real(self, data[: len(data) // 2], *a, **k)  # part of it made it to disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, data, *a, **k)
        return write

    monkeypatch.setattr(Path, "write_bytes", full(real_bytes))
    monkeypatch.setattr(Path, "write_text", full(real_text))
    assert msr_main(cli_args(root, out, epochs=2)) == 2
    assert capsys.readouterr().err == f"msr train: error: No space left on device: {out / target}; free space and rerun\n"
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    monkeypatch.undo()  # space freed: the same command finishes the run
    assert msr_main(cli_args(root, out, epochs=2)) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------------------------
# bf16 on CPU


def test_cpu_bf16_autocast_keeps_zmg_on_fp32_gradients(root, tmp_path, monkeypatch):
    seen = {"activations": set(), "grads": set(), "params": set()}
    real_build, real_after = build, Variant.after_backward

    def build_with_probe(*a, **k):
        variant = real_build(*a, **k)
        variant.model.stem.register_forward_hook(
            lambda m, i, o: seen["activations"].add(o.dtype) if m.training else None)
        return variant

    def after_backward(self):
        seen["grads"].update(p.grad.dtype for p in self.projected)
        seen["params"].update(p.dtype for p in self.projected)
        real_after(self)

    monkeypatch.setattr("msr.training.run.build", build_with_probe)
    monkeypatch.setattr(Variant, "after_backward", after_backward)
    out = tmp_path / "bf16"
    summary = train(tiny(root, precision="bf16", device="cpu", epochs=1), out, log=quiet)
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    assert summary["status"] == "completed" and summary["final_test_acc"] > 0.2
    assert seen == {"activations": {torch.bfloat16}, "grads": {torch.float32}, "params": {torch.float32}}
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    convs = [v for v in state.values() if v.dim() == 4]
    assert len(convs) == 7 and all(v.dtype == torch.float32 for v in convs)
    assert max(slice_means(v).abs().max().item() for v in convs) < 1e-5


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", '{"epochs": 2,', r"bad.json: not valid JSON \(Expecting property name enclosed in double quotes at line 1\)"),
    ("bad.yaml", "epochs: [2\nseed: 0\n", r"bad.yaml: not valid YAML \(line 2\)"),
])
def test_a_corrupt_config_file_is_named(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert msr_main(["train", "--config", str(path), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "never").exists()

"""tools/gpu_session.sh: a visit's two commands start anywhere, fit the device's limits (at most 8
files back, no folders; caps inside the budget), record every step, fail gracefully without
CUDA - and its reports (msr.infra.visit_report) say what was measured.

The real visit (a GPU machine) cannot run in CI; --dry-run runs the same steps at toy sizes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from msr.infra import visit_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_session.sh"
MAX_FILES, MAX_DEPTH = 8, 2


def _steps(out: Path) -> dict[str, dict]:
    with (out / "steps.tsv").open() as f:
        return {row["step"]: row for row in csv.DictReader(f, delimiter="\t")}


def _env(out: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **extra}
    env.pop("MSR_PREFORK_SOCKET", None)
    return env


def _within_device_limits(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(len(p.relative_to(out).parts) - 1 <= MAX_DEPTH for p in files)
    assert all(p.stat().st_size <= 16 * 2**20 for p in files) and sum(p.stat().st_size for p in files) <= 64 * 2**20
    return files


def test_quick_dry_run_records_each_step_fits_the_limits_and_a_cuda_step_fails_gracefully(tmp_path):
    out = tmp_path / "out"
    env = _env(out, GPU_SESSION_STEPS="env,digits,digits_compare")
    done = subprocess.run(["bash", str(SCRIPT), "--quick", "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    files = _within_device_limits(out)
    assert sorted(p.name for p in files) == ["session.tar.gz", "steps.tsv", "summary.md"]
    steps = _steps(out)
    assert list(steps) == ["env", "gpu_tests", "bench_32", "digits", "digits_compare"]  # every step, in order
    assert steps["env"]["status"] == "ok" and steps["bench_32"]["status"] == "not selected"
    # the caps add up inside the 240 s budget, less the 20 s kept for the summary
    assert sum(int(s["cap"]) for s in steps.values()) <= 240 - 20
    with tarfile.open(out / "session.tar.gz") as tar:
        names = tar.getnames()
    assert "./env.log" in names and "./digits_compare.json" in names and not any(n.endswith("checkpoint.pt") for n in names)
    summary = (out / "summary.md").read_text()
    assert "## Steps" in summary and "digits" in summary and "Tolerance: |test accuracy CUDA - CPU| <= 0.03" in summary
    if torch.cuda.is_available():
        assert steps["digits"]["status"] == "ok"
    else:  # the CUDA runs end at once with their reason; the CPU ones still ran; the compare says so
        assert steps["digits"]["status"] == "failed" and steps["digits_compare"]["status"] == "failed"
        compare = json.loads(tarfile.open(out / "session.tar.gz").extractfile("./digits_compare.json").read())
        assert compare["ok"] is False and "no summary" in json.dumps(compare["variants"]["bn"]["cuda"])
        assert compare["variants"]["bn"]["cpu"]["status"] == "completed"
        assert done.returncode == 1


def test_caps_that_do_not_fit_the_budget_stop_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--quick", "--dry-run"], env=_env(out, GPU_SESSION_BUDGET_S="200"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "do not fit the budget of 200 s" in done.stderr
    assert [p.name for p in out.iterdir()] == ["steps.tsv"]
    bad = subprocess.run(["bash", str(SCRIPT), "--train", str(tmp_path / "missing.json")], env=_env(out),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "msr plan-runs" in bad.stderr


@pytest.mark.slow
def test_train_dry_run_trains_a_plan_and_packs_it(tmp_path):
    """The training command on a tiny plan Snakemake made (digits, CPU): bench, choice, run, pack
    - at most 8 files, the runs in a tarball msr import takes."""
    wf = tmp_path / "wf"
    wf.mkdir()
    shutil.copy2(ROOT / "Snakefile", wf / "Snakefile")
    shutil.copytree(ROOT / "workflow", wf / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "notebooks", wf / "notebooks", ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    (wf / "tiny.yaml").write_text(
        "name: tiny\ndatasets: [digits]\narchs: [resnet8]\nvariants: [msr, bn]\nseeds: [0, 1]\n"
        "train: {epochs: 2, batch_size: 64, image_size: 8, train_subset: 256, probe_every: 5, device: cpu}\n"
        "sweeps: {lr: {variants: [], values: []}, batch_size: {variants: [], values: []}, noise_delta: {variants: [], values: []}}\n"
            "lr_selection: {variants: []}\n"
        "resources: {threads: 1}\n")
    repo = tmp_path / "repo"  # the tree that travels: its results/ are the visit's
    (repo / "tools").mkdir(parents=True)
    shutil.copy2(SCRIPT, repo / "tools" / SCRIPT.name)
    for name in ("src", "tests"):
        (repo / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    made = subprocess.run([sys.executable, "-m", "msr", "plan-runs", "--out", str(repo / "plan.json"), "--", "--cores", "1",
                           "--configfile", "tiny.yaml"], cwd=wf, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(repo / "tools" / SCRIPT.name), "--train", "plan.json", "--dry-run"], cwd=repo,
                          env=_env(out, GPU_SESSION_BUDGET_S="200"), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    files = _within_device_limits(out)
    assert sorted(p.name for p in files) == ["runs-1.tar.gz", "session.tar.gz", "steps.tsv", "summary.md"]
    steps = _steps(out)
    assert list(steps) == ["env", "bench_28", "choose", "train", "pack"] and all(s["status"] == "ok" for s in steps.values())
    with tarfile.open(out / "runs-1.tar.gz") as tar:
        summaries = [n for n in tar.getnames() if n.endswith("summary.json")]
    assert len(summaries) == 4
    summary = (out / "summary.md").read_text()
    assert "## Training path" in summary and "runs finished: 4" in summary and "GPU-hours(grid)" in summary


# --------------------------------------------------------------------------- the reports
def _table(path: Path, rows: list[tuple[str, int, float]], variant: str = "msr_noise") -> Path:
    path.write_text(json.dumps({"environment": {"image_shape": [1, 28, 28]}, "rows": [
        {"arch": "resnet20", "variant": variant, "method": m, "models": k, "status": "ok", "images_per_s": ips,
         "ms_per_step": 1.0, "speedup_vs_eager": None, "note": ""} for m, k, ips in rows]}))
    return path


def test_the_fastest_measured_path_becomes_the_run_plan_settings(tmp_path):
    a = _table(tmp_path / "bench_28.json", [("eager", 1, 20_000), ("processes", 8, 60_000), ("processes_graph", 8, 150_000)])
    b = _table(tmp_path / "bench_28_stacked.json", [("stacked", 5, 40_000), ("stacked_graph", 5, 90_000)])
    choice = visit_report.choose_path([a, b])
    assert (choice["method"], choice["procs"], choice["stack"], choice["extra"]) == ("processes_graph", 8, 1, "--cuda-graph")
    c = _table(tmp_path / "c.json", [("stacked_graph", 5, 200_000)])
    assert visit_report.choose_path([a, c])["stack"] == 5  # one process, 5 seeds stacked
    assert visit_report.choose_path([tmp_path / "missing.json"])["method"] == "eager"
    lines = visit_report._goal_line([json.loads(a.read_text())])
    assert lines == ["- 1x28x28, msr_noise: best processes_graph (8 model(s)) 150000 img/s = 7.50x eager (20000 img/s): goal 4x met"]


def test_digits_compare_holds_each_variant_to_the_tolerance(tmp_path):
    def run(dev: str, v: str, acc: float) -> None:
        d = tmp_path / dev / v
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"status": "completed", "final_test_acc": acc, "epochs_completed": 10}))

    run("cuda", "bn", 0.97)
    run("cpu", "bn", 0.98)
    run("cuda", "msr", 0.90)
    run("cpu", "msr", 0.95)
    result = visit_report.compare_digits(tmp_path, ["bn", "msr"], 0.03)
    assert result["variants"]["bn"]["within_tolerance"] is True
    assert result["variants"]["msr"]["within_tolerance"] is False and result["ok"] is False
    assert visit_report.compare_digits(tmp_path, ["bn"], 0.03)["ok"] is True

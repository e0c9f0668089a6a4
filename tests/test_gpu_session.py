"""tools/gpu_session.sh starts anywhere, records every step, and fails gracefully without CUDA.

The real visit (a GPU machine, ~9 minutes) cannot run in CI; this runs a few of its steps at
toy size (--dry-run) and checks the bookkeeping a GPU session relies on.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_session.sh"


def _steps(out: Path) -> dict[str, dict]:
    with (out / "steps.tsv").open() as f:
        return {row["step"]: row for row in csv.DictReader(f, delimiter="\t")}


def test_dry_run_records_each_step_and_a_cuda_step_fails_gracefully(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SESSION_STEPS": "env,digits_cuda,digits_compare"}
    env.pop("MSR_PREFORK_SOCKET", None)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    steps = _steps(out)
    # every step of the visit is listed, in order, whether it ran or not
    assert list(steps) == ["env", "gpu_tests", "bench_a", "digits_cuda", "digits_cpu", "digits_compare", "bench_b", "train_tests", "bench_compile"]
    assert steps["env"]["status"] == "ok" and "torch" in (out / "env.log").read_text()
    assert steps["bench_a"]["status"] == "not selected"
    if torch.cuda.is_available():
        assert steps["digits_cuda"]["status"] == "ok"
    else:  # the CUDA step ends at once with its reason; the visit goes on
        assert (steps["digits_cuda"]["status"], steps["digits_cuda"]["rc"]) == ("failed", "2")
        assert "no CUDA device" in (out / "digits_cuda.log").read_text()
        assert steps["digits_compare"]["status"] == "failed"  # nothing to compare: said, not crashed
        assert "no summary" in (out / "digits_compare.json").read_text()
        assert done.returncode == 1
    summary = (out / "summary.md").read_text()
    assert "## Steps" in summary and "digits_cuda" in summary


def test_a_step_that_no_longer_fits_the_budget_is_skipped(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SESSION_BUDGET_S": "50", "GPU_SESSION_STEPS": "env,bench_a"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    steps = _steps(out)
    # 50 s budget - 15 s kept for the summary: env (needs 5 s) runs; then under 35 s are left,
    # and bench_a needs 40 s, so it is skipped rather than started and cut
    assert steps["env"]["status"] == "ok" and steps["bench_a"]["status"] == "skipped"
    assert done.returncode == 0  # nothing that ran failed

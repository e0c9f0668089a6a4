"""The workflow's SLURM settings, without a cluster (seconds): what each job of the slurm profile
asks the scheduler for (partition, account, a GPU for CUDA train jobs only), clear errors for bad
settings, `make run` without the fork server for that profile, GPU-slot lock folders private to
each Slurm allocation, and the cluster script's usage errors. tests/test_slurm.py runs the smoke
set through a real Slurm.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from msr.infra import gpu

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm_local.sh"
PROFILE = ["--workflow-profile", "workflow/profiles/slurm"]
SMOKE = ["--configfile", "workflow/config/smoke.yaml"]
SLURM_SETTINGS = ["MSR_SLURM_PARTITION", "MSR_SLURM_GPU_PARTITION", "MSR_SLURM_ACCOUNT", "MSR_SLURM_GPU_GRES"]
# a validation run of the lr selection: it needs no other run (a final run waits for the whole selection)
PAPER_RUN = "results/paper/runs/cifar10/resnet20/msr/val-lrx2/seed0/summary.json"


def copy_workflow(dest: Path) -> Path:
    """The workflow files in a folder of their own, so no result lands in the repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "Makefile"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("workflow", "notebooks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any MSR_SLURM_* setting or fork server, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k not in SLURM_SETTINGS and k != "MSR_PREFORK_SOCKET"}
    env.update(settings)
    return env


def snakemake(cwd: Path, *args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_resources(output: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the `resources:` of each of its jobs in `snakemake -n` output."""
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in output.splitlines():
        m = re.match(r"^\s*(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and rule is not None:
            jobs.setdefault(rule, []).append(dict(item.split("=", 1) for item in m.group(1).split(", ")))
            rule = None
    return jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("wf"))


plugin_missing = pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                                    reason="snakemake-executor-plugin-slurm is not installed")


@plugin_missing
def test_cuda_train_jobs_ask_slurm_for_a_gpu_and_every_job_for_the_settings(workdir):
    env = clean_env(MSR_SLURM_PARTITION="batch", MSR_SLURM_GPU_PARTITION="gpu", MSR_SLURM_ACCOUNT="proj")
    done = snakemake(workdir, "-n", *PROFILE, PAPER_RUN, env=env)
    assert done.returncode == 0, done.stderr
    jobs = job_resources(done.stdout + done.stderr)
    [train] = jobs["train"]
    assert (train["gres"], train["slurm_partition"], train["slurm_account"]) == ("gpu:1", "gpu", "proj")
    [prepare] = jobs["prepare"]  # a CPU job: the partition of every job, no GPU
    assert (prepare["slurm_partition"], prepare["slurm_account"]) == ("batch", "proj") and "gres" not in prepare
    assert "download" in jobs and "slurm_partition" not in jobs["download"][0]  # runs on the submitting host

    # the GPU type is a setting; without any setting no partition or account is named at all
    done = snakemake(workdir, "-n", *PROFILE, PAPER_RUN, env=clean_env(MSR_SLURM_GPU_GRES="gpu:a100:1"))
    assert done.returncode == 0, done.stderr
    jobs = job_resources(done.stdout + done.stderr)
    assert jobs["train"][0]["gres"] == "gpu:a100:1"
    assert not any(k.startswith("slurm_") for j in jobs.values() for k in j[0])


@plugin_missing
def test_cpu_train_jobs_ask_for_no_gpu(workdir):
    env = clean_env(MSR_SLURM_PARTITION="batch", MSR_SLURM_GPU_PARTITION="gpu")
    done = snakemake(workdir, "-n", "-f", "results/smoke/runs/digits/resnet8/msr/val-lrx2/seed0/summary.json", *PROFILE, *SMOKE,
                     env=env)
    assert done.returncode == 0, done.stderr
    [train] = job_resources(done.stdout + done.stderr)["train"]
    assert "gres" not in train and "gpu" not in train and train["slurm_partition"] == "batch"
    # the run's own size, from the config: smoke.yaml's 1 thread and default.yaml's 1500 MB, 30 min
    assert (train["mem_mb"], train["runtime"]) == ("1500", "30")


@pytest.mark.parametrize("setting, value", [
    ("MSR_SLURM_PARTITION", "gpu queue"),
    ("MSR_SLURM_ACCOUNT", "'proj'"),
    ("MSR_SLURM_GPU_GRES", "gpu:a100:one"),
])
def test_a_bad_setting_is_named_before_any_job(workdir, setting, value):
    done = snakemake(workdir, "-n", *SMOKE, env=clean_env(**{setting: value}))
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"{setting}={value!r} is not a valid Slurm" in out, out[-2000:]


def test_make_run_starts_no_fork_server_for_a_cluster_profile(workdir):
    def command(*args: str) -> str:
        done = subprocess.run(["make", "-s", "-n", "-C", str(workdir), "run", "SETUP=", "BIN=/x", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return next(line for line in done.stdout.splitlines() if "snakemake" in line and "unlock_stale" not in line)

    assert command().startswith("/x/msr prefork -- /x/snakemake")
    assert command("PROFILE=fashion").startswith("/x/msr prefork -- ")
    assert command("PROFILE=slurm").startswith("/x/snakemake --cores all --workflow-profile workflow/profiles/slurm")


def test_gpu_lock_folder_is_private_to_a_slurm_allocation(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv("MSR_GPU_LOCK_DIR", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert gpu.lock_dir_from_env() == (tmp_path / f"msr-gpu-locks-{os.getuid()}", False)

    # two allocations on one node, each told by Slurm that its GPU is "0" (device confinement
    # numbers from 0): neither waits for the other's slot
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    first = gpu.claim_gpu_slot(1, ids=["0"], set_env=False, timeout_s=0.5)
    monkeypatch.setenv("SLURM_JOB_ID", "102")
    second = gpu.claim_gpu_slot(1, ids=["0"], set_env=False, timeout_s=0.5)
    try:
        assert first.path.parent.name.endswith("-slurm101") and second.path.parent.name.endswith("-slurm102")
        # within one allocation the slots are shared as before: its single slot is taken
        with pytest.raises(gpu.GpuSlotError, match="no free GPU slot"):
            gpu.claim_gpu_slot(1, ids=["0"], set_env=False, poll_s=0.05, timeout_s=0.3, log=lambda _: None)
    finally:
        first.release()
        second.release()
    monkeypatch.setenv("MSR_GPU_LOCK_DIR", str(tmp_path / "shared"))  # an explicit folder still wins
    assert gpu.lock_dir_from_env() == (tmp_path / "shared", True)


@pytest.mark.parametrize("args", [[], ["bogus"], ["up", "now"]])
def test_cluster_script_without_a_known_command_prints_usage(args):
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("usage: "), done.stderr

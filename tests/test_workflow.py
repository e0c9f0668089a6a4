"""The Snakemake pipeline: lint, dry-run job counts derived from the configs and profiles, every
output under its config set's name, config errors that name the bad key/value before any job,
notebooks stored as clean jupytext pairs, a tiny end-to-end run (workflow/config/smoke.yaml)
that produces every figure, table and the manifest, and the recovery scenarios: a retrain
killed after an option change, a config edit without Snakemake's metadata, `make run` after
kill -9 (during training and during the notebooks).

Every snakemake call runs in a copy of the workflow files (Snakefile, Makefile, workflow/,
notebooks/) in a temporary folder, so the repository's own results/, data/ and figures/ never
influence a job count and are never written.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "workflow" / "config"
NOTEBOOKS = REPO / "notebooks"
FIGURES = ["fig1_curves", "fig2_mean_shift", "fig3_lr_stability", "fig4_isocline", "fig5_batch_size",
           "fig6_noise", "fig7_peers"]
TABLES = ["tab1_ablation", "tab2_cost", "tab3_claims"]
# per run of the pipeline besides train/prepare/download: check_runs, aggregate, one job per
# notebook, manifest, all
ANALYSIS_JOBS = 1 + 1 + len(FIGURES) + len(TABLES) + 1 + 1
BIN = Path(sys.executable).parent
SMOKE = ["--configfile", "workflow/config/smoke.yaml"]


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "Makefile"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("workflow", "notebooks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest


def snakemake(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def make_run(cwd: Path, *args: str) -> list[str]:
    """`make run` in ``cwd`` with this interpreter's environment instead of building .venv."""
    return ["make", "-s", "-C", str(cwd), "run", "SETUP=", f"BIN={BIN}", "CORES=2", *args]


def job_counts(output: str) -> dict[str, int]:
    """The `job  count` table of `snakemake -n --quiet rules`."""
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", output, flags=re.M))
    return {rule: int(n) for rule, n in counts.items()}


def deep_merge(base: dict, overlay: dict) -> dict:
    """What Snakemake does with a --configfile overlay: dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def expected_train_jobs(cfg: dict, chosen: dict | None = None) -> int:
    """The number of runs a config asks for, derived independently of the workflow: the main grid
    datasets x archs x variants x seeds, the lr selection's validation runs (datasets x archs x
    tuned variants x factors x selection seeds; tuned: lr_selection.variants in the main grid),
    plus every sweep point (dataset x arch x variant x value x seed) except those identical to a
    main-grid run (same resolved value, and the point's dataset/arch/variant/seed are in the main
    grid), which are reused. lr sweep values are factors of each variant's own lr; a tuned
    variant's main-grid factor is the chosen one: ``chosen`` ((dataset, arch, variant) ->
    factor) counts every run; without it, the count `snakemake -n` lists before the choice:
    the lr sweep points that the choice may make main-grid runs (their factor is a candidate)
    are left out."""
    from msr.core.variants import VARIANTS

    train, sel = cfg["train"], cfg.get("lr_selection", {})
    main = (set(cfg["datasets"]), set(cfg["archs"]), set(cfg["variants"]), set(cfg["seeds"]))
    tuned = [v for v in sel.get("variants", []) if v in cfg["variants"]]
    n = len(cfg["datasets"]) * len(cfg["archs"]) * len(cfg["variants"]) * len(cfg["seeds"])
    n += len(cfg["datasets"]) * len(cfg["archs"]) * len(tuned) * len(sel.get("factors", [])) * len(sel.get("seeds", [0]))

    def own_factor(d, a, v):
        if v in tuned and d in main[0] and a in main[1]:
            return None if chosen is None else chosen[(d, a, v)]
        return train["lr"] / VARIANTS[v].lr if train.get("lr") else 1.0

    base_value = {
        "lr": own_factor,
        "batch_size": lambda d, a, v: train["batch_size"],
        # train.noise_delta only changes the variants that have noise
        "noise_delta": lambda d, a, v: train["noise_delta"] if train.get("noise_delta") is not None and VARIANTS[v].noise_delta > 0
        else VARIANTS[v].noise_delta,
    }
    for name, sweep in cfg.get("sweeps", {}).items():
        axes = [sweep.get("datasets") or cfg["datasets"], sweep.get("archs") or cfg["archs"],
                sweep.get("variants", []), sweep.get("values", []), sweep.get("seeds") or cfg["seeds"]]
        for d, a, v, value, s in product(*axes):
            in_main = d in main[0] and a in main[1] and v in main[2] and s in main[3]
            base = base_value[name](d, a, v)
            if base is None:  # waits for the choice: listed unless the choice may make it the main grid's run
                n += not (in_main and value in sel["factors"])
                continue
            n += not (value == base and in_main)
    return n


def expected_jobs(cfg: dict) -> dict[str, int]:
    datasets = set(cfg["datasets"])
    for sweep in cfg.get("sweeps", {}).values():
        if sweep.get("variants") and sweep.get("values"):
            datasets |= set(sweep.get("datasets") or [])
    counts = {"train": expected_train_jobs(cfg), "prepare": len(datasets),
              "download": len(datasets & {"cifar10", "cifar100"})}
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(counts.values()) + ANALYSIS_JOBS + bool(tuned_variants(cfg))  # + select_lr
    return counts


def tuned_variants(cfg: dict) -> list[str]:
    return [v for v in cfg.get("lr_selection", {}).get("variants", []) if v in cfg["variants"]]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIG / name).read_text())


def profile_config(profile: str) -> dict:
    """default.yaml overlaid with the config file a profile names."""
    prof = yaml.safe_load((REPO / "workflow/profiles" / profile / "config.yaml").read_text())
    return deep_merge(load("default.yaml"), load(Path(prof["configfile"]).name))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("wf"))


# ------------------------------------------------------------------------------------ static


def test_lint_is_clean(workdir):
    done = snakemake(workdir, "--lint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Congratulations, your workflow is in a good condition" in done.stdout + done.stderr, done.stdout + done.stderr


def test_default_dry_run_lists_the_whole_grid(workdir):
    done = snakemake(workdir, "-n", "--quiet", "rules")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    expected = expected_jobs(load("default.yaml"))
    assert {k: counts.get(k) for k in expected} == expected
    for rule in ["check_runs", "aggregate", "manifest", "all", *FIGURES, *TABLES]:
        assert counts[rule] == 1


@pytest.mark.parametrize("profile", ["paper", "fashion", "fashion-cpu"])
def test_profile_dry_run_lists_its_grid_without_gpu_or_data(workdir, profile):
    assert not (workdir / "data").exists()
    done = snakemake(workdir, "-n", "--quiet", "rules", "--workflow-profile", f"workflow/profiles/{profile}")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    cfg = profile_config(profile)
    expected = expected_jobs(cfg)
    assert {k: counts.get(k) for k in expected} == expected
    assert cfg["name"] == profile
    from msr.core.variants import VARIANTS

    assert cfg["variants"] == list(VARIANTS)  # every variant of the registry
    if profile == "paper":
        assert cfg["datasets"] == ["cifar10", "cifar100"] and len(cfg["seeds"]) == 5 and expected["download"] == 2
    else:  # Fashion-MNIST: found or fetched by `msr prepare` itself, no download job
        assert cfg["datasets"] == ["fashion_mnist"] and "download" not in counts and counts["prepare"] == 1
        assert cfg["archs"] == ["resnet20"]
        assert cfg["sweeps"]["lr"]["variants"] == ["plain", "bn", "msr"]
        assert cfg["sweeps"]["batch_size"]["variants"] == ["bn", "msr"] and cfg["sweeps"]["noise_delta"]["values"]
    if profile == "fashion":
        assert len(cfg["seeds"]) == 5 and cfg["train"]["epochs"] >= 30
    if profile == "fashion-cpu":  # T3 needs >= 2 seeds a side on the main grid and the lr sweep
        assert len(cfg["seeds"]) >= 2 and len(cfg["sweeps"]["lr"]["seeds"]) >= 2


def test_every_output_lives_under_its_sets_name(workdir, tmp_path):
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(yaml.safe_dump({"name": "my-study.v2"}))
    done = snakemake(workdir, "-n", *SMOKE, str(overlay))
    assert done.returncode == 0, done.stderr
    paths = []
    for line in (done.stdout + done.stderr).splitlines():
        m = re.match(r"^\s+(output|log|benchmark): (.*)$", line)
        if m:
            paths += m.group(2).split(", ")
    assert len(paths) > 40
    outside = [p for p in paths if not p.startswith(("results/my-study.v2/", "figures/my-study.v2/", "data/"))]
    assert outside == []
    assert "figures/my-study.v2/MANIFEST.json" in paths and "results/my-study.v2/tables/runs.csv" in paths


def test_train_jobs_get_only_their_own_options_and_declare_gpu_slots(workdir, tmp_path):
    untuned = tmp_path / "untuned.yaml"  # msr's own lr (not chosen on the validation split)
    untuned.write_text(yaml.safe_dump({"lr_selection": {"variants": []}}))
    done = snakemake(workdir, "results/paper/runs/cifar10/resnet20/msr/bs8/seed1/summary.json", "-n", "-p",
                     "--workflow-profile", "workflow/profiles/paper", "--configfile", "workflow/config/paper.yaml",
                     str(untuned))
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    cmd = next(line for line in out.splitlines() if "msr train" in line)
    # linear lr scaling from batch 128: every group at 8 / 128 of msr's own lrs; threads: the
    # profile's 4, capped by the cores here; --gpu-slots: the paper config's runs_per_gpu
    for part in ["--dataset cifar10", "--arch resnet20", "--variant msr", "--seed 1", "--epochs 200",
                 "--batch-size 8", "--lr-factor 0.0625", "--device cuda", "--threads ", "--gpu-slots 4 ",
                 "--out results/paper/runs/cifar10/resnet20/msr/bs8/seed1"]:
        assert part in cmd, (part, cmd)
    assert "--image-size" not in cmd and "--noise-delta" not in cmd and "--precision" not in cmd
    assert "--eval-split" not in cmd
    resources = next(line for line in out.splitlines() if "gpu_slots=" in line)
    assert "gpu_slots=1," in resources and "runs_per_gpu=4" in resources
    assert not re.search(r"\bgpu=", resources)  # no per-job GPU request on one machine: runs share GPUs
    prof = yaml.safe_load((REPO / "workflow/profiles/paper/config.yaml").read_text())
    assert prof["resources"]["gpu_slots"] == load("paper.yaml")["resources"]["runs_per_gpu"]  # one GPU's worth


def test_cpu_runs_claim_no_gpu_slot_and_pass_precision_subset_and_mirror(workdir, tmp_path):
    run = "results/smoke/runs/digits/resnet8/bn/base/seed0/summary.json"
    done = snakemake(workdir, "-n", "-p", "-f", run, "data/processed/digits-8.pt", *SMOKE)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    train = next(line for line in out.splitlines() if "msr train" in line)
    prepare = next(line for line in out.splitlines() if "msr prepare" in line)
    assert "--gpu-slots 0 " in train and "--precision" not in train and "--train-subset" not in train
    assert "--mirror" not in prepare
    overlay = tmp_path / "opts.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"precision": "bf16", "train_subset": 1000, "data_mirror": "/srv/my mirror"}}))
    done = snakemake(workdir, "-n", "-p", "-f", run, "data/processed/digits-8.pt", *SMOKE, str(overlay))
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    train = next(line for line in out.splitlines() if "msr train" in line)
    prepare = next(line for line in out.splitlines() if "msr prepare" in line)
    assert "--precision bf16" in train and "--train-subset 1000" in train
    assert "--mirror '/srv/my mirror'" in prepare


def test_sweep_runs_probe_sparsely_main_grid_densely(workdir):
    cfg = load("default.yaml")["train"]
    done = snakemake(workdir, "-n", "-p", "results/digits/runs/digits/resnet20/plain/base/seed0/summary.json",
                     "results/digits/runs/digits/resnet20/plain/lrx0.25/seed0/summary.json",
                     "results/digits/runs/digits/resnet20/bn/val-lrx0.5/seed0/summary.json")
    assert done.returncode == 0, done.stderr
    cmds = {line.split("--out ")[1].split()[0]: line for line in (done.stdout + done.stderr).splitlines()
            if "msr train" in line}
    assert f"--probe-every {cfg['probe_every']} " in cmds["results/digits/runs/digits/resnet20/plain/base/seed0"]
    assert f"--probe-every {cfg['sweep_probe_every']} " in cmds["results/digits/runs/digits/resnet20/plain/lrx0.25/seed0"]
    assert f"--probe-every {cfg['sweep_probe_every']} " in cmds["results/digits/runs/digits/resnet20/bn/val-lrx0.5/seed0"]
    assert cfg["sweep_probe_every"] > cfg["probe_every"]


def test_fresh_dry_run_lists_the_validation_runs_and_the_main_grid_waiting_for_the_choice(workdir):
    """Before any run: the validation runs train with their factor and the held-out split; the
    tuned variants' main-grid runs are listed, their input names the choice and their options
    wait for it (<TBD>); the lr sweep points the choice may make main-grid runs come later."""
    cfg = load("default.yaml")
    done = snakemake(workdir, "-n", "-p")
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    outputs = set(re.findall(r"^\s+output: results/digits/runs/(\S+)/summary.json$", out, flags=re.M))
    tuned = tuned_variants(cfg)
    sel = cfg["lr_selection"]
    for v in cfg["variants"]:
        for seed in cfg["seeds"]:
            assert f"digits/resnet20/{v}/base/seed{seed}" in outputs
    val = {o for o in outputs if "/val-lrx" in o}
    assert val == {f"digits/resnet20/{v}/val-lrx{f:g}/seed{s}" for v in tuned for f in sel["factors"] for s in sel["seeds"]}
    assert "digits/resnet20/bn/lrx1/seed0" not in outputs and "digits/resnet20/bn/lrx0.125/seed0" in outputs
    assert "digits/resnet20/plain/lrx1/seed0" not in outputs and "digits/resnet20/plain/lrx2/seed0" in outputs
    cmds = {line.split("--out ")[1].split()[0].split("/runs/")[1]: line for line in out.splitlines() if "msr train" in line}
    assert "--lr-factor 0.5 --eval-split validation --validation-size 288" in cmds["digits/resnet20/bn/val-lrx0.5/seed0"]
    assert "msr train <TBD>" in cmds["digits/resnet20/bn/base/seed0"]
    assert "--variant plain" in cmds["digits/resnet20/plain/base/seed0"] and "--lr-factor" not in cmds["digits/resnet20/plain/base/seed0"]
    block = out.split("output: results/digits/runs/digits/resnet20/bn/base/seed0/summary.json")[0].rsplit("rule train:", 1)[1]
    assert "results/digits/lr_selection.json" in block
    assert "checkpoint" in out.lower() and len(outputs) == expected_train_jobs(cfg)


def test_global_noise_delta_changes_only_the_noisy_variants(workdir, tmp_path):
    overlay = tmp_path / "noise.yaml"
    overlay.write_text(yaml.safe_dump({"name": "noise", "train": {"noise_delta": 0.2}, "lr_selection": {"variants": []}}))
    done = snakemake(workdir, "results/noise/runs/digits/resnet20/msr_noise/base/seed0/summary.json",
                     "results/noise/runs/digits/resnet20/msr/base/seed0/summary.json",
                     "-n", "-p", "--configfile", str(overlay))
    assert done.returncode == 0, done.stderr
    cmds = {re.search(r"--variant (\w+)", line).group(1): line
            for line in (done.stdout + done.stderr).splitlines() if "msr train" in line}
    assert "--noise-delta 0.2" in cmds["msr_noise"]
    assert "--noise-delta" not in cmds["msr"]


@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="snakemake-executor-plugin-slurm is not installed")
def test_slurm_profile_dry_run(workdir):
    done = snakemake(workdir, "-n", "--quiet", "rules", "--workflow-profile", "workflow/profiles/slurm")
    assert done.returncode == 0, done.stderr
    expected = expected_jobs(deep_merge(load("default.yaml"), load("paper.yaml")))
    assert job_counts(done.stdout + done.stderr)["train"] == expected["train"]


@pytest.mark.parametrize("overlay, named", [
    # the schema
    ({"variants": ["msr", "bogus"]}, "'bogus' is not one of"),
    ({"datasets": ["mnist"]}, "'mnist' is not one of"),
    ({"datasets": []}, "instance['datasets']"),
    ({"seeds": [0, 1, 1]}, "has non-unique elements"),
    ({"name": "../elsewhere"}, "'../elsewhere' does not match"),
    ({"epochs": 3}, "'epochs' was unexpected"),
    ({"train": {"epoch": 3}}, "'epoch' was unexpected"),
    ({"train": {"precision": "fp8"}}, "'fp8' is not one of"),
    ({"sweeps": {"lr": {"value": [0.1]}}}, "'value' was unexpected"),
    ({"sweeps": {"lr": {"seeds": [0, 0]}}}, "has non-unique elements"),
    ({"sweeps": {"lr": {"datasets": []}}}, "instance['sweeps']['lr']['datasets']"),
    ({"sweeps": {"batch_size": {"values": [0]}}}, "0 is less than the minimum of 1"),
    ({"resources": {"gpus": 1}}, "'gpus' was unexpected"),
    ({"archs": ["vgg16"]}, "'vgg16' does not match"),
    # the workflow's own checks (msr.pipeline.grid and the library's validation)
    ({"archs": ["resnet21"]}, "resnet21"),
    ({"sweeps": {"lr": {"archs": ["resnet22"], "variants": ["msr"], "values": [0.1]}}}, "resnet22"),
    ({"datasets": ["cifar10"], "train": {"image_size": 16}}, "image_size"),
    ({"analysis": {"probe_arch": "resnet56"}}, "probe_arch"),
    ({"sweeps": {"batch_size": {"values": [8, 4096]}}}, "config sweeps.batch_size.values: batch size 4096 is larger than the training set of digits (1437 images)"),
    ({"train": {"overrides": {"bogus": 1}}}, "config train.overrides={'bogus': 1}: unknown override(s) ['bogus']"),
    ({"train": {"train_subset": 2000}}, "config train.train_subset=2000 for digits: must be a number of training images from 1 to 1437"),
    ({"sweeps": {"lr": {"variants": []}}}, "config sweeps.lr: has values but no variants"),
    ({"sweeps": {"lr": {"values": [0.8, 0.8000001]}}}, "0.8 and 0.8000001 give the same run tag 'lrx0.8'"),
    ({"lr_selection": {"validation_size": 1437}}, "config lr_selection.validation_size=1437: digits has 1437 training images"),
    ({"lr_selection": {"variants": ["nonsense"]}}, "'nonsense' is not one of"),
    ({"analysis": {"margins": {"mnist": 1}}}, "'mnist' is not one of"),
])
def test_bad_config_stops_before_any_job_naming_the_problem(workdir, tmp_path, overlay, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    done = snakemake(workdir, "-n", "--configfile", str(bad))
    assert done.returncode != 0
    assert named in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Job stats" not in done.stdout + done.stderr


def test_list_from_the_command_line_is_named_not_a_type_error(workdir):
    done = snakemake(workdir, "-n", "--config", "seeds=[0,1]")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Job stats" not in out
    assert "config seeds=['0', '1']: the items are strings" in out and "--configfile" in out, out



def test_every_notebook_has_a_rule_and_a_caption():
    text = (REPO / "workflow/rules/common.smk").read_text()
    listed = re.findall(r'dict\(name="(\w+)", kind="(figure|table)"', text)
    assert sorted(listed) == sorted([(n, "figure") for n in FIGURES] + [(n, "table") for n in TABLES])
    for name in FIGURES + TABLES:
        assert (REPO / "workflow/report" / f"{name}.rst").stat().st_size > 100


@pytest.mark.parametrize("name", FIGURES + TABLES)
def test_notebooks_are_clean_jupytext_pairs(name):
    import jupytext
    import nbformat

    ipynb = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(ipynb, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["language_info"]["name"] == "python"  # Snakemake's notebook: directive needs it
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{ipynb} is committed with outputs"
    paired = jupytext.read(NOTEBOOKS / f"{name}.py")
    strip = lambda cells: [(c.cell_type, c.source.strip()) for c in cells]  # noqa: E731
    assert strip(paired.cells) == strip(nb.cells), f"{name}.py and .ipynb differ: run `jupytext --sync notebooks/{name}.ipynb`"


def test_stale_lock_is_removed_only_without_a_live_snakemake(tmp_path):
    script = REPO / "workflow/scripts/unlock_stale.py"
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    # a process in this folder whose command line names snakemake: the lock stays
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "snakemake"], cwd=tmp_path)
    try:
        done = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and f"pid {alive.pid}" in done.stderr and "leaving its lock" in done.stderr
        assert (locks / "0.input.lock").exists()
    finally:
        alive.kill()
        alive.wait()
    done = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "removed the lock" in done.stderr
    assert list(locks.iterdir()) == []


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_done(tmp_path_factory) -> Path:
    """workflow/config/smoke.yaml run once from a fresh copy; tests work on copies of it."""
    wd = copy_workflow(tmp_path_factory.mktemp("smoke") / "wf")
    done = snakemake(wd, "--cores", "2", *SMOKE)
    assert done.returncode == 0, done.stderr[-5000:]
    return wd


def copy_done(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)  # copy2: modification times kept
    return dest


def chosen_factors(wd: Path, name: str = "smoke") -> dict:
    record = json.loads((wd / "results" / name / "lr_selection.json").read_text())
    return {(s["dataset"], s["arch"], s["variant"]): s["lr_factor"] for s in record["selected"]}


def test_smoke_pipeline_end_to_end(smoke_done, tmp_path):
    """smoke.yaml (2 variants, 1 seed, 2 epochs, 8x8 images, msr's lr chosen from two factors,
    one lr and one batch size point, no noise sweep) from a fresh copy: every figure (PNG +
    PDF), every table (CSV + Markdown + LaTeX), the lr selection's table and the manifest under
    the set's name; then nothing left to do; figures byte-identical when their notebooks rerun;
    analysis edits never retrain; the HTML report."""
    wd = copy_done(smoke_done, tmp_path / "wf")
    figs, res = wd / "figures" / "smoke", wd / "results" / "smoke"
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (figs / f"{name}.{ext}").stat().st_size > 1000
    for name in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (figs / f"{name}.{ext}").stat().st_size > 0
    for name in FIGURES + TABLES:
        assert (res / "notebooks" / f"{name}.ipynb").exists()
    assert not (wd / "results" / "digits").exists() and not (wd / "figures" / "digits").exists()

    runs = sorted(p.relative_to(res / "runs").parent.as_posix() for p in (res / "runs").glob("*/*/*/*/*/summary.json"))
    cfg = deep_merge(load("default.yaml"), load("smoke.yaml"))
    chosen = chosen_factors(wd)
    assert len(runs) == expected_train_jobs(cfg, chosen) == 5 + (chosen[("digits", "resnet8", "msr")] != 2)
    assert "digits/resnet8/msr/val-lrx0.5/seed0" in runs and "digits/resnet8/msr/bs32/seed0" in runs
    checked = json.loads(next((res / "checks").glob("runs-*.json")).read_text())
    assert sorted(checked["runs"]) == runs

    manifest = json.loads((figs / "MANIFEST.json").read_text())
    assert sorted(i["name"] for i in manifest["items"]) == sorted(FIGURES + TABLES + ["lr_selection"])
    for item in manifest["items"]:
        for f in item["files"]:
            assert f["path"].startswith("figures/smoke/") and sha256(wd / f["path"]) == f["sha256"]
    fig1 = next(i for i in manifest["items"] if i["name"] == "fig1_curves")
    assert fig1["runs"] == ["digits/resnet8/bn/base/seed0", "digits/resnet8/msr/base/seed0"]
    assert len(manifest["config_sha256"]) == 64 and set(manifest["run_config_sha256"]) == set(runs)
    recorded = json.loads((res / "config.json").read_text())
    assert recorded["name"] == "smoke" and recorded["train"]["epochs"] == 2
    verify = subprocess.run([str(BIN / "msr"), "verify", "figures/smoke", "--config", "results/smoke/config.json"],
                            cwd=wd, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    t1 = (figs / "tab1_ablation.md").read_text()
    for variant in ("bn", "msr"):
        assert re.search(rf"\|\s*digits\s*\|\s*resnet8\s*\|\s*{variant}\s*\|", t1), t1

    # nothing left to do
    done = snakemake(wd, "-n", *SMOKE)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stdout

    # deterministic bytes: rerun two notebooks, same figure and table files
    before = {i["name"]: i["files"] for i in manifest["items"]}
    done = snakemake(wd, "--cores", "2", *SMOKE, "--forcerun", "fig1_curves", "tab1_ablation")
    assert done.returncode == 0, done.stderr[-5000:]
    after = {i["name"]: i["files"] for i in json.loads((figs / "MANIFEST.json").read_text())["items"]}
    assert after == before

    # editing a notebook reruns that notebook (and the manifest) only, never training; adding a
    # sweep point trains just that run: no train job's params depend on the rest of the config
    nb = wd / "notebooks" / "fig4_isocline.ipynb"
    nb.write_text(nb.read_text().replace("FLOOR = 1e-9", "FLOOR = 1e-10"))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"sweeps": {"noise_delta": {"variants": ["msr"], "values": [0.3], "seeds": [0]}}}))
    done = snakemake(wd, "-n", "--quiet", "rules", *SMOKE, str(extra))
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    assert counts.get("train") == 1 and "prepare" not in counts and counts.get("fig4_isocline") == 1, counts
    done = snakemake(wd, "-n", "--quiet", "rules", *SMOKE)
    counts = job_counts(done.stdout + done.stderr)
    assert "train" not in counts and "aggregate" not in counts and counts.get("fig4_isocline") == 1, counts

    # a run whose options changed starts over in its directory (msr refuses to mix configs);
    # a run whose summary is missing but whose options are unchanged resumes from its checkpoint
    run = "results/smoke/runs/digits/resnet8/bn/base/seed0"
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    done = snakemake(wd, f"{run}/summary.json", "--cores", "2", *SMOKE, str(longer))
    assert done.returncode == 0, done.stderr[-5000:]
    log = (wd / "results/smoke/logs/train/digits/resnet8/bn/base/seed0.log").read_text()
    assert "options changed (epochs: 2 -> 3); starting this run over" in log
    assert len((wd / run / "metrics.csv").read_text().splitlines()) == 1 + 3
    (wd / run / "summary.json").unlink()
    done = snakemake(wd, f"{run}/summary.json", "--cores", "2", *SMOKE, str(longer))
    assert done.returncode == 0, done.stderr[-5000:]
    assert "resuming after epoch 3" in (wd / "results/smoke/logs/train/digits/resnet8/bn/base/seed0.log").read_text()

    # the HTML report, with every figure
    done = snakemake(wd, *SMOKE, "--report", "results/smoke/report.html")
    assert done.returncode == 0, done.stderr[-5000:]
    assert (wd / "results/smoke/report.html").stat().st_size > 10_000


def test_smoke_lr_selection_is_chosen_on_validation_runs_used_by_the_main_grid_and_kept_out_of_the_tables(smoke_done, tmp_path):
    """msr's factor is chosen on its two validation runs (x0.5, x2: trained on 1,149 digits,
    evaluated on the 288 held out), recorded in lr_selection.json and figures/smoke/
    lr_selection.csv (in the manifest), and used by msr's main-grid and batch-size runs; the
    lr sweep point at the chosen factor is the main grid's run; the validation runs never enter
    a test-based table or figure; editing the selection config without Snakemake's metadata is
    caught by check_runs."""
    wd = copy_done(smoke_done, tmp_path / "wf")
    res, figs = wd / "results" / "smoke", wd / "figures" / "smoke"
    record = json.loads((res / "lr_selection.json").read_text())
    (msr,) = record["selected"]
    assert msr["variant"] == "msr" and msr["status"] == "chosen" and record["rule"].startswith("lr selection")
    factor = msr["lr_factor"]
    accs = {c["lr_factor"]: c["val_acc_mean"] for c in msr["candidates"]}
    assert set(accs) == {0.5, 2.0} and msr["eval_images"] == 288
    for f, tag in ((0.5, "val-lrx0.5"), (2.0, "val-lrx2")):
        rec = json.loads((res / "runs/digits/resnet8/msr" / tag / "seed0/config.json").read_text())
        assert (rec["eval_split"], rec["validation_size"], rec["lr_factor"]) == ("validation", 288, f)
        summary = json.loads((res / "runs/digits/resnet8/msr" / tag / "seed0/summary.json").read_text())
        assert summary["final_test_acc"] == pytest.approx(accs[f])  # the run's "test" numbers: validation
    # the choice is the main grid's factor (every group: lr 0.4 x factor), and the batch-size
    # point's (x 32/64, linear)
    base = json.loads((res / "runs/digits/resnet8/msr/base/seed0/config.json").read_text())
    assert (base["lr_factor"], base["lr"], base["eval_split"]) == (factor, pytest.approx(0.4 * factor), "test")
    assert json.loads((res / "runs/digits/resnet8/msr/bs32/seed0/config.json").read_text())["lr_factor"] == factor / 2
    assert json.loads((res / "runs/digits/resnet8/bn/base/seed0/config.json").read_text())["lr_factor"] == 1.0
    assert (res / "runs/digits/resnet8/msr/lrx2/seed0/summary.json").exists() == (factor != 2.0)
    table = pd.read_csv(figs / "lr_selection.csv")
    assert table.loc[table["chosen"], "lr_factor"].tolist() == [factor]
    manifest = json.loads((figs / "MANIFEST.json").read_text())
    item = next(i for i in manifest["items"] if i["name"] == "lr_selection")
    assert [f["path"] for f in item["files"]] == ["figures/smoke/lr_selection.csv"]
    assert item["runs"] == ["digits/resnet8/msr/val-lrx0.5/seed0", "digits/resnet8/msr/val-lrx2/seed0"]

    # runs.csv keeps them, apart; no figure or table of test results uses them
    runs = pd.read_csv(res / "tables" / "runs.csv").set_index("run_id")
    val = runs[runs["eval_split"] == "validation"]
    assert sorted(val.index) == item["runs"] and set(val["sweep"]) == {"lr_selection"}
    assert runs.loc["digits/resnet8/msr/base/seed0", "lr_selected_factor"] == factor
    for other in manifest["items"]:
        if other["name"] != "lr_selection":
            assert not any("/val-lrx" in r for r in other["runs"]), other["name"]
    t1 = pd.read_csv(figs / "tab1_ablation.csv")
    assert "val-lrx" not in t1.to_csv()
    summary = pd.read_csv(res / "tables" / "summary.csv")
    assert set(summary.loc[summary["sweep"] == "lr_selection", "eval_split"]) == {"validation"}
    assert set(summary.loc[summary["sweep"] != "lr_selection", "eval_split"]) == {"test"}

    # a config edit without Snakemake's metadata (copied results, --rerun-triggers mtime): the
    # validation runs were trained on another split; check_runs names them before aggregation
    shutil.rmtree(wd / ".snakemake")
    overlay = tmp_path / "val.yaml"
    overlay.write_text(yaml.safe_dump({"lr_selection": {"validation_size": 300}}))
    done = snakemake(wd, "--cores", "2", "--rerun-triggers", "mtime", *SMOKE, str(overlay))
    assert done.returncode != 0
    assert "digits/resnet8/msr/val-lrx0.5/seed0 (validation_size: 288 -> 300)" in done.stderr, done.stderr[-3000:]
    assert "2 run(s)" in (res / "logs/check_runs.log").read_text()
    assert not (res / "runs/digits/resnet8/msr/val-lrx2/seed0/summary.json").exists()
    assert (res / "runs/digits/resnet8/msr/base/seed0/summary.json").exists()


BS_RUN = "digits/resnet8/msr/bs32/seed0"  # smoke's batch-size point: lr 0.4 x the chosen factor x 32/64 (linear)


def bs_run_lrs(wd: Path) -> tuple[float, float]:
    """BS_RUN's lr with linear scaling and with none, at msr's chosen factor."""
    factor = chosen_factors(wd)[("digits", "resnet8", "msr")]
    return 0.4 * factor * 32 / 64, 0.4 * factor


def lr_scaling_none(tmp_path: Path) -> Path:
    """The same batch-size point with lr_scaling none: its lr becomes 0.4 x the chosen factor;
    no other run changes."""
    overlay = tmp_path / "none.yaml"
    overlay.write_text(yaml.safe_dump({"sweeps": {"batch_size": {"lr_scaling": "none"}}}))
    return overlay


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def assert_set_follows_new_options(wd: Path):
    """runs.csv, the batch-size figure's provenance and the manifest all describe the run as
    the changed config trained it."""
    res = wd / "results" / "smoke"
    runs = pd.read_csv(res / "tables" / "runs.csv").set_index("run_id")
    _, lr = bs_run_lrs(wd)
    assert runs.loc[BS_RUN, "lr"] == pytest.approx(lr) and runs.loc[BS_RUN, "batch_size"] == 32
    assert runs.loc["digits/resnet8/msr/base/seed0", "lr"] == pytest.approx(lr)
    assert json.loads((res / "runs" / BS_RUN / "config.json").read_text())["lr"] == pytest.approx(lr)
    assert BS_RUN in json.loads((res / "provenance" / "fig5_batch_size.json").read_text())["runs"]
    manifest = json.loads((wd / "figures" / "smoke" / "MANIFEST.json").read_text())
    assert manifest["run_config_sha256"][BS_RUN] == sha256(res / "runs" / BS_RUN / "config.json")
    assert json.loads((res / "config.json").read_text())["sweeps"]["batch_size"]["lr_scaling"] == "none"


@pytest.mark.slow
def test_kill_9_during_a_retrain_then_during_the_notebooks_make_run_finishes(smoke_done, tmp_path):
    """Issue 9, findings 1 and 9: one sweep run's options change, its retrain is killed with the
    whole pipeline (kill -9: Snakemake leaves its lock, the run's summary.json is already gone
    and the figures still exist); the next `make run` rebuilds that run, is itself killed while
    the notebooks write the figure set (old and new files mixed, which `msr verify` reports);
    one more `make run` finishes, and every table, figure record and the manifest follow the
    new options."""
    wd = copy_done(smoke_done, tmp_path / "wf")
    args = f"ARGS=--configfile workflow/config/smoke.yaml {lr_scaling_none(tmp_path)}"
    res = wd / "results" / "smoke"

    def start():
        return subprocess.Popen(make_run(wd, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def kill(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # 1. the retrain of the changed run, killed with everything
    proc = start()

    def retraining():
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "msr train" in cmd and f"runs/{BS_RUN}" in cmd:
                return p
        return None

    wait_for(retraining, proc, "the changed run's retrain started")
    kill(proc)
    assert list((wd / ".snakemake" / "locks").iterdir()), "a killed Snakemake leaves its lock"
    assert not (res / "runs" / BS_RUN / "summary.json").exists()
    assert (wd / "figures" / "smoke" / "fig5_batch_size.png").exists()

    # 2. make run again, killed once the notebooks have written part of the new figure set
    start_time = time.time()
    proc = start()
    wait_for(lambda: any(p.stat().st_mtime > start_time for p in (wd / "figures" / "smoke").glob("*.p*")),
             proc, "a notebook wrote a figure")
    kill(proc)
    verify = subprocess.run([str(BIN / "msr"), "verify", "figures/smoke"], cwd=wd, capture_output=True, text=True,
                            timeout=300)
    assert verify.returncode == 1, verify.stdout + verify.stderr  # a mixed set is reported, not cited

    # 3. one more make run finishes the study
    done = subprocess.run(make_run(wd, args), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "removed the lock of a Snakemake run that was killed" in done.stderr
    assert_set_follows_new_options(wd)
    verify = subprocess.run([str(BIN / "msr"), "verify", "figures/smoke", "--config", "results/smoke/config.json"],
                            cwd=wd, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    done = snakemake(wd, "-n", *SMOKE, str(lr_scaling_none(tmp_path)))
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.slow
def test_config_edit_without_snakemake_metadata_is_caught(smoke_done, tmp_path):
    """Issue 9, finding 4: results copied without .snakemake/ (or --rerun-triggers mtime) and a
    config edit that changes one run's options: check_runs stops before aggregation naming the
    run and what differs, leaves the figures alone, and the next run retrains just that run."""
    wd = copy_done(smoke_done, tmp_path / "wf")
    shutil.rmtree(wd / ".snakemake")
    overlay = ["--configfile", "workflow/config/smoke.yaml", str(lr_scaling_none(tmp_path))]
    figures = {p.name: sha256(p) for p in (wd / "figures" / "smoke").iterdir()}

    linear, none = bs_run_lrs(wd)  # the run's expected lr resolves msr's chosen factor
    done = snakemake(wd, "--cores", "2", "--rerun-triggers", "mtime", *overlay)
    assert done.returncode != 0
    assert f"{BS_RUN} (lr: {linear!r} -> {none!r})" in done.stderr and "rerun the same command" in done.stderr, done.stderr
    assert "1 run(s)" in (wd / "results/smoke/logs/check_runs.log").read_text()
    assert {p.name: sha256(p) for p in (wd / "figures" / "smoke").iterdir()} == figures
    log = wd / "results/smoke/logs/train" / f"{BS_RUN}.log"
    assert f"lr {linear:g}" in log.read_text()  # not retrained yet

    done = snakemake(wd, "--cores", "2", "--rerun-triggers", "mtime", *overlay)
    assert done.returncode == 0, done.stderr[-5000:]
    assert f"options changed (lr: {linear!r} -> {none!r}); starting this run over" in log.read_text()
    trained = [p for p in (wd / "results/smoke/logs/train").rglob("*.log") if "starting this run over" in p.read_text()]
    assert trained == [log]
    assert_set_follows_new_options(wd)


@pytest.mark.slow
def test_a_new_lr_choice_retrains_the_tuned_runs_and_only_a_new_one(smoke_done, tmp_path):
    """A validation run retrained (deleted here) reruns select_lr, which rewrites the choice;
    with the same choice, msr's main-grid and batch-size runs are kept (the selection is their
    `ancient` input: only a changed --lr-factor, Snakemake's params trigger, retrains them). A
    config edit that changes the choice retrains them, in the same invocation."""
    wd = copy_done(smoke_done, tmp_path / "wf")
    res = wd / "results" / "smoke"
    tuned = [res / "runs/digits/resnet8/msr" / tag / "seed0/summary.json" for tag in ("base", "bs32")]
    before = {p: p.stat().st_mtime_ns for p in tuned}
    chosen = chosen_factors(wd)[("digits", "resnet8", "msr")]
    (res / "runs/digits/resnet8/msr/val-lrx0.5/seed0/summary.json").unlink()
    done = snakemake(wd, "--cores", "2", *SMOKE)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "localcheckpoint select_lr" in done.stdout + done.stderr or "checkpoint select_lr" in done.stdout + done.stderr
    assert chosen_factors(wd)[("digits", "resnet8", "msr")] == chosen
    assert {p: p.stat().st_mtime_ns for p in tuned} == before

    # the candidates change: x1 replaces x2; whatever is chosen now, the tuned runs follow it
    overlay = tmp_path / "factors.yaml"
    overlay.write_text(yaml.safe_dump({"lr_selection": {"factors": [0.5, 1]}}))
    done = snakemake(wd, "--cores", "2", *SMOKE, str(overlay))
    assert done.returncode == 0, done.stderr[-5000:]
    now = chosen_factors(wd)[("digits", "resnet8", "msr")]
    assert now in (0.5, 1.0)
    base = json.loads((res / "runs/digits/resnet8/msr/base/seed0/config.json").read_text())
    assert base["lr_factor"] == now and base["lr"] == pytest.approx(0.4 * now)
    assert json.loads((res / "runs/digits/resnet8/msr/bs32/seed0/config.json").read_text())["lr_factor"] == now / 2
    done = snakemake(wd, "-n", *SMOKE, str(overlay))
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stdout + done.stderr

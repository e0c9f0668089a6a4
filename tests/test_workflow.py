"""The Snakemake pipeline: lint, dry-run job counts derived from the configs, schema errors that
name the bad key/value, notebooks stored as clean jupytext pairs, and a tiny end-to-end run
(workflow/config/smoke.yaml) that produces every figure, table and the manifest.

Every snakemake call runs in a copy of the workflow files (Snakefile, workflow/, notebooks/)
in a temporary folder, so the repository's own results/, data/ and figures/ never influence a
job count and are never written.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "workflow" / "config"
NOTEBOOKS = REPO / "notebooks"
FIGURES = ["fig1_curves", "fig2_mean_shift", "fig3_lr_stability", "fig4_isocline", "fig5_batch_size",
           "fig6_noise"]
TABLES = ["tab1_ablation", "tab2_cost"]
# per run of the pipeline besides train/prepare/download: aggregate, one job per notebook, manifest, all
ANALYSIS_JOBS = 1 + len(FIGURES) + len(TABLES) + 1 + 1


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    for folder in ("workflow", "notebooks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest


def snakemake(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


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


def expected_train_jobs(cfg: dict) -> int:
    """The number of runs a config asks for, derived independently of common.smk: the main grid
    datasets x archs x variants x seeds, plus every sweep point (dataset x arch x variant x value
    x seed) except those identical to a main-grid run (same resolved value, and the point's
    dataset/arch/variant/seed are in the main grid), which are reused."""
    from msr.variants import VARIANTS

    train = cfg["train"]
    main = (set(cfg["datasets"]), set(cfg["archs"]), set(cfg["variants"]), set(cfg["seeds"]))
    n = len(cfg["datasets"]) * len(cfg["archs"]) * len(cfg["variants"]) * len(cfg["seeds"])
    base_value = {
        "lr": lambda v: train.get("lr") or VARIANTS[v].lr,
        "batch_size": lambda v: train["batch_size"],
        # train.noise_delta only changes the variants that have noise
        "noise_delta": lambda v: train["noise_delta"] if train.get("noise_delta") is not None and VARIANTS[v].noise_delta > 0
        else VARIANTS[v].noise_delta,
    }
    for name, sweep in cfg.get("sweeps", {}).items():
        axes = [sweep.get("datasets") or cfg["datasets"], sweep.get("archs") or cfg["archs"],
                sweep.get("variants", []), sweep.get("values", []), sweep.get("seeds") or cfg["seeds"]]
        for d, a, v, value, s in product(*axes):
            reused = value == base_value[name](v) and d in main[0] and a in main[1] and v in main[2] and s in main[3]
            n += not reused
    return n


def expected_jobs(cfg: dict) -> dict[str, int]:
    datasets = set(cfg["datasets"])
    for sweep in cfg.get("sweeps", {}).values():
        if sweep.get("variants") and sweep.get("values"):
            datasets |= set(sweep.get("datasets") or [])
    counts = {"train": expected_train_jobs(cfg), "prepare": len(datasets),
              "download": len(datasets & {"cifar10", "cifar100"})}
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(counts.values()) + ANALYSIS_JOBS
    return counts


def load(name: str) -> dict:
    return yaml.safe_load((CONFIG / name).read_text())


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
    for rule in ["aggregate", "manifest", "all", *FIGURES, *TABLES]:
        assert counts[rule] == 1


def test_paper_profile_dry_run_lists_the_paper_grid_without_gpu_or_data(workdir):
    done = snakemake(workdir, "-n", "--quiet", "rules", "--workflow-profile", "workflow/profiles/paper")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    cfg = deep_merge(load("default.yaml"), load("paper.yaml"))
    expected = expected_jobs(cfg)
    assert {k: counts.get(k) for k in expected} == expected
    # the main grid alone: 2 datasets x 3 archs x 10 variants x 5 seeds
    assert cfg["datasets"] == ["cifar10", "cifar100"] and len(cfg["variants"]) == 10 and len(cfg["seeds"]) == 5
    assert expected["train"] > 2 * 3 * 10 * 5
    assert expected["download"] == 2


def test_train_jobs_get_only_their_own_options(workdir):
    done = snakemake(workdir, "-n", "-p", "--workflow-profile", "workflow/profiles/paper",
                     "results/runs/cifar10/resnet20/msr/bs8/seed1/summary.json")
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    cmd = next(line for line in out.splitlines() if "msr train" in line)
    # linear lr scaling from batch 128: 0.4 * 8 / 128; threads: the profile's 4, capped by the cores here
    for part in ["--dataset cifar10", "--arch resnet20", "--variant msr", "--seed 1", "--epochs 200",
                 "--batch-size 8", "--lr 0.025", "--device cuda", "--threads ",
                 "--out results/runs/cifar10/resnet20/msr/bs8/seed1"]:
        assert part in cmd, (part, cmd)
    assert "--image-size" not in cmd and "--noise-delta" not in cmd


def test_sweep_runs_probe_sparsely_main_grid_densely(workdir):
    cfg = load("default.yaml")["train"]
    done = snakemake(workdir, "-n", "-p", "results/runs/digits/resnet20/msr/base/seed0/summary.json",
                     "results/runs/digits/resnet20/msr/bs8/seed0/summary.json")
    assert done.returncode == 0, done.stderr
    cmds = {line.split("--out ")[1].split()[0]: line for line in (done.stdout + done.stderr).splitlines()
            if "msr train" in line}
    assert f"--probe-every {cfg['probe_every']} " in cmds["results/runs/digits/resnet20/msr/base/seed0"]
    assert f"--probe-every {cfg['sweep_probe_every']} " in cmds["results/runs/digits/resnet20/msr/bs8/seed0"]
    assert cfg["sweep_probe_every"] > cfg["probe_every"]


def test_global_noise_delta_changes_only_the_noisy_variants(workdir, tmp_path):
    overlay = tmp_path / "noise.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"noise_delta": 0.2}}))
    done = snakemake(workdir, "results/runs/digits/resnet20/msr_noise/base/seed0/summary.json",
                     "results/runs/digits/resnet20/msr/base/seed0/summary.json",
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
    ({"variants": ["msr", "bogus"]}, "'bogus' is not one of"),
    ({"datasets": ["mnist"]}, "'mnist' is not one of"),
    ({"epochs": 3}, "'epochs' was unexpected"),
    ({"train": {"epoch": 3}}, "'epoch' was unexpected"),
    ({"sweeps": {"lr": {"value": [0.1]}}}, "'value' was unexpected"),
    ({"sweeps": {"batch_size": {"values": [0]}}}, "0 is less than the minimum of 1"),
    ({"resources": {"gpus": 1}}, "'gpus' was unexpected"),
    ({"archs": ["vgg16"]}, "'vgg16' does not match"),
    ({"archs": ["resnet21"]}, "resnet21"),
    ({"sweeps": {"lr": {"archs": ["resnet22"], "variants": ["msr"], "values": [0.1]}}}, "resnet22"),
    ({"datasets": ["cifar10"], "train": {"image_size": 16}}, "image_size"),
    ({"analysis": {"probe_arch": "resnet56"}}, "probe_arch"),
])
def test_bad_config_stops_before_any_job_naming_the_problem(workdir, tmp_path, overlay, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    done = snakemake(workdir, "-n", "--configfile", str(bad))
    assert done.returncode != 0
    assert named in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Job stats" not in done.stdout + done.stderr


def test_schema_enums_match_the_library():
    from msr.data import DATASETS
    from msr.variants import VARIANTS

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["$defs"]["variant"]["enum"] == list(VARIANTS)
    assert schema["$defs"]["dataset"]["enum"] == list(DATASETS)


def test_cifar_folders_match_the_library():
    from msr import data

    text = (REPO / "workflow/rules/common.smk").read_text()
    for name in ("cifar10", "cifar100"):
        assert f'"{name}": "{data._cifar_source(name).folder}"' in text


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


# ------------------------------------------------------------------------------- end to end


def test_smoke_pipeline_end_to_end(tmp_path):
    """workflow/config/smoke.yaml (2 variants, 1 seed, 1 epoch, 8x8 images, one lr and one batch
    size point, no noise sweep) from a fresh copy: every figure (PNG + PDF), every table
    (CSV + Markdown + LaTeX) and the manifest; then nothing left to do; figures byte-identical
    when their notebooks rerun; analysis edits never retrain; the HTML report builds."""
    wd = copy_workflow(tmp_path / "wf")
    smoke = ["--configfile", "workflow/config/smoke.yaml"]
    done = snakemake(wd, "--cores", "2", *smoke)
    assert done.returncode == 0, done.stderr[-5000:]

    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (wd / "figures" / f"{name}.{ext}").stat().st_size > 1000
    for name in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (wd / "figures" / f"{name}.{ext}").stat().st_size > 0
    for name in FIGURES + TABLES:
        assert (wd / "results" / "notebooks" / f"{name}.ipynb").exists()

    runs = sorted(p.relative_to(wd / "results/runs").parent.as_posix()
                  for p in (wd / "results/runs").glob("*/*/*/*/*/summary.json"))
    cfg = deep_merge(load("default.yaml"), load("smoke.yaml"))
    assert len(runs) == expected_train_jobs(cfg) == 4
    assert "digits/resnet8/msr/lr0.8/seed0" in runs and "digits/resnet8/msr/bs32/seed0" in runs

    manifest = json.loads((wd / "figures/MANIFEST.json").read_text())
    assert sorted(i["name"] for i in manifest["items"]) == sorted(FIGURES + TABLES)
    import hashlib

    for item in manifest["items"]:
        for f in item["files"]:
            assert hashlib.sha256((wd / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    fig1 = next(i for i in manifest["items"] if i["name"] == "fig1_curves")
    assert fig1["runs"] == ["digits/resnet8/bn/base/seed0", "digits/resnet8/msr/base/seed0"]
    assert len(manifest["config_sha256"]) == 64 and set(manifest["run_config_sha256"]) == set(runs)

    t1 = (wd / "figures/tab1_ablation.md").read_text()
    for variant in ("bn", "msr"):
        assert re.search(rf"\|\s*digits\s*\|\s*resnet8\s*\|\s*{variant}\s*\|", t1), t1

    # nothing left to do
    done = snakemake(wd, "-n", *smoke)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stdout

    # deterministic bytes: rerun two notebooks, same figure and table files
    before = {i["name"]: i["files"] for i in manifest["items"]}
    done = snakemake(wd, "--cores", "2", *smoke, "--forcerun", "fig1_curves", "tab1_ablation")
    assert done.returncode == 0, done.stderr[-5000:]
    after = {i["name"]: i["files"] for i in json.loads((wd / "figures/MANIFEST.json").read_text())["items"]}
    assert after == before

    # editing a notebook reruns that notebook (and the manifest) only, never training; adding a
    # sweep point trains just that run: no train job's params depend on the rest of the config
    nb = wd / "notebooks" / "fig4_isocline.ipynb"
    nb.write_text(nb.read_text().replace("FLOOR = 1e-9", "FLOOR = 1e-10"))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"sweeps": {"noise_delta": {"variants": ["msr"], "values": [0.3], "seeds": [0]}}}))
    done = snakemake(wd, "-n", "--quiet", "rules", "--configfile", "workflow/config/smoke.yaml", str(extra))
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    assert counts.get("train") == 1 and "prepare" not in counts and counts.get("fig4_isocline") == 1, counts
    done = snakemake(wd, "-n", "--quiet", "rules", *smoke)
    counts = job_counts(done.stdout + done.stderr)
    assert "train" not in counts and "aggregate" not in counts and counts.get("fig4_isocline") == 1, counts

    # a run whose options changed starts over in its directory (msr refuses to mix configs);
    # a run whose summary is missing but whose options are unchanged resumes from its checkpoint
    run = "results/runs/digits/resnet8/bn/base/seed0"
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    done = snakemake(wd, f"{run}/summary.json", "--cores", "2", "--configfile", "workflow/config/smoke.yaml", str(longer))
    assert done.returncode == 0, done.stderr[-5000:]
    assert len((wd / run / "metrics.csv").read_text().splitlines()) == 1 + 2
    (wd / run / "summary.json").unlink()
    done = snakemake(wd, f"{run}/summary.json", "--cores", "2", "--configfile", "workflow/config/smoke.yaml", str(longer))
    assert done.returncode == 0, done.stderr[-5000:]
    assert "resuming after epoch 2" in (wd / "results/logs/train/digits/resnet8/bn/base/seed0.log").read_text()

    # the HTML report, with every figure
    done = snakemake(wd, *smoke, "--report", "results/report.html")
    assert done.returncode == 0, done.stderr[-5000:]
    assert (wd / "results/report.html").stat().st_size > 10_000

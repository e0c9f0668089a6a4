"""Training a set's runs elsewhere and bringing them back (msr.pipeline.plan, msr.infra.visit,
msr.infra.transfer): the plan is Snakemake's own dry run, the runner keeps the deadline and
leaves resumable runs, packing respects the device's limits, and import refuses anything but
run files - then Snakemake trains only what is left.

The end-to-end test plays both machines on this CPU with tiny runs: plan here -> run with 2
processes under a deadline there -> SIGTERM -> pack -> msr import here -> the runs are there,
Snakemake does not retrain the finished ones, and a stopped one resumes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from msr.infra import transfer, visit
from msr.pipeline import plan
from msr.training.config import RunConfig
from msr.training.loop import train

REPO = Path(__file__).resolve().parents[1]
DRY_RUN = """\
Building DAG of jobs...
Job stats:
job      count
-----  -------
train        3

[Fri Dec  4 18:06:19 2026]
rule prepare:
    output: data/processed/digits-8.pt
    log: results/t/logs/prepare/digits-8.log
    jobid: 1
    reason: Missing output files: data/processed/digits-8.pt
    wildcards: name=digits-8
    resources: tmpdir=/tmp
Shell command: msr prepare --dataset digits --data-root data --image-size 8    > results/t/logs/prepare/digits-8.log 2>&1

[Fri Dec  4 18:06:19 2026]
rule train:
    input: data/processed/digits-8.pt
    output: results/t/runs/digits/resnet8/zmi/base/seed0/summary.json
    log: results/t/logs/train/digits/resnet8/zmi/base/seed0.log
    jobid: 4
    wildcards: dataset=digits, arch=resnet8, variant=zmi, tag=base, seed=0
    threads: 1
Shell command: msr reset-run results/t/runs/digits/resnet8/zmi/base/seed0 '{"a":1}' > results/t/logs/train/digits/resnet8/zmi/base/seed0.log 2>&1 && msr train --dataset digits --arch resnet8 --variant zmi --seed 0 --epochs 2 --override 'lam=0.5' --threads 1 --gpu-slots 0 --out results/t/runs/digits/resnet8/zmi/base/seed0 >> results/t/logs/train/digits/resnet8/zmi/base/seed0.log 2>&1

rule train:
    output: results/t/runs/digits/resnet8/msr/lr0.8/seed0/summary.json
    log: results/t/logs/train/digits/resnet8/msr/lr0.8/seed0.log
    wildcards: dataset=digits, arch=resnet8, variant=msr, tag=lr0.8, seed=0
Shell command: msr reset-run x '{}' > l 2>&1 && /venv/bin/msr train --variant msr --seed 0 --lr 0.8 --threads 1 --gpu-slots 0 --out results/t/runs/digits/resnet8/msr/lr0.8/seed0 >> l 2>&1

rule train:
    output: results/t/runs/digits/resnet8/bn/base/seed1/summary.json
    log: results/t/logs/train/digits/resnet8/bn/base/seed1.log
    wildcards: dataset=digits, arch=resnet8, variant=bn, tag=base, seed=1
Shell command: msr train --variant bn --seed 1 --threads 2 --gpu-slots 4 --out results/t/runs/digits/resnet8/bn/base/seed1 >> l 2>&1
"""


# --------------------------------------------------------------------------- the plan
def test_plan_keeps_snakemakes_commands_in_priority_order():
    prepare, runs = plan.parse_dry_run(DRY_RUN)
    assert prepare == [["--dataset", "digits", "--data-root", "data", "--image-size", "8"]]
    zmi = runs[0]
    assert zmi.out == "results/t/runs/digits/resnet8/zmi/base/seed0"
    assert zmi.log == "results/t/logs/train/digits/resnet8/zmi/base/seed0.log"
    # the shell quoting is undone, the redirections are not options
    assert zmi.args == ["--dataset", "digits", "--arch", "resnet8", "--variant", "zmi", "--seed", "0", "--epochs", "2",
                        "--override", "lam=0.5", "--threads", "1", "--gpu-slots", "0", "--out", zmi.out]
    assert runs[1].args[-1] == "results/t/runs/digits/resnet8/msr/lr0.8/seed0"  # msr by its path
    ordered = plan.order(runs)
    # base runs of the priority variants first, then other base runs, then the sweeps
    assert [(r.variant, r.tag) for r in ordered] == [("bn", "base"), ("zmi", "base"), ("msr", "lr0.8")]


def test_plan_orders_priority_variants_seed_by_seed():
    runs = [plan.PlannedRun(out=f"r/{v}/{t}/seed{s}", log="", args=["--out", f"r/{v}/{t}/seed{s}"],
                            wildcards={"variant": v, "seed": str(s), "tag": t})
            for t in ("base", "lr0.1") for v in ("plain", "bn_noise", "msr", "bn") for s in (0, 1)]
    got = [(r.variant, r.seed, r.tag) for r in plan.order(runs)]
    assert got[:6] == [("bn", 0, "base"), ("msr", 0, "base"), ("bn_noise", 0, "base"),
                       ("bn", 1, "base"), ("msr", 1, "base"), ("bn_noise", 1, "base")]
    assert got[6:8] == [("plain", 0, "base"), ("plain", 1, "base")]
    assert all(t == "lr0.1" for _, _, t in got[8:])


WAITING_DRY_RUN = """
rule train:
    output: results/t/runs/digits/resnet8/bn/val-lrx0.5/seed0/summary.json
    log: results/t/logs/train/digits/resnet8/bn/val-lrx0.5/seed0.log
    wildcards: dataset=digits, arch=resnet8, variant=bn, tag=val-lrx0.5, seed=0
Shell command: msr train --variant bn --lr-factor 0.5 --eval-split validation --out results/t/runs/digits/resnet8/bn/val-lrx0.5/seed0 >> l 2>&1

rule train:
    output: results/t/runs/digits/resnet8/bn/base/seed0/summary.json
    log: results/t/logs/train/digits/resnet8/bn/base/seed0.log
    wildcards: dataset=digits, arch=resnet8, variant=bn, tag=base, seed=0
Shell command: msr train <TBD> --threads 1 --out results/t/runs/digits/resnet8/bn/base/seed0 >> l 2>&1

rule train:
    output: results/t/runs/digits/resnet8/zmi/base/seed0/summary.json
    log: results/t/logs/train/digits/resnet8/zmi/base/seed0.log
    wildcards: dataset=digits, arch=resnet8, variant=zmi, tag=base, seed=0
Shell command: msr train --variant zmi --threads 1 --out results/t/runs/digits/resnet8/zmi/base/seed0 >> l 2>&1
"""


def test_runs_waiting_for_the_lr_selection_are_left_out_and_validation_runs_come_first(tmp_path):
    # a tuned variant's main run waits for the checkpoint select_lr (<TBD> in a dry run): it
    # cannot run on the device yet; the validation runs that decide it go first
    made = plan.make_plan(WAITING_DRY_RUN)
    assert [r["out"].split("/")[-2] for r in made["runs"]] == ["val-lrx0.5", "base"]
    assert [r["wildcards"]["variant"] for r in made["runs"]] == ["bn", "zmi"]
    assert made["waiting"] == ["results/t/runs/digits/resnet8/bn/base/seed0"]
    path = tmp_path / "plan.json"
    plan.write_plan(made, path)
    assert len(plan.read_plan(path)[1]) == 2
    # a plan file that still has a waiting run (made by hand, or by an older msr) is refused
    made["runs"].append({"out": "o", "log": "", "args": ["<TBD>", "--out", "o"], "wildcards": {}})
    plan.write_plan(made, path)
    with pytest.raises(plan.PlanError, match="waits for the lr selection"):
        plan.read_plan(path)


def test_a_dry_run_without_commands_or_with_a_foreign_out_is_refused():
    with pytest.raises(plan.PlanError, match="printshellcmds"):
        plan.parse_dry_run("rule train:\n    output: a/summary.json\n")
    with pytest.raises(plan.PlanError, match="not the output's directory"):
        plan.parse_dry_run("rule train:\n    output: a/summary.json\nShell command: msr train --out b\n")


def test_jobs_set_only_how_a_run_runs_and_stack_seeds_of_one_run():
    _, runs = plan.parse_dry_run(DRY_RUN)
    jobs = visit.build_jobs(runs, threads=4, extra=["--cuda-graph"])
    argv = jobs[0].argv
    assert argv[0] == "train" and argv.count("--threads") == 1 and argv[argv.index("--threads") + 1] == "4"
    assert argv[argv.index("--gpu-slots") + 1] == "0" and argv[-1] == "--cuda-graph"
    assert "--override" in argv and "lam=0.5" in argv  # what the run computes is untouched
    seeds = [plan.PlannedRun(out=f"res/msr/base/seed{s}", log=f"logs/seed{s}.log",
                             args=["--variant", "msr", "--seed", str(s), "--threads", "1", "--out", f"res/msr/base/seed{s}"],
                             wildcards={"variant": "msr", "seed": str(s), "tag": "base"}) for s in range(5)]
    jobs = visit.build_jobs(seeds, stack=2)
    assert [len(j.runs) for j in jobs] == [2, 2, 1]
    assert jobs[0].argv == ["train", "--variant", "msr", "--threads", "1", "--seeds", "0,1", "--stacked",
                            "--out", "res/msr/base/seed{seed}", "--gpu-slots", "0", "--progress", "lines"]
    assert jobs[2].argv[:5] == ["train", "--variant", "msr", "--seed", "4"]


# --------------------------------------------------------------------------- import safety
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real complete run directory (digits, 1 epoch) at a pipeline path under its own root."""
    root = tmp_path_factory.mktemp("src")
    out = root / "results" / "t" / "runs" / "digits" / "resnet8" / "msr" / "base" / "seed0"
    before = Path.cwd()
    os.chdir(root)  # data_root "data", relative, as the pipeline records it
    try:
        train(RunConfig(dataset="digits", arch="resnet8", epochs=1, image_size=8, threads=1, train_subset=128,
                        data_root="data"), out, log=lambda *_: None)
    finally:
        os.chdir(before)
    log = root / "results" / "t" / "logs" / "train" / "digits" / "resnet8" / "msr" / "base" / "seed0.log"
    log.parent.mkdir(parents=True)
    log.write_text("trained\n")
    return root


RUN = "results/t/runs/digits/resnet8/msr/base/seed0"
LOG = "results/t/logs/train/digits/resnet8/msr/base/seed0.log"


def _clone(tmp_path: Path, src: Path) -> Path:
    """A destination root with the processed data the run depends on."""
    dest = tmp_path / "clone"
    shutil.copytree(src / "data", dest / "data")
    return dest


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_pack_and_import_a_finished_run(tmp_path, finished_run):
    packed = transfer.pack_runs(finished_run, [(RUN, LOG)], tmp_path / "out")
    assert [f.name for f in packed.files] == ["runs-1.tar.gz"] and packed.runs == {RUN: "runs-1.tar.gz"}
    with tarfile.open(packed.files[0]) as tar:
        names = set(tar.getnames())
    assert f"{RUN}/checkpoint.pt" not in names  # finished: no checkpoint travels
    assert {f"{RUN}/summary.json", f"{RUN}/metrics.csv", f"{RUN}/probes.csv", f"{RUN}/config.json", LOG} == names
    dest = _clone(tmp_path, finished_run)
    done = transfer.import_runs(packed.files, dest, log=lambda *_: None)
    assert done.added == [RUN] and done.logs == 1
    assert (dest / RUN / "metrics.csv").read_text() == (finished_run / RUN / "metrics.csv").read_text()
    assert (dest / LOG).read_text() == "trained\n"
    assert not list((dest / "results").glob(".import-*"))  # the staging folder is gone
    again = transfer.import_runs(packed.files, dest, log=lambda *_: None)
    assert again.kept == [RUN] and not again.added  # complete here: kept


def test_import_replaces_a_partial_run_here_only_by_one_further_along(tmp_path, finished_run):
    dest = _clone(tmp_path, finished_run)
    here = dest / RUN
    shutil.copytree(finished_run / RUN, here)
    (here / "summary.json").unlink()  # stopped here after the same epoch: partial
    partial = transfer.pack_runs(finished_run, [(RUN, None)], tmp_path / "p")  # complete there
    with tarfile.open(partial.files[0]) as tar:
        assert f"{RUN}/summary.json" in tar.getnames()
    done = transfer.import_runs(partial.files, dest, log=lambda *_: None)
    assert done.replaced == [RUN] and (here / "summary.json").exists() and not (here / "checkpoint.pt").exists()
    # a partial tarball run (its checkpoint travels) is no better than the complete run here
    src = tmp_path / "src2"
    shutil.copytree(finished_run, src)
    (src / RUN / "summary.json").unlink()
    stopped = transfer.pack_runs(src, [(RUN, None)], tmp_path / "s")
    with tarfile.open(stopped.files[0]) as tar:
        assert f"{RUN}/checkpoint.pt" in tar.getnames()
    assert transfer.import_runs(stopped.files, dest, log=lambda *_: None).kept == [RUN]


def test_import_needs_the_processed_data_first(tmp_path, finished_run):
    packed = transfer.pack_runs(finished_run, [(RUN, None)], tmp_path / "out")
    (tmp_path / "bare").mkdir()
    with pytest.raises(transfer.TransferError, match="msr prepare --dataset digits"):
        transfer.import_runs(packed.files, tmp_path / "bare", log=lambda *_: None)
    assert not (tmp_path / "bare" / RUN).exists()


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_file("/etc/evil"), "unsafe path"),
        (_file("results/t/runs/../../../evil/x/y/z/seed0/summary.json"), "unsafe path"),
        (_file("results/t/runs/d/a/v/base/seed0/evil.py"), "not a run file"),
        (_file("results/t/figures/x.png"), "not a run file or train log"),
        (_file("results/t/runs/d/a/v/base/seed0/sum mary.json"), "unsafe path"),
    ],
)
def test_import_refuses_paths_outside_the_run_layout(tmp_path, finished_run, member, message):
    bad = _tar(tmp_path / "bad.tar.gz", [member])
    dest = _clone(tmp_path, finished_run)
    with pytest.raises(transfer.TransferError, match=message):
        transfer.import_runs([bad], dest, log=lambda *_: None)
    assert sorted(p.name for p in (dest / "results").iterdir()) == []  # nothing landed, no staging left


def test_import_refuses_links_devices_and_lying_sizes(tmp_path, finished_run):
    dest = _clone(tmp_path, finished_run)
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE):
        info = tarfile.TarInfo(f"{RUN}/summary.json")
        info.type, info.linkname = kind, "/etc/passwd"
        bad = _tar(tmp_path / f"link{kind!r}.tar.gz", [(info, None)])
        with pytest.raises(transfer.TransferError, match="not a regular file"):
            transfer.import_runs([bad], dest, log=lambda *_: None)
    info, _ = _file(f"{RUN}/summary.json", b"x" * 10)
    info.size = transfer.MAX_FILE_BYTES + 1
    raw = tmp_path / "big.tar"
    with open(raw, "wb") as f:  # a header that claims more than the limit
        f.write(info.tobuf())
    with pytest.raises(transfer.TransferError, match="over the"):
        transfer.import_runs([raw], dest, log=lambda *_: None)
    assert not (dest / RUN).exists()


def test_import_checks_runs_before_they_move(tmp_path, finished_run):
    """A summary.json whose metrics disagree (a damaged or crafted run) is not imported."""
    members = []
    for name in ("config.json", "metrics.csv", "probes.csv", "summary.json"):
        data = (finished_run / RUN / name).read_bytes()
        if name == "summary.json":
            s = json.loads(data)
            s["final_test_acc"] = 0.99
            data = json.dumps(s).encode()
        members.append(_file(f"{RUN}/{name}", data))
    bad = _tar(tmp_path / "forged.tar.gz", members)
    dest = _clone(tmp_path, finished_run)
    with pytest.raises(transfer.TransferError, match=re.escape(RUN)):
        transfer.import_runs([bad], dest, log=lambda *_: None)
    assert not (dest / RUN).exists()


def test_pack_splits_by_size_and_says_what_did_not_fit(tmp_path):
    root = tmp_path / "root"
    runs = []
    for i in range(5):
        d = root / f"results/t/runs/d/a/v/base/seed{i}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text("{}")
        (d / "metrics.csv").write_bytes(os.urandom(400_000))  # incompressible
        runs.append((str(d.relative_to(root)), None))
    packed = transfer.pack_runs(root, runs, tmp_path / "out", max_files=2, max_bytes=900_000)
    assert len(packed.files) == 2 and all(f.stat().st_size <= 900_000 for f in packed.files)
    assert len(packed.runs) == 4 and packed.left_out == [runs[4][0]]  # 2 runs a tarball, the fifth left out, not cut


# --------------------------------------------------------------------------- both machines, on this CPU
def _workflow_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    shutil.copytree(REPO / "workflow", dest / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "notebooks", dest / "notebooks", ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest


def _msr(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MSR_PREFORK_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "msr", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _config(cwd: Path, name: str, epochs: int) -> Path:
    path = cwd / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "datasets": ["digits"], "archs": ["resnet8"], "variants": ["msr", "bn"], "seeds": [0, 1],
        "train": {"epochs": epochs, "batch_size": 64, "image_size": 8, "train_subset": 256, "probe_every": 5,
                  "device": "cpu"},
        "sweeps": {k: {"variants": [], "values": []} for k in ("lr", "batch_size", "noise_delta")},
        "lr_selection": {"variants": []},  # every run plannable at once (a selection: test_runs_waiting_...)
        "resources": {"threads": 1},
    }))
    return path


def _train_jobs(cwd: Path, config: Path) -> int:
    done = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "1", "--configfile", config.name],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = re.search(r"^train\s+(\d+)\s*$", done.stdout, flags=re.M)
    return int(m.group(1)) if m else 0


@pytest.mark.slow
def test_a_visit_on_this_cpu_plan_run_stop_pack_import_resume(tmp_path):
    here, there = _workflow_copy(tmp_path / "here"), _workflow_copy(tmp_path / "there")
    out = tmp_path / "OUT"

    # 1. finished runs: planned here, trained there by 2 processes, imported here
    cfg = _config(here, "visit", epochs=1)
    done = _msr(here, "plan-runs", "--out", str(there / "plan.json"), "--", "--cores", "1", "--configfile", cfg.name)
    assert done.returncode == 0, done.stderr
    planned = json.loads((there / "plan.json").read_text())
    assert [(r["wildcards"]["variant"], r["wildcards"]["seed"]) for r in planned["runs"]] == [
        ("bn", "0"), ("msr", "0"), ("bn", "1"), ("msr", "1")]  # priority order, seed by seed
    done = _msr(there, "run-plan", "plan.json", "--procs", "2", "--deadline-s", "240", "--status", str(out / "status.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["runs_finished"] == 4 and status["steps_done"] == 4 * 4 and status["gpu_seconds_per_step"] > 0
    assert all(r["process_wall_s"] > 0 and r["epochs"] == 1 for r in status["runs"])
    assert _msr(there, "pack-runs", "--status", str(out / "status.json"), "--out", str(out)).returncode == 0
    tarball = out / "runs-1.tar.gz"
    refused = _msr(here, "import", str(tarball))  # the processed data is not here yet
    assert refused.returncode == 2 and "msr prepare --dataset digits" in refused.stderr
    assert _msr(here, "prepare", "--dataset", "digits", "--data-root", "data", "--image-size", "8").returncode == 0
    done = _msr(here, "import", str(tarball))
    assert done.returncode == 0 and "4 run(s) added" in done.stdout, done.stderr
    assert _train_jobs(here, cfg) == 0  # Snakemake trains none of them again

    # 2. a deadline: 2 long runs stopped by SIGTERM (each after a checkpoint), 2 never started
    long_cfg = _config(here, "visit-long", epochs=5000)
    assert _msr(here, "plan-runs", "--out", str(there / "long.json"), "--", "--cores", "1", "--configfile", long_cfg.name).returncode == 0
    done = _msr(there, "run-plan", "long.json", "--procs", "2", "--deadline-s", "60", "--min-start-s", "20",
                "--grace-s", "10", "--status", str(out / "long.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads((out / "long.json").read_text())
    states = [(r["job_state"], r["state"]) for r in status["runs"]]
    assert states == [("stopped", "partial")] * 2 + [("not_started", "not_started")] * 2, states
    assert _msr(there, "pack-runs", "--status", str(out / "long.json"), "--out", str(out / "long")).returncode == 0
    done = _msr(here, "import", str(out / "long" / "runs-1.tar.gz"))
    assert done.returncode == 0 and "2 run(s) added" in done.stdout, done.stderr
    assert _train_jobs(here, long_cfg) == 4  # 2 to resume, 2 to start: nothing lost, nothing extra
    first = status["runs"][0]
    run_dir = here / first["out"]
    epochs = first["epochs"]
    assert epochs >= 1 and (run_dir / "checkpoint.pt").exists()
    said: list[str] = []
    cfg_run = RunConfig(dataset="digits", arch="resnet8", variant=first["wildcards"]["variant"], seed=0, epochs=5000,
                        batch_size=64, image_size=8, train_subset=256, probe_every=5, device="cpu", threads=1,
                        data_root=str(here / "data"))
    # SIGTERM may land between the epoch's metrics.csv and its checkpoint: the resume goes on
    # from the checkpoint (one epoch behind metrics.csv then, that epoch trained again)
    checkpointed = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    assert checkpointed in (epochs, epochs - 1)
    train(cfg_run, run_dir, log=said.append, stop_after_epoch=epochs + 1)
    assert any(f"resuming after epoch {checkpointed}" in line for line in said), said

"""Data-parallel training (msr.training.distributed): 2 gloo processes under torchrun against one
process at the same global batch - msr equal up to float rounding, BatchNorm only with SyncBN -
and the run-directory contract (rank 0 alone writes; resume; rank 0's errors reach every rank).

The multi-process tests launch ``python -m torch.distributed.run --standalone`` (a free port
of its own) on a small script that calls ``msr.training.loop.train`` on every rank; a rank
other than 0 may be given its own ``out``, which must stay absent (it never creates a file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from msr.cli import main as msr_main
from msr.core.method import BlockInputNoise
from msr.data import DeviceLoader
from msr.training.config import RunConfig
from msr.training.distributed import DistributedError, bn_batch, from_env, recorded_bn_batch
from msr.training.loop import train

FILES = ["config.json", "metrics.csv", "probes.csv", "summary.json", "checkpoint.pt"]
# what float rounding leaves after a few steps (observed: ~1e-7), and what a real difference
# in the algorithm gives (bn without SyncBN: ~1e-2)
ROUNDING = 1e-5
DIFFERENT = 1e-3


def tiny(data_root, **kw) -> dict:
    """ResNet-8 on 8x8 digits, 4 steps an epoch (256 images, batch 64)."""
    values = dict(dataset="digits", arch="resnet8", variant="msr", epochs=1, seed=0, batch_size=64,
                  image_size=8, data_root=str(data_root), threads=1, train_subset=256, probe_every=3)
    values.update(kw)
    return values


# --------------------------------------------------------------------------- without processes
def _images(n=40, c=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_loader_yields_each_ranks_rows_of_the_global_batch(world):
    x, y = _images()
    common = dict(batch_size=8, mean=[0.5] * 3, std=[0.25] * 3, train=True, seed=3, crop_padding=2, flip=True)
    whole = DeviceLoader(x, y, **common)
    shards = [DeviceLoader(x, y, shard=(r, world), **common) for r in range(world)]
    assert all(len(s) == len(whole) == 5 for s in shards)
    for epoch in (1, 2):
        for loader in [whole, *shards]:
            loader.set_epoch(epoch)
        for (wx, wy), *parts in zip(whole, *shards, strict=True):
            assert all(len(py) == 8 // world for _, py in parts)
            assert torch.equal(torch.cat([px for px, _ in parts]), wx)  # same samples, crops, flips
            assert torch.equal(torch.cat([py for _, py in parts]), wy)


def test_sharded_loader_refuses_what_does_not_split():
    x, y = _images()
    common = dict(mean=[0.5] * 3, std=[0.25] * 3, seed=0)
    with pytest.raises(ValueError, match="batch_size=9 must be divisible by the 2"):
        DeviceLoader(x, y, batch_size=9, train=True, shard=(0, 2), **common)
    with pytest.raises(ValueError, match="only a train loader is sharded"):
        DeviceLoader(x, y, batch_size=8, train=False, shard=(0, 2), **common)
    with pytest.raises(ValueError, match="whole global batches"):
        DeviceLoader(x, y, batch_size=8, train=True, drop_last=False, shard=(1, 2), **common)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        DeviceLoader(x, y, batch_size=8, train=True, shard=(2, 2), **common)


@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_noise_of_a_rank_is_its_rows_of_the_global_batchs_noise(dist):
    x = torch.ones(8, 5, 3, 3)
    noise = BlockInputNoise(0.3, dist)
    torch.manual_seed(7)
    whole = noise(x)
    parts = []
    for rank in range(2):
        torch.manual_seed(7)  # every rank's global RNG is in the same state
        noise.shard = (rank, 2)
        parts.append(noise(x[:4]))
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[0], parts[1])  # different values on different ranks


def test_torchrun_environment():
    assert from_env(environ={}) is None  # no torchrun: today's single process
    assert from_env(environ={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    d = from_env(sync_bn=False, environ={"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.sync_bn, d.is_main) == (3, 4, 1, False, False)
    assert d.device("cuda") == torch.device("cuda", 1) and d.device("cpu") == torch.device("cpu")
    with pytest.raises(DistributedError, match="out of range"):
        from_env(environ={"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(DistributedError, match="not integers"):
        from_env(environ={"WORLD_SIZE": "two"})


def test_bn_batch_says_when_the_split_changes_the_algorithm():
    assert bn_batch("none", 128, 4, False) is None  # no BatchNorm: any split is the same run
    assert bn_batch("bn", 128, 4, True) == 128  # SyncBN: the global batch's statistics
    assert bn_batch("bn", 128, 4, False) == 32  # each rank's shard
    single = {"batch_size": 128, "variant_spec": {"norm": "bn"}}
    assert recorded_bn_batch(single) == 128
    assert recorded_bn_batch({**single, "distributed": {"world_size": 4, "bn_batch": 32}}) == 32
    assert recorded_bn_batch({"batch_size": 128, "variant_spec": {"norm": "none"}}) is None


def test_no_sync_bn_needs_a_data_parallel_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert msr_main(["train", "--out", str(tmp_path / "r"), "--no-sync-bn"]) == 2
    assert "--no-sync-bn applies to a data-parallel run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 2 processes
SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys
    from msr.training.config import RunConfig
    from msr.training.distributed import from_env, init_process_group, leave
    from msr.training.loop import train

    ctx = from_env()
    init_process_group(ctx, "cpu")
    for i, job in enumerate(json.loads(open(sys.argv[1]).read())):
        rank_ctx = dataclasses.replace(ctx, sync_bn=job.get("sync_bn", True))
        out = job["out"] if ctx.rank == 0 or "out_other" not in job else job["out_other"]
        try:
            s = train(RunConfig.from_dict(job["cfg"]), out, dist=rank_ctx, stop_after_epoch=job.get("stop"),
                      log=lambda *a, **k: None)
            res = {"status": s["status"]}
        except Exception as err:
            res = {"error": type(err).__name__, "message": str(err)}
        with open(f"{sys.argv[2]}.rank{ctx.rank}", "a") as f:  # one file a rank: stdout lines interleave
            f.write(json.dumps({"rank": ctx.rank, "job": i, **res}) + "\\n")
    leave()
''')


def torchrun(tmp_path, jobs: list[dict], name: str) -> dict[tuple[int, int], dict]:
    """Run ``jobs`` (train() calls) on 2 gloo processes; (rank, job) -> its result line."""
    script, spec = tmp_path / f"{name}.py", tmp_path / f"{name}.json"
    script.write_text(SCRIPT)
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(spec), str(tmp_path / f"{name}.results")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for rank in (0, 1):
        path = tmp_path / f"{name}.results.rank{rank}"
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            results[r["rank"], r["job"]] = r
    assert len(results) == 2 * len(jobs), proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def model_state(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def max_diff(a: dict, b: dict, buffers: bool = False) -> float:
    keys = [k for k in a if ("running" in k) == buffers and "num_batches" not in k]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """One launch: msr, msr_noise, bn with and without SyncBN on 2 processes (rank 1 given an
    ``out`` of its own); the same three on one process."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    jobs = [{"cfg": tiny(data, variant=v), "out": str(tmp / f"{name}_2"), "out_other": str(tmp / f"{name}_2_rank1"),
             **({"sync_bn": False} if name == "bn_local" else {})}
            for name, v in [("msr", "msr"), ("msr_noise", "msr_noise"), ("bn_sync", "bn"), ("bn_local", "bn")]]
    results = torchrun(tmp, jobs, "split")
    for v in ("msr", "msr_noise", "bn"):
        train(RunConfig.from_dict(tiny(data, variant=v)), tmp / f"{v}_1", log=quiet)
    return tmp, results


def test_two_processes_ran_and_only_rank_0_wrote(split_runs):
    tmp, results = split_runs
    assert all(r.get("status") == "completed" for r in results.values()), results
    for name in ("msr", "msr_noise", "bn_sync", "bn_local"):
        assert sorted(p.name for p in (tmp / f"{name}_2").iterdir()) == sorted(FILES)
        assert not (tmp / f"{name}_2_rank1").exists()  # rank 1 created nothing, not even its folder
    cfg = json.loads((tmp / "msr_2" / "config.json").read_text())
    assert cfg["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": True, "bn_batch": None}
    assert cfg["batch_size"] == 64  # the global batch
    assert "distributed" not in json.loads((tmp / "msr_1" / "config.json").read_text())
    local = json.loads((tmp / "bn_local_2" / "config.json").read_text())["distributed"]
    assert (local["sync_bn"], local["bn_batch"]) == (False, 32)


def test_msr_on_two_processes_is_the_one_process_run(split_runs):
    """ZMG runs on the averaged gradient: 2 x 32 = 1 x 64 up to float rounding."""
    tmp, _ = split_runs
    assert max_diff(model_state(tmp / "msr_2"), model_state(tmp / "msr_1")) < ROUNDING
    m2 = (tmp / "msr_2" / "metrics.csv").read_text().splitlines()[1].split(",")
    m1 = (tmp / "msr_1" / "metrics.csv").read_text().splitlines()[1].split(",")
    assert m2[:3] == m1[:3]  # epoch, step, lr
    # train loss / acc over the global batch (summed over the ranks), clean and test numbers
    assert [float(v) for v in m2[3:9]] == pytest.approx([float(v) for v in m1[3:9]], rel=1e-4)


def test_noise_on_two_processes_is_the_one_process_runs_noise(split_runs):
    tmp, _ = split_runs
    noisy2, noisy1 = model_state(tmp / "msr_noise_2"), model_state(tmp / "msr_noise_1")
    assert max_diff(noisy2, noisy1) < ROUNDING
    assert max_diff(noisy1, model_state(tmp / "msr_1")) > DIFFERENT  # the noise was drawn and mattered


def test_bn_needs_syncbn_to_be_the_one_process_run(split_runs):
    tmp, _ = split_runs
    one, synced, local = (model_state(tmp / f"{n}") for n in ("bn_1", "bn_sync_2", "bn_local_2"))
    assert max_diff(synced, one) < ROUNDING
    assert max_diff(synced, one, buffers=True) < 1e-4  # the global batch's running statistics
    # each rank normalizing its own 32 samples is another algorithm
    assert max_diff(local, one) > DIFFERENT
    assert max_diff(local, one, buffers=True) > DIFFERENT


@pytest.mark.slow
def test_resume_and_errors_on_two_processes(tmp_path):
    """A 2-process run stopped after epoch 1 and resumed equals the uninterrupted one, bitwise
    (msr_noise: the RNG; bn without SyncBN: rank 0's running statistics restored on every rank);
    a diverging run stops on every rank at the single-process run's step; an error of rank 0
    before training ends every rank with its message, none hangs."""
    data = tmp_path / "data"
    jobs = []
    for v, extra in (("msr_noise", {}), ("bn", {"sync_bn": False})):
        cfg = tiny(data, variant=v, epochs=2)
        jobs += [{"cfg": cfg, "out": str(tmp_path / f"{v}_whole"), **extra},
                 {"cfg": cfg, "out": str(tmp_path / f"{v}_resumed"), "stop": 1, **extra},
                 {"cfg": cfg, "out": str(tmp_path / f"{v}_resumed"), **extra}]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes(b"not a checkpoint")  # and no config.json: refused
    jobs.append({"cfg": tiny(data), "out": str(damaged)})
    diverging = tiny(data, variant="plain", lr=1000.0, epochs=2)
    jobs.append({"cfg": diverging, "out": str(tmp_path / "diverged_2")})
    results = torchrun(tmp_path, jobs, "resume")

    for rank in (0, 1):
        assert [results[rank, j].get("status") for j in range(6)] == ["completed", "interrupted", "completed"] * 2
    for v in ("msr_noise", "bn"):
        whole, resumed = tmp_path / f"{v}_whole", tmp_path / f"{v}_resumed"
        a, b = model_state(whole), model_state(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a)
        strip = lambda p: [",".join(r.split(",")[:9]) for r in p.read_text().splitlines()]  # noqa: E731 - no timings
        assert strip(whole / "metrics.csv") == strip(resumed / "metrics.csv")
        assert (whole / "probes.csv").read_text() == (resumed / "probes.csv").read_text()

    err0, err1 = results[0, 6], results[1, 6]
    assert err0["error"] == "RunDirError" and "config.json" in err0["message"]
    assert err1["error"] == "DistributedError" and err1["message"].startswith("rank 0 stopped: RunDirError")

    assert results[0, 7]["status"] == results[1, 7]["status"] == "diverged"
    one = train(RunConfig.from_dict(diverging), tmp_path / "diverged_1", log=quiet)
    two = json.loads((tmp_path / "diverged_2" / "summary.json").read_text())
    assert one["status"] == "diverged" and one["diverged_at_step"] >= 1
    assert (two["diverged_at_step"], two["steps"], two["epochs_completed"]) == (
        one["diverged_at_step"], one["steps"], one["epochs_completed"])


# --------------------------------------------------------------------------- msr comm
def test_comm_refuses_what_it_cannot_measure(tmp_path, capsys):
    assert msr_main(["comm", "--variant", "bn,nope", "--out", str(tmp_path)]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
    assert msr_main(["comm", "--processes", "1", "--out", str(tmp_path)]) == 2
    assert "needs at least 2" in capsys.readouterr().err
    assert msr_main(["comm", "--batch-size", "15", "--out", str(tmp_path)]) == 2
    assert "divisible by --processes 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_comm_counts_syncbn_collectives_and_gradient_buckets(tmp_path):
    """ResNet-8 has 7 BatchNorm layers: SyncBN adds an all-gather (2C+1 floats) in each forward and
    an all-reduce (2C floats) in each backward; msr and per-rank BN communicate the gradient only."""
    from msr.core.variants import build

    out = tmp_path / "comm"
    assert msr_main(["comm", "--arch", "resnet8", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                     "--out", str(out)]) == 0
    result = json.loads((out / "comm.json").read_text())
    rows = {(r["variant"], r["bn"], r["processes"]): r for r in result["rows"]}
    assert set(rows) == {("bn", "BN", 1), ("msr", "-", 1), ("bn", "SyncBN", 2), ("bn", "local", 2), ("msr", "-", 2)}
    n_params = {v: sum(p.numel() for p in build(v, depth=8).model.parameters()) for v in ("bn", "msr")}
    channels = [16, 16, 16, 32, 32, 64, 64]  # stem, then two convs a block
    sync, local, msr = rows["bn", "SyncBN", 2], rows["bn", "local", 2], rows["msr", "-", 2]
    assert sync["bn_collectives_per_step"] == 2 * len(channels)
    assert sync["by_collective"].split() == ["all_gather=7", "all_reduce=7", f"grad_bucket_all_reduce={sync['grad_allreduces_per_step']:g}"]
    assert sync["bn_bytes_per_step"] == 4 * sum((2 * c + 1) + 2 * c for c in channels)
    for row, variant in ((sync, "bn"), (local, "bn"), (msr, "msr")):
        assert row["grad_allreduces_per_step"] >= 1
        assert row["grad_bytes_per_step"] == 4 * n_params[variant]  # every fp32 gradient, once
    assert local["bn_collectives_per_step"] == msr["bn_collectives_per_step"] == 0
    assert rows["msr", "-", 1]["collectives_per_step"] == 0
    assert result["environment"]["backend"] == "gloo" and result["environment"]["allreduce_latency_us"] > 0
    table = (out / "comm.md").read_text()
    assert f"| bn | SyncBN | 2 | {sync['collectives_per_step']:.3g} | {sync['grad_allreduces_per_step']:.3g} | 14 |" in table
    assert (out / "comm.csv").read_text().splitlines()[0].startswith("variant,bn,processes")


@pytest.mark.slow
def test_msr_train_under_torchrun(tmp_path):
    """The command a user runs: torchrun -m msr train joins the group, trains, leaves; exit 0."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--out", str(out), "--dataset", "digits", "--arch", "resnet8", "--variant", "bn", "--epochs", "1",
            "--batch-size", "64", "--image-size", "8", "--train-subset", "128", "--threads", "1",
            "--data-root", str(tmp_path / "data")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "msr", *args], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    record = json.loads((out / "config.json").read_text())["distributed"]
    assert record == {"world_size": 2, "backend": "gloo", "sync_bn": True, "bn_batch": 64}
    assert proc.stdout.count("completed; final test acc") == 1  # rank 0 alone reports

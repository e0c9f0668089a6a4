"""``msr comm``: what a data-parallel training step communicates, measured (the abstract's claim
that batch statistics cost a communication bottleneck in distributed training).

For each variant the same training step as ``msr train`` under torchrun (msr.training.step,
msr.training.distributed: DDP, SyncBN for a BatchNorm net) runs on P processes spawned here
(gloo on CPU, NCCL on GPU, one process per GPU) on synthetic CIFAR-shaped batches (3 x 32 x 32,
10 classes; the global batch split as training splits it). Per step it counts:

- ``grad``: the gradient all-reduces DDP launches, one per bucket (a DDP comm hook that
  counts each bucket, then averages it as DDP's default does);
- ``bn``: every other collective during the step - SyncBN's statistics all-gather in each BN
  layer's forward and its all-reduce in the backward (torch.distributed has no counter: the
  collectives are wrapped for the measurement, msr.training.syncbn and torch's SyncBN call
  them through ``torch.distributed``);
- bytes: the payload each rank contributes (a ring all-reduce moves about 2 (P-1)/P times it
  over the wire; an all-gather (P-1) times);
- ``blocking_ms``: time spent inside synchronous collectives (SyncBN's: the layer waits for
  them; DDP's bucket all-reduces are asynchronous, overlapped with the backward pass);
- the step time (median over the timed steps, after warm-up) and images/s of the global batch;
  and, for reference, one process at the same global batch with the threads of one of the P
  (no collectives; all the cores in one process would measure OpenMP on a shared machine).

A BatchNorm variant is measured twice: with SyncBN (the single-process algorithm) and with
each rank's own statistics (``local``: no BN collectives, another algorithm). Output: a CSV, a
Markdown table and the environment as JSON in ``--out`` (written atomically). The numbers are
one machine's; docs/architecture.md ("Data-parallel training") says what changes across nodes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from msr import atomic
from msr.core.models import parse_arch
from msr.core.variants import build, get_spec
from msr.machine import machine_record
from msr.training.distributed import Distributed, prepare_model, wrap
from msr.training.step import OneModel, TrainStep

# every collective a training step could call through torch.distributed
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")
COLUMNS = ["variant", "bn", "processes", "arch", "global_batch", "collectives_per_step", "grad_allreduces_per_step",
           "bn_collectives_per_step", "bytes_per_step", "grad_bytes_per_step", "bn_bytes_per_step",
           "blocking_ms_per_step", "step_ms", "images_per_s", "by_collective"]


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0


class CollectiveCounter:
    """Counts the collectives of a step: calls, payload bytes, time blocked in synchronous ones."""

    def __init__(self) -> None:
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        self.reset()

    def reset(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.blocking_s = 0.0

    def install(self) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrapped(name, fn))

    def uninstall(self) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def _wrapped(self, name: str, fn):
        def call(*args, **kwargs):
            # the payload this rank contributes: the tensor it sends (for all_gather and its
            # kin the second positional argument; for the rest the first)
            sent = args[1] if name.startswith("all_gather") and len(args) > 1 else (args[0] if args else kwargs.get("tensor"))
            self.calls[name] += 1
            self.bytes[name] += _nbytes(sent)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if not kwargs.get("async_op", False):
                self.blocking_s += time.perf_counter() - t0
            return out
        return call

    def gradient_hook(self, world: int):
        """A DDP comm hook: count the bucket, then average it as DDP's default hook does."""
        all_reduce = self.originals["all_reduce"]

        def hook(_state, bucket):  # no annotations: DDP checks them, and they are strings here
            buf = bucket.buffer()
            self.calls["grad_bucket_all_reduce"] += 1
            self.bytes["grad_bucket_all_reduce"] += _nbytes(buf)
            buf.div_(world)
            return all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])
        return hook


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(global_batch: int, steps: int, image_size: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(global_batch, 3, image_size, image_size, generator=g)
        y = torch.randint(0, 10, (global_batch,), generator=g)
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y.to(device)


def measure(job: dict, *, rank: int, world: int, device: torch.device, counter: CollectiveCounter | None) -> dict:
    """One variant's step: warm-up, then ``steps`` timed steps, counted (``world`` > 1) or not."""
    torch.manual_seed(0)
    variant = build(job["variant"], depth=parse_arch(job["arch"]), num_classes=10, in_channels=3)
    if world > 1:
        ctx = Distributed(rank=rank, world_size=world, local_rank=device.index or 0, sync_bn=job["sync_bn"])
        variant.model = prepare_model(variant.model, ctx, norm=variant.spec.norm, device=device)
    model = variant.model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(variant.param_groups(), momentum=0.9, fused=device.type == "cuda" or None)
    forward = model
    if world > 1:
        forward = wrap(model, ctx, device)
        forward.register_comm_hook(None, counter.gradient_hook(world))
    amp = torch.bfloat16 if device.type == "cuda" else None
    step = TrainStep(OneModel(variant, forward=forward, device_type=device.type, amp_dtype=amp), optimizer)
    local = job["batch_size"] // world
    times = []
    for i, (x, y) in enumerate(_batches(job["batch_size"], job["warmup"] + job["steps"], job["image_size"], device, True)):
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        if i == job["warmup"]:
            _sync(device)
            if world > 1:
                dist.barrier()
                counter.reset()
        t0 = time.perf_counter()
        step(x, y)
        _sync(device)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    n = job["steps"]
    row = {"variant": job["variant"], "bn": job["bn"], "processes": world, "arch": job["arch"],
           "global_batch": job["batch_size"], "step_ms": 1e3 * statistics.median(times)}
    row["images_per_s"] = job["batch_size"] / (row["step_ms"] / 1e3)
    calls = counter.calls if world > 1 else Counter()
    sizes = counter.bytes if world > 1 else Counter()
    grad_calls, grad_bytes = calls["grad_bucket_all_reduce"], sizes["grad_bucket_all_reduce"]
    row.update(
        collectives_per_step=sum(calls.values()) / n,
        grad_allreduces_per_step=grad_calls / n,
        bn_collectives_per_step=(sum(calls.values()) - grad_calls) / n,
        bytes_per_step=sum(sizes.values()) / n,
        grad_bytes_per_step=grad_bytes / n,
        bn_bytes_per_step=(sum(sizes.values()) - grad_bytes) / n,
        blocking_ms_per_step=1e3 * counter.blocking_s / n if world > 1 else 0.0,
        by_collective=" ".join(f"{k}={v / n:g}" for k, v in sorted(calls.items())) or "-",
    )
    return row


def _worker(rank: int, spec: dict) -> None:
    """One of the P processes (torch.multiprocessing.spawn): every job, rank 0 writes the rows."""
    world = spec["processes"]
    torch.set_num_threads(spec["threads_per_process"])
    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=spec["init"],
                            rank=rank, world_size=world)
    counter = CollectiveCounter()
    counter.install()
    try:
        rows = [measure(job, rank=rank, world=world, device=device, counter=counter) for job in spec["jobs"]]
    finally:
        counter.uninstall()
    latency = collective_latency_us(device)
    dist.destroy_process_group()
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps({"rows": rows, "latency_us": latency}))


def collective_latency_us(device: torch.device, reps: int = 200) -> float:
    """Median time of a one-float all-reduce here: the latency every SyncBN collective pays
    at least (each is a few hundred floats), whatever its compute."""
    x = torch.zeros(1, device=device)
    times = []
    dist.barrier()
    for _ in range(reps):
        t0 = time.perf_counter()
        dist.all_reduce(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def jobs_for(args: argparse.Namespace) -> list[dict]:
    jobs = []
    for variant in args.variant:
        modes = [("SyncBN", True), ("local", False)] if get_spec(variant).norm == "bn" else [("-", True)]
        for bn, sync in modes:
            jobs.append({"variant": variant, "bn": bn, "sync_bn": sync, "arch": args.arch, "batch_size": args.batch_size,
                         "steps": args.steps, "warmup": args.warmup, "image_size": args.image_size})
    return jobs


def run_measurement(args: argparse.Namespace, log=print) -> tuple[list[dict], dict]:
    """The rows (one process first, then P processes per variant) and the environment."""
    if args.processes < 2:
        raise ValueError(f"--processes {args.processes}: a data-parallel measurement needs at least 2")
    if args.batch_size % args.processes:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by --processes {args.processes}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.device_count() >= args.processes else "cpu"
    if device == "cuda" and torch.cuda.device_count() < args.processes:
        raise ValueError(f"--device cuda: NCCL needs one GPU per process, {torch.cuda.device_count()} for {args.processes}")
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]  # others' work on the cores: what the times include
    threads = args.threads or cores
    per_process = max(1, threads // args.processes)
    jobs = jobs_for(args)
    rows = []
    torch.set_num_threads(per_process)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    for job in jobs:
        if job["bn"] == "local":
            continue  # one process has no split to choose
        log(f"1 process: {job['variant']} {args.arch} batch {args.batch_size} ({per_process} threads)")
        rows.append(measure({**job, "bn": "-" if job["bn"] == "-" else "BN"}, rank=0, world=1, device=dev, counter=None))
    with tempfile.TemporaryDirectory(prefix="msr-comm-") as tmp:
        spec = {"processes": args.processes, "threads_per_process": per_process, "device": device, "jobs": jobs,
                "init": f"file://{tmp}/rendezvous", "result": f"{tmp}/rows.json"}
        log(f"{args.processes} processes ({'NCCL' if device == 'cuda' else 'gloo'}, {per_process} threads each): "
            + ", ".join(f"{j['variant']} ({j['bn']})" for j in jobs))
        torch.multiprocessing.spawn(_worker, args=(spec,), nprocs=args.processes, join=True)
        measured = json.loads(Path(spec["result"]).read_text())
        rows += measured["rows"]
    env = {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else machine_record("cpu")["cpu_model"],
           "cores": cores, "load_average_1min_at_start": load, "threads": threads, "threads_per_process": per_process, "processes": args.processes,
           "backend": "nccl" if device == "cuda" else "gloo", "torch": torch.__version__,
           "precision": "bf16 autocast" if device == "cuda" else "fp32", "data": "synthetic 3x32x32, 10 classes",
           "steps": args.steps, "warmup": args.warmup,
           "allreduce_latency_us": measured["latency_us"],  # a one-float all-reduce, median of 200
           "machine": machine_record(str(dev))}
    return rows, env


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def format_markdown(rows: list[dict], env: dict) -> str:
    head = ["variant", "bn", "processes", "collectives/step", "grad all-reduces", "BN collectives", "bytes/step",
            "BN bytes", "blocking ms/step", "step ms", "images/s"]
    keys = ["variant", "bn", "processes", "collectives_per_step", "grad_allreduces_per_step", "bn_collectives_per_step",
            "bytes_per_step", "bn_bytes_per_step", "blocking_ms_per_step", "step_ms", "images_per_s"]
    lines = [f"Communication per training step: {rows[0]['arch']}, global batch {rows[0]['global_batch']}, "
             f"{env['processes']} x {env['backend']} on {env['device_name']} ({env['threads_per_process']} threads "
             f"per process, the one-process rows too), torch {env['torch']}, {env['precision']}, median of {env['steps']} steps; "
             f"a one-float all-reduce takes {env['allreduce_latency_us']:.0f} us here; load average "
             f"{env['load_average_1min_at_start']:.1f} on {env['cores']} cores at the start.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    lines += ["", "bn SyncBN: the single-process algorithm; bn local: each process's own statistics (another "
              "algorithm). Bytes: the payload each process contributes. Blocking: time inside synchronous "
              "collectives (SyncBN's); DDP's gradient all-reduces overlap the backward pass.", ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], env: dict) -> list[Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [out / "comm.csv", out / "comm.md", out / "comm.json"]
    atomic.write_text(paths[0], buf.getvalue())
    atomic.write_text(paths[1], format_markdown(rows, env))
    atomic.write_json(paths[2], {"environment": env, "rows": rows})
    return paths


def run(args: argparse.Namespace) -> int:
    rows, env = run_measurement(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_outputs(out, rows, env)
    print(format_markdown(rows, env))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0

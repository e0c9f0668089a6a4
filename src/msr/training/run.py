"""Everything one run holds - model, optimizer, loaders, metrics, probes - and how it is saved,
resumed, evaluated and summarized. :mod:`msr.training.loop` drives it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import platform
import resource
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import msr
from msr import atomic
from msr import data as msr_data
from msr.core.models import parse_arch
from msr.core.variants import Variant, build
from msr.machine import machine_record
from msr.training.config import ConfigError, RunConfig
from msr.training.distributed import Distributed, prepare_model, wrap
from msr.training.probes import Prober, grad_norm
from msr.training.rundir import (
    CHECKPOINT,
    METRIC_COLUMNS,
    METRICS,
    PROBE_COLUMNS,
    PROBES,
    check_probe_rows,
    damaged,
    read_metrics,
    read_probes,
    span,
)
from msr.training.schedule import LinearWarmup
from msr.training.step import GraphedStep, OneModel, TrainStep

# Clean train accuracy (clean_train_loss/_acc in metrics.csv) is measured at every epoch end on
# the first min(N, 1000) training images in their stored order - eval mode, no augmentation,
# the test set's code path - because train_acc is a running average over augmented (and, for
# the noise variants, noisy) batches while the weights move, so it cannot be compared with test
# accuracy. The stored order is fixed and not sorted by class (digits: the stratified split in
# the original order; CIFAR / Fashion-MNIST: the official, shuffled order), so the prefix is a
# fixed, roughly class-balanced sample (97-104 images a class on digits, 86-115 on
# Fashion-MNIST); 1000 images give a standard error of at most 1.6 points for one extra eval
# pass of <= 1000 images an epoch. It contains the probe batch (the first
# probe_batch images); both are read-only measurements, so the overlap changes nothing.
CLEAN_TRAIN_IMAGES = 1000

def _csv_text(columns: list[str], rows: list) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _metrics_row(m: dict[str, float]) -> list:
    return [m[c] for c in METRIC_COLUMNS]


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux: the whole process (torch, data, model), not just tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- the run

def load_run_dataset(cfg: RunConfig) -> msr_data.Dataset:
    """The dataset a run of ``cfg`` trains and evaluates on: loaded, cut to its ``train_subset``
    (its limits: RunConfig.validate, msr.catalog), and for a selection run
    (``eval_split="validation"``) with the held-out validation images in place of the test set,
    which such a run never sees (config.json and runs.csv say eval_split=validation). Runs that
    share one (stacked seeds) load it once."""
    ds = msr_data.load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
    # normalization keeps the full training set's statistics: a subset or a held-out
    # validation split changes what the model sees, not how its input is scaled
    if cfg.eval_split == "validation":
        try:
            keep, held_out = msr_data.validation_split(ds.train_y, cfg.validation_size, train_subset=cfg.train_subset)
        except ValueError as err:
            raise ConfigError(f"{cfg.dataset}: {err}") from None
        return dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep],
                                   test_x=ds.train_x[held_out], test_y=ds.train_y[held_out])
    if cfg.train_subset is not None:
        keep = msr_data.stratified_subset(ds.train_y, cfg.train_subset)
        ds = dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
    return ds


class Run:
    """Everything one run holds; ``train()`` below is the readable loop that drives it."""

    def __init__(self, cfg: RunConfig, out: Path, log=print, dist: Distributed | None = None, *,
                 dataset: msr_data.Dataset | None = None):
        """``dist``: this process's rank in a data-parallel run (msr.training.distributed), or
        None for the single-process run. ``dataset``: what :func:`load_run_dataset` returns for
        ``cfg`` (runs that share one, e.g. stacked seeds, load it once)."""
        self.cfg, self.out, self.log, self.dist = cfg, out, log, dist
        self.device = cfg.resolved_device()
        if dist is not None:
            self.device = dist.device(self.device.type)
        self.threads = cfg.resolved_threads()
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        ds = load_run_dataset(cfg) if dataset is None else dataset
        self.dataset = ds
        torch.manual_seed(cfg.seed)  # the model's init is the first (and only) use of the global RNG before training
        self.variant: Variant = build(
            cfg.variant, depth=parse_arch(cfg.arch), num_classes=ds.num_classes,
            in_channels=ds.in_channels, **cfg.variant_overrides(),
        )
        if dist is not None:  # SyncBN, the noise's rows: before the optimizer sees the parameters
            self.variant.model = prepare_model(self.variant.model, dist, norm=self.variant.spec.norm, device=self.device)
        self.model = self.variant.model
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)

        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # fp16 needs loss scaling; the projection then runs on unscaled gradients (docs/method.md)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

        spec = self.variant.spec
        # every param group at lr_factor x the variant's own lr; base_lr is the conv group's
        self.lr_factor = cfg.resolved_lr_factor(spec.lr)
        fused = self.device.type == "cuda"
        groups = self.variant.param_groups(factor=self.lr_factor)
        self.base_lr = cfg.resolved_lr(spec.lr)
        self.optimizer = torch.optim.SGD(groups, momentum=cfg.momentum, fused=fused or None)
        milestones = sorted({max(1, round(m * cfg.epochs)) for m in cfg.milestones})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=cfg.gamma)

        common = dict(mean=ds.mean, std=ds.std, device=self.device, channels_last=cfg.channels_last)
        self.train_loader = msr_data.DeviceLoader(
            ds.train_x, ds.train_y, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
            crop_padding=ds.crop_padding, flip=ds.flip, **common,
            **({} if dist is None else {"shard": (dist.rank, dist.world_size)}),
        )
        # the variant's warm-up (msr.training.schedule), per optimizer step through its hooks
        self.warmup = LinearWarmup.for_run(self.optimizer, fraction=spec.warmup, from_lr=spec.warmup_from,
                                           lr=self.base_lr, total_steps=cfg.epochs * len(self.train_loader))
        if cfg.cuda_graph and self.warmup.steps:  # its hooks are Python: a graph replay skips them
            raise ConfigError(f"cuda_graph: {cfg.variant}'s warm-up ({self.warmup.steps} steps) sets the lr in "
                              "optimizer hooks a CUDA graph does not replay; train it without --cuda-graph")
        # the evaluation split: the test set, or a selection run's validation images
        self.test_loader = msr_data.DeviceLoader(ds.test_x, ds.test_y, batch_size=cfg.eval_batch_size, train=False, **common)
        n_clean = min(len(ds.train_x), CLEAN_TRAIN_IMAGES)
        self.clean_train_loader = msr_data.DeviceLoader(
            ds.train_x[:n_clean], ds.train_y[:n_clean], batch_size=cfg.eval_batch_size, train=False, **common
        )
        # a fixed, un-augmented batch of training images for the probes (never the test set)
        probe_loader = msr_data.DeviceLoader(
            ds.train_x[: cfg.probe_batch], ds.train_y[: cfg.probe_batch], batch_size=cfg.probe_batch, train=False, **common
        )
        self.probe_x = next(iter(probe_loader))[0]
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.prober = Prober(self.model, self.probe_x)

        self.epoch = 0  # epochs completed
        self.step = 0
        self.images_seen = 0
        self.metrics: list[dict[str, float]] = []
        self.probes: list[tuple] = []
        self.train_seconds = 0.0
        self.wall_seconds = 0.0

    # ---- persistence
    def config_record(self) -> dict[str, Any]:
        rec = dataclasses.asdict(self.cfg)
        rec.update(
            lr=self.base_lr,
            lr_factor=self.lr_factor,
            warmup_steps=self.warmup.steps,
            eval_images=self.test_loader.num_samples,
            noise_delta=self.variant.spec.noise_delta,
            image_size=self.dataset.image_size,
            threads=self.threads,
            device=str(self.device),
            precision=self.precision,
            milestones=list(self.cfg.milestones),
            clean_train_images=self.clean_train_loader.num_samples,
            variant_spec=dataclasses.asdict(self.variant.spec),
            n_params=sum(p.numel() for p in self.model.parameters()),
            versions={"python": platform.python_version(), "torch": torch.__version__, "msr": msr.__version__,
                      **({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()} if self.device.type == "cuda" else {})},
            # GPU results are not bitwise comparable with CPU ones, nor between these paths
            train_path=self.train_path,
            device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
            # CPU model, kernel ISA flags, torch/oneDNN/cuDNN, GPU: what a bitwise rerun needs
            # the same of (msr.machine). A record only: nothing reads it to decide a result.
            machine=machine_record(str(self.device)),
        )
        if self.dist is not None:  # a single-process record has no such block (unchanged)
            rec["distributed"] = self.dist.record(self.variant.spec.norm, self.cfg.batch_size)
        return rec

    def model_state(self) -> dict[str, Any]:
        """What the checkpoint holds of the model, the optimizer and the random state (the
        parts a run trained differently - stacked seeds - provides its own way)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": _rng_state(self.device)}

    def restore_rng(self, state: dict[str, torch.Tensor]) -> None:
        _set_rng_state(state, self.device)

    def save_checkpoint(self) -> None:
        atomic.torch_save(
            self.out / "checkpoint.pt",
            {
                "epoch": self.epoch,
                "step": self.step,
                **self.model_state(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "images_seen": self.images_seen,
                "train_seconds": self.train_seconds,
                "wall_seconds": self.wall_seconds,
            },
        )

    def try_resume(self) -> bool:
        """Restore the checkpoint and the rows written up to it; False if there is none.

        The files must agree with the checkpoint: metrics.csv holds exactly its epochs 1..E
        and probes.csv parses completely and reaches its step. The one tolerated difference is
        a job that died between writing the files and the checkpoint: one extra trailing epoch
        in metrics.csv (and its probes), dropped here and retrained. Anything else is a
        RunDirError, not a silent restart (module docstring).
        """
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        self.restore_checkpoint()

        metrics = read_metrics(self.out / METRICS)
        epochs = [m["epoch"] for m in metrics]
        if epochs == list(range(1, self.epoch + 2)):
            self.log(f"{self.out / METRICS}: dropping epoch {self.epoch + 1}, written after the last checkpoint "
                     f"(the job died between the two writes); it is trained again")
            metrics = metrics[:-1]
        elif epochs != list(range(1, self.epoch + 1)):
            raise damaged(self.out / METRICS, f"holds epochs {span(epochs)}, but {CHECKPOINT} is after epoch {self.epoch}")
        if metrics[-1]["step"] != self.step:
            raise damaged(self.out / METRICS, f"epoch {self.epoch} ends at step {metrics[-1]['step']}, "
                          f"{CHECKPOINT} at step {self.step}")
        self.metrics = metrics
        probes = read_probes(self.out / PROBES)
        check_probe_rows(self.out / PROBES, probes)
        self.probes = [r for r in probes if r[0] <= self.step]
        # every epoch end is probed, so the probes up to the checkpoint end at its step
        if not self.probes or self.probes[-1][0] != self.step:
            last = self.probes[-1][0] if self.probes else None
            raise damaged(self.out / PROBES, f"probes up to the checkpoint end at step {last}, "
                          f"{CHECKPOINT} is at step {self.step}")
        if len(self.probes) < len(probes):
            self.log(f"{self.out / PROBES}: dropping {len(probes) - len(self.probes)} rows after step {self.step}, "
                     "written after the last checkpoint")
        return True

    def restore_checkpoint(self) -> None:
        """Model, optimizer, scheduler, scaler, RNG and counters from ``checkpoint.pt`` (read
        only; the other ranks of a data-parallel run resume with this alone, after rank 0 has
        checked the directory with :meth:`try_resume`)."""
        path = self.out / CHECKPOINT
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
            # torch's own text may suggest weights_only=False: never pass that on
            raise damaged(path, f"cannot be loaded ({type(err).__name__}: truncated or corrupt)") from None
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.restore_rng(ckpt["rng"])
            self.epoch, self.step, self.images_seen = ckpt["epoch"], ckpt["step"], ckpt["images_seen"]
            self.warmup.done = self.step  # every completed step was one optimizer step
            self.train_seconds, self.wall_seconds = ckpt["train_seconds"], ckpt["wall_seconds"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise damaged(path, f"does not fit this run's model and optimizer ({type(err).__name__})") from None

    def write_progress(self) -> None:
        atomic.write_text(self.out / "metrics.csv", _csv_text(METRIC_COLUMNS, [_metrics_row(m) for m in self.metrics]))
        atomic.write_text(self.out / "probes.csv", _csv_text(PROBE_COLUMNS, self.probes))

    def summary(self, status: str, diverged_at_step: int | None) -> dict[str, Any]:
        last = self.metrics[-1] if self.metrics else None
        if status == "completed" and (last is None or not math.isfinite(last["test_acc"])):
            # never write a completed run without a headline (it would be averaged as one)
            raise damaged(self.out / METRICS, f"no finite final test accuracy for a completed run of {self.epoch} epochs")
        evaluated = [m for m in self.metrics if math.isfinite(m["test_acc"])]  # eval_every skips some
        best = max(evaluated, key=lambda m: m["test_acc"]) if evaluated else None
        mem, mem_kind = peak_memory_mb(self.device)
        return {
            "status": status,
            "final_test_acc": last["test_acc"] if last else math.nan,
            "final_test_loss": last["test_loss"] if last else math.nan,
            "final_train_acc": last["train_acc"] if last else math.nan,
            "final_train_loss": last["train_loss"] if last else math.nan,
            "final_clean_train_acc": last["clean_train_acc"] if last else math.nan,
            "final_clean_train_loss": last["clean_train_loss"] if last else math.nan,
            # best epoch by *test* accuracy: shown for reference only, never the headline
            "best_test_acc": best["test_acc"] if best else math.nan,
            "best_epoch": best["epoch"] if best else None,
            "diverged_at_step": diverged_at_step,
            "epochs_completed": self.epoch,
            "steps": self.step,
            "wall_seconds": self.wall_seconds,
            "train_seconds": self.train_seconds,
            "mean_step_seconds": self.train_seconds / self.step if self.step else math.nan,
            "images_per_s": self.images_seen / self.train_seconds if self.train_seconds else math.nan,
            "peak_memory_mb": mem,
            "peak_memory_kind": mem_kind,
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, loader: msr_data.DeviceLoader) -> tuple[float, float]:
        """Mean loss and accuracy over ``loader`` in eval mode (the test set, the clean train subset)."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in loader:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.forward(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        self.model.train()
        n = loader.num_samples
        return loss_sum.item() / n, correct.item() / n

    # ---- the step
    def make_step(self) -> TrainStep | GraphedStep:
        """This run's training step (msr.training.step): its model's forward and loss, the
        variant's hook, its optimizer; ``inspect`` measures the grad norm the update applies.
        With ``cuda_graph`` the same step, captured as one CUDA graph after 3 eager steps."""
        params = list(self.model.parameters())
        forward = self.forward
        if self.dist is not None:  # DDP averages the gradients in backward, before the variant's hook
            ddp = wrap(self.model, self.dist, self.device)
            forward = torch.compile(ddp) if self.cfg.compile else ddp
        objective = OneModel(self.variant, forward=forward, device_type=self.device.type, amp_dtype=self.amp_dtype)
        step = TrainStep(objective, self.optimizer, scaler=self.scaler, inspect=lambda: grad_norm(params))
        return GraphedStep(step) if self.cfg.cuda_graph else step

    @property
    def train_path(self) -> str:
        """How the steps run: ``eager``, ``compile`` or ``cuda_graph`` (``stacked``: msr.training.stacked)."""
        return "cuda_graph" if self.cfg.cuda_graph else "compile" if self.cfg.compile else "eager"

    def probe(self, last_grad_norm: torch.Tensor | None = None) -> None:
        gn = None if last_grad_norm is None else float(last_grad_norm)
        self.probes.extend(self.prober(self.step, gn))

"""One training run, from a resolved config to a run directory (docs/architecture.md, "The run directory").

    <out>/config.json    resolved config, versions, device
    <out>/metrics.csv    one row per epoch
    <out>/probes.csv     step, layer, metric, value (msr.training.probes)
    <out>/summary.json   status completed|diverged, final (headline) and best test accuracy, ...
    <out>/checkpoint.pt  last epoch's state, for resume
    <out>/.lock          held (fcntl.flock) while a process writes the directory

Every file is written atomically. A complete run (summary.json and a metrics.csv that agrees
with it, msr.training.rundir.check_complete) does nothing; a run with a checkpoint resumes and ends
bitwise identical (on CPU, same thread count) to an uninterrupted one, because the data order
and augmentation are a pure function of (seed, epoch) and the checkpoint holds every other
source of randomness. A non-finite loss ends the run as ``diverged`` - a result, not a crash.

A directory that is neither fresh, nor resumable, nor complete - a damaged or truncated file,
files that disagree with the checkpoint, an older metrics schema, another live writer, a full
disk - stops with a :class:`msr.training.rundir.RunDirError`: one line naming the file and what to do.
Resume never silently restarts: a damaged directory is the user's to delete.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import msr
from msr import atomic
from msr import data as msr_data
from msr.core.models import parse_arch
from msr.core.variants import VARIANTS, Variant, build, get_spec
from msr.training.probes import Prober, grad_norm
from msr.training.rundir import (
    CHECKPOINT,
    CONFIG,
    METRIC_COLUMNS,
    METRICS,
    PROBE_COLUMNS,
    PROBES,
    SUMMARY,
    RunDirError,
    RunLock,
    check_complete,
    check_probe_rows,
    damaged,
    read_json,
    read_metrics,
    read_probes,
    span,
)

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
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# the paper's recipe on CIFAR; digits has 1437 training images, where batch 128 would give 11
# steps an epoch, so its defaults take smaller batches (the method's lr stays the paper's)
DATASET_DEFAULTS = {
    "cifar10": {"epochs": 200, "batch_size": 128},
    "cifar100": {"epochs": 200, "batch_size": 128},
    "digits": {"epochs": 10, "batch_size": 32},
    "synthetic": {"epochs": 10, "batch_size": 32},
    "fashion_mnist": {"epochs": 30, "batch_size": 128},
}
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A bad run configuration; the message names the key and the valid choices."""


@dataclass
class RunConfig:
    """Everything that defines a run. ``None`` means "the variant's / dataset's default"."""

    dataset: str = "digits"
    arch: str = "resnet20"
    variant: str = "msr"
    epochs: int | None = None  # None: the dataset's default (DATASET_DEFAULTS)
    seed: int = 0
    lr: float | None = None  # base (conv-group) lr; other groups keep their ratio
    batch_size: int | None = None  # None: the dataset's default
    noise_delta: float | None = None  # shortcut for overrides["noise_delta"]
    overrides: dict[str, Any] = field(default_factory=dict)  # any VariantSpec field
    data_root: str = "data"
    image_size: int | None = None  # digits: 8/16/32 (default 16); CIFAR: native 32
    # train on a fixed class-stratified subset of this many training images (None: all); the
    # same subset for every run and seed (msr.data.stratified_subset); the test set stays whole
    train_subset: int | None = None
    momentum: float = 0.9
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs where lr *= gamma
    gamma: float = 0.1
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; default: the cores this process may use
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    probe_every: int = 50  # steps between probes (also at step 0 and every epoch end)
    probe_batch: int = 256
    eval_batch_size: int = 1000

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
        values = dict(values)
        if "milestones" in values and values["milestones"] is not None:
            values["milestones"] = tuple(values["milestones"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field before anything is written; errors name the key.

        Also fills the dataset-dependent defaults (epochs, batch size) left as ``None``.
        """

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        need(self.dataset in msr_data.DATASETS, "dataset", f"valid datasets: {', '.join(msr_data.DATASETS)}")
        for key, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        try:
            parse_arch(self.arch)
        except ValueError as e:
            raise ConfigError(f"arch: {e}") from None
        need(self.variant in VARIANTS, "variant", f"valid variants: {', '.join(VARIANTS)}")
        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        need(is_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(self.lr is None or (is_num(self.lr) and self.lr > 0), "lr", "must be a number > 0")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        need(self.noise_delta is None or (is_num(self.noise_delta) and 0 <= self.noise_delta <= 1), "noise_delta", "must be in [0, 1]")
        need(isinstance(self.overrides, dict), "overrides", "must be a mapping of variant fields")
        need(self.image_size is None or (is_int(self.image_size) and self.image_size >= 4), "image_size", "must be an integer >= 4")
        need(self.train_subset is None or (is_int(self.train_subset) and self.train_subset >= 1),
             "train_subset", "must be an integer >= 1 (a number of training images) or null")
        need(is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(all(is_num(m) and 0 < m <= 1 for m in self.milestones), "milestones", "must be fractions of the run in (0, 1]")
        need(is_num(self.gamma) and 0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        need(self.device in DEVICES, "device", f"valid devices: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available (use --device auto or cpu)")
        need(self.threads is None or (is_int(self.threads) and self.threads >= 1), "threads", "must be an integer >= 1")
        need(self.precision in PRECISIONS, "precision", f"valid: {', '.join(PRECISIONS)}")
        need(is_int(self.probe_every) and self.probe_every >= 1, "probe_every", "must be an integer >= 1")
        need(is_int(self.probe_batch) and self.probe_batch >= 1, "probe_batch", "must be an integer >= 1")
        need(is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "eval_batch_size", "must be an integer >= 1")
        try:
            get_spec(self.variant, **self.variant_overrides())
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def variant_overrides(self) -> dict[str, Any]:
        over = dict(self.overrides)
        if self.noise_delta is not None:
            over["noise_delta"] = self.noise_delta
        return over

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- run-directory files
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
class Run:
    """Everything one run holds; ``train()`` below is the readable loop that drives it."""

    def __init__(self, cfg: RunConfig, out: Path, log=print):
        self.cfg, self.out, self.log = cfg, out, log
        self.device = cfg.resolved_device()
        self.threads = cfg.resolved_threads()
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        ds = msr_data.load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
        if cfg.train_subset is not None:
            if cfg.train_subset > len(ds.train_y):
                raise ConfigError(f"train_subset={cfg.train_subset}: {cfg.dataset} has only "
                                  f"{len(ds.train_y)} training images")
            # normalization keeps the full training set's statistics: the subset changes how
            # much the model sees, not how its input is scaled
            keep = msr_data.stratified_subset(ds.train_y, cfg.train_subset)
            ds = dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
        self.dataset = ds
        torch.manual_seed(cfg.seed)  # the model's init is the first (and only) use of the global RNG before training
        self.variant: Variant = build(
            cfg.variant, depth=parse_arch(cfg.arch), num_classes=ds.num_classes,
            in_channels=ds.in_channels, **cfg.variant_overrides(),
        )
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

        lr = cfg.lr if cfg.lr is not None else self.variant.spec.lr
        self.base_lr = lr
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.SGD(self.variant.param_groups(lr), momentum=cfg.momentum, fused=fused or None)
        milestones = sorted({max(1, round(m * cfg.epochs)) for m in cfg.milestones})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=cfg.gamma)

        common = dict(mean=ds.mean, std=ds.std, device=self.device, channels_last=cfg.channels_last)
        self.train_loader = msr_data.DeviceLoader(
            ds.train_x, ds.train_y, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
            crop_padding=ds.crop_padding, flip=ds.flip, **common,
        )
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
            noise_delta=self.variant.spec.noise_delta,
            image_size=self.dataset.image_size,
            threads=self.threads,
            device=str(self.device),
            precision=self.precision,
            milestones=list(self.cfg.milestones),
            clean_train_images=self.clean_train_loader.num_samples,
            variant_spec=dataclasses.asdict(self.variant.spec),
            n_params=sum(p.numel() for p in self.model.parameters()),
            versions={"python": platform.python_version(), "torch": torch.__version__, "msr": msr.__version__},
            device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
        )
        return rec

    def save_checkpoint(self) -> None:
        atomic.torch_save(
            self.out / "checkpoint.pt",
            {
                "epoch": self.epoch,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.device),
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
            _set_rng_state(ckpt["rng"], self.device)
            self.epoch, self.step, self.images_seen = ckpt["epoch"], ckpt["step"], ckpt["images_seen"]
            self.train_seconds, self.wall_seconds = ckpt["train_seconds"], ckpt["wall_seconds"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise damaged(path, f"does not fit this run's model and optimizer ({type(err).__name__})") from None

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

    def write_progress(self) -> None:
        atomic.write_text(self.out / "metrics.csv", _csv_text(METRIC_COLUMNS, [_metrics_row(m) for m in self.metrics]))
        atomic.write_text(self.out / "probes.csv", _csv_text(PROBE_COLUMNS, self.probes))

    def summary(self, status: str, diverged_at_step: int | None) -> dict[str, Any]:
        last = self.metrics[-1] if self.metrics else None
        if status == "completed" and (last is None or not math.isfinite(last["test_acc"])):
            # never write a completed run without a headline (it would be averaged as one)
            raise damaged(self.out / METRICS, f"no finite final test accuracy for a completed run of {self.epoch} epochs")
        best = max(self.metrics, key=lambda m: m["test_acc"]) if self.metrics else None
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

    def probe(self, last_grad_norm: torch.Tensor | None = None) -> None:
        gn = None if last_grad_norm is None else float(last_grad_norm)
        self.probes.extend(self.prober(self.step, gn))


# the config fields that define a run's results: a directory holds one value of each
RESULT_KEYS = ("dataset", "arch", "variant", "epochs", "seed", "lr", "batch_size", "noise_delta", "image_size",
               "train_subset", "overrides", "milestones", "gamma", "momentum")


def _requested(cfg: RunConfig) -> dict[str, Any]:
    """The RESULT_KEYS of ``cfg`` as config.json records them, without loading the data (an
    image size left to the dataset's default is not compared)."""
    spec = get_spec(cfg.variant, **cfg.variant_overrides())
    rec = {k: getattr(cfg, k) for k in RESULT_KEYS}
    rec.update(lr=cfg.lr if cfg.lr is not None else spec.lr, noise_delta=spec.noise_delta,
               milestones=list(cfg.milestones))
    if cfg.image_size is None:
        del rec["image_size"]
    return rec


def _refuse_other_config(out: Path, old: dict[str, Any], record: dict[str, Any]) -> None:
    """A run directory belongs to one config: refuse to mix (or report) results of two."""
    diff = [k for k in RESULT_KEYS if k in record and old.get(k) != record[k]]
    if diff:
        raise ConfigError(f"{out} already holds a run with a different config (differs in: {', '.join(diff)}); use another --out or delete it")


def _check_existing(out: Path, record: dict[str, Any], log=print) -> None:
    """Before (re)starting a run: the directory's config.json, if any, is this config's."""
    path = out / CONFIG
    if not path.exists():
        if (out / CHECKPOINT).exists():  # config.json is written before any checkpoint
            raise damaged(path, f"missing next to {CHECKPOINT}")
        return
    old = read_json(path)
    _refuse_other_config(out, old, record)
    if old.get("threads") != record.get("threads"):
        # still a valid run, but no longer bitwise identical to an uninterrupted one
        log(f"warning: {out} was started with {old.get('threads')} threads, resuming with {record.get('threads')}")


def _already_complete(cfg: RunConfig, out: Path, log) -> dict[str, Any]:
    """The summary of a complete run of ``cfg`` in ``out``; a damaged one, or one of another
    config, is an error (never reported complete)."""
    summary = check_complete(out)
    _refuse_other_config(out, read_json(out / CONFIG), _requested(cfg))
    log(f"{out}: already complete, nothing to do")
    return summary


def train(cfg: RunConfig, out: str | Path, *, log=print, progress: bool | None = None, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train one run into ``out`` and return its summary (the existing one if already complete).

    Holds ``out``'s lock while it writes: a second writer fails at once (RunDirError naming
    the holder). A full disk is a RunDirError too. ``stop_after_epoch`` ends the
    process-equivalent early, leaving a checkpoint as a killed job would (used by tests of
    resume).
    """
    cfg.validate()
    out = Path(out)
    if (out / SUMMARY).exists():
        return _already_complete(cfg, out, log)
    created = not out.exists()
    lock = RunLock(out).acquire()
    try:
        if (out / SUMMARY).exists():  # finished by the previous holder just now
            return _already_complete(cfg, out, log)
        return _train_locked(cfg, out, log=log, progress=progress, stop_after_epoch=stop_after_epoch)
    except atomic.NoSpaceError as err:
        raise RunDirError(str(err)) from None
    finally:
        lock.release()
        if created:
            try:
                out.rmdir()  # only if nothing was written (e.g. the dataset failed to load)
            except OSError:
                pass


def _train_locked(cfg: RunConfig, out: Path, *, log, progress: bool | None, stop_after_epoch: int | None) -> dict[str, Any]:
    run = Run(cfg, out, log=log)
    record = run.config_record()
    _check_existing(out, record, log)
    resumed = run.try_resume()  # checks the files first: a refused directory is left as it was
    atomic.write_json(out / CONFIG, record)
    if resumed:
        log(f"{out}: resuming after epoch {run.epoch} (step {run.step})")
    else:
        run.probe()

    cfg_str = f"{cfg.dataset}/{cfg.arch}/{cfg.variant} seed {cfg.seed} on {run.device} ({run.threads} threads, {run.precision})"
    log(f"training {cfg_str}: {cfg.epochs} epochs x {len(run.train_loader)} steps, lr {run.base_lr}")
    show_bar = sys.stderr.isatty() if progress is None else progress
    model, opt, variant, scaler = run.model, run.optimizer, run.variant, run.scaler
    params = list(model.parameters())
    status, diverged_at = "completed", None
    wall_start = time.perf_counter() - run.wall_seconds
    # on CUDA a host sync per step costs throughput: find the first non-finite loss on the
    # device and look at it once per epoch; on CPU checking every step is free
    check_every = 1 if run.device.type == "cpu" else max(1, len(run.train_loader))

    while run.epoch < cfg.epochs and status == "completed":
        epoch = run.epoch + 1
        run.train_loader.set_epoch(epoch)
        epoch_lr = opt.param_groups[0]["lr"]
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=run.device)
        correct = torch.zeros((), device=run.device, dtype=torch.long)
        seen = 0
        first_bad = torch.full((), -1, device=run.device, dtype=torch.long)
        bar = tqdm(run.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not show_bar, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                logits = run.forward(x)
                loss = F.cross_entropy(logits.float(), y)
            total = loss + variant.extra_loss()
            bad = ~torch.isfinite(total)
            first_bad = torch.where((first_bad < 0) & bad, run.step + 1, first_bad)
            if (i + 1) % check_every == 0 and first_bad.item() >= 0:
                break
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(opt)  # no-op unless fp16: the projection must see true gradients
            variant.after_backward()
            run.step += 1
            probing = run.step % cfg.probe_every == 0
            gn = grad_norm(params) if probing else None  # of the gradient this step applies
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if probing:
                run.probe(gn)
        bar.close()
        if first_bad.item() >= 0:
            status, diverged_at = "diverged", int(first_bad.item())
            run.train_seconds += time.perf_counter() - t0  # the partial epoch's steps count too
            run.images_seen += seen
            run.step = diverged_at - 1  # steps actually completed with a finite loss
            run.probes = [r for r in run.probes if r[0] <= run.step]
            log(f"epoch {epoch}: loss became non-finite at step {diverged_at}: run diverged")
            break
        train_time = time.perf_counter() - t0
        test_loss, test_acc = run.evaluate(run.test_loader)
        clean_loss, clean_acc = run.evaluate(run.clean_train_loader)
        run.epoch = epoch
        if run.probes and run.probes[-1][0] != run.step:
            run.probe()  # the grad norm is measured at probe steps only, never carried over
        run.scheduler.step()
        seconds = time.perf_counter() - t0
        run.train_seconds += train_time
        run.images_seen += seen
        run.wall_seconds = time.perf_counter() - wall_start
        m = {
            "epoch": epoch,
            "step": run.step,
            "lr": epoch_lr,
            "train_loss": loss_sum.item() / max(seen, 1),
            "train_acc": correct.item() / max(seen, 1),
            "clean_train_loss": clean_loss,
            "clean_train_acc": clean_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": seconds,
            "images_per_s": seen / train_time if train_time > 0 else math.nan,
        }
        run.metrics.append(m)
        run.write_progress()
        run.save_checkpoint()
        line = (
            f"epoch {epoch:>3}/{cfg.epochs} step {run.step:>6} lr {m['lr']:.4g} "
            f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f} clean acc {clean_acc:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f}s {m['images_per_s']:.0f} img/s"
        )
        (tqdm.write if show_bar else log)(line)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs:
            return {"status": "interrupted", "epochs_completed": epoch}

    run.wall_seconds = time.perf_counter() - wall_start
    run.write_progress()
    summary = run.summary(status, diverged_at)
    atomic.write_json(out / SUMMARY, summary)
    log(
        f"{out}: {status}; final test acc {summary['final_test_acc']:.4f} after {run.epoch} epochs"
        + (f" (diverged at step {diverged_at})" if diverged_at else "")
    )
    return summary

"""``msr bench``: training-step throughput, measured - never asserted in a timed test.

Two reports.

**The comparison table** (default): for each arch x variant, the same training step run
- ``eager``: msr's loop as ``msr train`` runs it (channels_last; bf16 autocast and fused SGD on
  CUDA), the reference;
- ``compile``: the model under ``torch.compile`` (default mode), as ``msr train --compile``.
  On a CPU it is skipped unless ``--compile-on-cpu``: it costs 20-40 s to compile there and is
  no faster (docs/architecture.md, "Speed");
- ``compile_cudagraphs``: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs under
  Inductor); CUDA only;
- ``cuda_graph``: the whole step - forward, loss, backward, the variant's gradient hook (ZMG),
  fused SGD with the lr as a device tensor - captured by hand as one CUDA graph; CUDA only;
- ``processes``: K runs at once as K processes (the same eager step, each its own seed and
  data), started together after their warm-up; images/s is all K together, over the wall time
  from the first start to the last end;
- ``processes_graph``: the same with each process's step a CUDA graph (``cuda_graph``); CUDA only;
- ``stacked``: K seeds of the variant stacked in one process (``msr.training.stacked``);
- ``stacked_graph``: that stacked step captured as one CUDA graph (msr.training.step.GraphedStep;
  the per-model noise generators are registered with the graph); CUDA only.
Times exclude warm-up (and compilation); CUDA events time the GPU, ``perf_counter`` the CPU.
A method that cannot run says why in its row (``not available on cpu``, ``skipped: ...``,
``failed: ...``): no row is ever silently missing. ``--json PATH`` writes the table after each
row, so a run cut short still leaves what it measured.

**The data-path report** (``--data-path``): one arch / variant / batch size fed two ways - msr's
device-resident loader and a conventional torchvision-style ``DataLoader`` of PIL images with
per-sample transforms - plus the shares of the step spent in the gradient modification and the
noise modules.

The data is synthetic - CIFAR-10-shaped (msr.catalog) unless ``--image-shape`` says otherwise
(``1,28,28``: Fashion-MNIST's) - so both run anywhere offline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from msr import atomic, catalog
from msr import data as msr_data
from msr.core.method import BlockInputNoise
from msr.core.models import parse_arch
from msr.core.variants import Variant, build
from msr.data.cifar import CIFAR_CROP_PADDING, IMAGENET_MEAN, IMAGENET_STD
from msr.data.fashion_mnist import CROP_PADDING as FASHION_CROP_PADDING
from msr.infra.benchtable import TABLE_HEADER, format_environment, format_row
from msr.training.step import GraphedStep, OneModel, TrainStep

# the bench's generated data stand in for CIFAR-10 (the paper's dataset): its shape and classes
_CIFAR = catalog.dataset("cifar10")


# =========================================================================== data-path report
class PILImageDataset(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per sample: uint8 HWC -> PIL -> transforms."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images = images_uint8.permute(0, 2, 3, 1).numpy()  # NHWC, as CIFAR10.data
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return self.transform(img), self.labels[i]


def conventional_loader(ds: msr_data.Dataset, batch_size: int, workers: int, pin: bool, seed: int):
    from torchvision import transforms

    steps = []
    if ds.crop_padding:
        steps.append(transforms.RandomCrop(ds.image_size, padding=ds.crop_padding))
    if ds.flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)]
    dataset = PILImageDataset(ds.train_x, ds.train_y, transforms.Compose(steps))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=pin, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(make_iter: Callable[[], Iterator]) -> Iterator:
    epoch = 0
    while True:
        epoch += 1
        yield from make_iter(epoch)


class Stepper:
    """One training step of a variant (msr.training.step.TrainStep, as ``msr train`` runs it),
    shared by both loops so only the data path differs."""

    def __init__(self, variant: Variant, device: torch.device, amp_dtype, channels_last: bool):
        self.variant, self.device, self.amp_dtype = variant, device, amp_dtype
        self.model = variant.model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.opt = torch.optim.SGD(variant.param_groups(), momentum=0.9, fused=device.type == "cuda" or None)
        self.channels_last = channels_last
        self.forward = self.model  # or a compiled version of it (set before the first call)
        self._step: TrainStep | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._step is None:
            objective = OneModel(self.variant, forward=self.forward, device_type=self.device.type, amp_dtype=self.amp_dtype)
            self._step = TrainStep(objective, self.opt)
        self._step(x, y)


def time_loop(step: Stepper, batches: Iterator, steps: int, warmup: int, repeats: int, to_device: bool) -> list[float]:
    """Seconds per step of ``repeats`` timed windows of ``steps`` steps each (after warm-up)."""
    dev = step.device
    fmt = torch.channels_last if step.channels_last else torch.contiguous_format

    def one() -> None:
        x, y = next(batches)
        if to_device:
            x = x.to(dev, non_blocking=True, memory_format=fmt)
            y = y.to(dev, non_blocking=True)
        step(x, y)

    for _ in range(warmup):
        one()
    _sync(dev)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        _sync(dev)
        out.append((time.perf_counter() - t0) / steps)
    return out


def time_data(batches: Iterator, n: int, device: torch.device) -> float:
    """Seconds per batch of the data path alone (no model), in this process."""
    next(batches)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    _sync(device)
    return (time.perf_counter() - t0) / n


def time_grad_modification(step: Stepper, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    """Seconds of one ``after_backward()`` on a real gradient, averaged over ``reps`` calls."""
    step(x, y)  # leaves real gradients in place
    dev = step.device
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        step.variant.after_backward()
    _sync(dev)
    return (time.perf_counter() - t0) / reps


def time_noise(step: Stepper, x: torch.Tensor, reps: int) -> float | None:
    """Seconds per step spent in the noise modules, forward and backward.

    Each module's input shape is captured during one real forward; then each module runs
    alone on a tensor of that shape, so the number does not drown in step-to-step jitter.
    """
    modules = [m for m in step.model.modules() if isinstance(m, BlockInputNoise) and m.delta > 0]
    if not modules:
        return None
    shapes: list[tuple[BlockInputNoise, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: shapes.append((mod, inp[0].detach()))) for m in modules]
    step.model.train()
    with torch.no_grad(), torch.autocast(step.device.type, dtype=step.amp_dtype, enabled=step.amp_dtype is not None):
        step.model(x)
    for h in hooks:
        h.remove()
    inputs = [(mod, t.clone().requires_grad_()) for mod, t in shapes]
    dev = step.device
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        for mod, t in inputs:
            out = mod(t)
            out.backward(torch.ones_like(out))
    _sync(dev)
    return (time.perf_counter() - t0) / reps


def run_data_path(args: argparse.Namespace) -> dict:
    device = _resolve_device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None
    channels_last = args.channels_last
    if args.dataset == "synthetic":
        ds = msr_data.load_dataset(
            "synthetic", args.data_root,
            synthetic_kwargs=dict(n_train=args.n_train, n_test=100, channels=_CIFAR.channels,
                                  image_size=_CIFAR.native_size, num_classes=_CIFAR.num_classes, seed=0),
        )
        # CIFAR's augmentation, so both loops do the work a CIFAR run does
        ds.flip, ds.crop_padding = True, CIFAR_CROP_PADDING
    else:
        ds = msr_data.load_dataset(args.dataset, args.data_root, image_size=args.image_size)

    def make_stepper() -> Stepper:
        torch.manual_seed(0)
        variant = build(args.variant, depth=parse_arch(args.arch), num_classes=ds.num_classes, in_channels=ds.in_channels)
        return Stepper(variant, device, amp_dtype, channels_last)

    ours_loader = msr_data.DeviceLoader(
        ds.train_x, ds.train_y, batch_size=args.batch_size, mean=ds.mean, std=ds.std, train=True, seed=0,
        crop_padding=ds.crop_padding, flip=ds.flip, device=device, channels_last=channels_last,
    )

    def ours_epoch(epoch: int) -> Iterator:
        ours_loader.set_epoch(epoch)
        return iter(ours_loader)

    timing = dict(steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    stepper = make_stepper()
    ours = time_loop(stepper, _cycle(ours_epoch), to_device=False, **timing)
    x, y = next(iter(ours_loader))
    grad_mod = time_grad_modification(stepper, x, y, reps=20)

    noise_s = time_noise(stepper, x, reps=20)
    noise_share = None if noise_s is None else noise_s / statistics.median(ours)

    result = {
        "arch": args.arch, "variant": args.variant, "batch_size": args.batch_size, "dataset": args.dataset,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "precision": "bf16" if amp_dtype else "fp32", "channels_last": channels_last,
        "torch": torch.__version__, "steps_per_window": args.steps, "windows": args.repeats,
        "ours_step_ms": 1e3 * statistics.median(ours),
        "ours_images_per_s": args.batch_size / statistics.median(ours),
        "ours_data_ms": 1e3 * time_data(_cycle(ours_epoch), args.steps, device),
        "grad_mod_ms": 1e3 * grad_mod,
        "grad_mod_share": grad_mod / statistics.median(ours),
        "noise_share": noise_share,
    }
    if not args.no_conventional:
        conv_loader = conventional_loader(ds, args.batch_size, args.workers, pin=device.type == "cuda", seed=0)
        conv = time_loop(make_stepper(), _cycle(lambda _e: iter(conv_loader)), to_device=True, **timing)
        result.update(
            conventional_workers=args.workers,
            conventional_step_ms=1e3 * statistics.median(conv),
            conventional_images_per_s=args.batch_size / statistics.median(conv),
            speedup_vs_conventional=statistics.median(conv) / statistics.median(ours),
            # the same transforms without workers: the CPU time the data path costs per batch
            conventional_data_ms=1e3 * time_data(
                _cycle(lambda _e: iter(conventional_loader(ds, args.batch_size, 0, pin=False, seed=0))), args.steps, device
            ),
        )
    return result


def format_data_path(r: dict) -> str:
    lines = [
        f"msr bench: {r['arch']} / {r['variant']} / batch {r['batch_size']} on {r['device_name']} "
        f"({r['device']}, {r['threads']} threads, {r['precision']}, channels_last={r['channels_last']})",
        f"  msr loop (device-resident data):   {r['ours_images_per_s']:9.0f} img/s  {r['ours_step_ms']:8.2f} ms/step",
    ]
    if "conventional_images_per_s" in r:
        lines.append(
            f"  conventional DataLoader ({r['conventional_workers']} workers): {r['conventional_images_per_s']:9.0f} img/s  "
            f"{r['conventional_step_ms']:8.2f} ms/step"
        )
        lines.append(f"  speed-up vs conventional:          {r['speedup_vs_conventional']:9.2f}x")
        lines.append(
            f"  data path alone, per batch: msr {r['ours_data_ms']:.2f} ms, conventional {r['conventional_data_ms']:.2f} ms "
            "of CPU work (in-process; its workers hide it only while they have spare cores)"
        )
    else:
        lines.append(f"  data path alone: {r['ours_data_ms']:.2f} ms per batch")
    lines.append(f"  gradient modification: {r['grad_mod_ms']:.3f} ms/step = {100 * r['grad_mod_share']:.2f}% of the step")
    if r["noise_share"] is not None:
        lines.append(f"  noise injection: {100 * r['noise_share']:.2f}% of the step (its modules' forward + backward, timed alone)")
    else:
        lines.append("  noise injection: none in this variant")
    return "\n".join(lines)


# =========================================================================== comparison table
METHODS = ("eager", "compile", "compile_cudagraphs", "cuda_graph", "processes", "processes_graph", "stacked", "stacked_graph")
CUDA_ONLY = ("compile_cudagraphs", "cuda_graph", "processes_graph", "stacked_graph")
IMAGE_SHAPE = (_CIFAR.channels, _CIFAR.native_size, _CIFAR.native_size)
NUM_CLASSES = _CIFAR.num_classes


def synthetic_loader(n: int, batch_size: int, seed: int, device: torch.device, channels_last: bool,
                     image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> Iterator:
    """Endless batches of random uint8 images of ``image_shape`` (CIFAR's by default, (1, 28, 28)
    for Fashion-MNIST) through msr's DeviceLoader (crop + flip + normalize on the device, as a
    training run does); content does not matter for speed."""
    g = torch.Generator().manual_seed(1000 + seed)
    images = torch.randint(0, 256, (n, *image_shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    # CIFAR's normalization and crop for colour images, Fashion-MNIST's crop for grey ones (its
    # normalization statistics need no precision here: the content does not matter for speed)
    colour = image_shape[0] == 3
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if colour else ((0.5,) * image_shape[0], (0.25,) * image_shape[0])
    crop_padding = CIFAR_CROP_PADDING if colour else FASHION_CROP_PADDING
    loader = msr_data.DeviceLoader(
        images, labels, batch_size=batch_size, mean=mean, std=std, train=True, seed=seed,
        crop_padding=crop_padding, flip=True, device=device, channels_last=channels_last,
    )

    def epoch(e: int) -> Iterator:
        loader.set_epoch(e)
        return iter(loader)

    return _cycle(epoch)


def time_windows(step: Callable[[], None], device: torch.device, steps: int, warmup: int, repeats: int) -> tuple[list[float], float]:
    """(seconds per step of ``repeats`` windows of ``steps`` steps, seconds the warm-up took).

    CUDA: events around each window on the current stream (GPU time, launch gaps included);
    CPU: ``perf_counter``.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            out.append((time.perf_counter() - t) / steps)
    return out, warm_s


class GraphStepper:
    """The whole training step as one CUDA graph: ``msr train --cuda-graph``'s
    (msr.training.step.GraphedStep) around the bench's eager step - forward, loss (+ the
    variant's extra loss), backward, ``after_backward`` (ZMG on the true gradients) and a fused
    SGD step whose lr is a device tensor, captured once after a few eager warm-up steps on a
    side stream; a step is then a copy into the static batch and one ``replay()``. The noise
    draws come from the default CUDA generator, which graphs support (each replay advances it).
    """

    def __init__(self, variant: Variant, device: torch.device, amp_dtype, channels_last: bool, batch_size: int):
        if device.type != "cuda":
            raise ValueError("a CUDA graph needs a CUDA device")
        self.device = device
        self.model = variant.model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.opt = torch.optim.SGD(variant.param_groups(), momentum=0.9, fused=True)
        self.step = GraphedStep(TrainStep(OneModel(variant, device_type="cuda", amp_dtype=amp_dtype), self.opt))

    def capture(self, batches: Iterator, warmup: int = 3) -> None:
        """``warmup`` real steps on batches from ``batches``, then the capture."""
        self.step.warmup = warmup
        for _ in range(warmup):
            self.step(*next(batches))
        x, y = next(batches)
        self.step._capture(x, y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.step(x, y).loss


def _build_variant(variant: str, arch: str, seed: int, in_channels: int = IMAGE_SHAPE[0]) -> Variant:
    torch.manual_seed(seed)
    return build(variant, depth=parse_arch(arch), num_classes=NUM_CLASSES, in_channels=in_channels)


def _row(arch: str, variant: str, method: str, models: int, status: str = "ok", **fields) -> dict:
    return {"arch": arch, "variant": variant, "method": method, "models": models, "status": status,
            "ms_per_step": None, "images_per_s": None, "speedup_vs_eager": None, "note": "", **fields}


def _timed_row(arch, variant, method, models, batch_size, windows, warm_s, timing, note="") -> dict:
    step_s = statistics.median(windows)
    return _row(arch, variant, method, models, ms_per_step=1e3 * step_s, images_per_s=models * batch_size / step_s,
                warmup_s=warm_s, windows_ms=[1e3 * w for w in windows], timing=timing, note=note)


def _timing_name(device: torch.device) -> str:
    return "cuda events" if device.type == "cuda" else "perf_counter"


def bench_single(args, arch: str, variant: str, method: str, device: torch.device, amp_dtype) -> dict:
    """eager / compile / compile_cudagraphs / cuda_graph: one model, one process."""
    v = _build_variant(variant, arch, seed=0, in_channels=args.image_shape[0])
    batches = synthetic_loader(args.n_train, args.batch_size, 0, device, args.channels_last, args.image_shape)
    timing = dict(steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    note = ""
    if method == "cuda_graph":
        stepper = GraphStepper(v, device, amp_dtype, args.channels_last, args.batch_size)
        t0 = time.perf_counter()
        stepper.capture(batches)
        note = f"captured after 3 eager steps in {time.perf_counter() - t0:.1f} s"
        windows, warm_s = time_windows(lambda: stepper(*next(batches)), device, **timing)
    else:
        stepper = Stepper(v, device, amp_dtype, args.channels_last)
        if method == "compile":
            stepper.forward = torch.compile(stepper.model)
        elif method == "compile_cudagraphs":
            stepper.forward = torch.compile(stepper.model, mode="reduce-overhead")
        # compilation happens in the first warm-up steps: at least 2 so a recompile is outside too
        if method != "eager":
            timing["warmup"] = max(2, timing["warmup"])
        windows, warm_s = time_windows(lambda: stepper(*next(batches)), device, **timing)
        if method != "eager":
            note = f"warm-up incl. compilation {warm_s:.1f} s"
    return _timed_row(arch, variant, method, 1, args.batch_size, windows, warm_s, _timing_name(device), note)


def bench_stacked(args, arch: str, variant: str, device: torch.device, amp_dtype, graph: bool = False) -> dict:
    from msr.training.stacked import StackedSeeds

    k = args.k
    noise = args.stacked_noise
    stacked = StackedSeeds(variant, list(range(k)), depth=parse_arch(arch), num_classes=NUM_CLASSES,
                           in_channels=args.image_shape[0], device=device, amp_dtype=amp_dtype, noise_rng=noise)
    loaders = [synthetic_loader(args.n_train, args.batch_size, i, device, False, args.image_shape) for i in range(k)]
    xs = torch.empty((k, args.batch_size, *args.image_shape), device=device)
    ys = torch.empty((k, args.batch_size), dtype=torch.long, device=device)

    def load() -> None:
        bx, by = zip(*(next(it) for it in loaders), strict=True)
        torch.stack(bx, out=xs)
        torch.stack(by, out=ys)

    note = f"{k} seeds, vmap; noise {noise}; contiguous (not channels_last)"
    if not graph:
        def step() -> None:
            load()
            stacked.step(xs, ys)
    else:
        # as msr train --cuda-graph (GraphedStep): warm-up on a side stream, then one capture
        graphed = GraphedStep(stacked.train_step, generators=stacked._generators if noise == "per_model" else ())
        t0 = time.perf_counter()
        for _ in range(graphed.warmup + 1):  # the warm-up steps, then the capture and a first replay
            load()
            graphed(xs, ys)
        note += f"; captured after {graphed.warmup} eager steps in {time.perf_counter() - t0:.1f} s"

        def step() -> None:
            load()
            graphed(xs, ys)

    windows, warm_s = time_windows(step, device, args.steps, args.warmup, args.repeats)
    return _timed_row(arch, variant, "stacked_graph" if graph else "stacked", k, args.batch_size, windows, warm_s,
                      _timing_name(device), note)


# ---- K processes
def _worker(spec: dict) -> int:
    """One of the K processes: warm up, say ready, wait for go, time, report one JSON line."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_dtype = getattr(torch, spec["amp"]) if spec["amp"] else None
    shape = tuple(spec["image_shape"])
    v = _build_variant(spec["variant"], spec["arch"], seed=spec["seed"], in_channels=shape[0])
    batches = synthetic_loader(spec["n_train"], spec["batch_size"], spec["seed"], device, spec["channels_last"], shape)
    if spec.get("graph"):  # each process's step as one CUDA graph (msr train --cuda-graph)
        stepper = GraphStepper(v, device, amp_dtype, spec["channels_last"], spec["batch_size"])
        stepper.capture(batches)
    else:
        stepper = Stepper(v, device, amp_dtype, spec["channels_last"])
    for _ in range(spec["warmup"]):
        stepper(*next(batches))
    _sync(device)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    windows = []
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        for _ in range(spec["steps"]):
            stepper(*next(batches))
        _sync(device)
        windows.append((time.perf_counter() - t) / spec["steps"])
    end = time.monotonic()
    print(json.dumps({"start": start, "end": end, "windows": windows}), flush=True)
    return 0


class _Proc:
    def __init__(self, spec: dict):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "msr", "bench", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout] + [self.lines.put(None)], daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()

    def line(self, deadline: float) -> str:
        try:
            got = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"worker {self.p.pid} did not answer in time") from None
        if got is None:
            self.p.wait(timeout=30)
            tail = "".join(self.err).strip().splitlines()
            raise RuntimeError(f"worker exited with status {self.p.returncode}: {tail[-1] if tail else 'no message'}")
        return got.strip()


def bench_processes(args, arch: str, variant: str, device: torch.device, amp_dtype, graph: bool = False) -> dict:
    k = args.k
    threads = max(1, torch.get_num_threads() // k) if device.type == "cpu" else 1
    base = dict(arch=arch, variant=variant, device=str(device), amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
                channels_last=args.channels_last, batch_size=args.batch_size, n_train=args.n_train, threads=threads,
                image_shape=list(args.image_shape), graph=graph,
                warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    procs = [_Proc({**base, "seed": i}) for i in range(k)]
    deadline = time.monotonic() + args.worker_timeout
    try:
        for p in procs:
            if p.line(deadline) != "ready":
                raise RuntimeError("worker said something other than ready")
        for p in procs:  # all start timing together
            p.p.stdin.write("go\n")
            p.p.stdin.flush()
        results = [json.loads(p.line(deadline)) for p in procs]
        for p in procs:
            p.p.wait(timeout=60)
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    images = k * args.batch_size * args.steps * args.repeats
    per_proc = statistics.median(statistics.median(r["windows"]) for r in results)
    return _row(arch, variant, "processes_graph" if graph else "processes", k, ms_per_step=1e3 * per_proc, images_per_s=images / span,
                timing="wall (perf_counter + synchronize)", windows_ms=[1e3 * statistics.median(r["windows"]) for r in results],
                note=f"{k} processes x {threads} thread(s){', each a CUDA graph' if graph else ''}; ms/step per process, img/s all together")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def bench_method(args, arch: str, variant: str, method: str, device: torch.device, amp_dtype) -> dict:
    models = args.k if method in ("processes", "processes_graph", "stacked", "stacked_graph") else 1
    if method in CUDA_ONLY and device.type != "cuda":
        return _row(arch, variant, method, models, status="not available on cpu", note="needs CUDA")
    if method == "compile" and device.type == "cpu" and not args.compile_on_cpu:
        return _row(arch, variant, method, models, status="skipped",
                    note="on a CPU compiling costs 20-40 s and is no faster; --compile-on-cpu runs it")
    try:
        if method in ("processes", "processes_graph"):
            return bench_processes(args, arch, variant, device, amp_dtype, graph=method == "processes_graph")
        if method in ("stacked", "stacked_graph"):
            return bench_stacked(args, arch, variant, device, amp_dtype, graph=method == "stacked_graph")
        return bench_single(args, arch, variant, method, device, amp_dtype)
    except Exception as e:  # one method failing (e.g. a capture on an untried GPU) must not lose the table
        traceback.print_exc(file=sys.stderr)
        return _row(arch, variant, method, models, status="failed", note=_first_line(e))
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def environment(device: torch.device, amp_dtype, args) -> dict:
    env = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
        "precision": "bf16" if amp_dtype else "fp32", "channels_last": args.channels_last, "batch_size": args.batch_size,
        "image_shape": list(args.image_shape),
        "steps_per_window": args.steps, "windows": args.repeats, "warmup_steps": args.warmup, "k": args.k,
        "hostname": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


def run_table(args, device: torch.device, log=print) -> dict:
    amp_dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"environment": environment(device, amp_dtype, args), "rows": []}
    for arch in args.arch:
        for variant in args.variant:
            eager_ips = None
            for method in args.methods:
                row = bench_method(args, arch, variant, method, device, amp_dtype)
                if method == "eager" and row["status"] == "ok":
                    eager_ips = row["images_per_s"]
                if row["status"] == "ok" and eager_ips:
                    row["speedup_vs_eager"] = row["images_per_s"] / eager_ips
                result["rows"].append(row)
                log(format_row(row))
                if args.json:
                    atomic.write_json(args.json, result)  # after every row: a cut-short run keeps what it measured
    return result


# =========================================================================== command line
def parse_image_shape(text: str | tuple) -> tuple[int, int, int]:
    """``"1,28,28"`` -> (1, 28, 28): channels, height, width of the synthetic images."""
    if isinstance(text, tuple):
        return text
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 4:
        raise ValueError(f"--image-shape {text!r}: give C,H,W with C >= 1 and H, W >= 4, e.g. 1,28,28 (Fashion-MNIST) or 3,32,32 (CIFAR)")
    return shape


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args) -> int:
    """``msr bench`` (msr.cli.tools parses its options): check them, then print the table or
    the data-path report. Bad options are one line on stderr and exit status 2."""
    if args.worker:
        return _worker(json.loads(args.worker))
    args.channels_last = not args.no_channels_last
    try:
        archs, methods = list(args.arch), list(args.methods)
        variants = list(args.variant or (["msr_noise"] if args.data_path else ["bn", "msr_noise"]))
        for a in archs:
            parse_arch(a)
        for v in variants:
            catalog.check_variant(v)
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; valid methods: {', '.join(METHODS)}")
        if not archs or not variants or not methods:
            raise ValueError("--arch, --variant and --methods need at least one entry each")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        if min(args.batch_size, args.steps, args.repeats) < 1 or args.warmup < 0:
            raise ValueError("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
        if args.k is not None and args.k < 1:
            raise ValueError("--k must be >= 1")
        args.image_shape = parse_image_shape(args.image_shape)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = _resolve_device(args.device)
        if args.data_path:
            if len(archs) != 1 or len(variants) != 1:
                raise ValueError("--data-path reports one arch and one variant")
            args.arch, args.variant = archs[0], variants[0]
            result = run_data_path(args)
            print(format_data_path(result))
            if args.json:
                atomic.write_json(args.json, result)
            return 0
        if args.k is None:
            args.k = 4 if device.type == "cuda" else max(1, min(4, len(os.sched_getaffinity(0))))
        args.arch, args.variant, args.methods = archs, variants, methods
        print(format_environment(environment(device, torch.bfloat16 if device.type == "cuda" and not args.fp32 else None, args)))
        print(TABLE_HEADER, flush=True)
        run_table(args, device, log=lambda line: print(line, flush=True))
    except (ValueError, msr_data.DatasetError) as e:
        print(f"msr bench: error: {e}", file=sys.stderr)
        return 2
    return 0


"""``msr bench``: training-step throughput, measured - never asserted in a timed test.

Reports, for one arch / variant / batch size / device:
- images/s of msr's loop (device-resident uint8 data, batched on-device crop + flip);
- the same model and step fed the conventional way - a torchvision-style ``Dataset`` of PIL
  images with ``RandomCrop(padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``
  per sample, through a ``DataLoader`` with worker processes - and the ratio of the two;
- the time of the variant's gradient modification (ZMG / cmrr) per step, and of its noise
  modules (forward + backward, each timed alone on the shapes of a real step), as shares of
  the step.

The data is synthetic and CIFAR-shaped by default, so the benchmark runs anywhere offline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from msr import data as msr_data
from msr import io as msr_io
from msr.method import BlockInputNoise
from msr.models import parse_arch
from msr.variants import VARIANTS, Variant, build


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
    """One training step of a variant, shared by both loops so only the data path differs."""

    def __init__(self, variant: Variant, device: torch.device, amp_dtype, channels_last: bool):
        self.variant, self.device, self.amp_dtype = variant, device, amp_dtype
        self.model = variant.model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.opt = torch.optim.SGD(variant.param_groups(), momentum=0.9, fused=device.type == "cuda" or None)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = F.cross_entropy(self.model(x).float(), y)
        loss = loss + self.variant.extra_loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.variant.after_backward()
        self.opt.step()


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


def run_bench(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None
    channels_last = not args.no_channels_last
    if args.dataset == "synthetic":
        ds = msr_data.load_dataset(
            "synthetic", args.data_root,
            synthetic_kwargs=dict(n_train=args.n_train, n_test=100, channels=3, image_size=32, num_classes=10, seed=0),
        )
        # CIFAR's augmentation, so both loops do the work a CIFAR run does
        ds.flip, ds.crop_padding = True, 4
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


def format_result(r: dict) -> str:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="msr bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--variant", default="msr_noise", help=f"one of {', '.join(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dataset", default="synthetic", help="synthetic (CIFAR-shaped, default), digits, cifar10, cifar100")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--n-train", type=int, default=5000, help="synthetic training images")
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional loop")
    p.add_argument("--no-conventional", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    try:
        if args.variant not in VARIANTS:
            raise ValueError(f"unknown variant {args.variant!r}; valid variants: {', '.join(VARIANTS)}")
        parse_arch(args.arch)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        if min(args.batch_size, args.steps, args.repeats) < 1 or args.warmup < 0:
            raise ValueError("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
        result = run_bench(args)
    except (ValueError, msr_data.DatasetError) as e:
        print(f"msr bench: error: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.out:
        msr_io.write_json(args.out, result)
    return 0



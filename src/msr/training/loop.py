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

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msr import atomic
from msr.training.config import RunConfig
from msr.training.existing import already_complete, check_existing
from msr.training.probes import grad_norm
from msr.training.run import Run
from msr.training.rundir import CONFIG, SUMMARY, RunDirError, RunLock


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
        return already_complete(cfg, out, log)
    created = not out.exists()
    lock = RunLock(out).acquire()
    try:
        if (out / SUMMARY).exists():  # finished by the previous holder just now
            return already_complete(cfg, out, log)
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
    check_existing(out, record, log)
    resumed = run.try_resume()  # checks the files first: a refused directory is left as it was
    atomic.write_json(out / CONFIG, record)
    if resumed:
        log(f"{out}: resuming after epoch {run.epoch} (step {run.step})")
    else:
        run.probe()

    cfg_str = f"{cfg.dataset}/{cfg.arch}/{cfg.variant} seed {cfg.seed} on {run.device} ({run.threads} threads, {run.precision})"
    warm = f", warm-up {run.warmup.steps} steps" if run.warmup.steps else ""
    log(f"training {cfg_str}: {cfg.epochs} epochs x {len(run.train_loader)} steps, lr {run.base_lr:.6g} "
        f"(x{run.lr_factor:.6g} of the variant's){warm}; evaluated on the {cfg.eval_split} split")
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
            f"{'val' if cfg.eval_split == 'validation' else 'test'} loss {test_loss:.4f} acc {test_acc:.4f} | "
            f"{seconds:.1f}s {m['images_per_s']:.0f} img/s"
        )
        (tqdm.write if show_bar else log)(line)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs:
            return {"status": "interrupted", "epochs_completed": epoch}

    run.wall_seconds = time.perf_counter() - wall_start
    run.write_progress()
    summary = run.summary(status, diverged_at)
    atomic.write_json(out / SUMMARY, summary)
    log(
        f"{out}: {status}; final {'validation' if cfg.eval_split == 'validation' else 'test'} acc "
        f"{summary['final_test_acc']:.4f} after {run.epoch} epochs"
        + (f" (diverged at step {diverged_at})" if diverged_at else "")
    )
    return summary

"""One training run, from a resolved config to a run directory (docs/architecture.md, "The run directory").

    <out>/config.json    resolved config, versions, device, machine (msr.machine)
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
from tqdm.auto import tqdm

from msr import atomic
from msr.training.config import RunConfig
from msr.training.distributed import (
    Distributed,
    DistributedError,
    announce,
    first_bad_step,
    sum_over_ranks,
)
from msr.training.existing import already_complete, check_existing
from msr.training.run import Run
from msr.training.rundir import CONFIG, SUMMARY, RunDirError, RunLock


def train(cfg: RunConfig, out: str | Path, *, log=print, progress: bool | None = None, stop_after_epoch: int | None = None,
          dist: Distributed | None = None) -> dict[str, Any]:
    """Train one run into ``out`` and return its summary (the existing one if already complete).

    Holds ``out``'s lock while it writes: a second writer fails at once (RunDirError naming
    the holder). A full disk is a RunDirError too. ``stop_after_epoch`` ends the
    process-equivalent early, leaving a checkpoint as a killed job would (used by tests of
    resume).

    ``dist``: this process's rank in a data-parallel run (msr.training.distributed; the process
    group already joined), or None. Rank 0 runs this function as a single process would and
    tells the other ranks what it decided; they train alongside and never write (:func:`_follow`).
    """
    cfg.validate()
    out = Path(out)
    if dist is not None and not dist.is_main:
        return _follow(cfg, out, dist, progress=progress, stop_after_epoch=stop_after_epoch)
    leader = _Leader(dist)
    try:
        if (out / SUMMARY).exists():
            return leader.tell("complete", already_complete(cfg, out, log, dist))
        created = not out.exists()
        lock = RunLock(out).acquire()
        try:
            if (out / SUMMARY).exists():  # finished by the previous holder just now
                return leader.tell("complete", already_complete(cfg, out, log, dist))
            return _train_locked(cfg, out, log=log, progress=progress, stop_after_epoch=stop_after_epoch,
                                 leader=leader)
        except atomic.NoSpaceError as err:
            raise RunDirError(str(err)) from None
        finally:
            lock.release()
            if created:
                try:
                    out.rmdir()  # only if nothing was written (e.g. the dataset failed to load)
                except OSError:
                    pass
    except BaseException as err:
        leader.fail(err)
        raise


class _Leader:
    """Rank 0's one announcement to the other ranks of a data-parallel run (nothing without
    one): ``("go", resumed)``, ``("complete", summary)`` or ``("error", message)``."""

    def __init__(self, dist: Distributed | None):
        self.dist, self.told = dist, False

    def tell(self, kind: str, payload: Any) -> Any:
        if self.dist is not None and not self.told:
            self.told = True
            announce(self.dist, (kind, payload))
        return payload

    def fail(self, err: BaseException) -> None:
        if self.dist is not None and not self.told:
            self.tell("error", f"{type(err).__name__}: {err}")


def _follow(cfg: RunConfig, out: Path, dist: Distributed, *, progress: bool | None, stop_after_epoch: int | None) -> dict[str, Any]:
    """A rank other than 0: wait for rank 0's decision, then train the same steps on its shard.
    Reads the checkpoint to resume; creates and writes nothing."""
    kind, payload = announce(dist)
    if kind == "complete":
        return payload
    if kind == "error":
        raise DistributedError(f"rank 0 stopped: {payload}")
    run = Run(cfg, out, log=_quiet, dist=dist)
    if payload:  # resumed: rank 0 checked the files
        run.restore_checkpoint()
    return _loop(run, log=_quiet, progress=False, stop_after_epoch=stop_after_epoch, resumed=payload)


def _quiet(*_args, **_kwargs) -> None:
    pass


def _train_locked(cfg: RunConfig, out: Path, *, log, progress: bool | None, stop_after_epoch: int | None,
                  leader: _Leader) -> dict[str, Any]:
    run = Run(cfg, out, log=log, dist=leader.dist)
    record = run.config_record()
    check_existing(out, record, log)
    resumed = run.try_resume()  # checks the files first: a refused directory is left as it was
    atomic.write_json(out / CONFIG, record)
    leader.tell("go", resumed)
    return _loop(run, log=log, progress=progress, stop_after_epoch=stop_after_epoch, resumed=resumed)


def _loop(run: Run, *, log, progress: bool | None, stop_after_epoch: int | None, resumed: bool) -> dict[str, Any]:
    """The epochs. In a data-parallel run every rank steps; rank 0 alone probes, evaluates and
    writes, and the ranks agree on an epoch's sums and its first non-finite step at its end."""
    cfg, out, dist = run.cfg, run.out, run.dist
    main = dist is None or dist.is_main
    if resumed:
        log(f"{out}: resuming after epoch {run.epoch} (step {run.step})")
    elif main:
        run.probe()

    cfg_str = f"{cfg.dataset}/{cfg.arch}/{cfg.variant} seed {cfg.seed} on {run.device} ({run.threads} threads, {run.precision})"
    if dist is not None:
        cfg_str += f", {dist.world_size} data-parallel processes"
    warm = f", warm-up {run.warmup.steps} steps" if run.warmup.steps else ""
    log(f"training {cfg_str}: {cfg.epochs} epochs x {len(run.train_loader)} steps, lr {run.base_lr:.6g} "
        f"(x{run.lr_factor:.6g} of the variant's){warm}; evaluated on the {cfg.eval_split} split")
    show_bar = sys.stderr.isatty() if progress is None else progress
    opt = run.optimizer
    step = run.make_step()  # forward, loss, backward, the variant's hook, update (msr.training.step)
    status, diverged_at = "completed", None
    wall_start = time.perf_counter() - run.wall_seconds
    # on CUDA a host sync per step costs throughput: find the first non-finite loss on the
    # device and look at it once per epoch; on CPU checking every step is free. Data-parallel
    # ranks must stop together: they agree once an epoch, after its last step (0: no check).
    check_every = 1 if run.device.type == "cpu" else max(1, len(run.train_loader))
    if dist is not None:
        check_every = 0

    while run.epoch < cfg.epochs and status == "completed":
        epoch = run.epoch + 1
        run.train_loader.set_epoch(epoch)
        epoch_lr = opt.param_groups[0]["lr"]
        run.model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=run.device)
        correct = torch.zeros((), device=run.device, dtype=torch.long)
        seen = 0
        first_bad = torch.full((), -1, device=run.device, dtype=torch.long)
        bar = tqdm(run.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not show_bar, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            probing = main and (run.step + 1) % cfg.probe_every == 0
            res = step(x, y, inspect=probing)  # inspected: the grad norm of the update it applied
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(res.total), run.step + 1, first_bad)
            if check_every and (i + 1) % check_every == 0 and first_bad.item() >= 0:
                # the diverged step was applied, but nothing records it: only finished epochs
                # are written, and the model is never saved again
                break
            run.step += 1
            loss_sum += res.loss * len(y)
            correct += (res.logits.argmax(1) == y).sum()
            seen += len(y)
            if probing:
                run.probe(res.inspected)
        bar.close()
        if dist is not None:  # the global batch's numbers: every rank's shard, summed
            first_bad = first_bad_step(first_bad)
            sums = sum_over_ranks(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=run.device)]))
            loss_sum, correct, seen = sums[0], sums[1].long(), int(sums[2].item())
        if first_bad.item() >= 0:
            status, diverged_at = "diverged", int(first_bad.item())
            run.train_seconds += time.perf_counter() - t0  # the partial epoch's steps count too
            run.images_seen += seen
            run.step = diverged_at - 1  # steps actually completed with a finite loss
            run.probes = [r for r in run.probes if r[0] <= run.step]
            log(f"epoch {epoch}: loss became non-finite at step {diverged_at}: run diverged")
            break
        train_time = time.perf_counter() - t0
        run.epoch = epoch
        if main:
            if cfg.eval_every is None or epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                test_loss, test_acc = run.evaluate(run.test_loader)
                clean_loss, clean_acc = run.evaluate(run.clean_train_loader)
            else:  # skipped (eval_every): recorded as NaN, never as a number
                test_loss = test_acc = clean_loss = clean_acc = math.nan
            if run.probes and run.probes[-1][0] != run.step:
                run.probe()  # the grad norm is measured at probe steps only, never carried over
        run.scheduler.step()
        seconds = time.perf_counter() - t0
        run.train_seconds += train_time
        run.images_seen += seen
        run.wall_seconds = time.perf_counter() - wall_start
        if main:
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
    summary = None
    if main:
        run.write_progress()
        summary = run.summary(status, diverged_at)
        atomic.write_json(out / SUMMARY, summary)
        log(
            f"{out}: {status}; final {'validation' if cfg.eval_split == 'validation' else 'test'} acc "
            f"{summary['final_test_acc']:.4f} after {run.epoch} epochs"
            + (f" (diverged at step {diverged_at})" if diverged_at else "")
        )
    if dist is not None:
        summary = announce(dist, summary)
    return summary

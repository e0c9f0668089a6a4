"""K seeds of one run trained stacked in one process (msr.training.stacked), into K standard run
directories: ``msr train --stacked --seeds 0,1,2 --out 'runs/.../seed{seed}'``.

Each seed's directory is what ``msr train --seed <k>`` writes - config.json, metrics.csv,
probes.csv, summary.json, checkpoint.pt, held under its own lock - and it trains the same model
(to float tolerance on a CPU: tests/test_stacked_train.py). The pieces that make that so:

- Each seed is a :class:`msr.training.run.Run` (its data order, loaders, probes, evaluation, files,
  schedule), built as the run would build it; its model is then stacked
  (``StackedSeeds.of_variants``) and stays a view of the stack, so evaluating, probing and
  saving it is the run's own code. Its noise comes from its own generator, started where the
  run's noise would start.
- One step (msr.training.step) trains all K; the learning rate is each run's own scheduler's
  (they are identical: same config but the seed), copied into the stacked optimizer.
- A checkpoint is the run's own format: its model (copied out of the stack), the optimizer's
  momentum for its model (a slice of the stacked state), its noise generator's state as the
  run's RNG state. So a stacked run resumes stacked, and ``msr train --seed k`` can resume it too.
- A model whose loss turns non-finite ends as ``diverged`` in its own directory, as a run
  would; the others go on (no tensor mixes models).

Seeds whose directory is complete are skipped; the rest must be all fresh or all after the same
epoch (they resume together). ``--cuda-graph`` captures the stacked step (the noise generators
are registered with the graph). Stacked runs use no channels-last layout (the 5-D stacked
tensors have none); their config.json says so (``channels_last: false``) and records
``train_path: stacked`` and the group's seeds: a separate run with ``--no-channels-last`` is the
one they equal to float tolerance on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from msr import atomic
from msr.training.config import ConfigError, RunConfig
from msr.training.existing import already_complete, check_existing
from msr.training.run import Run, _rng_state, load_run_dataset
from msr.training.rundir import CONFIG, SUMMARY, RunDirError, RunLock
from msr.training.stacked import StackedSeeds, noise_generator
from msr.training.step import GraphedStep

# everything but these may differ between the stacked runs: nothing (they are one config)
_PER_SEED = ("seed",)


class SeedRun(Run):
    """One seed of a stacked group: a run whose model is a view of the stack, whose noise comes
    from its own generator, and whose optimizer state lives in the stacked optimizer."""

    def __init__(self, cfg: RunConfig, out: Path, log=print, *, dataset=None, group: Sequence[int] = ()):
        super().__init__(cfg, out, log, dataset=dataset)
        # the noise this run draws starts here (nothing random runs between this and training)
        self.generator = noise_generator(self.device)
        self.group = list(group)
        self.stacked: StackedSeeds | None = None
        self.index = 0

    @property
    def train_path(self) -> str:
        return "stacked_cuda_graph" if self.cfg.cuda_graph else "stacked"

    def config_record(self) -> dict[str, Any]:
        return {**super().config_record(), "stacked_seeds": self.group}

    def restore_rng(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["cpu" if self.device.type == "cpu" else "cuda"])

    def model_state(self) -> dict[str, Any]:
        assert self.stacked is not None
        i, stacked = self.index, self.stacked
        # copies: a view would save the whole stack's storage
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        opt = self.optimizer.state_dict()  # this run's groups and lrs, the stack's momentum
        state, index = {}, 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                buf = stacked.optimizer.state.get(stacked.params[names[id(p)]], {}).get("momentum_buffer")
                if buf is not None:
                    state[index] = {"momentum_buffer": buf[i].detach().clone()}
                index += 1
        opt["state"] = state
        rng = _rng_state(self.device)
        rng["cpu" if self.device.type == "cpu" else "cuda"] = self.generator.get_state()
        return {"model": model, "optimizer": opt, "rng": rng}


def _check_group(cfgs: Sequence[RunConfig], outs: Sequence[Path]) -> None:
    if not cfgs:
        raise ConfigError("seeds: at least one seed to train")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds}: each seed once")
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise ConfigError("--out: each seed needs its own run directory (put {seed} in the path)")
    first = {k: v for k, v in vars(cfgs[0]).items() if k not in _PER_SEED}
    for c in cfgs[1:]:
        diff = [k for k, v in vars(c).items() if k not in _PER_SEED and first[k] != v]
        if diff:
            raise ConfigError(f"stacked seeds share one config; seed {c.seed} differs in {', '.join(diff)}")
    if cfgs[0].compile:
        raise ConfigError("compile: not with stacked seeds (vmap over a compiled model is not supported here)")
    if cfgs[0].precision == "fp16":
        raise ConfigError("precision=fp16: stacked seeds need no loss scaling: use bf16 or fp32")


def train_stacked(cfgs: Sequence[RunConfig], outs: Sequence[str | Path], *, log=print, progress: bool | None = None,
                  stop_after_epoch: int | None = None) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (one config, several seeds) stacked, into ``outs``; return their
    summaries in order (an already complete run's own). Each directory is locked while written;
    ``stop_after_epoch`` stops early as a killed job would (tests of resume)."""
    if any(c.channels_last for c in cfgs):
        # the stacked 5-D tensors have no channels-last layout; record what the runs really use
        log("stacked seeds: channels_last off (the stacked tensors are contiguous)")
        cfgs = [dataclasses.replace(c, channels_last=False) for c in cfgs]
    for c in cfgs:
        c.validate()
    outs = [Path(o) for o in outs]
    _check_group(cfgs, outs)
    summaries: dict[int, dict[str, Any]] = {}
    for i, (cfg, out) in enumerate(zip(cfgs, outs, strict=True)):
        if (out / SUMMARY).exists():
            summaries[i] = already_complete(cfg, out, log)
    todo = [i for i in range(len(cfgs)) if i not in summaries]
    locks, created = [], []
    try:
        for i in todo:
            created.append((outs[i], not outs[i].exists()))
            locks.append(RunLock(outs[i]).acquire())
        for i in list(todo):
            if (outs[i] / SUMMARY).exists():  # finished by the previous holder just now
                summaries[i] = already_complete(cfgs[i], outs[i], log)
                todo.remove(i)
        if todo:
            done = _train_locked([cfgs[i] for i in todo], [outs[i] for i in todo], log=log, progress=progress,
                                 stop_after_epoch=stop_after_epoch)
            summaries.update(zip(todo, done, strict=True))
    except atomic.NoSpaceError as err:
        raise RunDirError(str(err)) from None
    finally:
        for lock in locks:
            lock.release()
        for out, new in created:
            if new:
                try:
                    out.rmdir()  # only if nothing was written
                except OSError:
                    pass
    return [summaries[i] for i in range(len(cfgs))]


def _load_momentum(stacked: StackedSeeds, runs: Sequence[SeedRun]) -> None:
    """Resumed runs: their optimizers (loaded from their checkpoints) hold each model's momentum;
    the stacked optimizer gets them stacked."""
    per_run = [{n: run.optimizer.state.get(p, {}).get("momentum_buffer") for n, p in run.model.named_parameters()} for run in runs]
    for name, leaf in stacked.params.items():
        bufs = [state[name] for state in per_run]
        if all(b is None for b in bufs):
            continue
        if any(b is None for b in bufs):
            raise RunDirError(f"{runs[0].out.parent}: the checkpoints of the stacked seeds disagree on {name}'s momentum; "
                              "resume them one by one with msr train")
        stacked.optimizer.state[leaf]["momentum_buffer"] = torch.stack([b.to(leaf.device) for b in bufs])
    for run in runs:
        run.optimizer.state.clear()  # the stack holds it from now on


def _set_lr(stacked: StackedSeeds, run: Run) -> None:
    """The runs' schedule (each run's own scheduler, identical for all) into the stacked optimizer."""
    for mine, theirs in zip(stacked.optimizer.param_groups, run.optimizer.param_groups, strict=True):
        mine["lr"] = theirs["lr"]


def _train_locked(cfgs: Sequence[RunConfig], outs: Sequence[Path], *, log, progress: bool | None,
                  stop_after_epoch: int | None) -> list[dict[str, Any]]:
    cfg = cfgs[0]
    dataset = load_run_dataset(cfg)
    seeds = [c.seed for c in cfgs]
    runs = [SeedRun(c, out, log=log, dataset=dataset, group=seeds) for c, out in zip(cfgs, outs, strict=True)]
    for run in runs:
        check_existing(run.out, run.config_record(), log)
    resumed = [run.try_resume() for run in runs]  # checks each directory before anything is written
    if len({run.epoch for run in runs}) > 1:
        where = ", ".join(f"{run.out} after epoch {run.epoch}" for run in runs)
        raise RunDirError(f"stacked seeds resume together, but the runs stopped at different epochs ({where}); "
                          "finish them one by one with msr train")
    for run in runs:
        atomic.write_json(run.out / CONFIG, run.config_record())
    stacked = StackedSeeds.of_variants([r.variant for r in runs], [r.generator for r in runs], seeds=seeds,
                                       lr=runs[0].base_lr, momentum=cfg.momentum, device=runs[0].device,
                                       amp_dtype=runs[0].amp_dtype)
    for i, run in enumerate(runs):
        run.stacked, run.index = stacked, i
    if any(resumed):
        _load_momentum(stacked, runs)
        log(f"{len(runs)} stacked seeds {seeds}: resuming after epoch {runs[0].epoch} (step {runs[0].step})")
    else:
        for run in runs:
            run.probe()
    _set_lr(stacked, runs[0])
    step = GraphedStep(stacked.train_step, generators=stacked._generators) if cfg.cuda_graph else stacked.train_step

    device, k = runs[0].device, len(runs)
    log(f"training {cfg.dataset}/{cfg.arch}/{cfg.variant} seeds {seeds} stacked on {device} "
        f"({runs[0].threads} threads, {runs[0].precision}): {cfg.epochs} epochs x {len(runs[0].train_loader)} steps, "
        f"lr {runs[0].base_lr}")
    show_bar = sys.stderr.isatty() if progress is None else progress
    check_every = 1 if device.type == "cpu" else max(1, len(runs[0].train_loader))
    active = list(range(k))  # runs still training (not diverged)
    summaries: dict[int, dict[str, Any]] = {}
    wall_start = [time.perf_counter() - run.wall_seconds for run in runs]

    def finish(j: int, status: str, diverged_at: int | None) -> None:
        run = runs[j]
        run.wall_seconds = time.perf_counter() - wall_start[j]
        run.write_progress()
        summaries[j] = run.summary(status, diverged_at)
        atomic.write_json(run.out / SUMMARY, summaries[j])
        log(f"{run.out}: {status}; final test acc {summaries[j]['final_test_acc']:.4f} after {run.epoch} epochs"
            + (f" (diverged at step {diverged_at})" if diverged_at else ""))

    while active and runs[active[0]].epoch < cfg.epochs:
        epoch = runs[active[0]].epoch + 1
        for run in runs:
            run.train_loader.set_epoch(epoch)
        epoch_lr = runs[active[0]].optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device, dtype=torch.long)
        seen = 0
        first_bad = torch.full((k,), -1, device=device, dtype=torch.long)
        loaders = zip(*(run.train_loader for run in runs), strict=True)
        bar = tqdm(loaders, total=len(runs[0].train_loader), desc=f"epoch {epoch}/{cfg.epochs} x{k}", leave=False,
                   disable=not show_bar, dynamic_ncols=True)
        step_now = runs[active[0]].step
        for i, batches in enumerate(bar):
            xs = torch.stack([b[0] for b in batches])
            ys = torch.stack([b[1] for b in batches])
            probing = (step_now + 1) % cfg.probe_every == 0
            res = step(xs, ys, inspect=probing)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(res.total), step_now + 1, first_bad)
            if (i + 1) % check_every == 0:
                bad = [j for j in active if first_bad[j].item() >= 0]
                for j in bad:  # as the loop does for one run: the epoch's steps count, nothing else
                    run = runs[j]
                    diverged_at = int(first_bad[j].item())
                    run.train_seconds += time.perf_counter() - t0
                    run.images_seen += seen
                    run.step = diverged_at - 1
                    run.probes = [r for r in run.probes if r[0] <= run.step]
                    log(f"{run.out}: epoch {epoch}: loss became non-finite at step {diverged_at}: run diverged")
                    active.remove(j)
                    finish(j, "diverged", diverged_at)
                if not active:
                    break
            step_now += 1
            loss_sum += res.loss * ys.shape[1]
            correct += (res.logits.argmax(-1) == ys).sum(1)
            seen += ys.shape[1]
            for j in active:
                runs[j].step = step_now
                if probing:
                    runs[j].probe(res.inspected[j])
        bar.close()
        if not active:
            break
        train_time = time.perf_counter() - t0
        losses, accs = (loss_sum / max(seen, 1)).tolist(), (correct.float() / max(seen, 1)).tolist()
        for j in active:
            run = runs[j]
            test_loss, test_acc = run.evaluate(run.test_loader)
            clean_loss, clean_acc = run.evaluate(run.clean_train_loader)
            run.epoch = epoch
            if run.probes and run.probes[-1][0] != run.step:
                run.probe()
            with warnings.catch_warnings():
                # this run's optimizer never steps (the stacked one does): the schedule is right
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                run.scheduler.step()
            run.train_seconds += train_time
            run.images_seen += seen
            run.metrics.append({
                "epoch": epoch, "step": run.step, "lr": epoch_lr,
                "train_loss": losses[j], "train_acc": accs[j],
                "clean_train_loss": clean_loss, "clean_train_acc": clean_acc,
                "test_loss": test_loss, "test_acc": test_acc,
                "seconds": math.nan,  # filled in below: the epoch's wall time with every model's evaluation
                "images_per_s": seen / train_time if train_time > 0 else math.nan,
            })
        _set_lr(stacked, runs[active[0]])
        seconds = time.perf_counter() - t0
        for j in active:
            run = runs[j]
            run.metrics[-1]["seconds"] = seconds
            run.wall_seconds = time.perf_counter() - wall_start[j]
            run.write_progress()
            run.save_checkpoint()
        line = " | ".join(f"seed {runs[j].cfg.seed} loss {losses[j]:.4f} test acc {runs[j].metrics[-1]['test_acc']:.4f}" for j in active)
        (tqdm.write if show_bar else log)(f"epoch {epoch:>3}/{cfg.epochs} step {step_now:>6} lr {epoch_lr:.4g} {line} | {seconds:.1f}s")
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs:
            return [summaries.get(j, {"status": "interrupted", "epochs_completed": runs[j].epoch}) for j in range(k)]

    for j in list(active):
        finish(j, "completed", None)
    return [summaries[j] for j in range(k)]

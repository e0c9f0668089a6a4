"""The learning-rate warm-up a variant may ask for (``VariantSpec.warmup``, ``warmup_from``).

The step decay at the milestones stays torch's ``MultiStepLR``, stepped once per epoch by the
loop. The warm-up acts per optimizer step, so it rides on the optimizer itself: a step pre-hook
multiplies every group's scheduled lr by the warm-up factor and the post-hook puts the scheduled
values back. The training loop needs no line for it, the scheduler never sees a warmed value,
and every group keeps its ratio to the conv group (as Fixup's official trainer scales its
scalar groups alike).

Linear: at the t-th optimizer step (t = 0, 1, ...) the conv group's lr is
``from + (lr - from) t / T`` for t < T, then ``lr``; ``T`` = ``warmup`` x the run's steps
(at least 1). No warm-up when ``warmup`` is 0 or the run's conv lr is at most ``from``.
"""

from __future__ import annotations

import torch


class LinearWarmup:
    """Linear warm-up of every param group over the first ``steps`` optimizer steps, from
    ``start`` x the scheduled lr up to it. ``done`` counts the steps applied (set it on resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, start: float):
        if steps < 0 or not 0.0 <= start <= 1.0:
            raise ValueError(f"warm-up of {steps} steps from {start} x the lr: need steps >= 0 and 0 <= start <= 1")
        self.steps, self.start, self.done = int(steps), float(start), 0
        self._scheduled: list[float] | None = None
        if self.steps > 0:
            optimizer.register_step_pre_hook(self._before_step)
            optimizer.register_step_post_hook(self._after_step)

    @classmethod
    def for_run(cls, optimizer: torch.optim.Optimizer, *, fraction: float, from_lr: float, lr: float,
                total_steps: int) -> LinearWarmup:
        """The warm-up of a run whose conv group starts at ``lr``, over ``fraction`` of its
        ``total_steps``, from a conv lr of ``from_lr``; none when there is nothing to warm up."""
        if fraction <= 0 or lr <= from_lr:
            return cls(optimizer, 0, 1.0)
        return cls(optimizer, max(1, round(fraction * total_steps)), from_lr / lr)

    def factor(self, t: int) -> float:
        """The multiplier of the scheduled lr at the ``t``-th optimizer step (0-based)."""
        return self.start + (1.0 - self.start) * t / self.steps if t < self.steps else 1.0

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.done >= self.steps:
            return
        factor = self.factor(self.done)
        self._scheduled = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._scheduled is not None:
            for group, lr in zip(optimizer.param_groups, self._scheduled, strict=True):
                group["lr"] = lr
            self._scheduled = None
        self.done += 1

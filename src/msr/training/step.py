"""One training step, shared by every path that trains: ``msr train`` (eager), its CUDA graph
(``--cuda-graph``), K seeds stacked in one process (msr.training.stacked), the bench
(msr.infra.bench) and data-parallel training.

A step is, in this order and nowhere else written down::

    logits, loss, total = objective.forward_loss(x, y)   # forward (autocast), cross-entropy, + extra loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()                       # (K,) totals of stacked models: their sum
    scaler.unscale_(optimizer)                           # fp16 only: the hook must see true gradients
    reduce_grads()                                       # optional: the place for a gradient all-reduce
    objective.after_backward()                           # the variant's hook (ZMG, cmrr, AGC)
    inspect()                                            # optional: e.g. the grad norm the update applies
    scaler.step(optimizer); scaler.update()              # the optimizer step (lr set by the scheduler)

- ``reduce_grads`` runs between backward and the variant's hook: a data-parallel run averages
  the gradients of its ranks there, so the hook (ZMG projects *the* gradient) sees the gradient
  of the global batch, exactly as a single process at that batch would.
- The step holds no learning-rate logic: whoever owns the schedule writes the optimizer's
  ``param_groups[i]["lr"]`` between steps (a ``torch.optim.lr_scheduler``).
- It never syncs with the host: divergence (a non-finite ``total``) is the caller's to look at,
  when it chooses to (every step on a CPU, once an epoch on a GPU).

:class:`GraphedStep` captures a whole :class:`TrainStep` as one CUDA graph (PyTorch's
"whole-network capture"): the batch is copied into static tensors and the graph replayed. The
learning rates the graph reads are device tensors that follow the schedule: before each replay
every group's current ``lr`` (a float the scheduler keeps writing, as in the eager step) is
copied into its tensor when it changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from msr.core.variants import Variant


@dataclass
class StepResult:
    """What one step leaves, detached: per model for stacked models (a leading dim of K)."""

    logits: torch.Tensor  # (B, classes), or (K, B, classes)
    loss: torch.Tensor  # the data loss (cross-entropy, mean over the batch): () or (K,)
    total: torch.Tensor  # loss + the variant's extra loss, what backward differentiated: () or (K,)
    inspected: torch.Tensor | None = None  # what ``inspect`` returned (when asked for)


class Objective(Protocol):
    """What a step trains: one model (:class:`OneModel`) or K stacked ones (StackedSeeds)."""

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, data loss, total loss) in train mode."""
        ...

    def after_backward(self) -> None:
        """The variant's gradient modification, in place, on true (unscaled) gradients."""
        ...


class OneModel:
    """The objective of one model: its forward under autocast, cross-entropy on float32 logits,
    plus the variant's extra loss (unity decay); the variant's gradient hook.

    ``forward`` is the model or a compiled version of it. Autocast keeps no weight-cast cache
    (``cache_enabled=False``): each weight is cast once per forward anyway, and a cache must not
    outlive a CUDA-graph capture.
    """

    def __init__(self, variant: Variant, *, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device_type: str = "cpu", amp_dtype: torch.dtype | None = None):
        self.variant = variant
        self.forward = forward if forward is not None else variant.model
        self.device_type, self.amp_dtype = device_type, amp_dtype

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None, cache_enabled=False):
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
        return logits, loss, loss + self.variant.extra_loss()

    def after_backward(self) -> None:
        self.variant.after_backward()


class TrainStep:
    """forward, loss, backward, [reduce_grads], the variant's hook, [inspect], optimizer step.

    ``scaler``: a ``torch.amp.GradScaler`` (fp16) or None. ``reduce_grads``: called after
    backward, before the hook (a data-parallel all-reduce). ``inspect``: called after the hook,
    before the update, on steps that ask for it (``step(x, y, inspect=True)``); its result is
    ``StepResult.inspected`` - the trainer measures the grad norm the update applies there.
    """

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *,
                 scaler: torch.amp.GradScaler | None = None,
                 reduce_grads: Callable[[], None] | None = None,
                 inspect: Callable[[], torch.Tensor] | None = None):
        self.objective, self.optimizer, self.scaler = objective, optimizer, scaler
        self.reduce_grads, self.inspect = reduce_grads, inspect

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, inspect: bool = False) -> StepResult:
        logits, loss, total = self.objective.forward_loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        # K stacked models: the sum of their losses, so model i's gradient is its own loss's
        objective = total if total.dim() == 0 else total.sum()
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        else:
            objective.backward()
        if self.reduce_grads is not None:
            self.reduce_grads()
        self.objective.after_backward()
        seen = self.inspect() if inspect and self.inspect is not None else None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return StepResult(logits.detach(), loss.detach(), total.detach(), seen)


# --------------------------------------------------------------------------- the CUDA graph
def capture(body: Callable[[], object], load_next: Callable[[], None], zero_grad: Callable[[], None],
            warmup: int = 3, generators: Sequence[torch.Generator] = ()) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, body's output): ``warmup`` real steps on a side stream (cuDNN autotune, lazily
    made optimizer state), then ``body`` captured once (not run: the first replay runs it).

    Grads are set to None first, so the capture's backward allocates the gradient tensors every
    replay refills (not accumulates into). ``generators``: non-default CUDA generators the body
    draws from (per-model noise), registered so each replay advances them as eager calls would;
    the default generator needs nothing.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            load_next()
            zero_grad()
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    zero_grad()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


class GraphedStep:
    """A :class:`TrainStep` as one CUDA graph, called like the step it wraps.

    The first ``warmup`` calls run the eager step on a side stream (real training steps on real
    batches); the next call captures the step on static input tensors and replays it, and so
    does every later call (a copy of the batch into the static tensors, then ``replay()``).
    Every replay runs ``inspect`` too (a few kernels), so probing needs no second graph; the
    caller reads ``inspected`` when it wants it. The result is the graph's static outputs:
    read them before the next call.

    The lr: each param group's ``lr`` stays the float the scheduler writes (checkpoints are
    the eager step's); the captured optimizer step reads a device tensor per group instead,
    refreshed from that float before every replay when it changed - so MultiStepLR, a warm-up,
    anything that sets ``param_groups[i]["lr"]`` between steps reaches the graph. Needs a fused
    optimizer (``torch.optim.SGD(fused=True)``: takes a tensor lr without a host sync).

    Not for fp16 (the GradScaler's step syncs with the host) or a compiled forward.
    """

    def __init__(self, step: TrainStep, *, warmup: int = 3, generators: Sequence[torch.Generator] = ()):
        groups = step.optimizer.param_groups
        device = next(p.device for g in groups for p in g["params"])
        if device.type != "cuda":
            raise ValueError("a CUDA graph needs a CUDA device")
        if step.scaler is not None and step.scaler.is_enabled():
            raise ValueError("a CUDA graph cannot capture fp16 loss scaling (its step syncs with the host); use bf16 or fp32")
        if not step.optimizer.defaults.get("fused"):
            raise ValueError("a CUDA graph needs a fused optimizer (SGD(fused=True)) to read the lr from the device")
        self.step, self.warmup, self.generators = step, warmup, list(generators)
        self.device = device
        self._lr = [torch.tensor(float(g["lr"]), device=device) for g in groups]
        self._lr_set = [float(g["lr"]) for g in groups]
        self._warm = 0
        self._side: torch.cuda.Stream | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.out: StepResult | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _sync_lr(self) -> None:
        for i, g in enumerate(self.step.optimizer.param_groups):
            lr = float(g["lr"])
            if lr != self._lr_set[i]:
                self._lr[i].fill_(lr)  # on the replay's stream: ordered before it
                self._lr_set[i] = lr

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        # warm-up on a side stream, as capture wants it (cuDNN autotune, optimizer state)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            out = self.step(x, y, inspect=True)
        current.wait_stream(self._side)
        return out

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x = torch.empty_like(x)  # keeps x's memory format (channels_last)
        self.static_y = torch.empty_like(y)
        groups = self.step.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, t in zip(groups, self._lr, strict=True):
            g["lr"] = t  # the captured update reads the tensor ...
        try:
            self.graph, self.out = capture(
                lambda: self.step(self.static_x, self.static_y, inspect=True), lambda: None,
                lambda: self.step.optimizer.zero_grad(set_to_none=True), warmup=0, generators=self.generators,
            )
        finally:
            for g, lr in zip(groups, floats, strict=True):
                g["lr"] = lr  # ... the scheduler and the checkpoints keep the float

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, inspect: bool = True) -> StepResult:
        if self.graph is None:
            if self._warm < self.warmup:
                self._warm += 1
                return self._eager(x, y)
            self._capture(x, y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise ValueError(f"a captured step takes batches of one shape: {tuple(self.static_x.shape)}, got {tuple(x.shape)}")
        self._sync_lr()
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.out
